"""Multi-head latent attention (MLA), DeepSeek-V2/V3 and Kimi K2.

Keys and values are not projected per head from the hidden state; a down-projection
(``kv_a_proj_with_mqa``) compresses each token to a ``kv_lora_rank`` latent (normalised by
``kv_a_layernorm``) plus one ``qk_rope_head_dim`` key that carries RoPE and is shared by every
head (the "decoupled" RoPE key). ``kv_b_proj`` expands the latent to per-head no-RoPE keys
and values. Queries optionally go through their own low-rank bottleneck
(``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``).

The cache (:class:`LatentCache`) stores only the latent and the RoPE key:
``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer (576 for DeepSeek-V3, against
2 * 128 * 128 = 32768 for the same heads in plain MHA).

Two equivalent execution paths:

* expanded (prefill): up-project the latents to full keys/values and run ordinary attention;
* absorbed (decoding): fold kv_b's key half into the query (q_nope @ W_uk gives a query in
  latent space) and its value half into the output, so attention runs directly over the
  cached latents, never materialising per-head keys and values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import layer_mask
from .cache import FullCache
from .config import ModelConfig
from .layers import RMSNorm, apply_rope

# DeepSeek's q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


class LatentCache(FullCache):
    """Per token: the normalised KV latent (kv_lora_rank) and the RoPE'd shared key (qk_rope_head_dim).

    Stored as one-"head" key/value slots of a :class:`FullCache`: ``k`` holds the latents,
    ``v`` the RoPE keys.
    """

    def __init__(self, batch: int, kv_lora_rank: int, rope_dim: int, max_len: int, dtype, device):
        super().__init__(batch, 1, kv_lora_rank, rope_dim, max_len, dtype, device)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale squared when ``mscale_all_dim`` is set.

    The RoPE tables carry mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for
    DeepSeek-V3); the softmax scale takes the mscale_all_dim part, as in DeepSeek's code.
    """
    m = cfg.mla
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    s = cfg.rope.scaling or {}
    if cfg.rope.rope_type != "default" and s.get("mscale_all_dim"):
        factor = float(s["factor"])
        mscale = 0.1 * float(s["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


class MLAttention(nn.Module):
    reads_weights = ("kv_b_proj",)  # the absorbed decode splits its matrix (kept by llmarch.inference.packed.release_weights)
    param_component = "attention"  # how llmarch.analysis.modules files this module's parameters

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mla
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        self.head_dim = m.qk_rope_head_dim  # the width the rotary tables are built for
        self.rope_interleaved = cfg.rope_interleaved
        self.scale = mla_softmax_scale(cfg)
        # None: the absorbed path for single-token steps with a cache, expanded otherwise
        self.absorb: bool | None = None
        h, heads, qk_dim = cfg.hidden_size, cfg.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(h, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * m.v_head_dim, h, bias=cfg.attn_out_bias)
        # training hook, as in Attention: observer(self, q, k) with the (expanded) queries and keys
        self.logit_observer = None

    # -- caches -----------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, dtype, device) -> LatentCache:
        return LatentCache(batch, self.kv_lora_rank, self.rope_dim, max_len, dtype, device)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return (self.kv_lora_rank + self.rope_dim) * bytes_per_element

    def describe(self) -> dict:
        """The keys of :meth:`llmarch.model.attention.Attention.describe`, for MLA.

        Prefill expands the latents, so a key costs scores over nope + rope dims and values
        over v dims per head; absorbed decoding attends over the cached latents themselves,
        (rank + rope) for scores and rank for values per head (kv_b is then a per-query matmul).
        """
        heads, qk = self.num_heads, self.nope_dim + self.rope_dim
        return dict(
            kind="MLA",
            label=f"MLA latent {self.kv_lora_rank}",
            heads=heads,
            kv_heads=heads,
            head_dim=qk,
            window=None,
            chunk=None,
            rope=True,
            qk_norm="none",
            flops_per_key=2 * heads * (qk + self.v_dim),
            decode_flops_per_key=2 * heads * (2 * self.kv_lora_rank + self.rope_dim),
            cache=f"latent {self.kv_lora_rank} + shared RoPE key {self.rope_dim} (all heads)",
        )

    # -- forward ----------------------------------------------------------------------
    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, positions, rope, cache=None, shared_kv=None) -> torch.Tensor:
        """``shared_kv``: unused (MLA layers do not share keys and values; see ``ModelConfig.validate``)."""
        b, t, _ = x.shape
        q = self.queries(x).view(b, t, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, T, rank): one "head" shared by all
        cos, sin = rope
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleaved)
        k_rope = apply_rope(k_rope[:, None], cos, sin, self.rope_interleaved)
        kpos = positions
        if cache is not None:
            latent, k_rope, kpos = cache.update(latent, k_rope, positions)
        mask = layer_mask(cache, positions, kpos, None, None, q.dtype)
        absorb = self.absorb if self.absorb is not None else (cache is not None and t == 1)
        attend = self._absorbed if absorb else self._expanded
        out = attend(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_dim))

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.logit_observer is not None:
            self.logit_observer(self, q, k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, nope, rank), (H, v, rank)
        q = torch.cat([torch.matmul(q_nope, w_uk), q_rope], dim=-1)  # (B, H, T, rank + rope)
        k = torch.cat([latent, k_rope], dim=-1)  # (B, 1, S, rank + rope)
        out = F.scaled_dot_product_attention(q, k, latent, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return torch.matmul(out, w_uv.transpose(1, 2))  # (B, H, T, v)
