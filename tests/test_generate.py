"""The generation engine on tiny random models: caches, left-padded batches, samplers, stop
strings, input validation and the ``llmarch generate`` command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracle import TOK, VOCAB
from tiny_tokenizer import tiny_tokenizer

import llmarch
from llmarch.errors import GenerationError
from llmarch.inference.generate import (
    GenerationConfig,
    Sampler,
    apply_repetition_penalty,
    chat_prompt,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    generate,
    stream,
)

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_reference):
    """arch -> (llmarch model, HF model, a copy of its checkpoint directory with a tokenizer)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            src, hf = tiny_reference(arch)
            d = tmp_path_factory.mktemp(arch)
            shutil.copytree(src, d, dirs_exist_ok=True)
            tok = tiny_tokenizer()
            tok.backend.save(str(d / "tokenizer.json"))
            (d / "tokenizer_config.json").write_text(
                json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True})
            )
            cache[arch] = (llmarch.from_pretrained(d), hf, d)
        return cache[arch]

    return get


def _prompt(n: int, seed: int = 0) -> list[int]:
    # ids >= 3: no special tokens inside prompts
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _uncached_reference(model, prompt: list[int], config: GenerationConfig) -> list[int]:
    """Generate by re-running the whole sequence through the model, no cache, at every step."""
    ids = list(prompt)
    sampler = Sampler(config, 1, model.config.vocab_size)
    sampler.observe(torch.tensor([ids]))
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            tok = sampler(model(torch.tensor([ids]))[:, -1])
            sampler.observe(tok[:, None])
            ids.append(int(tok))
    return ids[len(prompt) :]


# ----------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------


def test_sliding_window_cache_holds_only_the_window(tiny):
    model = tiny("gemma3_text")[0]
    cfg = model.config
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # keys + values, float32
    n_sliding = cfg.layer_types.count("sliding")
    assert 0 < n_sliding < cfg.num_layers and cfg.sliding_window == 4
    for new in (6, 60):
        g = stream(model, None, _prompt(5), GenerationConfig(max_new_tokens=new, ignore_eos=True))
        g.run()
        kinds = list(zip(cfg.layer_types, g.cache.layers))
        sliding = sum(c.nbytes for t, c in kinds if t == "sliding")
        full = sum(c.nbytes for t, c in kinds if t == "full")
        assert sliding == n_sliding * cfg.sliding_window * per_token
        assert full == (cfg.num_layers - n_sliding) * (5 + new) * per_token


def test_a_ring_not_yet_full_attends_over_its_written_slots_only():
    """Decoding in a window larger than the context so far returns (and so attends over) only
    the slots written, in order; from the first wrap on, the whole ring. A prefill after a few
    tokens sees the written slots plus the new tokens."""
    from llmarch.model.cache import RingCache

    ring = RingCache(1, 1, 2, 2, size=4, dtype=torch.float32, device="cpu")
    for i in range(6):
        kv = torch.full((1, 1, 1, 2), float(i))
        k, v, pos = ring.update(kv, kv, torch.tensor([[i]]))
        n = min(i + 1, 4)
        assert k.shape[2] == v.shape[2] == pos.shape[1] == n
        assert sorted(pos[0].tolist()) == list(range(i + 1 - n, i + 1))
        assert torch.equal(k[0, 0, :, 0], pos[0].float())
    ring = RingCache(1, 1, 2, 2, size=8, dtype=torch.float32, device="cpu")
    ring.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.tensor([[0]]))
    k, _, pos = ring.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), torch.tensor([[1, 2, 3]]))
    assert pos[0].tolist() == [0, 1, 2, 3] and k.shape[2] == 4


