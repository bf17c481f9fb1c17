"""Llama 3 / 3.2: the article's baseline. Pre-RMSNorm, GQA, SwiGLU, RoPE (llama3 scaling)."""

from __future__ import annotations

from ..model.config import ModelConfig, RopeConfig
from .base import Family, check_exportable, common_from_hf, common_to_hf

LLAMA3_SCALING_32 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama_config(**kw) -> ModelConfig:
    base = dict(
        ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_eps=1e-5,
        norm_placement="pre", hf_model_type="llama",
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS = {
    "llama3.2-1b": lambda: llama_config(
        name="llama3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True, max_position_embeddings=131072,
        rope=RopeConfig(500000.0, dict(LLAMA3_SCALING_32)), bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3-8b": lambda: llama_config(
        name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_embeddings=False, max_position_embeddings=8192,
        rope=RopeConfig(500000.0), bos_token_id=128000, eos_token_id=128001,
    ),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw["ffn_bias"] = bool(d.get("mlp_bias", False))
    kw["norm_eps"] = float(d.get("rms_norm_eps", 1e-5))
    kw.pop("rope_local")
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "llama", ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     qk_norm="none", position="rope", norm_unit_offset=False, embed_scale=None,
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False,
                     qkv_bias=cfg.attn_out_bias, layer_types=["full"] * cfg.num_layers)
    d = common_to_hf(cfg, "llama", "LlamaForCausalLM")
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias, hidden_act="silu")
    return d


FAMILY = Family("llama", ("llama",), PRESETS, from_hf, to_hf)
