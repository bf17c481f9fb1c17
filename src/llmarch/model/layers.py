"""Building blocks: normalisation, rotary embeddings and activation functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeConfig

# ----------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without a call into torch when it already is (decoding makes hundreds of
    these calls a token, each a few microseconds of dispatch even when it does nothing)."""
    return t if t.dtype == dtype else t.to(dtype)


def rms_normalize(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis of float32 x: ``F.rms_norm``'s arithmetic,
    step for step (so the same bits), in five operations. Outside autograd and compilation,
    where its CPU composite spends about a third more on its own dispatch (a decoding step runs
    100+ norms); otherwise ``F.rms_norm`` itself."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.rms_norm(xf, xf.shape[-1:], eps=eps)
    return xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()


class RMSNorm(nn.Module):
    """RMSNorm computed in float32.

    ``unit_offset``: the stored weight w is applied as (1 + w) (Gemma).
    ``weight_fp32``: multiply by the weight in float32 and cast afterwards (Gemma, OLMo 2);
    otherwise cast the normalised activations first, then multiply (Llama, Qwen).
    """

    param_component = "norms"

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False, weight_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight_fp32 = weight_fp32
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self._scale: tuple[tuple, torch.Tensor] | None = None  # inference cache of scale()

    def scale(self) -> torch.Tensor:
        """What the normalised activations are multiplied by: w or 1 + w, in float32 with
        ``weight_fp32``. Kept between calls while no gradient is recorded (decoding runs
        every norm once per token), recomputed when the weight changes."""
        w = self.weight
        if not (self.unit_offset or self.weight_fp32):
            return w
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a compiled graph computes it in place
            w = w.float() if self.weight_fp32 else w
            return 1.0 + w if self.unit_offset else w
        key = (w._version, w.data_ptr(), w.dtype)
        if self._scale is None or self._scale[0] != key:
            v = w.detach().float() if self.weight_fp32 else w.detach()
            self._scale = (key, 1.0 + v if self.unit_offset else v)
        return self._scale[1]

    def rescale(self, h: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 activations ``h`` -> the output in ``dtype``, times the scale."""
        scale = self.scale() if scale is None else scale
        if not torch.is_grad_enabled() and scale.dtype == (h.dtype if self.weight_fp32 else dtype):
            # h is a temporary: scale it in place (same dtypes, so the same result); the casts
            # are skipped where there is nothing to cast (a few microseconds each, 100+ a token)
            return as_dtype(h.mul_(scale), dtype) if self.weight_fp32 else as_dtype(h, dtype).mul_(scale)
        if self.weight_fp32:
            return (h * scale).to(dtype)
        return h.to(dtype) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rescale(rms_normalize(as_dtype(x, torch.float32), self.eps), x.dtype)


class L2Norm(nn.Module):
    """Weightless RMS normalisation (Llama 4's QK-norm)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x.float(), self.eps).type_as(x)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm_kind == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_weight_fp32)


# ----------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------


def rope_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin multiplier for one RoPE configuration.

    Implements the default, linear, llama3 and YaRN rules as published (the same formulas as
    Hugging Face's ``modeling_rope_utils``).
    """
    base = float(rope.theta)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = rope.scaling or {}
    kind = rope.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(s["factor"]), 1.0
    if kind == "llama3":
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = s.get("original_max_position_embeddings") or max_position_embeddings
        factor = s.get("factor")
        factor = float(factor) if factor is not None else max_position_embeddings / orig

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = s.get("attention_factor")
        if attn_factor is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn_factor = get_mscale(factor, m) / get_mscale(factor, m_all) if (m and m_all) else get_mscale(factor)
        beta_fast = s.get("beta_fast") or 32
        beta_slow = s.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, float(attn_factor)
    raise ValueError(f"unsupported rope type {kind!r}")


class Rotary(nn.Module):
    """cos/sin tables for one RoPE configuration, computed for the positions of a forward.

    Keeps no buffers (so the model can be built on the meta device and loaded by assignment);
    the inverse frequencies are cached per device.
    """

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.dim = dim
        self.max_pos = max_position_embeddings
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if device not in self._cache:
            inv, factor = rope_frequencies(self.rope, self.dim, self.max_pos)
            self._cache[device] = (inv.to(device), factor)
        return self._cache[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1, T, dim) in ``dtype``.

        ``sin`` comes with its first half negated, so that :func:`apply_rope` rotates with one
        ``roll``."""
        inv, factor = self.inv_freq(positions.device)
        freqs = positions.float()[..., None] * inv  # (B, T, dim/2)
        cos, sin = freqs.cos() * factor, freqs.sin() * factor
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): the interleaved RoPE layout as halves.

    Queries and keys go through the same permutation, so their dot products, and hence the
    attention output, are those of the interleaved rotation.
    """
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE in the "halves" layout: x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1).

    With ``sin`` from :class:`Rotary` (first half negated) this is x * cos + roll(x, dim/2) * sin,
    the same numbers in one op instead of three."""
    if interleaved:
        x = deinterleave(x)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ----------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------


def activation_fn(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")