def test_decoding_in_a_window_longer_than_the_context_matches_the_uncached_forward(tiny):
    """Sliding layers whose ring is not yet full (window 64, 20 tokens): the same logits, cached
    token by token, as the whole sequence at once."""
    from llmarch.model.cache import RingCache

    model = tiny("gemma3_text")[0]
    wide = llmarch.build_model(model.config.replace(sliding_window=64)).eval()
    wide.load_state_dict(model.state_dict())
    ids = torch.tensor([_prompt(20, seed=7)])
    with torch.no_grad():
        full = wide(ids)
        cache = wide.new_cache(1, 128)
        assert sum(isinstance(c, RingCache) and c.size == 64 for c in cache.layers) == model.config.layer_types.count("sliding")
        steps = torch.cat([wide(ids[:, i : i + 1], positions=torch.tensor([[i]]), cache=cache) for i in range(20)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_one_mask_per_layer_kind_per_forward(tiny, monkeypatch):
    """Layers whose caches hold the same key positions share one mask per forward (the
    sliding layers one, the full layers another), and the shared masks give the same
    tokens as the uncached forward (left padding makes every mask a real tensor)."""
    import llmarch.model.attention as A

    model = tiny("gemma3_text")[0]
    kinds = set(model.config.layer_types)
    assert kinds == {"sliding", "full"}
    built = []
    real = A.attention_mask
    monkeypatch.setattr(A, "attention_mask", lambda *a: built.append(1) or real(*a))
    prompts = [_prompt(3, 20), _prompt(9, 21)]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    out = generate(model, None, prompts, config).token_ids
    assert len(built) == len(kinds) * config.max_new_tokens  # one forward per new token
    monkeypatch.setattr(A, "attention_mask", real)
    assert out == [generate(model, None, p, config).token_ids[0] for p in prompts]
    assert out[0] == _uncached_reference(model, prompts[0], config)


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(max_new_tokens=40, ignore_eos=True),
        GenerationConfig(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.5),
        GenerationConfig(max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=3),
    ],
    ids=["greedy", "greedy-repetition-penalty", "sampled"],
)
def test_generation_past_the_window_matches_uncached_forward(tiny, config):
    model = tiny("gemma3_text")[0]
    prompt = _prompt(6, seed=1)
    out = generate(model, None, prompt, config).token_ids[0]
    assert len(out) == 40 >= 10 * model.config.sliding_window
    assert out == _uncached_reference(model, prompt, config)
    if config.repetition_penalty != 1 or not config.greedy:
        assert len(set(out)) > 10  # a varied sequence, not one token repeated


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_generation_matches_transformers(tiny, penalty):
    model, hf, _ = tiny("gemma3_text")
    prompt = _prompt(6, seed=2)
    ours = generate(model, None, prompt, GenerationConfig(max_new_tokens=40, ignore_eos=True,
                                                            repetition_penalty=penalty)).token_ids[0]
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40, min_new_tokens=40,
                          repetition_penalty=penalty, pad_token_id=TOK["pad_token_id"])[0, 6:].tolist()
    assert ours == ref


# ----------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama4_text"])  # MLA latent cache + MoE; chunked + NoPE + MoE
def test_cached_generation_matches_uncached_forward_other_attention(tiny, arch):
    model = tiny(arch)[0]
    prompt = _prompt(6, seed=4)
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, repetition_penalty=1.5)
    out = generate(model, None, prompt, config).token_ids[0]
    assert out == _uncached_reference(model, prompt, config)


@pytest.mark.parametrize("arch", ["gemma3_text", "llama", "gpt2", "qwen2", "deepseek_v3", "llama4_text"])
def test_left_padded_batch_matches_each_prompt_alone(tiny, arch):
    model = tiny(arch)[0]
    prompts = [_prompt(3, 10), _prompt(11, 11), _prompt(7, 12)]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    batch = generate(model, None, prompts, config)
    alone = [generate(model, None, p, config).token_ids[0] for p in prompts]
    assert batch.token_ids == alone
    assert batch.stats.prompt_tokens == 21 and batch.stats.generated_tokens == 36


