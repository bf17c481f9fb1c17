"""Gemma 3n (text decoder): Gemma 3's layer (sandwich RMSNorm with a plain weight, per-head
QK-norm, GeGLU, sqrt(hidden)-scaled embeddings) built for phones: per-layer embeddings (PLE)
that can stay off the accelerator, AltUp over 4 residual streams, a rank-64 LAuReL residual,
the last 15 (E4B) / 10 (E2B) layers reusing earlier keys and values, Gaussian top-k sparse
FFN gates in the first 10 layers, a weightless value norm, attention scale 1, 4 sliding-window
(512) layers to 1 global, final logit soft-capping at 30. E2B is the MatFormer slice of E4B.

The multimodal ``gemma3n`` checkpoints keep the text weights under ``model.language_model.``
(``language_model.model.`` in older exports); llmarch drops the vision and audio towers.
"""

from __future__ import annotations

import math
import re

from ..errors import ConfigError
from ..model.config import FULL, SLIDING, ModelConfig, RopeConfig
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
from .gemma3 import GEMMA3_KEYS

# Gemma 3's names, plus the per-layer embeddings, AltUp and LAuReL
GEMMA3N_KEYS = KeyMap(
    GEMMA3_KEYS.pairs
    + [
        ("model.embed_tokens_per_layer.", "ple.table."),
        ("model.per_layer_model_projection.", "ple.projection."),
        ("model.per_layer_projection_norm.", "ple.norm."),
        ("model.altup_projections.", "altup_projections."),
        ("model.altup_unembed_projections.", "altup_unembed_projections."),
        ("model.layers.{i}.altup.", "layers.{i}.altup."),
        ("model.layers.{i}.laurel.", "layers.{i}.laurel."),
        ("model.layers.{i}.per_layer_input_gate.", "layers.{i}.ple.gate."),
        ("model.layers.{i}.per_layer_projection.", "layers.{i}.ple.projection."),
        ("model.layers.{i}.post_per_layer_input_norm.", "layers.{i}.ple.norm."),
    ]
)

# transformers' Gemma3nTextConfig defaults (the E4B values) for fields a config.json may omit
HF_DEFAULTS = dict(
    sliding_window=512, final_logit_softcapping=30.0, vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=256, altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True,
    altup_num_inputs=4, num_kv_shared_layers=15, laurel_rank=64,
)


def gemma3n_layer_types(n: int) -> list[str]:
    """Every fifth layer is global: four sliding-window layers, then one full."""
    return [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]


def default_sparsity(n: int) -> list[float]:
    """transformers' default: the first 10 layers 0.95-sparse (when there are more than 10)."""
    k = 10 if n > 10 else 0
    return [0.95] * k + [0.0] * (n - k)


def gemma3n_config(**kw) -> ModelConfig:
    base = dict(
        ffn_kind="glu", activation="gelu_tanh", norm_kind="rmsnorm", norm_eps=1e-6, norm_placement="sandwich",
        norm_unit_offset=False, norm_weight_fp32=True, qk_norm="head", v_norm=True, query_pre_attn_scalar=1.0,
        tie_embeddings=True, hf_model_type="gemma3n_text", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope=RopeConfig(1e6), rope_local=RopeConfig(10000.0), max_position_embeddings=32768,
        num_heads=8, num_kv_heads=2, head_dim=256, vocab_size=262400,
    )
    base.update({k: v for k, v in HF_DEFAULTS.items() if k not in ("final_logit_softcapping",)})
    base["final_logit_softcap"] = HF_DEFAULTS["final_logit_softcapping"]
    base.update(kw)
    n = base["num_layers"]
    base.setdefault("layer_types", gemma3n_layer_types(n))
    base.setdefault("activation_sparsity", default_sparsity(n))
    base.setdefault("embed_scale", math.sqrt(base["hidden_size"]))
    return ModelConfig(**base)


