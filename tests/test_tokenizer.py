"""Tokenizer: GGUF-built tokenizers against transformers' GGUF tokenizers, chat templates, streaming."""

from __future__ import annotations

import json
import os

import pytest

from llmarch.checkpoints.formats import GGUFCheckpoint
from llmarch.checkpoints.tokenizer import StreamDecoder, Tokenizer
from llmarch.errors import CheckpointError

SAMPLES = [
    "Hello world",
    "Hello world, this is a test of the tokenizer.",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a\n\nb\n\n\n c\n",
    "日本語のテキスト、中文文本和한국어 텍스트",
    "emoji 😀🎉 family 👩‍👩‍👧 flags 🇫🇷 café naïve Ångström",
    "def f(x):\n\tif x:\n\t\treturn  x  *  2\n    else:\n        pass\n",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i];\t// accumulate\n}",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhey<|im_end|>\n<|endoftext|>",
    "numbers 1234567 3.14159 -42 and      many     spaces",
    "",
    " ",
    "\n",
    "\u00a0non-breaking\u200bzero-width",
    "I'm sure they'RE fine, we'll see",
    "Ⅻ ﬁ ẞ µ ∑ ≈ ∞",
    "ab\r\ncd\r\n",
]

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 日本 + emoji 😀?\n"},
]





@pytest.fixture(scope="session")
def ours(real_paths):
    return {k: Tokenizer.from_gguf(GGUFCheckpoint(p)) for k, p in real_paths.items()}


@pytest.fixture(scope="session")
def oracle(real_paths, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    toks = {}
    for k, p in real_paths.items():
        d = tmp_path_factory.mktemp(f"oracle_{k}")
        os.symlink(p, d / p.name)
        toks[k] = transformers.AutoTokenizer.from_pretrained(d, gguf_file=p.name)
    return toks


@pytest.mark.parametrize("which", ["gemma", "qwen"])
@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(which, add_special, ours, oracle):
    for text in SAMPLES:
        assert ours[which].encode(text, add_special_tokens=add_special) == \
            oracle[which].encode(text, add_special_tokens=add_special), repr(text)


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_decode_matches_transformers_and_round_trips(which, ours, oracle):
    tok = ours[which]
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                oracle[which].decode(ids, skip_special_tokens=skip), repr(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_and_ids(ours, oracle):
    gemma, qwen = ours["gemma"], ours["qwen"]
    assert gemma.bos_token_id == 2 and gemma.add_bos_token
    assert gemma.encode("hi")[0] == 2 and gemma.encode("hi", add_special_tokens=False)[0] != 2
    assert gemma.eos_token_ids == {1, gemma.token_to_id("<end_of_turn>")}
    assert gemma.encode("<start_of_turn>", add_special_tokens=False) == [gemma.token_to_id("<start_of_turn>")]
    assert not qwen.add_bos_token
    assert qwen.token_to_id("<|im_end|>") in qwen.eos_token_ids
    assert qwen.encode("<|im_start|>", add_special_tokens=False) == [qwen.token_to_id("<|im_start|>")]
    for k in ("gemma", "qwen"):
        assert ours[k].vocab_size == len(oracle[k])
        assert ours[k].bos_token_id == oracle[k].bos_token_id
        assert ours[k].eos_token_id == oracle[k].eos_token_id


@pytest.mark.parametrize("which", ["gemma", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(which, add_generation_prompt, ours, oracle):
    tok = ours[which]
    # Gemma GGUF files carry no chat template: ours falls back to Gemma 3's; give transformers the same
    template = tok.chat_template if oracle[which].chat_template is None else None
    expected = oracle[which].apply_chat_template(MESSAGES, tokenize=False, chat_template=template,
                                                 add_generation_prompt=add_generation_prompt)
    got = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert got == expected
    if which == "gemma":
        assert got.startswith("<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?")
    else:
        assert got.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>")


def test_chat_template_raise_exception(ours):
    """The template's own raise_exception reaches the user as one llmarch error with its message."""
    from llmarch.errors import LlmarchError

    with pytest.raises(LlmarchError, match="alternate"):
        ours["gemma"].apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_stream_decoder(which, ours):
    tok = ours[which]
    text = "Streaming 😀 emoji, 日本語, and ünïcödé\n\tindented  text 👩‍👩‍👧 done."
    ids = tok.encode(text, add_special_tokens=True)
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)
    assert isinstance(stream, StreamDecoder)


def test_stream_decoder_holds_partial_utf8(ours):
    tok = ours["gemma"]  # byte-fallback tokens: an emoji unknown to the vocabulary is 4 byte tokens
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "🫠".encode()]
    stream = StreamDecoder(tok)
    assert [stream.feed(i) for i in byte_ids] == ["", "", "", "🫠"]


def test_from_file_hf_directory(ours, oracle, tmp_path):
    """An HF tokenizer directory (saved by transformers) loads with the same behaviour."""
    hf = oracle["qwen"]
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(tmp_path)
    assert tok.chat_template == ours["qwen"].chat_template
    assert tok.bos_token == ours["qwen"].bos_token and tok.eos_token_id == ours["qwen"].eos_token_id
    for text in SAMPLES:
        assert tok.encode(text) == hf.encode(text)
    assert tok.apply_chat_template(MESSAGES) == ours["qwen"].apply_chat_template(MESSAGES)
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("hi") == tok.encode("hi")


def test_from_file_missing(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def _bpe_ids(vocab, merges, texts):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    backend = Backend(BPE(vocab=vocab, merges=merges, byte_fallback=False, dropout=None))
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def test_merges_that_fire_change_no_encoding():
    """A made-up SentencePiece-BPE vocabulary whose tokens split in several ways: the derived merges
    keep only those BPE can apply, and every text encodes as with all of them."""
    import random

    from llmarch.checkpoints import tokenizer as tk

    rng = random.Random(0)
    alphabet = "abcd\u2581"
    pieces = set(alphabet)
    while len(pieces) < 400:
        pieces.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))))
    vocab = {t: i for i, t in enumerate(sorted(pieces))}
    priority = {t: rng.random() for t in vocab}
    ranked = sorted(((-priority[t], -i, t[:i], t[i:]) for t in vocab for i in range(1, len(t))
                     if t[:i] in vocab and t[i:] in vocab), key=lambda m: (m[0], m[1]))
    every = [(m[2], m[3]) for m in ranked]
    kept = tk._merges_that_fire(vocab, every)
    assert kept == tk._merges_from_vocab(vocab, priority)
    assert 0 < len(kept) < len(every) and set(kept) <= set(every)
    assert kept == [m for m in every if m in set(kept)]  # in the same order
    texts = list(vocab) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(5000)]
    assert _bpe_ids(vocab, kept, texts) == _bpe_ids(vocab, every, texts)


