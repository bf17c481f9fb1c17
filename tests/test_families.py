"""Each family owns its checkpoint formats: the format readers name no family, and a new
architecture is one family file plus its registration."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llmarch
from llmarch import families
from llmarch.families import llama, tokenizer_quirks
from llmarch.families.base import GGUF_KEYS, Family

CHECKPOINTS = Path(llmarch.__file__).parent / "checkpoints"
FORMAT_READERS = ["gguf.py", "tokenizer.py", "hf.py", "formats.py"]
FAMILY_NAMES = re.compile(r"gemma|llama|qwen|mistral|deepseek|olmo|smollm|kimi|gpt2", re.IGNORECASE)


def _code_strings(source: str) -> list[str]:
    """String constants of a module's code: docstrings (and comments) left out."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_string_collector_sees_code_and_skips_docstrings():
    src = '"""About gemma."""\ndef f():\n    """llama docs"""\n    # qwen comment\n    return f"x{1}" + "Mistral-7B"\n'
    found = [s for s in _code_strings(src) if FAMILY_NAMES.search(s)]
    assert found == ["Mistral-7B"]


@pytest.mark.parametrize("module", FORMAT_READERS)
def test_format_readers_name_no_family(module):
    strings = _code_strings((CHECKPOINTS / module).read_text())
    named = sorted({s for s in strings if FAMILY_NAMES.search(s)})
    assert not named, f"checkpoints/{module} names model families in code: {named}; move that knowledge to families/"


def test_each_gguf_architecture_has_one_family():
    archs = [a for fam in families.FAMILIES for a in fam.gguf_architectures]
    assert len(archs) == len(set(archs)) and {"llama", "qwen2", "qwen3", "gemma3"} <= set(archs)


def test_tokenizer_quirks_come_from_the_family():
    gemma, qwen = tokenizer_quirks("gemma3"), tokenizer_quirks("qwen2")
    assert gemma.chat_template and gemma.spaces_in_vocab and not gemma.add_space_prefix
    assert qwen.chat_template is None and not qwen.spaces_in_vocab and qwen.add_space_prefix
    # tokenizer-kind and pre-tokenizer names are llama.cpp-global: every family sees them all
    assert gemma.models == qwen.models and set(gemma.models.values()) == {"sentencepiece", "byte_level"}
    assert "qwen2" in gemma.pre_tokenizers and "llama-bpe" in qwen.pre_tokenizers


def _write_gguf(path: Path, arch: str, q: np.ndarray) -> dict[str, np.ndarray]:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((10, 16)),
        "blk.0.attn_norm.weight": rng.standard_normal(16),
        "blk.0.attn_q.weight": q,
        "blk.0.attn_k.weight": rng.standard_normal((8, 16)),
        "blk.0.attn_v.weight": rng.standard_normal((8, 16)),
        "blk.0.attn_output.weight": rng.standard_normal((16, 16)),
        "blk.0.ffn_norm.weight": rng.standard_normal(16),
        "blk.0.ffn_gate.weight": rng.standard_normal((24, 16)),
        "blk.0.ffn_up.weight": rng.standard_normal((24, 16)),
        "blk.0.ffn_down.weight": rng.standard_normal((16, 24)),
        "output_norm.weight": rng.standard_normal(16),
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    for name, a in tensors.items():
        w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _toy_from_gguf(f):
    return {**llama.from_gguf(f), "model_type": "toy_lm"}


TOY = Family("toy", ("toy_lm",), {}, llama.from_hf, llama.to_hf, gguf_architectures=("toy",),
             from_gguf=_toy_from_gguf, gguf_keys=GGUF_KEYS)


def test_new_architecture_is_one_family(tmp_path, monkeypatch):
    """A family registered from outside loads its GGUF files through the one dispatch, with its own
    tensor handling: the toy family keeps Q rows as stored, the llama family unpermutes them."""
    monkeypatch.setattr(families, "FAMILIES", [*families.FAMILIES, TOY])
    q = np.arange(256, dtype=np.float32).reshape(16, 16)
    written = _write_gguf(tmp_path / "toy.gguf", "toy", q)
    model = llmarch.from_pretrained(tmp_path / "toy.gguf")
    assert model.config.hf_model_type == "toy_lm" and model.config.tie_embeddings
    torch.testing.assert_close(model.layers[0].attn.q_proj.weight, torch.from_numpy(q))
    torch.testing.assert_close(model.layers[0].mlp.down_proj.weight,
                               torch.from_numpy(written["blk.0.ffn_down.weight"].astype(np.float32)))

    _write_gguf(tmp_path / "llama.gguf", "llama", q)
    as_llama = llmarch.from_pretrained(tmp_path / "llama.gguf")
    unpermuted = torch.from_numpy(q).reshape(4, 2, 2, 16).transpose(1, 2).reshape(16, 16)
    torch.testing.assert_close(as_llama.layers[0].attn.q_proj.weight, unpermuted)
    assert not torch.equal(unpermuted, torch.from_numpy(q))


def test_attention_softcap_is_refused_where_the_format_cannot_hold_it(tmp_path):
    """Only Gemma 2 checkpoints carry attention logit soft-capping: exporting it as another
    family would silently drop it, and MLA has no soft-capped path."""
    import llmarch
    from llmarch.errors import ConfigError

    cfg = llmarch.ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                              intermediate_size=64, hf_model_type="llama", attn_logit_softcap=30.0)
    with pytest.raises(ConfigError, match="attn_logit_softcap"):
        llmarch.save_pretrained(llmarch.build_model(cfg), tmp_path)
    with pytest.raises(ConfigError, match="not supported with MLA"):
        llmarch.get_config("deepseek-v3").replace(attn_logit_softcap=30.0).validate()
