"""Faster CPU inference: linear layers whose weights are pre-packed for oneDNN.

Decoding one token multiplies a single row by every weight matrix, so its speed is the
speed of reading the weights. ``F.linear`` on CPU re-lays-out ("reorders") the weight into
oneDNN's blocked format on every call, which costs about as much as the product itself;
packing each weight once (as ``torch.compile``'s freezing pass does) roughly halves the
time of a bfloat16 decode step. In bfloat16 the results are bit-identical to ``F.linear``
(both are the same oneDNN kernel); in float32 they differ in the last bits.

    model = llmarch.from_pretrained(path, dtype=torch.bfloat16)
    llmarch.inference.packed.pack_linears(model)   # in place; for inference

A packed layer keeps its original weight (so ``state_dict``, export and training are
unchanged) plus the packed copy, re-packed if the weight is modified in place; while
autograd records it falls back to ``F.linear``.

Beside the model, not inside it: :func:`pack_linears` swaps modules of a built model for
inference versions that override the model's seams, keeping every parameter (and so every
``state_dict`` name) where it is:

* ``nn.Linear`` -> :class:`PackedLinear`;
* ``Attention`` -> :class:`PackedAttention`: q, k and v from one packed product
  (:class:`FusedLinears`: one product instead of three reads the weights at a higher
  bandwidth and saves the per-call overhead; decoding Gemma 3 270M in bfloat16 here: 12%
  faster, Qwen2.5 0.5B: up to 5%), queries and keys normed and rotated in one pass, and a
  decoding step's attention by :func:`single_query_attention`;
* ``GLU`` -> :class:`PackedGLU`: gate and up as one packed product;
* MoE ``Experts`` -> :class:`PackedExperts`: every expert's matrices pre-packed;
* ``RMSNorm`` -> :class:`PackedRMSNorm`: one native call per norm (``llmarch.inference.native``)
  where the kernels are built (a decoding step of Gemma 3 270M runs 91 norms);
* ``Decoder`` -> :class:`PackedDecoder`: a decoding step's layers in one native call where they
  are all of the kinds it runs (``llmarch.inference.step``: int8 / int4 projections, ...).

The separate layers of a fused group stay unpacked (they are packed lazily, on first use),
so the fused copy replaces their packed copies rather than adding to them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.decoder import Decoder
from ..model.ffn import GLU
from ..model.layers import RMSNorm, apply_rope, rms_normalize
from ..model.moe import Experts
from . import native
from .device import release_free_memory, resident_bytes
from .quant import FusedInt8

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of ``dtype`` on this CPU: bfloat16 needs AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT, so on an AVX2 CPU a bfloat16 model keeps ``F.linear`` (probed once)."""
    if dtype not in PACKABLE_DTYPES or not packing_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


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
        self._version: tuple = ()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        if w.is_meta:
            if self._packed is None:
                raise RuntimeError(RELEASED)
            return self._packed
        key = (w._version, w.data_ptr())  # changed in place, or converted / moved by .to()
        if self._packed is None or self._version != key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._version = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)) or not packable(self.weight.dtype):
            if self.weight.is_meta:
                raise RuntimeError(RELEASED)
            return F.linear(x, self.weight, self.bias)  # autograd, or a dtype oneDNN cannot pack here
        lead = x.shape[:-1]
        b = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight(), b, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FusedLinears:
    """Linear layers of one module that read the same input, computed as one packed product.

    Not an ``nn.Module`` (it owns no parameters; the layers stay where they are, for
    ``state_dict`` and training): stored on the module, re-packed when any of the layers'
    weights changes (in place, by ``.to()`` or by replacement)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        self.module = module
        self.names = names
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._layers: list[nn.Module] = []
        self._sources: list[torch.Tensor] = []
        self._key: tuple = ()

    def _weights(self) -> list[torch.Tensor]:
        return [getattr(self.module, n).weight for n in self.names]

    def usable(self, x: torch.Tensor) -> bool:
        if not packable(x.dtype):  # converted to a dtype oneDNN cannot pack on this CPU: the layers apart
            return False
        if not torch.is_grad_enabled():
            return True
        return not x.requires_grad and not any(w.requires_grad for w in self._weights())

    def _pack(self) -> None:
        layers = [getattr(self.module, n) for n in self.names]
        if any(m.weight.is_meta for m in layers):
            raise RuntimeError(RELEASED)
        with torch.no_grad():
            w = torch.cat([m.weight.detach() for m in layers])
            b = None
            if any(m.bias is not None for m in layers):
                b = torch.cat([m.bias.detach() if m.bias is not None else w.new_zeros(m.weight.shape[0]) for m in layers])
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(w, 1), b)
        self._layers = layers
        self._sources = [m.weight for m in layers]
        self._key = self._source_key()

    def pack_now(self) -> None:
        if self._packed is None:
            self._pack()

    def sources_released(self) -> None:
        """The layers' weights were swapped for meta tensors after packing: keep the packing."""
        self._sources = [m.weight for m in self._layers]
        self._key = self._source_key()

    def _source_key(self) -> tuple:
        return tuple((w._version, w.data_ptr()) for w in self._sources)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """All the layers' outputs side by side (..., sum of out_features)."""
        # cheap staleness check on the hot path: the weights packed last time, changed in place
        # or converted (.to()); a replaced layer is caught by comparing the objects
        modules = self.module._modules
        if self._packed is None or self._source_key() != self._key or any(
            modules[n] is not m or m.weight is not w for n, m, w in zip(self.names, self._layers, self._sources)
        ):
            self._pack()
        w, b = self._packed
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def fused_output(module: nn.Module, group: str, x: torch.Tensor) -> torch.Tensor | None:
    """The outputs of ``module``'s fused linear group ``group`` on ``x``, side by side, or
    None when the module has none (not packed) or autograd needs the separate layers."""
    fused = _fused(module).get(group)
    if fused is None or not fused.usable(x):
        return None
    return fused(x)