def test_gemma_with_the_merges_that_fire_encodes_as_with_all(real_paths, ours, monkeypatch):
    """Gemma 3's 515k derived merges cut to those BPE can apply: the same ids for every vocabulary
    token spelled out, for random runs of tokens and for the bundled Shakespeare."""
    import gzip
    import importlib.resources
    import random

    from llmarch.checkpoints import tokenizer as tk
    from llmarch.families import tokenizer_quirks

    ckpt = GGUFCheckpoint(real_paths["gemma"])
    monkeypatch.setattr(tk, "_merges_that_fire", lambda vocab, merges: merges)
    every = Tokenizer._build_from_gguf(ckpt, tokenizer_quirks(ckpt.architecture))
    kept = ours["gemma"]
    n_every = len(json.loads(every.backend.to_str())["model"]["merges"])
    n_kept = len(json.loads(kept.backend.to_str())["model"]["merges"])
    assert n_kept < 0.5 * n_every, (n_kept, n_every)
    vocab = sorted(every.backend.get_vocab(with_added_tokens=False))
    rng = random.Random(0)
    text = gzip.decompress(importlib.resources.files("llmarch.data").joinpath("shakespeare.txt.gz").read_bytes()).decode()
    texts = ([t.replace("\u2581", " ") for t in vocab]
             + ["".join(rng.choice(vocab) for _ in range(rng.randint(2, 12))).replace("\u2581", " ") for _ in range(20000)]
             + [text[i : i + 4000] for i in range(0, len(text), 4000)])
    for a, b in zip(every.backend.encode_batch(texts, add_special_tokens=False),
                    kept.backend.encode_batch(texts, add_special_tokens=False)):
        assert a.ids == b.ids
