"""The typed summary holds what the published configs say, worked out by hand here from their
config.json fields, and every renderer reads only the summary (never the model it came from)."""

import dataclasses
import json
from collections import Counter

import pytest

import llmarch
from llmarch.analysis import compare, diagram, plots
from llmarch.analysis.compare import Profile
from llmarch.analysis.params import count_params
from llmarch.analysis.summary import Summary, summarize_config

CONTEXT = 32768
BF16 = 2


def summary(name: str, context: int = CONTEXT) -> Summary:
    return summarize_config(llmarch.get_config(name), context=context)


def spans(s: Summary) -> Counter:
    """Layers per (window, chunk, RoPE) kind."""
    return Counter((a.window, a.chunk, a.rope) for a in s.attention)


def test_gemma3_27b():
    # google/gemma-3-27b-it text_config: 62 layers, hidden 5376, 32 heads, 16 KV heads of 128,
    # sliding_window 1024, sliding_window_pattern 6 (every 6th layer global), intermediate 21504,
    # rope_theta 1e6 with linear scaling x8, rope_local_base_freq 1e4, vocab 262208
    s = summary("gemma3-27b")
    n, kv_heads, head_dim = 62, 16, 128
    globals_ = [i for i in range(n) if (i + 1) % 6 == 0]
    assert len(globals_) == 10
    assert spans(s) == {(1024, None, True): n - 10, (None, None, True): 10}
    assert [i for i, a in enumerate(s.attention) if a.window is None] == globals_
    assert {(a.kind, a.heads, a.kv_heads, a.head_dim, a.qk_norm) for a in s.attention} == {("GQA", 32, 16, 128, "head")}
    assert {(f.kind, f.width, f.moe) for f in s.ffn} == {("GeGLU", 21504, False)}
    assert not s.moe
    assert s.norms.placement == "sandwich" and s.norms.form.unit_offset
    assert (s.rope.theta, s.rope.scaling["factor"], s.rope_local.theta) == (1e6, 8, 1e4)
    assert s.tied_head and s.vocab_size == 262208 and s.embed_scale == pytest.approx(5376**0.5)
    per_layer = 2 * kv_heads * head_dim * BF16  # K and V
    assert s.kv_bytes_per_token == n * per_layer
    assert s.kv_bytes == (52 * 1024 + 10 * CONTEXT) * per_layer
    assert round(s.params.total / 1e9) == 27


def test_deepseek_v3():
    # deepseek-ai/DeepSeek-V3: 61 layers, 128 heads, MLA with kv_lora_rank 512, qk_nope 128,
    # qk_rope 64, v_head 128; first_k_dense_replace 3 (intermediate 18432), then 256 routed
    # experts of 2048, 8 per token, 1 shared; "671B total parameters with 37B activated"
    s = summary("deepseek-v3")
    n, rank, rope, nope, v, heads = 61, 512, 64, 128, 128, 128
    assert Counter(a.kind for a in s.attention) == {"MLA": n}
    assert spans(s) == {(None, None, True): n}
    assert {a.kv_elements_per_token for a in s.attention} == {rank + rope}  # one latent + one RoPE key
    assert {a.flops_per_key for a in s.attention} == {2 * heads * ((nope + rope) + v)}
    assert {a.decode_flops_per_key for a in s.attention} == {2 * heads * ((rank + rope) + rank)}  # absorbed
    assert [f.moe for f in s.ffn] == [False] * 3 + [True] * 58
    assert {f.width for f in s.dense} == {18432}
    assert {(f.experts, f.active, f.shared, f.width) for f in s.moe} == {(256, 8, 1, 2048)}
    assert s.norms.placement == "pre" and not s.tied_head
    assert s.kv_bytes_per_token == n * (rank + rope) * BF16
    assert s.kv_bytes == n * CONTEXT * (rank + rope) * BF16
    assert int(s.params.total / 1e9) == 671 and int(s.params.active / 1e9) == 37  # 671.0B, 37.6B
    assert s.params.total - s.params.active == 58 * (256 - 8) * 3 * 7168 * 2048


