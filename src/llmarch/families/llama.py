"""Llama 3 / 3.2: the article's baseline. Pre-RMSNorm, GQA, SwiGLU, RoPE (llama3 scaling).

GGUF: llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` from HF's
rotate-half RoPE layout to its interleaved one (undone on load), and writes Mistral models
under the ``llama`` architecture too (told apart by ``general.name``). llama.cpp names its
SentencePiece tokenizer kind ``llama`` and Llama 3's byte-level pre-tokenizer ``llama-bpe``.
"""

from __future__ import annotations

import torch

from ..checkpoints.gguf import GGUFFile
from ..model.config import ModelConfig, RopeConfig
from .base import (
    GGUF,
    GGUF_KEYS,
    LLAMA_KEYS,
    SENTENCEPIECE,
    Family,
    Stream,
    TokenizerQuirks,
    check_exportable,
    common_from_hf,
    common_to_hf,
    gguf_config,
    rename,
    rename_gguf,
)

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
    "llama3.2-3b": lambda: llama_config(
        name="llama3.2-3b", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, tie_embeddings=True, max_position_embeddings=131072,
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
    check_exportable(cfg, "llama", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     qk_norm="none", position="rope", norm_unit_offset=False, embed_scale=None,
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False,
                     qkv_bias=cfg.attn_out_bias, layer_types=["full"] * cfg.num_layers)
    d = common_to_hf(cfg, "llama", "LlamaForCausalLM")
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias, hidden_act="silu")
    return d


def from_gguf(f: GGUFFile) -> dict:
    d = gguf_config(f, "llama", "LlamaForCausalLM")
    d.update(hidden_act="silu", attention_bias=f.has_tensor("blk.0.attn_q.bias"), mlp_bias=False)
    if "mistral" in str(f.metadata.get("general.name", "")).lower():
        window = f.value("attention.sliding_window")
        d.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=int(window) if window else None)
    return d


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's ``LlamaModel.permute`` of Q/K rows (interleaved -> rotate-half RoPE).
    Whole rows move, so a still-quantised tensor (``QuantizedTensor``) is unpermuted as well."""
    rows = w.shape[0]
    return w[torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(-1)]


def gguf_to_hf_layout(tensors: Stream, cfg: ModelConfig) -> Stream:
    """A ``llama``-architecture GGUF file's tensors in HF names and HF's rotate-half Q/K row order."""
    for name, t in rename_gguf(tensors, GGUF_KEYS):
        if ".self_attn.q_proj." in name:
            t = _unpermute(t, cfg.num_heads)
        elif ".self_attn.k_proj." in name:
            t = _unpermute(t, cfg.num_kv_heads)
        yield name, t


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    if fmt == GGUF:
        tensors = gguf_to_hf_layout(tensors, cfg)
    return rename(tensors, LLAMA_KEYS, "llama")


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


FAMILY = Family(
    "llama", ("llama",), PRESETS, from_hf, to_hf, sanitize=sanitize,
    gguf_architectures=("llama",), from_gguf=from_gguf, gguf_keys=GGUF_KEYS,
    tokenizer=TokenizerQuirks(
        models={"llama": SENTENCEPIECE},
        pre_tokenizers=dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe"), _LLAMA3_SPLIT),
    ),
)
