"""Gemma 2 (9B, 27B): Gemma 3's predecessor, the baseline of the article's Gemma 3 section.

Sliding-window attention on every other layer (1:1, window 4096; Gemma 3 went to 5:1 and
1024); attention scores soft-capped at 50 (cap * tanh(score / cap)) and logits at 30; pre+post
("sandwich") RMSNorm of the (1 + weight) form; no QK-norm (Gemma 3 replaced the attention
soft-cap with it); GeGLU; embeddings scaled by sqrt(hidden); softmax scale
query_pre_attn_scalar ** -0.5; one RoPE base for all layers. Tensors are named as Gemma 3's.
"""

from __future__ import annotations

import math

from ..model.config import FULL, SLIDING, ModelConfig, RopeConfig
from .base import (
    Family,
    TokenizerQuirks,
    check_exportable,
    common_from_hf,
    common_to_hf,
    layer_types_to_hf,
    parse_layer_types,
)
from .gemma3 import GEMMA3_CHAT_TEMPLATE, GEMMA3_KEYS, _int_if_whole, sanitize


def gemma2_layer_types(n: int) -> list[str]:
    """Layer i slides when i is even: sliding, global, sliding, ..."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(n)]


def gemma2_config(**kw) -> ModelConfig:
    base = dict(
        ffn_kind="glu", activation="gelu_tanh", norm_kind="rmsnorm", norm_eps=1e-6, norm_placement="sandwich",
        norm_unit_offset=True, norm_weight_fp32=True, tie_embeddings=True, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, sliding_window=4096, max_position_embeddings=8192, rope=RopeConfig(10000.0),
        hf_model_type="gemma2", bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    base.update(kw)
    base.setdefault("layer_types", gemma2_layer_types(base["num_layers"]))
    base.setdefault("embed_scale", math.sqrt(base["hidden_size"]))
    return ModelConfig(**base)


def _preset(name: str, hidden: int, ffn: int, layers: int, heads: int, kv: int, head_dim: int, qpas: int):
    # google/gemma-2-9b and google/gemma-2-27b config.json
    return lambda: gemma2_config(
        name=name, vocab_size=256000, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas,
    )


PRESETS = {
    "gemma2-9b": _preset("gemma2-9b", 3584, 14336, 42, 16, 8, 256, 256),
    "gemma2-27b": _preset("gemma2-27b", 4608, 36864, 46, 32, 16, 128, 144),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d, tie_default=True)
    kw.pop("rope_local")
    n = kw["num_layers"]
    kw["layer_types"] = parse_layer_types(d, n) if d.get("layer_types") else gemma2_layer_types(n)
    kw["sliding_window"] = int(d.get("sliding_window") or 4096)
    kw["query_pre_attn_scalar"] = float(d.get("query_pre_attn_scalar") or 256)
    kw["attn_logit_softcap"] = d.get("attn_logit_softcapping")
    kw["final_logit_softcap"] = d.get("final_logit_softcapping")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    kw["activation"] = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act, act)
    return gemma2_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gemma2", ffn_kind="glu", norm_kind="rmsnorm", norm_placement="sandwich", qk_norm="none",
                     position="rope", norm_unit_offset=True, rope_layers=None, rope_interleaved=False, rope_local=None,
                     embed_scale=math.sqrt(cfg.hidden_size), attn_out_bias=cfg.qkv_bias)
    d = common_to_hf(cfg, "gemma2", "Gemma2ForCausalLM")
    d.update(
        hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        sliding_window=cfg.sliding_window or 4096,
        layer_types=layer_types_to_hf(cfg),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        attention_bias=cfg.qkv_bias,
    )
    return d


FAMILY = Family(
    "gemma2", ("gemma2",), PRESETS, from_hf, to_hf, keys=GEMMA3_KEYS, sanitize=sanitize,
    tokenizer=TokenizerQuirks(spaces_in_vocab=True, merges_by_position=True, add_space_prefix=False,
                              chat_template=GEMMA3_CHAT_TEMPLATE),
)
