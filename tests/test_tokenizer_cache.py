"""The tokenizer cache: built once, then read back; damaged entries rebuilt; no cache when unwritable."""

from __future__ import annotations

import dataclasses
import json

import pytest

gguf = pytest.importorskip("gguf")

from llmarch.checkpoints import cache
from llmarch.checkpoints.formats import GGUFCheckpoint
from llmarch.checkpoints.gguf import GGUFFile
from llmarch.checkpoints.tokenizer import Tokenizer
from llmarch.families import tokenizer_quirks

SAMPLE = ("Hello world, this is a test.  Two  spaces\n\n\ttab 日本語 😀 café "
          "<start_of_turn>user\nhi<end_of_turn> <|im_start|>x<|im_end|> 12345 ab\r\n")

_WORDS = ["\u2581Hello", "\u2581world", "\u2581test", "\u2581is", "\u2581a", "\u2581this", "Hel", "lo", "wor", "ld",
          "\u2581", "\u2581\u2581", "e", "l", "o", "H", "w", "r", "d", "t", "s", "i", "a", "h"]


def _tiny_spm_gguf(path, template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}<end_of_turn>{% endfor %}"):
    """A GGUF file holding only a small SentencePiece tokenizer (byte fallback, control tokens)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += _WORDS
    types += [1] * len(_WORDS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LLMARCH_CACHE", str(root))
    return root


def _entries(root):
    return sorted((root / "tokenizers").glob("*.json"))


def _same(a: Tokenizer, b: Tokenizer) -> None:
    assert a.encode(SAMPLE) == b.encode(SAMPLE)
    assert a.decode(a.encode(SAMPLE)) == b.decode(b.encode(SAMPLE))
    assert repr(a) == repr(b) and a.eos_token_ids == b.eos_token_ids
    assert a.backend.to_str() == b.backend.to_str()  # the whole state: vocabulary, merges, added tokens, ids
    for field in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                  "chat_template"):
        assert getattr(a, field) == getattr(b, field), field


def _counting_builds(monkeypatch):
    calls = []
    build = Tokenizer._build_from_gguf.__func__

    def counted(cls, ckpt, quirks):
        calls.append(ckpt.path)
        return build(cls, ckpt, quirks)

    monkeypatch.setattr(Tokenizer, "_build_from_gguf", classmethod(counted))
    return calls


def test_second_load_is_a_cache_hit(tmp_path, cache_root, monkeypatch):
    path = _tiny_spm_gguf(tmp_path / "tok.gguf")
    calls = _counting_builds(monkeypatch)
    first = Tokenizer.from_gguf(path)
    assert len(calls) == 1 and len(_entries(cache_root)) == 1
    assert [p.name for p in (cache_root / "tokenizers").iterdir()] == [_entries(cache_root)[0].name]  # no temporaries left

    def fail(cls, ckpt, quirks):
        raise AssertionError("the tokenizer was built again instead of read from the cache")

    monkeypatch.setattr(Tokenizer, "_build_from_gguf", classmethod(fail))
    second = Tokenizer.from_gguf(path)
    _same(first, second)
    assert second.encode("Hello world")[0] == 2  # BOS from the cached fields
    assert 5 in second.eos_token_ids  # <end_of_turn>, used by the chat template


def test_entry_of_another_model_type_reads_back(tmp_path):
    """An entry whose model is not a BPE (the fast path hands only a BPE's tables over as Python
    objects) is read as the JSON it is."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert cache._backend(backend.to_str().encode()).to_str() == backend.to_str()