def test_llama4_maverick():
    # meta-llama/Llama-4-Maverick-17B-128E: 48 layers, 40 heads, 8 KV heads of 128; every 4th
    # layer NoPE (global), the others chunked attention of 8192; use_qk_norm false (Scout's is true);
    # interleave_moe_layer_step 2: odd layers MoE (128 experts of 8192, 1 per token, 1 shared),
    # even layers dense of intermediate_size_mlp 16384; "17B active, 400B total"
    s = summary("llama4-maverick", context=131072)
    n, kv_heads, head_dim = 48, 8, 128
    nope = [i for i in range(n) if (i + 1) % 4 == 0]
    assert spans(s) == {(None, 8192, True): 36, (None, None, False): 12}
    assert [i for i, a in enumerate(s.attention) if not a.rope] == nope
    assert {a.qk_norm for a in s.attention} == {"none"}
    assert {a.qk_norm for a in summary("llama4-scout").attention if a.rope} == {"l2"}
    assert {(a.kind, a.heads, a.kv_heads, a.head_dim) for a in s.attention} == {("GQA", 40, 8, 128)}
    assert [i for i, f in enumerate(s.ffn) if f.moe] == list(range(1, n, 2))
    assert {(f.experts, f.active, f.shared, f.width) for f in s.moe} == {(128, 1, 1, 8192)}
    assert {f.width for f in s.dense} == {16384}
    per_layer = 2 * kv_heads * head_dim * BF16
    assert s.kv_bytes_per_token == n * per_layer
    assert s.kv_bytes == (36 * 8192 + 12 * 131072) * per_layer
    assert int(s.params.total / 1e9) == 400 and int(s.params.active / 1e9) == 17  # 400.7B, 17.2B


def test_gemma3n_e4b():
    # google/gemma-3n-E4B text_config: 35 layers, 8 heads, 2 KV heads of 256, sliding_window 512,
    # layer_types 4 sliding + 1 full repeated, num_kv_shared_layers 15 (the last 15 layers reuse
    # the K/V of earlier ones), intermediate 16384, laurel_rank 64, altup_num_inputs 4, per-layer
    # inputs of 256 from a 262144-token table
    s = summary("gemma3n-e4b")
    n, kv_heads, head_dim, shared = 35, 2, 256, 15
    assert spans(s) == {(512, None, True): 28, (None, None, True): 7}
    assert [i for i, a in enumerate(s.attention) if a.window is None] == list(range(4, n, 5))
    assert [a.kv_elements_per_token == 0 for a in s.attention] == [False] * (n - shared) + [True] * shared
    assert s.kv_sharing_layers == shared
    per_layer = 2 * kv_heads * head_dim * BF16
    assert s.kv_bytes_per_token == (n - shared) * per_layer
    assert s.kv_bytes == (16 * 512 + 4 * CONTEXT) * per_layer  # layers 0-19 cache: 4 of every 5 sliding
    assert {(f.kind, f.width, f.moe) for f in s.ffn} == {("GeGLU", 16384, False)}
    assert set(s.extras) == {"AltUp", "Laurel", "PerLayerInput"}
    assert s.norms.placement == "sandwich"
    assert s.params.total - s.params.effective == 262144 * n * 256  # the per-layer table lives off the accelerator


def test_summary_is_plain_data():
    s = summary("llama4-scout")
    data = json.loads(json.dumps(dataclasses.asdict(s)))
    assert data["attention"][0]["chunk"] == 8192 and data["ffn"][0]["experts"] == 16


@pytest.fixture(scope="module")
def detached():
    """Profiles without their model: a renderer that reads the model instead of the summary fails."""
    return [Profile(summary(n, 4096), model=None) for n in ("gemma3-27b", "deepseek-v3", "gemma3n-e4b", "gpt2")]


def test_every_renderer_reads_only_the_summary(detached):
    with_model = compare.profiles(["gemma3-27b", "deepseek-v3", "gemma3n-e4b", "gpt2"], context=4096)
    assert compare.markdown(detached) == compare.markdown(with_model)
    assert compare.to_csv(detached) == compare.to_csv(with_model)
    assert compare.to_json(detached) == compare.to_json(with_model)
    assert compare.diff(detached[0], detached[2]) == compare.diff(with_model[0], with_model[2])
    assert diagram.to_svg(diagram.layout(detached[:2])) == diagram.to_svg(diagram.layout(with_model[:2]))
    for kind in plots.KINDS:
        plots.figure(kind, detached, 8192)


def test_renderers_follow_the_summary_fields(detached):
    """Change one typed field and the words change with it: the text is rendered, not stored."""
    g = detached[0].summary
    wider = [dataclasses.replace(a, window=a.window and 4096) for a in g.attention]
    p = Profile(dataclasses.replace(g, attention=tuple(wider)), model=None)
    assert p.row("attention pattern").text == "5x sliding(4096) + 1x full, repeated 10x + 2x sliding(4096)"
    assert p.short["attention pattern"] == "5:1 sliding(4096):global"
    ds = detached[1].summary
    fewer = tuple(dataclasses.replace(f, experts=64, active=4) if f.moe else f for f in ds.ffn)
    line = compare.diff(detached[1], Profile(dataclasses.replace(ds, ffn=fewer), model=None))
    assert line == [("FFN: MoE 256 experts, 8 active + 1 shared, first 3 layers dense -> "
                     "MoE 64 experts, 4 active + 1 shared, first 3 layers dense")]


