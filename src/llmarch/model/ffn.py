"""Feed-forward networks: the gated FFN (SwiGLU, GeGLU) and the plain MLP (GPT-2).

:func:`make_ffn` builds a layer's dense FFN from the config: its kind (``ffn_kind``), its
width (``intermediate_size``, or the layer's entry of ``intermediate_sizes``, MatFormer) and
its Gaussian top-k activation sparsity (the layer's entry of ``activation_sparsity``).
"""

from __future__ import annotations

import torch
from torch import nn

from .components import gaussian_topk
from .config import ModelConfig
from .layers import activation_fn

_GLU_NAMES = {"silu": "SwiGLU", "gelu_tanh": "GeGLU", "gelu": "GeGLU", "relu": "ReGLU"}
_ACT_NAMES = {"silu": "SiLU", "gelu_tanh": "GELU", "gelu": "GELU", "relu": "ReLU"}


def glu_name(activation: str) -> str:
    """SwiGLU, GeGLU, ... : what the article calls a gated FFN with this activation."""
    return _GLU_NAMES.get(activation, f"{activation}-GLU")


def sparsify(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """:func:`gaussian_topk` of pre-activations ``x``; x itself when ``sparsity`` is 0 (a dense layer)."""
    return gaussian_topk(x, sparsity) if sparsity > 0 else x


class GLU(nn.Module):
    """Gated FFN: down(act(gate(x)) * up(x)) -- SwiGLU with SiLU, GeGLU with GELU; with
    ``sparsity`` the gate goes through :func:`gaussian_topk` first (Gemma 3n)."""

    param_component = "dense FFN"

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = False, sparsity: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.activation = activation
        self.act = activation_fn(activation)
        self.sparsity = sparsity

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of x (one fused product in ``llmarch.inference.packed``)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down_proj(self.act(sparsify(gate, self.sparsity)) * up)

    def describe(self) -> dict:
        """The FFN in the article's terms (read by llmarch.analysis.modules); MoE layers add expert counts."""
        return dict(kind=glu_name(self.activation), width=self.up_proj.out_features, moe=False)


class MLP(nn.Module):
    """Plain two-layer FFN: down(act(up(x))) (GPT-2); ``sparsity`` as in :class:`GLU`, on up(x)."""

    param_component = "dense FFN"

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = True, sparsity: float = 0.0):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.activation = activation
        self.act = activation_fn(activation)
        self.sparsity = sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(sparsify(self.up_proj(x), self.sparsity)))

    def describe(self) -> dict:
        return dict(kind=f"{_ACT_NAMES.get(self.activation, self.activation)} MLP", width=self.up_proj.out_features, moe=False)


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The dense FFN of layer ``layer_idx``: its kind, width and activation sparsity from ``cfg``."""
    cls = MLP if cfg.ffn_kind == "mlp" else GLU
    return cls(cfg.hidden_size, cfg.layer_intermediate_size(layer_idx), cfg.activation, cfg.ffn_bias,
               cfg.layer_activation_sparsity(layer_idx))
