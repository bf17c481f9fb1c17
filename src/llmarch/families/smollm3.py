"""SmolLM3: a Llama-style decoder that skips RoPE in every 4th layer (NoPE)."""

from __future__ import annotations

from ..errors import ConfigError
from ..model.config import ModelConfig, RopeConfig
from .base import Family, check_exportable, common_from_hf, common_to_hf
from .llama import llama_config
from .qwen import _sliding

PRESETS = {
    "smollm3-3b": lambda: llama_config(
        name="smollm3-3b", hf_model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
        num_layers=36, num_heads=16, num_kv_heads=4, head_dim=128, tie_embeddings=True,
        max_position_embeddings=65536, rope=RopeConfig(5e6), norm_eps=1e-6,
        rope_layers=[True, True, True, False] * 9, bos_token_id=128000, eos_token_id=128012,
    ),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw.pop("rope_local")
    n = kw["num_layers"]
    no_rope = d.get("no_rope_layers")
    if no_rope is None:
        interval = int(d.get("no_rope_layer_interval", 4))
        no_rope = [int((i + 1) % interval != 0) for i in range(n)]
    if len(no_rope) != n:
        raise ConfigError(f"no_rope_layers has {len(no_rope)} entries for {n} layers")
    kw["rope_layers"] = [bool(x) for x in no_rope]  # 1 means "uses RoPE"
    kw["ffn_bias"] = bool(d.get("mlp_bias", False))
    _sliding(d, kw)
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "smollm3", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     qk_norm="none", position="rope", embed_scale=None, norm_unit_offset=False,
                     final_logit_softcap=None, rope_interleaved=False, layer_types=["full"] * cfg.num_layers,
                     attn_out_bias=cfg.qkv_bias)
    d = common_to_hf(cfg, "smollm3", "SmolLM3ForCausalLM")
    rl = cfg.rope_layers if cfg.rope_layers is not None else [True] * cfg.num_layers
    d.update(hidden_act="silu", no_rope_layers=[int(x) for x in rl], attention_bias=cfg.qkv_bias,
             mlp_bias=cfg.ffn_bias, use_sliding_window=False, sliding_window=None)
    return d


FAMILY = Family("smollm3", ("smollm3",), PRESETS, from_hf, to_hf)
