"""Qwen2.5 (q/k/v bias) and Qwen3 dense (per-head QK-norm, explicit head_dim).

GGUF: architectures ``qwen2`` and ``qwen3`` (the HF model_type names), tensors in HF layout
(llama.cpp uses NEOX-style RoPE for them, so Q/K rows are not permuted); byte-level BPE
split with the ``qwen2`` pre-tokenizer.
"""

from __future__ import annotations

from ..checkpoints.gguf import GGUFFile
from ..errors import ConfigError
from ..model.config import FULL, SLIDING, ModelConfig, RopeConfig
from .base import (
    GGUF_KEYS,
    Family,
    TokenizerQuirks,
    check_exportable,
    common_from_hf,
    common_to_hf,
    gguf_config,
    parse_layer_types,
)
from .llama import llama_config


def qwen3(name: str, hidden: int, ffn: int, layers: int, heads: int, tied: bool) -> ModelConfig:
    return llama_config(
        name=name, hf_model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, tie_embeddings=tied,
        max_position_embeddings=40960, rope=RopeConfig(1e6), norm_eps=1e-6, qk_norm="head",
        bos_token_id=151643, eos_token_id=151645,
    )


PRESETS = {
    "qwen2.5-0.5b": lambda: llama_config(
        name="qwen2.5-0.5b", hf_model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, tie_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, rope=RopeConfig(1e6), norm_eps=1e-6, bos_token_id=151643,
        eos_token_id=151643,
    ),
    "qwen3-0.6b": lambda: qwen3("qwen3-0.6b", 1024, 3072, 28, 16, True),
    "qwen3-1.7b": lambda: qwen3("qwen3-1.7b", 2048, 6144, 28, 16, True),
    "qwen3-4b": lambda: qwen3("qwen3-4b", 2560, 9728, 36, 32, True),
    "qwen3-8b": lambda: qwen3("qwen3-8b", 4096, 12288, 36, 32, False),
    "qwen3-14b": lambda: qwen3("qwen3-14b", 5120, 17408, 40, 40, False),
    "qwen3-32b": lambda: qwen3("qwen3-32b", 5120, 25600, 64, 64, False),
}


def _sliding(d: dict, kw: dict) -> None:
    """Qwen's optional sliding window: layers >= max_window_layers (or explicit layer_types)."""
    n = kw["num_layers"]
    if d.get("layer_types"):
        kw["layer_types"] = parse_layer_types(d, n)
    elif d.get("use_sliding_window") and d.get("sliding_window"):
        start = int(d.get("max_window_layers", n))
        kw["layer_types"] = [SLIDING if i >= start else FULL for i in range(n)]
    if SLIDING in kw.get("layer_types", []):
        kw["sliding_window"] = int(d["sliding_window"])


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw.pop("rope_local")
    kw["attn_out_bias"] = False
    if d["model_type"] == "qwen2":
        kw["qkv_bias"] = True
    else:
        kw["qkv_bias"] = bool(d.get("attention_bias", False))
        kw["qk_norm"] = "head"
    _sliding(d, kw)
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    mt = cfg.hf_model_type if cfg.hf_model_type in ("qwen2", "qwen3") else ("qwen3" if cfg.qk_norm == "head" else "qwen2")
    check_exportable(cfg, mt, attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     position="rope", attn_out_bias=False, embed_scale=None, norm_unit_offset=False,
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False,
                     qk_norm="none" if mt == "qwen2" else "head", **({"qkv_bias": True} if mt == "qwen2" else {}))
    d = common_to_hf(cfg, mt, "Qwen2ForCausalLM" if mt == "qwen2" else "Qwen3ForCausalLM")
    d["hidden_act"] = "silu"
    if SLIDING in cfg.layer_types:
        first = cfg.layer_types.index(SLIDING)
        if cfg.layer_types != [FULL] * first + [SLIDING] * (cfg.num_layers - first):
            raise ConfigError(f"cannot export as {mt}: sliding layers must be the last ones")
        d.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=first)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if mt == "qwen3":
        d["attention_bias"] = cfg.qkv_bias
    return d


def from_gguf(f: GGUFFile) -> dict:
    mt = f.architecture  # llama.cpp's qwen2 / qwen3 are the HF model types
    d = gguf_config(f, mt, "Qwen2ForCausalLM" if mt == "qwen2" else "Qwen3ForCausalLM")
    n = d["num_hidden_layers"]
    d.update(hidden_act="silu", use_sliding_window=False, max_window_layers=n)
    if mt == "qwen2":
        d["sliding_window"] = d["max_position_embeddings"]
    else:
        d.update(sliding_window=None, attention_bias=f.has_tensor("blk.0.attn_q.bias"))
    return d


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


FAMILY = Family(
    "qwen", ("qwen2", "qwen3"), PRESETS, from_hf, to_hf,
    gguf_architectures=("qwen2", "qwen3"), from_gguf=from_gguf, gguf_keys=GGUF_KEYS,
    tokenizer=TokenizerQuirks(pre_tokenizers=dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)),
)