def test_key_follows_the_tokenizer_metadata_and_quirks(tmp_path, cache_root):
    a = GGUFFile(_tiny_spm_gguf(tmp_path / "a.gguf"))
    same = GGUFFile(_tiny_spm_gguf(tmp_path / "same.gguf"))
    other = GGUFFile(_tiny_spm_gguf(tmp_path / "b.gguf", template="{{ messages[0]['content'] }}"))
    quirks = tokenizer_quirks("llama")
    assert cache.tokenizer_cache_path(a, quirks) == cache.tokenizer_cache_path(same, quirks)
    assert cache.tokenizer_cache_path(a, quirks) != cache.tokenizer_cache_path(other, quirks)
    changed = dataclasses.replace(quirks, add_space_prefix=not quirks.add_space_prefix)
    assert cache.tokenizer_cache_path(a, quirks) != cache.tokenizer_cache_path(a, changed)


def _truncate(entry, data):
    entry.write_bytes(data[: len(data) // 2])


def _flip_byte(entry, data):
    i = len(data) - 100  # inside the tokenizers JSON
    entry.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])


def _wrong_key(entry, data):
    """A whole, valid entry, but written for another key (e.g. copied from another file's entry)."""
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    header["key"] = "0" * 64
    entry.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _old_format(entry, data):
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    header["format"] = cache.FORMAT_VERSION - 1
    entry.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _garbage(entry, data):
    entry.write_bytes(b"\x00\xff not json")


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _wrong_key, _old_format, _garbage])
def test_damaged_entry_is_rebuilt(damage, tmp_path, cache_root, monkeypatch):
    path = _tiny_spm_gguf(tmp_path / "tok.gguf")
    calls = _counting_builds(monkeypatch)
    first = Tokenizer.from_gguf(path)
    (entry,) = _entries(cache_root)
    good = entry.read_bytes()
    damage(entry, good)
    assert entry.read_bytes() != good
    rebuilt = Tokenizer.from_gguf(path)
    assert len(calls) == 2, "a damaged entry was served"
    _same(first, rebuilt)
    assert entry.read_bytes() == good  # and written again, whole
    Tokenizer.from_gguf(path)
    assert len(calls) == 2


def test_unwritable_cache_dir_means_no_caching(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LLMARCH_CACHE", str(blocker / "cache"))  # mkdir fails even as root
    path = _tiny_spm_gguf(tmp_path / "tok.gguf")
    calls = _counting_builds(monkeypatch)
    a = Tokenizer.from_gguf(path)
    b = Tokenizer.from_gguf(path)
    assert len(calls) == 2
    _same(a, b)
    assert blocker.read_text() == "not a directory"


def test_read_only_cache_dir(tmp_path, monkeypatch):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    root = tmp_path / "ro"
    (root / "tokenizers").mkdir(parents=True)
    (root / "tokenizers").chmod(0o555)
    monkeypatch.setenv("LLMARCH_CACHE", str(root))
    path = _tiny_spm_gguf(tmp_path / "tok.gguf")
    Tokenizer.from_gguf(path)
    assert not list((root / "tokenizers").iterdir())


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_real_cached_tokenizer_equals_built(which, real_paths, tmp_path, monkeypatch):
    """The entry read back encodes and decodes exactly as the tokenizer built from the file."""
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    ckpt = GGUFCheckpoint(real_paths[which])
    built = Tokenizer._build_from_gguf(ckpt, tokenizer_quirks(ckpt.architecture))
    Tokenizer.from_gguf(ckpt)  # writes the entry
    calls = _counting_builds(monkeypatch)
    cached = Tokenizer.from_gguf(ckpt)
    assert calls == []
    _same(built, cached)
    # the entry keeps the merges in tokenizers' compact "a b" form, and reads back the same model
    (entry,) = _entries(tmp_path)
    merges = json.loads(entry.read_bytes().partition(b"\n")[2])["model"]["merges"]
    assert merges and all(isinstance(m, str) for m in merges)
    assert cached.backend.to_str() == built.backend.to_str()


def test_cli_import_is_light():
    """``import llmarch.cli`` (every start of the command) loads no torch, analysis, matplotlib or transformers."""
    import subprocess
    import sys

    code = ("import sys, llmarch.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'matplotlib', 'transformers') or m.startswith('llmarch.analysis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
