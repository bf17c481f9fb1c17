"""Multi-head attention with grouped KV heads, QK-norm, RoPE/NoPE and full/sliding/chunked masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.packed import fused_output
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
    if q.shape[1] == 1 and bool(allowed.all()):
        return None
    # a finite minimum (not -inf) keeps fully masked rows (padding queries) free of NaN
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def head_norms(qk: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, n_q: int) -> torch.Tensor:
    """``q_norm`` on the first ``n_q`` heads of qk (B, heads, T, D) and ``k_norm`` on the rest,
    in one pass: the same numbers as the two norms apart (the norm is per head)."""
    d = qk.shape[-1]
    scale = torch.cat((q_norm.scale().expand(n_q, d), k_norm.scale().expand(qk.shape[1] - n_q, d)))[:, None]
    return q_norm.rescale(F.rms_norm(qk.float(), (d,), eps=q_norm.eps), qk.dtype, scale)


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


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one new token per sequence (decoding), q (B, H, 1, D), k/v (B, KV, S, D).

    Two small matrix products in float32, the query heads grouped by the KV head they share.
    On CPU this is several times faster than SDPA's kernels for a single query, above all in
    bfloat16, and it is as precise as SDPA (scores and softmax in float32).
    """
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = q.float().reshape(b, kv, h // kv, d) @ k.float().transpose(-1, -2) * scale  # (B, KV, H/KV, S)
    if mask is not None:
        scores = scores + mask.float()  # (B, 1, 1, S)
    out = scores.softmax(-1) @ v.float()
    return out.reshape(b, h, 1, v.shape[-1]).to(q.dtype)


class Attention(nn.Module):
    param_component = "attention"  # how llmarch.analysis.modules files this module's parameters
    fusable = {"qkv": ("q_proj", "k_proj", "v_proj")}  # one packed product for inference (llmarch.inference.packed)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.layer_window(layer_idx)
        self.chunk = cfg.layer_chunk(layer_idx)
        self.use_rope = cfg.layer_uses_rope(layer_idx)
        self.rope_interleaved = cfg.rope_interleaved
        self.qk_norm = cfg.qk_norm
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.temperature_floor, self.temperature_scale = cfg.attn_temperature_floor_scale, cfg.attn_temperature_scale
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attn_out_bias)
        norm_args = dict(eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset, weight_fp32=cfg.norm_weight_fp32)
        if cfg.qk_norm == "head":  # one norm over head_dim, shared by all heads (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(d, **norm_args)
            self.k_norm = RMSNorm(d, **norm_args)
        elif cfg.qk_norm == "proj":  # one norm over the whole projection (OLMo 2)
            self.q_norm = RMSNorm(cfg.num_heads * d, **norm_args)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, **norm_args)
        elif cfg.qk_norm == "l2":  # weightless, on RoPE layers only (Llama 4)
            self.q_norm = self.k_norm = L2Norm(cfg.norm_eps)
        # training hook: called as observer(self, q, k) with the queries and keys that enter
        # the softmax (QK-clip tracks each head's max logit through it); None costs nothing
        self.logit_observer = None

    # -- caches -----------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype, device) -> LayerCache:
        span = self.window or self.chunk
        if span is not None and span < max_len:
            return RingCache(batch, self.num_kv_heads, self.head_dim, self.head_dim, span, dtype, device)
        return FullCache(batch, self.num_kv_heads, self.head_dim, self.head_dim, max_len, dtype, device)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
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
        return dict(
            kind=self.kind,
            label=label,
            heads=self.num_heads,
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            window=self.window,
            chunk=self.chunk,
            rope=self.use_rope,
            qk_norm="none" if self.qk_norm == "l2" and not self.use_rope else self.qk_norm,  # see forward
            flops_per_key=2 * self.num_heads * (self.head_dim + self.head_dim),
            cache=f"K and V, {self.num_kv_heads} heads x {self.head_dim}",
        )

    # -- forward ----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        y = fused_output(self, "qkv", x)  # q, k, v side by side from one packed product (inference)
        if self.qk_norm in ("none", "head"):
            # queries and keys take the same per-head steps (head norm, RoPE): one tensor, one pass
            if y is not None:
                qk, v = y.split(((h + kv) * d, kv * d), dim=-1)
            else:
                qk, v = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
            qk = qk.view(b, t, h + kv, d).transpose(1, 2)
            if self.qk_norm == "head":
                qk = head_norms(qk, self.q_norm, self.k_norm, h)
            if self.use_rope:
                qk = apply_rope(qk, *rope, self.rope_interleaved)
            q, k = qk.split((h, kv), dim=1)
        else:  # OLMo 2 normalises the whole projections, Llama 4 (L2) after RoPE
            q, k, v = y.split((h * d, kv * d, kv * d), dim=-1) if y is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
            if self.qk_norm == "proj":
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(b, t, h, d).transpose(1, 2)
            k = k.view(b, t, kv, d).transpose(1, 2)
            if self.use_rope:
                q, k = apply_rope(q, *rope, self.rope_interleaved), apply_rope(k, *rope, self.rope_interleaved)
                if self.qk_norm == "l2":
                    q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(b, t, kv, d).transpose(1, 2)
        if self.temperature_tuning:  # NoPE layers only
            # Llama 4 NoPE layers sharpen attention with distance: q *= 1 + scale * log1p(floor((pos + 1) / floor))
            t_scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.temperature_floor)) * self.temperature_scale + 1.0
            q = (q * t_scale[:, None, :, None]).to(q.dtype)
        if self.logit_observer is not None:
            self.logit_observer(self, q, k)
        kpos = positions
        if cache is not None:
            k, v, kpos = cache.update(k, v, positions)
        # a whole sequence from position 0 with plain causal attention (training, first prefill)
        # needs no mask tensor: SDPA's is_causal is the same and faster
        causal = cache is None and t > 1 and self.window is None and self.chunk is None and bool(
            (positions == torch.arange(t, device=positions.device)).all()
        )
        mask = None if causal else layer_mask(cache, positions, kpos, self.window, self.chunk, q.dtype)
        if t == 1:
            out = single_query_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
