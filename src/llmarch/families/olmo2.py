"""OLMo 2: no pre-norm; RMSNorm after attention and after the FFN, inside the residual;
QK-norm over the whole q and k projections (not per head)."""

from __future__ import annotations

from ..model.config import ModelConfig, RopeConfig
from .base import Family, KeyMap, check_exportable, common_from_hf, common_to_hf

OLMO2_KEYS = KeyMap(
    [
        ("model.embed_tokens.", "embed."),
        ("model.layers.{i}.self_attn.", "layers.{i}.attn."),
        ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.attn_post_norm."),
        ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
        ("model.layers.{i}.post_feedforward_layernorm.", "layers.{i}.mlp_post_norm."),
        ("model.norm.", "norm."),
        ("lm_head.", "lm_head."),
    ]
)


def olmo2_config(**kw) -> ModelConfig:
    base = dict(
        ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_eps=1e-6, norm_placement="post",
        qk_norm="proj", norm_weight_fp32=True, hf_model_type="olmo2",
    )
    base.update(kw)
    return ModelConfig(**base)


def _preset(name: str, hidden: int, ffn: int, layers: int, heads: int, kv: int):
    # allenai/OLMo-2-1124-7B, -1124-13B and -0325-32B config.json
    return lambda: olmo2_config(
        name=name, vocab_size=100352, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=128, tie_embeddings=False, max_position_embeddings=4096,
        rope=RopeConfig(500000.0), bos_token_id=100257, eos_token_id=100257, pad_token_id=100277,
    )


PRESETS = {
    "olmo2-7b": _preset("olmo2-7b", 4096, 11008, 32, 32, 32),
    "olmo2-13b": _preset("olmo2-13b", 5120, 13824, 40, 40, 40),
    "olmo2-32b": _preset("olmo2-32b", 5120, 27648, 64, 40, 8),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw.pop("rope_local")
    return olmo2_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "olmo2", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="post",
                     qk_norm="proj", position="rope", embed_scale=None, norm_unit_offset=False,
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False,
                     layer_types=["full"] * cfg.num_layers, attn_out_bias=cfg.qkv_bias)
    d = common_to_hf(cfg, "olmo2", "Olmo2ForCausalLM")
    d.update(hidden_act="silu", attention_bias=cfg.qkv_bias)
    return d


FAMILY = Family("olmo2", ("olmo2",), PRESETS, from_hf, to_hf, keys=OLMO2_KEYS)
