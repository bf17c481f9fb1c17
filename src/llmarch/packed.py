"""Faster CPU inference: linear layers whose weights are pre-packed for oneDNN.

Decoding one token multiplies a single row by every weight matrix, so its speed is the
speed of reading the weights. ``F.linear`` on CPU re-lays-out ("reorders") the weight into
oneDNN's blocked format on every call, which costs about as much as the product itself;
packing each weight once (as ``torch.compile``'s freezing pass does) roughly halves the
time of a bfloat16 decode step. In bfloat16 the results are bit-identical to ``F.linear``
(both are the same oneDNN kernel); in float32 they differ in the last bits.

    model = llmarch.from_pretrained(path, dtype=torch.bfloat16)
    llmarch.packed.pack_linears(model)   # in place; for inference

A packed layer keeps its original weight (so ``state_dict``, export and training are
unchanged) plus the packed copy, re-packed if the weight is modified in place; while
autograd records it falls back to ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``nn.Linear`` (y = x W^T + b) computed with a weight pre-packed for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, own_weight: bool = True):
        super().__init__()
        if own_weight:
            self.weight = weight
            self.bias = bias
        else:  # a tied head: the weight is registered by the embedding, not twice
            self.__dict__["weight"] = weight
            self.bias = None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._packed: torch.Tensor | None = None
        self._version = -1

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        if self._packed is None or self._version != w._version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._version = w._version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        b = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight(), b, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model (and a tied output head) by a
    :class:`PackedLinear`, in place. A no-op where oneDNN is unavailable or for other
    dtypes/devices."""
    p = next(model.parameters())
    if not packing_available() or p.device.type != "cpu" or p.dtype not in PACKABLE_DTYPES:
        return model
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, child_name, PackedLinear.from_linear(child))
    for mod in model.modules():  # stacked MoE experts pack each expert's matrices
        if hasattr(mod, "pack_weights"):
            mod.pack_weights()
    if getattr(model, "lm_head", False) is None and hasattr(model, "embed"):
        model.lm_head = PackedLinear(model.embed.weight, own_weight=False)
    return model