RELEASED = (
    "this model was packed for inference with its plain weights released (llmarch.inference.generate.load / "
    "pack_linears(release=True)): it cannot train, export or be converted; load it with "
    "llmarch.from_pretrained for that"
)


def release_parameter(module: nn.Module, name: str) -> None:
    """Replace parameter ``name`` by a meta tensor of the same shape (frees its memory)."""
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def fuse(module: nn.Module, group: str, names: tuple[str, ...]) -> None:
    """Give ``module`` the fused group ``group`` of its layers ``names``, when all are packable
    float layers (:class:`FusedLinears`) or all int8 layers of one input width
    (:class:`~llmarch.inference.quant.FusedInt8`); otherwise (an int4 layer among them, say)
    each runs on its own."""
    layers = [getattr(module, n) for n in names]
    if all(type(m) is PackedLinear for m in layers):
        module.__dict__.setdefault("_fused", {})[group] = FusedLinears(module, names)
    elif FusedInt8.fusable(layers):
        module.__dict__.setdefault("_fused", {})[group] = FusedInt8(module, names)


def _fused(module: nn.Module) -> dict[str, FusedLinears]:
    """The fused linear groups of a packed module (stored outside ``_modules``: they own no parameters)."""
    return module.__dict__.get("_fused", {})


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------


def head_norms(qk: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, n_q: int) -> torch.Tensor:
    """``q_norm`` on the first ``n_q`` heads of qk (B, heads, T, D) and ``k_norm`` on the rest,
    in one pass: the same numbers as the two norms apart (the norm is per head)."""
    table = _head_table(q_norm, k_norm, n_q, qk.shape[1])
    return q_norm.rescale(rms_normalize(qk.float(), q_norm.eps), qk.dtype, table[:, None])


def _head_table(q_norm: RMSNorm, k_norm: RMSNorm, n_q: int, heads: int) -> torch.Tensor:
    """(heads, D): ``q_norm``'s scale on the first ``n_q`` rows, ``k_norm``'s on the rest; kept
    on ``q_norm`` (outside its state_dict) while both scales stay the same tensors."""
    qs, ks = q_norm.scale(), k_norm.scale()
    memo = q_norm.__dict__.get("_head_table")
    if memo is None or memo[0] is not qs or memo[1] is not ks or memo[2].shape[0] != heads:
        d = qs.shape[-1]
        memo = (qs, ks, torch.cat((qs.expand(n_q, d), ks.expand(heads - n_q, d))))
        q_norm.__dict__["_head_table"] = memo
    return memo[2]