# ----------------------------------------------------------------------------------------
# what-ifs: --set field=value
# ----------------------------------------------------------------------------------------


def test_set_all_global_gemma3_27b_kv_by_hand():
    from llmarch.analysis.overrides import apply

    cfg = apply(llmarch.get_config("gemma3-27b"), ['layer_types=["full"]'])
    s = summarize_config(cfg, context=CONTEXT)
    # 62 layers x (K and V) x 16 KV heads x 128 x bf16, every token of the 32k context
    assert s.kv_bytes == 62 * 2 * 16 * 128 * BF16 * CONTEXT
    assert cfg.layer_types == ["full"] * 62 and "layer_types" in cfg.name


def test_set_dotted_and_typed_errors():
    from llmarch.analysis.overrides import apply
    from llmarch.errors import ConfigError

    base = llmarch.get_config("qwen3-30b-a3b")
    cfg = apply(base, ["moe.top_k=2", "rope.theta=5e5", "sliding_window=null"])
    assert (cfg.moe.top_k, cfg.moe.num_experts, cfg.rope.theta) == (2, base.moe.num_experts, 5e5)
    with pytest.raises(ConfigError, match=r"num_heads: expected int, got \"abc\""):
        apply(base, ["num_heads=abc"])
    with pytest.raises(ConfigError, match="moe has no field 'topk'.*top_k"):
        apply(base, ["moe.topk=2"])
    with pytest.raises(ConfigError, match="field=value"):
        apply(base, ["num_heads"])
    # a per-layer pattern repeats; a shorter model keeps the first layers of each list
    assert apply(llmarch.get_config("gemma3-27b"), ['layer_types=["sliding","full"]']).layer_types[:4] == [
        "sliding", "full", "sliding", "full"]
    assert apply(llmarch.get_config("deepseek-v3"), ["num_layers=5"]).moe_layers == [False] * 3 + [True] * 2


def test_diff_cli_shows_parameter_and_kv_deltas(capsys):
    from llmarch.cli import main

    # DeepSeek-V3 with 128-head MHA (head_dim 128) instead of MLA, per token in bf16
    assert main(["diff", "deepseek-v3", "deepseek-v3", "--set", "attention_kind=mha", "--set", "num_kv_heads=128",
                 "--set", "head_dim=128", "--context", "1024", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    mha = 61 * 2 * 128 * 128 * 4
    mla = 61 * (512 + 64) * 4
    assert f"KV cache / token (fp32): {compare._bytes(mla)} -> {compare._bytes(mha)}" in out
    assert f"KV cache @ 1,024 tokens (fp32): {compare._bytes(mla * 1024)} -> {compare._bytes(mha * 1024)}" in out
    assert "active params: 37.55B" in out


def test_params_cli_accepts_checkpoints_and_set(tmp_path, capsys):
    from llmarch.cli import main

    cfg = llmarch.get_config("qwen3-0.6b")
    (tmp_path / "config.json").write_text(json.dumps(llmarch.families.family_for_config(cfg).config_to_hf(cfg)))
    assert main(["params", str(tmp_path), "qwen3-0.6b", "--set", "num_layers=2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    full, two = rows[0]["total"], rows[1]["total"]
    assert full == count_params(cfg).total
    assert two == count_params(cfg.replace(num_layers=2, layer_types=None)).total
    assert rows[1]["name"] == "qwen3-0.6b [num_layers=2]"


def test_bench_measures_a_scaled_model_and_plots_it():
    from llmarch.analysis.bench import bench, figure

    cfg = llmarch.get_config("qwen3-0.6b").replace(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                   num_heads=4, num_kv_heads=2, head_dim=16)
    r = bench(cfg, context=16, steps=3, scale=0.25)
    assert (r.name, r.layers, r.context) == ("qwen3-0.6b", 7, 16)  # a quarter of 28 layers
    assert r.prefill_tok_s > 0 and r.decode_tok_s > 0
    # float32 weights + a full K/V cache of 16 + 3 positions in 7 layers (2 KV heads of 16)
    assert r.memory_bytes == 4 * r.params + 7 * 2 * 2 * 16 * (16 + 3) * 4
    fig = figure([r, r])
    assert [t.get_text() for t in fig.axes[1].texts] == [f"{r.memory_bytes / 2**30:.2f}"] * 2
