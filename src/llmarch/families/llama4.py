"""Llama 4 (Scout, Maverick), text decoder.

* GQA attention; RoPE layers use chunked attention (8192-token chunks) and, in Scout, a
  weightless L2 QK-norm; every 4th layer is NoPE with full causal attention and attention-
  temperature tuning (queries scaled up with log(position)).
* RoPE in Meta's complex / interleaved layout (llama3 scaling x8 in Scout).
* MoE: top-1 of 16 (Scout) or 128 (Maverick) experts by sigmoid score, the score scaling the
  expert's input; a shared expert always added. Maverick alternates dense (width 16384) and
  MoE layers; Scout is MoE everywhere.
* Checkpoints: text weights under ``language_model.`` in the multimodal release (the vision
  tower is dropped); experts fused as (E, hidden, 2 * width) and (E, width, hidden).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..model.config import CHUNKED, FULL, ModelConfig, MoEConfig, RopeConfig
from .base import (
    Family,
    KeyMap,
    Stream,
    check_exportable,
    common_from_hf,
    common_to_hf,
    layer_types_to_hf,
    parse_layer_types,
    rename,
    text_only,
    unwrap_text_config,
)
from .llama import LLAMA3_SCALING_32, llama_config

KEYS = KeyMap(
    [
        ("model.embed_tokens.", "embed."),
        ("model.layers.{i}.input_layernorm.", "layers.{i}.attn_norm."),
        ("model.layers.{i}.self_attn.", "layers.{i}.attn."),
        ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.mlp_norm."),
        ("model.layers.{i}.feed_forward.", "layers.{i}.mlp."),
        ("model.norm.", "norm."),
        ("lm_head.", "lm_head."),
    ]
)
FUSED = (".experts.gate_up_proj", ".experts.down_proj")
TOWERS = ("vision_model", "multi_modal_projector")


def _preset(name: str, experts: int, moe_step: int, qk_norm: str, rope: RopeConfig, max_pos: int) -> ModelConfig:
    # meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E config.json (text_config)
    layers = 48
    rope_layers = [(i + 1) % 4 != 0 for i in range(layers)]
    return llama_config(
        name=name, hf_model_type="llama4_text", vocab_size=202048, hidden_size=5120, num_layers=layers, num_heads=40,
        num_kv_heads=8, head_dim=128, intermediate_size=16384, max_position_embeddings=max_pos, rope=rope,
        rope_interleaved=True, rope_layers=rope_layers, layer_types=[CHUNKED if r else FULL for r in rope_layers],
        attention_chunk_size=8192, qk_norm=qk_norm, attn_temperature_tuning=True, norm_eps=1e-5,
        moe=MoEConfig(num_experts=experts, top_k=1, expert_size=8192, score="sigmoid", scale_input=True,
                      shared_expert_size=8192),
        moe_layers=[(i + 1) % moe_step == 0 for i in range(layers)], bos_token_id=200000,
    )


PRESETS = {
    "llama4-scout": lambda: _preset("llama4-scout", 16, 1, "l2", RopeConfig(500000.0, dict(LLAMA3_SCALING_32, factor=8.0)),
                                    10485760),
    "llama4-maverick": lambda: _preset("llama4-maverick", 128, 2, "none", RopeConfig(500000.0), 1048576),
}


def from_hf(d: dict) -> ModelConfig:
    d = unwrap_text_config(d, "llama4", "llama4_text")
    kw = common_from_hf(d)
    kw.pop("rope_local")
    n = kw["num_layers"]
    no_rope = d.get("no_rope_layers") or [int((i + 1) % int(d.get("no_rope_layer_interval", 4)) != 0) for i in range(n)]
    if len(no_rope) != n:
        raise ConfigError(f"no_rope_layers has {len(no_rope)} entries for {n} layers")
    kw["rope_layers"] = [bool(x) for x in no_rope]  # 1 means "uses RoPE"
    chunk = d.get("attention_chunk_size")
    if d.get("layer_types"):
        kw["layer_types"] = parse_layer_types(d, n)
    else:
        kw["layer_types"] = [CHUNKED if r and chunk else FULL for r in kw["rope_layers"]]
    if CHUNKED in kw["layer_types"]:
        kw["attention_chunk_size"] = int(chunk)
    kw["rope_interleaved"] = True
    kw["qk_norm"] = "l2" if d.get("use_qk_norm", True) else "none"
    kw["norm_eps"] = float(d.get("rms_norm_eps", 1e-5))
    kw["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))
    kw["attn_temperature_floor_scale"] = int(d.get("floor_scale", 8192))
    kw["attn_temperature_scale"] = float(d.get("attn_scale", 0.1))
    expert = kw["intermediate_size"]  # HF's intermediate_size is the expert width ...
    kw["intermediate_size"] = int(d.get("intermediate_size_mlp") or expert)  # ... dense layers use intermediate_size_mlp
    kw["moe"] = MoEConfig(num_experts=int(d["num_local_experts"]), top_k=int(d.get("num_experts_per_tok", 1)),
                          expert_size=expert, score="sigmoid", scale_input=True, shared_expert_size=expert)
    step = int(d.get("interleave_moe_layer_step", 1))
    moe_layers = d.get("moe_layers")
    moe_layers = set(moe_layers) if moe_layers is not None else set(range(step - 1, n, step))
    kw["moe_layers"] = [i in moe_layers for i in range(n)]
    kw["hf_model_type"] = "llama4_text"
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    check_exportable(cfg, "llama4_text", attn_logit_softcap=None, attention_kind="mha", ffn_kind="glu", activation="silu", norm_kind="rmsnorm",
                     norm_placement="pre", position="rope", embed_scale=None, norm_unit_offset=False,
                     final_logit_softcap=None, rope_interleaved=True, attn_out_bias=cfg.qkv_bias)
    if m is None or m.score != "sigmoid" or not m.scale_input or m.shared_expert_size != m.expert_size or m.n_group != 1:
        raise ConfigError("cannot export as llama4_text: it needs sigmoid-routed, input-scaled experts with a shared "
                          "expert as wide as a routed one")
    if cfg.qk_norm not in ("l2", "none"):
        raise ConfigError(f"cannot export as llama4_text: qk_norm {cfg.qk_norm!r}, expected 'l2' or 'none'")
    d = common_to_hf(cfg, "llama4_text", "Llama4ForCausalLM")
    layers = cfg.moe_layers or [True] * cfg.num_layers
    rl = cfg.rope_layers if cfg.rope_layers is not None else [True] * cfg.num_layers
    d.update(hidden_act="silu", attention_bias=cfg.qkv_bias, intermediate_size=m.expert_size,
             intermediate_size_mlp=cfg.intermediate_size, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
             moe_layers=[i for i, x in enumerate(layers) if x], no_rope_layers=[int(x) for x in rl],
             layer_types=layer_types_to_hf(cfg), attention_chunk_size=cfg.attention_chunk_size,
             use_qk_norm=cfg.qk_norm == "l2", attn_temperature_tuning=cfg.attn_temperature_tuning,
             floor_scale=cfg.attn_temperature_floor_scale, attn_scale=cfg.attn_temperature_scale)
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    """Text decoder only; Meta's fused experts are stored (E, in, out): transposed to llmarch's (E, out, in)."""
    tensors = ((n, t.transpose(1, 2).contiguous() if n.endswith(FUSED) else t) for n, t in text_only(tensors, TOWERS))
    return rename(tensors, KEYS, "llama4")


def save_transform(state: dict, cfg: ModelConfig) -> dict:
    return {KEYS.to_hf(k): (v.transpose(1, 2).contiguous() if k.endswith(FUSED) else v) for k, v in state.items()}


FAMILY = Family(
    "llama4", ("llama4_text", "llama4"), PRESETS, from_hf, to_hf, keys=KEYS, sanitize=sanitize,
    save_transform=save_transform, notes=["multimodal checkpoints load the text decoder; the vision tower is dropped"],
)