def test_batch_rows_finish_independently(tiny):
    model = tiny("llama")[0]
    prompts = [_prompt(4, 20), _prompt(9, 21)]
    free = generate(model, None, prompts, GenerationConfig(max_new_tokens=10, ignore_eos=True)).token_ids
    eos = free[0][3]  # row 0 stops at its 4th token; row 1 runs on unless it meets the same id
    res = generate(model, None, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=[eos]))
    assert res.token_ids[0] == free[0][: free[0].index(eos) + 1] and res.finish_reasons[0] == "eos"
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert res.token_ids[1] == free[1][:cut]


# ----------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------


def _logits(rows=4, vocab=60, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def test_top_k_never_samples_outside_the_k_best():
    logits = _logits()
    sampler = Sampler(GenerationConfig(temperature=1.5, top_k=5, seed=0), 4, 60)
    best = torch.topk(logits, 5).indices
    draws = torch.stack([sampler(logits) for _ in range(300)], 1)  # (4, 300)
    for r in range(4):
        assert set(draws[r].tolist()) <= set(best[r].tolist())
        assert len(set(draws[r].tolist())) > 1
    assert _kept(filter_top_k(logits, 5)).sum(-1).tolist() == [5] * 4


def test_sampling_follows_the_renormalised_distribution():
    probs = torch.tensor([[0.45, 0.30, 0.15, 0.10]])
    sampler = Sampler(GenerationConfig(temperature=1.0, top_k=2, seed=0), 1, 4)
    draws = torch.tensor([int(sampler(probs.log())) for _ in range(3000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.6) < 0.04  # 0.45 / (0.45 + 0.30)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _kept(filter_top_p(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert _kept(filter_top_p(logits, 0.85)).tolist() == [[True, True, True, False]]
    assert _kept(filter_top_p(logits, 0.4)).tolist() == [[True, False, False, False]]
    assert _kept(filter_top_p(logits, 1.0)).all()


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _kept(filter_min_p(logits, 0.2)).tolist() == [[True, True, True, False]]  # threshold 0.1
    assert _kept(filter_min_p(logits, 0.5)).tolist() == [[True, True, False, False]]  # threshold 0.25


def test_repetition_penalty_as_specified():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    sampler = Sampler(GenerationConfig(repetition_penalty=2.0), 1, 4)
    sampler.observe(torch.tensor([[1, 0, 1]]))
    assert sampler.distribution(logits).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # a penalty large enough flips the greedy choice away from a seen token
    sampler = Sampler(GenerationConfig(repetition_penalty=1.6), 1, 4)
    sampler.observe(torch.tensor([[3]]))
    assert int(sampler(logits)) == 0


def test_filters_match_transformers_processors():
    from transformers.generation import logits_process as P

    logits = _logits(rows=6, vocab=80, seed=5)
    ids = torch.randint(0, 80, (6, 12), generator=torch.Generator().manual_seed(6))
    for ours, theirs in [
        (filter_top_k(logits, 7), P.TopKLogitsWarper(7)(ids, logits.clone())),
        (filter_top_p(logits, 0.8), P.TopPLogitsWarper(0.8)(ids, logits.clone())),
        (filter_min_p(logits, 0.05), P.MinPLogitsWarper(0.05)(ids, logits.clone())),
    ]:
        assert torch.equal(_kept(ours), _kept(theirs))
    sampler = Sampler(GenerationConfig(repetition_penalty=1.7), 6, 80)
    sampler.observe(ids)
    ref = P.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.allclose(sampler.distribution(logits), ref)


def test_temperature_scales_the_logits():
    logits = _logits()
    sampler = Sampler(GenerationConfig(temperature=0.5), 4, 60)
    assert torch.allclose(sampler.distribution(logits), logits / 0.5)


def test_same_seed_same_output(tiny):
    model = tiny("qwen2")[0]
    prompt = _prompt(5, 30)

    def run(seed):
        cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True, temperature=1.0, top_p=0.95, seed=seed)
        return generate(model, None, prompt, cfg).token_ids[0]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ----------------------------------------------------------------------------------------
# text: EOS, stop strings, streaming
# ----------------------------------------------------------------------------------------


def test_stop_string_trims_the_output_and_is_never_streamed(tiny):
    model = tiny("gemma3_text")[0]
    tok = tiny_tokenizer()
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True, repetition_penalty=1.5)
    free = generate(model, tok, "hello world", config)
    text = free.texts[0]
    assert len(text) == 30
    stop = text[12:14]
    g = stream(model, tok, "hello world", GenerationConfig(**{**config.__dict__, "stop": [stop]}))
    pieces = [s.texts[0] for s in g]
    res = g.result()
    assert res.texts[0] == text[: text.index(stop)]
    assert res.finish_reasons == ["stop"]
    assert "".join(pieces) == res.texts[0]
    assert len(res.token_ids[0]) == text.index(stop) + 2  # generation ended with the stop string
    assert all(stop not in p for p in pieces)


def test_eos_ends_the_row_and_is_not_in_the_text(tiny):
    model = tiny("llama")[0]
    tok = tiny_tokenizer()
    free = generate(model, tok, "abc", GenerationConfig(max_new_tokens=15, ignore_eos=True))
    eos = free.token_ids[0][5]
    first = free.token_ids[0].index(eos)
    res = generate(model, tok, "abc", GenerationConfig(max_new_tokens=15, eos_token_ids=[eos]))
    assert res.token_ids[0] == free.token_ids[0][: first + 1]
    assert res.finish_reasons == ["eos"]
    assert res.texts[0] == tok.decode(free.token_ids[0][:first], skip_special_tokens=True)


def test_stream_yields_one_step_per_token_with_stats(tiny):
    model = tiny("qwen2")[0]
    tok = tiny_tokenizer()
    g = stream(model, tok, ["abc", "hello there"], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    steps = []
    for step in g:
        assert not torch.is_inference_mode_enabled()  # the caller's code between steps runs normally
        steps.append(step)
    res = g.result()
    assert [s.index for s in steps] == list(range(8))
    assert steps[-1].finished == [True, True] and not any(steps[0].finished)
    assert [[s.token_ids[r] for s in steps] for r in range(2)] == res.token_ids
    assert ["".join(s.texts[r] for s in steps) for r in range(2)] == res.texts
    st = res.stats
    assert st.prompt_tokens == 4 + 12 and st.generated_tokens == 16 and st.decode_tokens == 14
    assert st.prefill_tps > 0 and st.decode_tps > 0 and "tok/s" in st.summary()


def test_chat_prompt_renders_the_template_with_one_bos():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }}.{% endfor %}"
        "{% if add_generation_prompt %}a {% endif %}"
    )
    ids = chat_prompt(tok, "hello", system="be brief")
    assert ids == [TOK["bos_token_id"], *tok.encode("s be brief.u hello.a ", add_special_tokens=False)]
    with pytest.raises(GenerationError):
        chat_prompt(tok, "")


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"temperature": -0.1}, {"min_p": 1.0},
        {"min_p": -0.1}, {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"max_new_tokens": 0},
        {"stop": [""]}, {"max_context": 0},
    ],
)
def test_bad_sampling_parameters(tiny, kwargs):
    model = tiny("llama")[0]
    with pytest.raises(GenerationError):
        generate(model, tiny_tokenizer(), "abc", GenerationConfig(**kwargs))


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "empty"),
        ([], {}, "no prompt"),
        ([[]], {}, "empty"),
        (["abc", ""], {}, "empty"),
        ("abcdefghij", {"max_context": 8}, "context"),  # 11 tokens with BOS
        ("abcdef", {"max_context": 12, "max_new_tokens": 6}, "max_new_tokens"),
        ("abc", {"max_new_tokens": 300}, "context"),  # the model's 256 positions
        ("abc", {"max_context": 10_000}, "exceeds"),
        ([[5, VOCAB]], {}, "vocabulary"),
    ],
)
def test_bad_prompts(tiny, prompt, kwargs, message):
    model = tiny("llama")[0]
    with pytest.raises(GenerationError, match=message):
        generate(model, tiny_tokenizer(), prompt, GenerationConfig(**kwargs))


