"""Multi-head attention with grouped KV heads, QK-norm, RoPE/NoPE and full/sliding/chunked masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import FullCache, LayerCache, RingCache
from .config import ModelConfig
from .layers import L2Norm, RMSNorm, apply_rope


def attention_mask(
    qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, chunk: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive mask (B, 1, T, S) from query positions (B, T) and key positions (B, S).

    A key is visible when it is valid (position >= 0), not in the future, inside the sliding
    window (q - k < window) and in the same chunk (q // chunk == k // chunk). Returns None
    when every key is visible (no mask needed).
    """
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= (q - k) < window
    if chunk is not None:
        allowed &= torch.div(q, chunk, rounding_mode="floor") == torch.div(k, chunk, rounding_mode="floor")
    if q.shape[1] == 1 and not torch.compiler.is_compiling() and bool(allowed.all()):
        return None  # (a compiled graph keeps the mask: this test would read the tensor back)
    # a finite minimum (not -inf) keeps fully masked rows (padding queries) free of NaN
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def layer_mask(
    cache: LayerCache | None, qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, chunk: int | None, dtype
) -> torch.Tensor | None:
    """:func:`attention_mask` for the keys ``cache`` just returned, built once per forward for
    all the layers whose caches share a layout (see ``LayerCache.masks``)."""
    memo = cache.masks if cache is not None else None
    if memo is None:
        return attention_mask(qpos, kpos, window, chunk, dtype)
    key = (cache.layout(), window, chunk, dtype, tuple(qpos.shape))
    if key not in memo:
        if len(memo) > 64:  # entries of earlier forwards never match again (the layout moved on)
            memo.clear()
        memo[key] = attention_mask(qpos, kpos, window, chunk, dtype)
    return memo[key]


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float, cap: float
) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap) + mask) v (Gemma 2), scores written out: SDPA
    has no soft-cap. The softmax runs in float32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * (scale / cap)) * cap
    if causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).triu(s - t + 1)
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


# keys, values, key positions and cache of each layer whose K/V later layers reuse, filled in
# during one forward (KV sharing)
SharedKV = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, LayerCache | None]]


