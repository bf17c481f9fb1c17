"""Mistral Small 3.1: a Llama-style decoder with head_dim * heads != hidden and rope_theta 1e9.

The released checkpoint is ``Mistral3ForConditionalGeneration``: the text weights sit under
``language_model.`` beside a vision tower, which llmarch drops. GGUF files are written under
the ``llama`` architecture (see ``llama.py``); the Tekken tokenizer's pre-tokenizer is ``tekken``.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..model.config import FULL, SLIDING, ModelConfig, RopeConfig
from .base import (
    GGUF,
    GGUF_KEYS,
    LLAMA_KEYS,
    Family,
    Stream,
    TokenizerQuirks,
    check_exportable,
    common_from_hf,
    common_to_hf,
    rename,
    text_only,
    unwrap_text_config,
)
from .llama import gguf_to_hf_layout, llama_config

TOWERS = ("vision_tower", "multi_modal_projector")

PRESETS = {
    "mistral-small-3.1-24b": lambda: llama_config(
        name="mistral-small-3.1-24b", hf_model_type="mistral", vocab_size=131072, hidden_size=5120,
        intermediate_size=32768, num_layers=40, num_heads=32, num_kv_heads=8, head_dim=128,
        tie_embeddings=False, max_position_embeddings=131072, rope=RopeConfig(1e9), norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2,
    ),
}


def from_hf(d: dict) -> ModelConfig:
    d = unwrap_text_config(d, "mistral3", "mistral")
    kw = common_from_hf(d)
    kw.pop("rope_local")
    kw["qkv_bias"] = kw["attn_out_bias"] = False
    kw["norm_eps"] = float(d.get("rms_norm_eps", 1e-5))
    window = d.get("sliding_window")
    if window:  # Mistral applies its sliding window to every layer
        kw["layer_types"] = [SLIDING] * kw["num_layers"]
        kw["sliding_window"] = int(window)
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    uniform = set(cfg.layer_types)
    check_exportable(cfg, "mistral", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     qk_norm="none", position="rope", qkv_bias=False, attn_out_bias=False, embed_scale=None,
                     norm_unit_offset=False, final_logit_softcap=None, rope_layers=None, rope_interleaved=False)
    if len(uniform) != 1 or not uniform <= {FULL, SLIDING}:
        raise ConfigError("cannot export as mistral: all layers must be full or all sliding")
    d = common_to_hf(cfg, "mistral", "MistralForCausalLM")
    d.update(hidden_act="silu", sliding_window=cfg.sliding_window if SLIDING in uniform else None)
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    if fmt == GGUF:
        tensors = gguf_to_hf_layout(tensors, cfg)
    return rename(text_only(tensors, TOWERS), LLAMA_KEYS, "mistral")


_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


FAMILY = Family(
    "mistral", ("mistral", "mistral3"), PRESETS, from_hf, to_hf, sanitize=sanitize, gguf_keys=GGUF_KEYS,
    tokenizer=TokenizerQuirks(pre_tokenizers={"tekken": _TEKKEN_SPLIT}),
)
