"""Small valid inputs for the hardening and fuzz tests, built in the test: a loadable one-layer
Llama GGUF file, a loadable Hugging Face directory (config.json + model.safetensors) and a
tokenizer directory. Each test then damages a copy."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 16, 4, 2, 24, 32


def _llama_tensors(layers: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS

    def w(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    out = [("token_embd.weight", w(VOCAB, HIDDEN)), ("output_norm.weight", np.ones(HIDDEN, np.float32))]
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32)),
            (f"blk.{i}.attn_q.weight", w(HEADS * head_dim, HIDDEN)),
            (f"blk.{i}.attn_k.weight", w(KV_HEADS * head_dim, HIDDEN)),
            (f"blk.{i}.attn_v.weight", w(KV_HEADS * head_dim, HIDDEN)),
            (f"blk.{i}.attn_output.weight", w(HIDDEN, HEADS * head_dim)),
            (f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32)),
            (f"blk.{i}.ffn_gate.weight", w(FFN, HIDDEN)),
            (f"blk.{i}.ffn_up.weight", w(FFN, HIDDEN)),
            (f"blk.{i}.ffn_down.weight", w(HIDDEN, FFN)),
        ]
    return out


def write_gguf(path: Path, *, layers: int = 1, block_count: int | None = None, context_length: int = 64) -> Path:
    """A loadable Llama GGUF file; ``block_count`` may claim more layers than its ``layers`` of tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers if block_count is None else block_count)
    w.add_context_length(context_length)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for name, array in _llama_tensors(layers):
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HF_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
    "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "hidden_act": "silu",
}


def write_hf_dir(path: Path, config: dict | None = None) -> Path:
    """A loadable one-layer Llama checkpoint directory (tied embeddings)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or HF_CONFIG))
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for name, array in _llama_tensors(1):
        stem = name.removesuffix(".weight")
        if stem in names:
            hf = names[stem]
        else:
            _, i, part = stem.split(".")
            hf = f"model.layers.{i}.{layer[part]}"
        state[hf + ".weight"] = torch.from_numpy(array)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def write_tokenizer_dir(path: Path, config: dict | bytes | None = None) -> Path:
    """A character-level ``tokenizer.json`` plus ``tokenizer_config.json`` (``config``: a dict or raw bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.save(str(path / "tokenizer.json"))
    if config is None:
        config = {"bos_token": "<s>", "eos_token": "</s>",
                  "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (path / "tokenizer_config.json").write_bytes(raw)
    return path
