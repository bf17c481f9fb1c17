"""Sliding-window perplexity against Hugging Face's documented strided recipe, computed here
with plain full forwards and cross-entropy over masked labels."""

import math

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.errors import GenerationError
from llmarch.inference.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = llmarch.ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64, max_position_embeddings=128,
                              layer_types=["sliding", "full"], sliding_window=5)
    m = llmarch.build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def hf_recipe(model, ids, context, stride):
    """The recipe of transformers' perplexity guide: labels before the new tokens set to -100."""
    nlls, counted, prev_end = [], 0, 0
    n = ids.shape[1]
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = model(x)
        lab = labels[:, 1:]
        nlls.append(F.cross_entropy(logits[0, :-1].double(), lab[0], ignore_index=-100, reduction="sum"))
        counted += int((lab != -100).sum())
        prev_end = end
        if end == n:
            break
    return math.exp(sum(nlls).item() / counted), counted


@pytest.mark.parametrize("context,stride", [(64, 64), (16, 16), (16, 8), (16, 1), (13, 5)])
def test_matches_the_strided_recipe(model, context, stride):
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(1))
    ref, counted = hf_recipe(model, ids, context, stride)
    res = perplexity(model, ids[0].tolist(), context=context, stride=stride, chunk=7)
    assert res.tokens == counted
    assert res.perplexity == pytest.approx(ref, rel=1e-5)
    assert res.perplexity > 1


def test_one_window_is_exp_of_the_mean_cross_entropy(model):
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nll = F.cross_entropy(model(ids)[0, :-1].double(), ids[0, 1:]).item()
    res = perplexity(model, ids[0], context=64)
    assert res.tokens == 39 and res.windows == 1
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_overlap_gives_more_context_so_a_different_value(model):
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(3))
    a = perplexity(model, ids[0], context=10, stride=10)
    b = perplexity(model, ids[0], context=10, stride=2)
    assert b.tokens == 59 and a.tokens == 54  # non-overlapping windows skip each window's first token
    assert a.perplexity != pytest.approx(b.perplexity, rel=1e-4)


def test_windows_cover_every_token_once():
    for n, c, s in [(50, 16, 16), (50, 16, 3), (7, 16, 4), (33, 8, 8)]:
        spans = windows(n, c, s)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert len(scored) == len(set(scored))
        assert all(end - begin <= c for begin, end, _ in spans)
        if s < c:
            assert scored == list(range(1, n))


@pytest.mark.parametrize("kw,msg", [(dict(context=1), "at least 2"), (dict(context=16, stride=0), "stride"),
                                    (dict(context=16, stride=17), "stride"), (dict(context=1000), "maximum context")])
def test_bad_arguments(model, kw, msg):
    with pytest.raises(GenerationError, match=msg):
        perplexity(model, list(range(20)), **kw)


def test_too_few_tokens(model):
    with pytest.raises(GenerationError, match="at least 2 tokens"):
        perplexity(model, [5], context=8)


# ----------------------------------------------------------------------------------------
# llmarch perplexity
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF directory (llama family) with a tokenizer, as `llmarch perplexity --model` takes it."""
    import json

    from tiny_tokenizer import VOCAB, tiny_tokenizer

    torch.manual_seed(0)
    cfg = llmarch.ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64, max_position_embeddings=256, hf_model_type="llama")
    m = llmarch.build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("ppl")
    llmarch.save_pretrained(m, d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))
    return d


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmarch.cli", "perplexity", *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_the_api_value_as_json(model_dir, tmp_path):
    import json

    from tiny_tokenizer import tiny_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 4
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    r = _cli(f, "--model", model_dir, "--context", 16, "--stride", 8, "--max-tokens", 100, "--json",
             "--dtype", "float32", "--threads", 1)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ids = tiny_tokenizer().encode(text)[:100]
    ref = perplexity(llmarch.from_pretrained(model_dir), ids, context=16, stride=8)
    assert out["tokens"] == ref.tokens == 99
    assert out["perplexity"] == pytest.approx(ref.perplexity, rel=1e-4)
    assert out["tokens_per_second"] > 0 and out["dtype"] == "float32"


@pytest.mark.parametrize("args,message", [
    (["{f}", "--stride", "0"], "stride"),
    (["{f}", "--context", "1"], "at least 2"),
    (["{f}", "--max-tokens", "1"], "max-tokens"),
    (["{d}/missing.txt"], "not found"),
    (["{bad}"], "not UTF-8"),
    (["{f}", "--threads", "0"], "threads"),
])
def test_cli_bad_input_is_one_error_line(model_dir, tmp_path, args, message):
    f = tmp_path / "t.txt"
    f.write_text("hello there", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    r = _cli(*(a.format(f=f, d=tmp_path, bad=bad) for a in args), "--model", model_dir)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("llmarch: error: ") and message in lines[0], r.stderr