def _native_norm(norm: RMSNorm, dtype: torch.dtype, scale: torch.Tensor) -> bool:
    """Whether ``norm`` with this scale runs in the native kernel for activations of ``dtype``:
    outside autograd and compilation, the scale in float32 (``weight_fp32``) or in the
    activations' dtype (the product ``RMSNorm.rescale`` computes)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and scale.dtype == (torch.float32 if norm.weight_fp32 else dtype))


class PackedRMSNorm(RMSNorm):
    """:class:`RMSNorm` for CPU inference: one native call (:func:`llmarch.inference.native.rms_norm`)
    instead of nine torch operations, where the kernels are built; the same parameters."""

    #: what llmarch.inference.step runs natively in place of this class's forward (not a subclass's)
    native_step_kind = "rms_norm"

    def prepare_packing(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        if x.device.type == "cpu" and _native_norm(self, x.dtype, scale):
            y = native.rms_norm(x.reshape(-1, x.shape[-1]), scale, self.weight_fp32, self.eps)
            if y is not None:
                return y.view(x.shape)
        return super().forward(x)


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one new token per sequence (decoding), q (B, H, 1, D), k/v (B, KV, S, D).

    Two small matrix products in float32, the query heads grouped by the KV head they share.
    On CPU this is several times faster than SDPA's kernels for a single query, above all in
    bfloat16, and it is as precise as SDPA (scores and softmax in float32).
    """
    if not torch.compiler.is_compiling():
        out = native.attend_one(q, k, v, mask, scale)  # one call where the native kernels are built
        if out is not None:
            return out
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = q.float().reshape(b, kv, h // kv, d) @ k.float().transpose(-1, -2) * scale  # (B, KV, H/KV, S)
    if mask is not None:
        scores = scores + mask.float()  # (B, 1, 1, S)
    out = scores.softmax(-1) @ v.float()
    return out.reshape(b, h, 1, v.shape[-1]).to(q.dtype)


class PackedAttention(Attention):
    """:class:`Attention` for CPU inference (the same parameters, the same results)."""

    native_step_kind = "attention"  # see PackedRMSNorm

    def prepare_packing(self) -> None:
        if self.kv_source is None:  # a KV-shared layer projects queries only
            fuse(self, "qkv", ("q_proj", "k_proj", "v_proj"))

    def project(self, x: torch.Tensor):
        y = fused_output(self, "qkv", x)
        if y is None:
            return super().project(x)
        kv = self.num_kv_heads * self.head_dim
        return y.split((self.num_heads * self.head_dim, kv, kv), dim=-1)

    def qkv_heads(self, x: torch.Tensor, rope):
        y = fused_output(self, "qkv", x) if self.qk_norm in ("none", "head") else None
        if y is None:
            return super().qkv_heads(x, rope)
        # queries and keys take the same per-head steps (head norm, RoPE): one tensor, one pass
        h, kv = self.num_heads, self.num_kv_heads
        qk, v = y.split(((h + kv) * self.head_dim, kv * self.head_dim), dim=-1)
        qk = self.split_heads(qk)
        done = self._native_norm_rope(qk, rope)
        if done is not None:
            qk = done
        else:
            if self.qk_norm == "head":
                qk = head_norms(qk, self.q_norm, self.k_norm, h)
            if self.use_rope:
                qk = apply_rope(qk, *rope, self.rope_interleaved)
        q, k = qk.split((h, kv), dim=1)
        return q, k, self.values(v)

    def _native_norm_rope(self, qk: torch.Tensor, rope) -> torch.Tensor | None:
        """The head norms and RoPE of one token's queries and keys qk (1, heads, 1, D) in one
        native call (``llmarch_rms_norm`` with RoPE), or None: several tokens, nothing to do, the
        interleaved RoPE layout, or no native kernels."""
        b, heads, t, d = qk.shape
        norm = self.qk_norm == "head"
        if b * t != 1 or not (norm or self.use_rope) or (self.use_rope and self.rope_interleaved):
            return None
        table, scale_f32, eps = None, False, 0.0
        if norm:
            table = _head_table(self.q_norm, self.k_norm, self.num_heads, heads)
            if not _native_norm(self.q_norm, qk.dtype, table):
                return None
            scale_f32, eps = self.q_norm.weight_fp32, self.q_norm.eps
        elif torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        cs = None
        if self.use_rope:
            cos, sin = rope
            if cos.numel() != d:
                return None
            cs = (cos.reshape(d), sin.reshape(d))
        y = native.rms_norm(qk.view(heads, d), table, scale_f32, eps, rope=cs, normalize=norm)
        return None if y is None else y.view(b, heads, t, d)

    def attend(self, q, k, v, mask, causal) -> torch.Tensor:
        if q.shape[2] == 1 and self.logit_softcap is None:
            return single_query_attention(q, k, v, mask, self.scale)
        return super().attend(q, k, v, mask, causal)


# ----------------------------------------------------------------------------------------
# Feed-forward and experts
# ----------------------------------------------------------------------------------------


class PackedGLU(GLU):
    """:class:`GLU` whose gate and up projections run as one packed product."""

    native_step_kind = "glu"  # see PackedRMSNorm

    def prepare_packing(self) -> None:
        fuse(self, "gate_up", ("gate_proj", "up_proj"))

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = fused_output(self, "gate_up", x)
        if y is None:
            return super().gate_and_up(x)
        return y.split(self.up_proj.out_features, dim=-1)


class PackedExperts(Experts):
    """Routed experts with every expert's weights pre-packed for oneDNN.

    ``F.linear`` re-lays-out a weight on every call, which for an expert's few dozen tokens
    costs about as much as the product; packed experts skip that. Costs a second copy of the
    expert weights (unless released); training (autograd) keeps using the plain weights.
    Prefills run expert by expert (never the padded batched product), in the reference's
    summation order, so bfloat16 results equal transformers' to the last bit."""

    def prepare_packing(self) -> None:
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._packed_version: tuple = ()
        self.pack_weights()

    def pack_weights(self) -> None:
        if self.gate_up_proj.device.type != "cpu" or not packable(self.gate_up_proj.dtype):
            return
        reorder = torch.ops.mkldnn._reorder_linear_weight
        with torch.no_grad():
            self._packed = [
                (reorder(self.gate_up_proj[e].detach().contiguous(), 1), reorder(self.down_proj[e].detach().contiguous(), 1))
                for e in range(self.gate_up_proj.shape[0])
            ]
        self._packed_version = self._weights_version()

    def release_weights(self) -> None:
        """Free the stacked weights once every expert is packed (see :func:`release_weights`)."""
        if self._packed is None:
            return
        release_parameter(self, "gate_up_proj")
        release_parameter(self, "down_proj")
        self._packed_version = self._weights_version()

    def _weights_version(self) -> tuple:
        g, d = self.gate_up_proj, self.down_proj
        return (g._version, d._version, g.data_ptr(), d.data_ptr(), g.dtype)

    def _use_packed(self, x: torch.Tensor) -> bool:
        if self.gate_up_proj.is_meta and self._packed is not None:
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError(RELEASED)
            return True
        if self._packed is None or torch.is_grad_enabled() or x.dtype != self.gate_up_proj.dtype:
            return False
        if self._packed_version != self._weights_version():
            self.pack_weights()  # weights changed (in place or by .to()) since packing
        return True

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self._use_packed(x):
            return super().expert(e, x)
        gu, dn = self._packed[e]
        linear = torch.ops.mkldnn._linear_pointwise
        gate, up = linear(x, gu, None, "none", [], "").split(self.width, dim=-1)
        return linear(self.act(gate) * up, dn, None, "none", [], "")

    def run_batched(self, x: torch.Tensor, counts: torch.Tensor) -> bool:
        return not self._use_packed(x) and super().run_batched(x, counts)


# ----------------------------------------------------------------------------------------
# The decoder: a decoding step's layers in one native call
# ----------------------------------------------------------------------------------------


class PackedDecoder(Decoder):
    """:class:`Decoder` whose decoding steps (one sequence, one token, a cache) run every layer
    in one native call where the layers allow it (:mod:`llmarch.inference.step`); the same
    parameters, and otherwise the same forward."""

    def prepare_packing(self) -> None:
        pass

    #: in a forward of this many rows or more (a prefill), after a layer that left the process
    #: ``release_growth`` bytes above the most it held before in this forward, the C allocator's
    #: freed memory goes back to the system (:func:`llmarch.inference.device.release_free_memory`,
    #: about a millisecond). Otherwise a first forward after loading puts each layer's
    #: temporaries in other holes of the heap the load left, and every page they touched stays
    #: resident: Gemma 3 270M, a 34-token prompt, 16-50 MB more at the peak, varying from run to
    #: run. Measured against the forward's own high-water mark, not the last release: after every
    #: layer, the next one faults the same temporaries' pages in again (a 512-token prefill a
    #: fifth slower).
    release_min_rows = 32
    release_growth = 2 << 20

    def hidden_states(self, input_ids, positions=None, cache=None):
        if cache is not None and input_ids.numel() == 1:
            from . import step

            x = step.decode(self, input_ids, positions, cache)
            if x is not None:
                return self.norm(x)
        if self._releases(input_ids.numel(), input_ids.device):
            self._resident = resident_bytes()
        return super().hidden_states(input_ids, positions, cache)

    def _releases(self, rows: int, device: torch.device) -> bool:
        """Whether a forward of ``rows`` rows returns freed memory (never inside a compiled graph:
        reading /proc would break it; a decoding step never reaches the check)."""
        return rows >= self.release_min_rows and device.type == "cpu" and not torch.compiler.is_compiling()

    def after_layer(self, x: torch.Tensor) -> None:
        if not self._releases(x.numel() // x.shape[-1], x.device):
            return
        mark = self.__dict__.get("_resident", 0)
        now = resident_bytes()
        if now - mark > self.release_growth:
            release_free_memory()
        self._resident = max(mark, now)


# the model's modules and their inference versions (subclasses: the same parameters)
PACKED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    Attention: PackedAttention, GLU: PackedGLU, Experts: PackedExperts, RMSNorm: PackedRMSNorm,
    Decoder: PackedDecoder,
}


# ----------------------------------------------------------------------------------------
# Packing a model, releasing its plain weights
# ----------------------------------------------------------------------------------------


def release_weights(model: nn.Module) -> nn.Module:
    """Free the plain copy of every weight that a packed layer serves (see :func:`pack_linears`).

    Packs everything first. Afterwards the model runs inference exactly as before with about
    half the memory of its linear layers, and refuses (with :data:`RELEASED`) to train. Weights
    read directly by their module (``reads_weights``: MLA's absorbed decode, AltUp's
    coefficient clipping) and the embedding (also the tied head) are kept."""
    for mod in model.modules():
        keep = set(getattr(mod, "reads_weights", ()))
        groups = _fused(mod).values()
        fused = {n for f in groups for n in f.names}
        for f in groups:
            f.pack_now()
        for name, child in mod.named_children():
            if type(child) is not PackedLinear or name in keep or "weight" not in child._parameters:
                continue
            if name not in fused:
                child.packed_weight()
            release_parameter(child, "weight")
            if child.bias is not None:
                child.bias.requires_grad_(False)
        for f in groups:
            f.sources_released()
        if isinstance(mod, PackedExperts):
            mod.release_weights()
    return model


def pack_linears(model: nn.Module, release: bool = False) -> nn.Module:
    """Prepare a CPU model for inference, in place: every ``nn.Linear`` (and a tied output head)
    becomes a :class:`PackedLinear`, and attention, gated FFNs and MoE experts become their
    packed versions (:data:`PACKED_CLASSES`). A no-op where oneDNN is unavailable or for other
    dtypes/devices; float layers of a dtype oneDNN cannot pack on this CPU (:func:`packable`) stay
    ``nn.Linear``. ``release``: then free the plain weights (:func:`release_weights`), for a
    model that only runs inference."""
    p = next(model.parameters())
    if not packing_available() or p.device.type != "cpu" or p.dtype not in PACKABLE_DTYPES:
        return model
    pack = packable(p.dtype)  # else (bfloat16 on an AVX2 CPU) the float layers stay as they are
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and pack:
                setattr(mod, child_name, PackedLinear.from_linear(child))
    for mod in model.modules():
        packed = PACKED_CLASSES.get(type(mod))
        if packed is not None:
            mod.__class__ = packed  # a subclass adding no parameters: state_dict and training unchanged
            mod.prepare_packing()
    if pack and getattr(model, "lm_head", False) is None and hasattr(model, "embed"):
        model.lm_head = PackedLinear(model.embed.weight, own_weight=False)
    return release_weights(model) if release else model