PRESETS = {
    # E4B: transformers' Gemma3nTextConfig defaults (= google/gemma-3n-E4B text_config)
    "gemma3n-e4b": lambda: gemma3n_config(name="gemma3n-e4b", hidden_size=2048, intermediate_size=16384, num_layers=35),
    # E2B: 30 layers, FFN 8192, the last 10 layers KV-shared, first 10 sparse
    "gemma3n-e2b": lambda: gemma3n_config(
        name="gemma3n-e2b", hidden_size=2048, intermediate_size=8192, num_layers=30, num_kv_shared_layers=10
    ),
}


def from_hf(d: dict) -> ModelConfig:
    d = unwrap_text_config(d, "gemma3n", "gemma3n_text")
    nullable = ("final_logit_softcapping", "altup_coef_clip")
    d = {**HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k in nullable}}
    sizes = d["intermediate_size"]
    per_layer = isinstance(sizes, list) and len(set(sizes)) > 1
    width = sizes[0] if isinstance(sizes, list) and not per_layer else sizes
    kw = common_from_hf({**d, "intermediate_size": max(sizes) if per_layer else width}, tie_default=True)
    n = kw["num_layers"]
    kw["layer_types"] = parse_layer_types(d, n) if d.get("layer_types") else gemma3n_layer_types(n)
    if kw["rope_local"] is None:
        kw["rope_local"] = RopeConfig(10000.0)
    sparsity = d.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = default_sparsity(n)
    elif not isinstance(sparsity, list):
        sparsity = [float(sparsity)] * n
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    kw.update(
        intermediate_sizes=list(sizes) if per_layer else None,
        activation_sparsity=sparsity,
        activation={"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act, act),
        sliding_window=int(d["sliding_window"]),
        final_logit_softcap=d.get("final_logit_softcapping"),
        **{k: d[k] for k in ("vocab_size_per_layer_input", "hidden_size_per_layer_input", "altup_active_idx",
                             "altup_coef_clip", "altup_correct_scale", "altup_num_inputs", "num_kv_shared_layers",
                             "laurel_rank")},
    )
    return gemma3n_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gemma3n_text", attn_logit_softcap=None, ffn_kind="glu", norm_kind="rmsnorm", norm_placement="sandwich",
                     qk_norm="head", position="rope", norm_unit_offset=False, rope_layers=None, v_norm=True,
                     rope_interleaved=False, embed_scale=math.sqrt(cfg.hidden_size), query_pre_attn_scalar=1.0,
                     attn_out_bias=cfg.qkv_bias)
    unset = [f for f in ("altup_num_inputs", "laurel_rank", "hidden_size_per_layer_input") if getattr(cfg, f) is None]
    if unset:
        raise ConfigError(f"cannot export as gemma3n_text: its layers always have {', '.join(unset)}; set them")
    d = common_to_hf(cfg, "gemma3n_text", "Gemma3nForCausalLM")
    n = cfg.num_layers
    d.update(
        intermediate_size=[cfg.layer_intermediate_size(i) for i in range(n)],
        activation_sparsity_pattern=[cfg.layer_activation_sparsity(i) for i in range(n)],
        hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
        sliding_window=cfg.sliding_window or 512,
        layer_types=layer_types_to_hf(cfg),
        rope_local_base_freq=(cfg.rope_local or cfg.rope).theta,
        final_logit_softcapping=cfg.final_logit_softcap,
        attention_bias=cfg.qkv_bias,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input,
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        altup_active_idx=cfg.altup_active_idx,
        altup_coef_clip=cfg.altup_coef_clip,
        altup_correct_scale=cfg.altup_correct_scale,
        altup_num_inputs=cfg.altup_num_inputs,
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        laurel_rank=cfg.laurel_rank,
    )
    return d


_KV_TENSOR = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def _uses_own_kv(name: str, cfg: ModelConfig) -> bool:
    m = _KV_TENSOR.match(name)
    return m is None or cfg.layer_kv_source(int(m.group(1))) is None


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    """Text decoder only, without the K/V weights checkpoints still carry for KV-shared layers (never used)."""
    return rename(((n, t) for n, t in text_only(tensors, TOWERS) if _uses_own_kv(n, cfg)), GEMMA3N_KEYS, "gemma3n")


FAMILY = Family("gemma3n", ("gemma3n_text", "gemma3n"), PRESETS, from_hf, to_hf, keys=GEMMA3N_KEYS, sanitize=sanitize)