# ----------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmarch.cli", "generate", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)


def test_cli_streams_the_same_text_as_the_api(tiny):
    model, _, d = tiny("gemma3_text")
    expected = generate(model, tiny_tokenizer(), "hello", GenerationConfig(max_new_tokens=9, ignore_eos=True))
    r = _cli("hello", "--model", str(d), "--max-new-tokens", "9", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    # EOS may come earlier on the CLI (it does not ignore it): compare the common part
    assert expected.texts[0].startswith(r.stdout.rstrip("\n"))
    assert "decode:" in r.stderr and "tok/s" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--model", "{d}"], "empty"),
        (["hi", "--model", "{d}", "--top-p", "2"], "top_p"),
        (["hi", "--model", "{d}", "--top-k", "many"], "--top-k"),
        (["hi", "--model", "{d}", "--temperature", "-1"], "temperature"),
        (["hi", "--model", "{d}", "--threads", "0"], "threads"),
        (["abcdefghij", "--model", "{d}", "--max-context", "6"], "context"),
        (["hi", "--model", "{d}/missing.gguf"], "no such model"),
        (["hi", "--model", "{d}/corrupt.gguf"], "GGUF"),
    ],
)
def test_cli_bad_input_is_one_error_line(tiny, args, message):
    d = tiny("gemma3_text")[2]
    (d / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    r = _cli(*(a.format(d=d) for a in args))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("llmarch: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_cli_device_without_the_device_is_one_error_line(tiny, tmp_path, command):
    d = tiny("llama")[2]
    text = tmp_path / "t.txt"
    text.write_text("hello there")
    first = "hi" if command == "generate" else str(text)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "llmarch.cli", command, first, "--model", str(d), "--device", "cuda"],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["llmarch: error: --device cuda: no cuda device is available to this torch "
                                             "build; use --device cpu"]


@pytest.mark.parametrize("flag, decoding", [([], False), (["--fast-kernels"], True), (["--fast-head"], True)])
def test_generate_packs_the_fast_kernels_only_when_asked(flag, decoding, monkeypatch, capsys):
    from llmarch.cli import generate as cli_generate
    from llmarch.cli import main
    from llmarch.errors import GenerationError

    seen = []

    def fake_load(args, name, device, dtype, decoding=False):
        seen.append(decoding)
        raise GenerationError("stop here")

    monkeypatch.setattr(cli_generate, "load_on_device", fake_load)
    assert main(["generate", "hello", *flag]) == 2
    assert seen == [decoding] and "stop here" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gemma3-270m", "llama3.2-1b"])
def test_a_decoding_step_traces_as_one_graph(arch):
    """A compiled decoding step (the way to remove its per-operation overhead) needs one graph:
    no data-dependent Python in the decode path of the inference model as a GGUF file loads it
    (int8 layers; the float layers' oneDNN-packed copies still check their source's data
    pointer, which breaks a graph)."""
    from llmarch.inference.packed import pack_linears
    from llmarch.inference.quant import quantize
    from llmarch.model.decoder import build_model
    from llmarch.training.scale import resolve_model_config

    torch._dynamo.reset()
    cfg = resolve_model_config(arch, "tiny", {}, 256, 64)
    model = build_model(cfg, device="cpu").eval()
    quantize(model, "int8")
    pack_linears(model)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model(ids, positions=torch.arange(4)[None], cache=cache, last_only=True)
        explained = torch._dynamo.explain(model)(torch.tensor([[7]]), positions=torch.tensor([[4]]), cache=cache,
                                                 last_only=True)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