class Attention(nn.Module):
    """Softmax attention with grouped KV heads (MHA, GQA, MQA).

    Per layer, from the config: full, sliding-window or chunked span; RoPE or NoPE; the QK-norm
    kind; Llama 4's query temperature on NoPE layers; a weightless value norm (``v_norm``);
    and **KV sharing** (``num_kv_shared_layers``): a KV-shared layer has no key/value
    projections and no cache; it attends over the keys, values and key positions that its
    source layer (``cfg.layer_kv_source``) produced earlier in the same forward, after the
    source's cache update, handed over through the decoder's per-forward ``shared_kv`` store.

    ``project``, ``qkv_heads`` and ``attend`` are the steps that ``llmarch.inference.packed``
    replaces with faster kernels.
    """

    param_component = "attention"  # how llmarch.analysis.modules files this module's parameters

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.logit_softcap = cfg.attn_logit_softcap
        self.window = cfg.layer_window(layer_idx)
        self.chunk = cfg.layer_chunk(layer_idx)
        self.use_rope = cfg.layer_uses_rope(layer_idx)
        self.rope_interleaved = cfg.rope_interleaved
        self.qk_norm = cfg.qk_norm
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.temperature_floor, self.temperature_scale = cfg.attn_temperature_floor_scale, cfg.attn_temperature_scale
        self.kv_source = cfg.layer_kv_source(layer_idx)
        self.is_kv_source = any(cfg.layer_kv_source(j) == layer_idx for j in range(cfg.num_layers))
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = self.v_proj = None
        if self.kv_source is None:
            self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attn_out_bias)
        norm_args = dict(eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset, weight_fp32=cfg.norm_weight_fp32)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm == "head":  # one norm over head_dim, shared by all heads (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(d, **norm_args)
            self.k_norm = RMSNorm(d, **norm_args)
        elif cfg.qk_norm == "proj":  # one norm over the whole projection (OLMo 2)
            self.q_norm = RMSNorm(cfg.num_heads * d, **norm_args)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, **norm_args)
        elif cfg.qk_norm == "l2":  # weightless, on RoPE layers only (Llama 4)
            self.q_norm = self.k_norm = L2Norm(cfg.norm_eps)
        if self.kv_source is not None:
            self.k_norm = None
        self.v_norm = L2Norm(cfg.norm_eps) if cfg.v_norm and self.kv_source is None else None
        # training hook: called as observer(self, q, k) with the queries and keys that enter
        # the softmax (QK-clip tracks each head's max logit through it); None costs nothing
        self.logit_observer = None

    # -- caches -----------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype, device) -> LayerCache | None:
        if self.kv_source is not None:
            return None
        span = self.window or self.chunk
        if span is not None and span < max_len:
            return RingCache(batch, self.num_kv_heads, self.head_dim, self.head_dim, span, dtype, device)
        return FullCache(batch, self.num_kv_heads, self.head_dim, self.head_dim, max_len, dtype, device)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        if self.kv_source is not None:
            return 0
        return 2 * self.num_kv_heads * self.head_dim * bytes_per_element

    # -- description (read by llmarch.analysis.modules, .compare and .diagram) ------------------
    @property
    def kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def describe(self) -> dict:
        """This layer's attention in the article's terms; every attention kind reports these keys.

        ``flops_per_key``: multiply-adds x 2 of one query against one visible key, scores
        (q.k over all heads) plus the weighted sum of values.
        """
        label = {"MHA": f"MHA {self.num_heads} heads", "MQA": "MQA 1 KV head"}.get(
            self.kind, f"GQA {self.num_kv_heads} KV heads"
        )
        cache = f"K and V, {self.num_kv_heads} heads x {self.head_dim}"
        if self.kv_source is not None:
            cache = f"none: reuses layer {self.kv_source}'s K and V"
        return dict(
            kind=self.kind,
            label=label,
            heads=self.num_heads,
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            window=self.window,
            chunk=self.chunk,
            rope=self.use_rope,
            qk_norm="none" if self.qk_norm == "l2" and not self.use_rope else self.qk_norm,  # see _heads
            flops_per_key=2 * self.num_heads * (self.head_dim + self.head_dim),
            cache=cache,
        )

    # -- forward ----------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """q (B, T, heads * D), k and v (B, T, kv_heads * D); k and v are None on a KV-shared layer."""
        if self.kv_source is not None:
            return self.q_proj(x), None, None
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv_heads(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Queries (B, heads, T, D), keys and values (B, kv_heads, T, D) of x: projected, QK-normed,
        rotated; the values through ``v_norm``. Keys and values are None on a KV-shared layer."""
        q, k, v = self.project(x)
        q = self._heads(q, self.q_norm, rope)
        if k is None:
            return q, None, None
        return q, self._heads(k, self.k_norm, rope), self.values(v)

    def split_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, n * D) -> (B, n, T, D)."""
        b, t, _ = y.shape
        return y.view(b, t, -1, self.head_dim).transpose(1, 2)

    def _heads(self, y: torch.Tensor, norm: nn.Module | None, rope) -> torch.Tensor:
        # OLMo 2 normalises the whole projection, Qwen3 / Gemma each head before RoPE, Llama 4
        # (L2) after RoPE and on RoPE layers only
        if self.qk_norm == "proj":
            y = norm(y)
        y = self.split_heads(y)
        if self.qk_norm == "head":
            y = norm(y)
        if self.use_rope:
            y = apply_rope(y, *rope, self.rope_interleaved)
            if self.qk_norm == "l2":
                y = norm(y)
        return y

    def values(self, v: torch.Tensor) -> torch.Tensor:
        """Projected values (B, T, kv_heads * D) -> (B, kv_heads, T, D), through ``v_norm`` if set."""
        v = self.split_heads(v)
        return self.v_norm(v) if self.v_norm is not None else v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v, the query heads grouped over the KV heads: (B, heads, T, D)."""
        if self.logit_softcap is not None:
            return softcapped_attention(q, k, v, mask, causal, self.scale, self.logit_softcap)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
        shared_kv: SharedKV | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_heads(x, rope)
        if self.temperature_tuning:  # NoPE layers only
            # Llama 4 NoPE layers sharpen attention with distance: q *= 1 + scale * log1p(floor((pos + 1) / floor))
            t_scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.temperature_floor)) * self.temperature_scale + 1.0
            q = (q * t_scale[:, None, :, None]).to(q.dtype)
        if self.kv_source is not None:
            # the source's keys, and its cache: the key positions of the mask are the source's
            k, v, kpos, cache = shared_kv[self.kv_source]
        else:
            kpos = positions
            if cache is not None:
                k, v, kpos = cache.update(k, v, positions)
            if self.is_kv_source:
                shared_kv[self.layer_idx] = (k, v, kpos, cache)
        if self.logit_observer is not None:
            self.logit_observer(self, q, k)
        # a whole sequence from position 0 with plain causal attention (training, first prefill)
        # needs no mask tensor: SDPA's is_causal is the same and faster
        causal = cache is None and t > 1 and self.window is None and self.chunk is None and bool(
            (positions == torch.arange(t, device=positions.device)).all()
        )
        mask = None if causal else layer_mask(cache, positions, kpos, self.window, self.chunk, q.dtype)
        out = self.attend(q, k, v, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
