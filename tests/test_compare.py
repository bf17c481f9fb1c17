"""The comparison is computed from the models: its parameter counts are the module tree's, its
KV-cache bytes are what the engine allocates, its FLOPs agree with torch's FLOP counter, and
its diffs name the differences the configs define."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import llmarch
from llmarch.analysis import modules as an
from llmarch.analysis.compare import diff, load_config, profile, profiles
from llmarch.cli import main
from llmarch.model.attention import attention_mask
from llmarch.model.config import MLAConfig, ModelConfig, MoEConfig
from llmarch.model.decoder import build_model

PRESETS = llmarch.preset_names()


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=80, max_position_embeddings=64, name="tiny")
    base.update(kw)
    return ModelConfig(**base)


# the attention kinds whose caches and FLOPs differ: global, sliding (window shorter than the
# context), chunked, NoPE, and all of them mixed in one model
KINDS = {
    "full": tiny(),
    "sliding": tiny(layer_types=["sliding"] * 3 + ["full"], sliding_window=5),
    "chunked": tiny(layer_types=["chunked"] * 3 + ["full"], attention_chunk_size=4),
    "nope": tiny(rope_layers=[True, True, True, False]),
    "mixed": tiny(layer_types=["sliding", "full", "chunked", "full"], sliding_window=5, attention_chunk_size=4,
                  rope_layers=[True, True, True, False], qk_norm="head", tie_embeddings=True),
    # MLA: the cache holds a latent (24) + one RoPE key (8) per token; prefill expands it, a
    # decoding step attends over the latents (absorbed)
    "mla": tiny(attention_kind="mla", mla=MLAConfig(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
                                                    qk_rope_head_dim=8, v_head_dim=12)),
    # MoE: 32 experts, top-1, a shared expert, first layer dense; 12 tokens reach at most 12 < 32 / 2
    # experts, which keeps the engine on its per-expert path (its all-experts path pads tokens,
    # see test_flops_match_torch_flop_counter)
    "moe": tiny(moe=MoEConfig(num_experts=32, top_k=1, expert_size=24, shared_expert_size=24),
                moe_layers=[False, True, True, True]),
}


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_params_are_the_module_tree_and_breakdown_sums_to_total(name):
    p = profile(llmarch.get_config(name), context=1024)
    tree = sum(t.numel() for t in p.model.parameters())
    assert p.numbers["total_params"] == tree
    assert sum(p.breakdown.values()) == tree
    assert "other" not in p.breakdown, f"{name}: parameters owned by no known component: {p.breakdown}"
    assert p.numbers["embedding_params"] + p.numbers["non_embedding_params"] == tree
    has_head = p.model.lm_head is not None
    assert ("head" in p.breakdown) == has_head


def test_published_parameter_counts():
    # totals published with the checkpoints (safetensors index total_size / 2 bytes)
    assert profile(llmarch.get_config("llama3-8b")).numbers["total_params"] == 8_030_261_248
    assert profile(llmarch.get_config("gpt2")).numbers["total_params"] == 124_439_808


def test_breakdown_matches_the_formulas():
    cfg = llmarch.get_config("llama3-8b")
    b = profile(cfg).breakdown
    h, n, d, hq, hkv, f, v = 4096, 32, 128, 32, 8, 14336, 128256
    assert b["attention"] == n * (2 * h * hq * d + 2 * h * hkv * d)
    assert b["dense FFN"] == n * 3 * h * f
    assert b["norms"] == (2 * n + 1) * h
    assert b["embedding"] == b["head"] == v * h


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kv_bytes_equal_the_allocated_cache(kind, dtype):
    cfg = KINDS[kind]
    context = 12  # longer than the window (5) and the chunk (4)
    model = build_model(cfg, device="cpu")
    cache = model.new_cache(1, context, dtype=an.DTYPES[dtype])
    assert profile(cfg, context=context, dtype=dtype).numbers["kv_bytes"] == cache.nbytes


@pytest.mark.parametrize("name", ["gemma3-27b", "gemma3-270m", "llama3-8b", "smollm3-3b", "mistral-small-3.1-24b",
                                  "gemma3n-e2b"])
@pytest.mark.parametrize("context", [512, 32768, 131072])
def test_kv_bytes_equal_the_allocated_cache_of_presets(name, context):
    cfg = llmarch.get_config(name)
    model = build_model(cfg, device="meta")  # the cache is allocated on meta: sizes only
    assert profile(cfg, context=context).numbers["kv_bytes"] == model.new_cache(1, context, dtype=torch.bfloat16).nbytes


def test_sliding_layers_hold_only_their_window():
    # Gemma 3 27B at 128k: 52 sliding layers hold 1024 tokens, 10 global layers hold all
    cfg = llmarch.get_config("gemma3-27b")
    per_token = 2 * 16 * 128 * 2
    expected = (52 * 1024 + 10 * 131072) * per_token
    assert profile(cfg, context=131072).numbers["kv_bytes"] == expected
    # NoPE layers still cache K and V
    smol = profile(llmarch.get_config("smollm3-3b"), context=4096).numbers
    assert smol["kv_bytes"] == 36 * 4096 * 2 * 4 * 128 * 2


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------


def _counted(fn) -> int:
    # the math SDPA kernel runs as matmuls that the counter sees; the fused CPU kernel is not counted
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("kind", KINDS)
def test_flops_match_torch_flop_counter(kind):
    """FlopCounterMode counts matmuls and the attention matmuls (bmm), not norms, softmax,
    RoPE, activations or bias adds; neither does llmarch. The engine's dense SDPA multiplies
    every key it is given, masked ones included, which is what keys="computed" counts.

    Not compared: MoE prefills where most experts are active, which the engine runs as a
    batched matmul over all experts padded to the busiest one's token count (more FLOPs than
    the k experts per token that llmarch reports)."""
    cfg = KINDS[kind]
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").eval()
    t = 12
    ids = torch.randint(0, cfg.vocab_size, (1, t))

    prefill = _counted(lambda: model(ids))
    ours = an.prefill_flops_per_token(model, t, keys="computed").total * t
    assert abs(prefill - ours) / prefill < 0.01, (prefill, ours)

    cache = model.new_cache(1, t)
    with torch.no_grad():
        model(ids[:, : t - 1], cache=cache)
    decode = _counted(lambda: model(ids[:, t - 1 :], cache=cache))
    ours = an.decode_flops_per_token(model, t, keys="computed").total
    assert abs(decode - ours) / decode < 0.01, (decode, ours)


@pytest.mark.parametrize("layer", ["full", "sliding", "chunked"])
def test_visible_keys_are_the_attention_mask(layer):
    """The FLOPs the comparison reports count the keys the engine's mask lets each query see."""
    cfg = tiny(layer_types=[layer] * 4, sliding_window=5, attention_chunk_size=4)
    model = build_model(cfg, device="meta")
    attn = an.attention_layers(model)[0]
    for t in (1, 3, 4, 5, 11, 12, 23):
        pos = torch.arange(t)[None]
        mask = attention_mask(pos, pos, attn.window, attn.chunk, torch.float32)
        allowed = t * t if mask is None else int((mask == 0).sum())
        assert attn.visible_keys_sum(t) == allowed, (layer, t)
        assert attn.visible_keys(t - 1) == (t if mask is None else int((mask[0, 0, -1] == 0).sum())), (layer, t)


def test_flops_of_a_preset_by_hand():
    cfg = llmarch.get_config("llama3-8b")
    p = profile(cfg, context=8192).numbers
    matmul = 2 * (8_030_261_248 - 128256 * 4096 - 65 * 4096)  # every weight but the embedding table and norms
    attention = 32 * 2 * 32 * (128 + 128) * 8192  # scores + values over 8192 keys, 32 layers
    assert p["decode_flops_per_token"] == matmul + attention
    # a causal prefill sees on average (T + 1) / 2 keys per query
    assert p["prefill_flops_per_token"] == matmul + round(32 * 2 * 32 * 256 * 8192 * 8193 / 2 / 8192)


def test_sliding_window_caps_decode_flops():
    gemma = llmarch.get_config("gemma3-27b")
    short, long = (profile(gemma, context=c).numbers["decode_flops_per_token"] for c in (1024, 131072))
    per_key = 2 * 32 * 256
    assert long - short == 10 * per_key * (131072 - 1024)  # only the 10 global layers grow


# ----------------------------------------------------------------------------------------
# schedules and diffs
# ----------------------------------------------------------------------------------------


def test_pattern_summaries():
    assert an.summarize((["sliding(512)"] * 5 + ["full"]) * 3) == "5x sliding(512) + 1x full, repeated 3x"
    assert an.summarize((["a"] * 5 + ["b"]) * 4 + ["a"] * 2) == "5x a + 1x b, repeated 4x + 2x a"
    assert an.summarize(["dense"] * 3 + ["moe"] * 58) == "3x dense + 58x moe"
    assert an.summarize(["full"] * 7) == "full (all 7 layers)"
    assert an.ratio((["sliding(512)"] * 5 + ["full"]) * 3, {"full": "global"}) == "5:1 sliding(512):global"


def test_compare_table_rows_from_config():
    g = profile(llmarch.get_config("gemma3-27b"))
    assert g.row("attention pattern").text == "5x sliding(1024) + 1x full, repeated 10x + 2x sliding(1024)"
    assert g.row("norm").text == "RMSNorm (1 + w), pre+post (sandwich)"
    assert g.row("FFN").text == "GeGLU, width 21504"
    assert g.row("heads / KV heads / head_dim").text == "32 / 16 / 128"
    s = profile(llmarch.get_config("smollm3-3b"))
    assert s.row("attention pattern").text == "3x full/RoPE + 1x full/NoPE, repeated 9x"
    assert s.row("positions").text.startswith("NoPE every 4th layer")
    assert profile(llmarch.get_config("gpt2")).row("FFN").text == "GELU MLP, width 3072"


def _diff(a, b):
    pa, pb = profiles([a, b])
    return diff(pa, pb)


def test_diff_llama3_olmo2():
    d = _diff("llama3-8b", "olmo2-7b")
    assert "norm: pre -> post inside residual" in d
    assert "QK-norm: none -> RMSNorm over the q/k projections" in d
    assert "attention: GQA 8 KV heads -> MHA 32 heads" in d
    assert not any(line.startswith(("attention pattern", "FFN kind", "positions", "norm form")) for line in d)


def test_diff_gemma3_qwen3():
    d = _diff("gemma3-27b", "qwen3-32b")
    assert "attention pattern: 5:1 sliding(1024):global -> global" in d
    assert "norm: pre+post (sandwich) -> pre" in d
    assert "norm form: RMSNorm (1 + w) -> RMSNorm" in d
    assert "FFN kind: GeGLU -> SwiGLU" in d
    assert not any(line.startswith("QK-norm") for line in d)  # both normalise q and k per head


def test_moe_and_mla_presets():
    ds = profile(llmarch.get_config("deepseek-v3"), context=131072)
    h, w, e, moe_layers = 7168, 2048, 256, 58
    assert ds.breakdown["experts"] == moe_layers * e * 3 * h * w
    assert ds.breakdown["shared expert"] == moe_layers * 3 * h * w
    assert ds.breakdown["router"] == moe_layers * e * h
    assert ds.numbers["total_params"] - ds.numbers["active_params"] == moe_layers * (e - 8) * 3 * h * w
    # MLA caches 512 latent + 64 RoPE numbers per token per layer
    assert ds.numbers["kv_bytes"] == 61 * 131072 * (512 + 64) * 2
    assert ds.row("MoE").text == ("256 experts, 8 active + 1 shared, expert width 2048; dense FFN width 18432; "
                                  "first 3 layers dense")
    scout = profile(llmarch.get_config("llama4-scout"), context=131072)
    assert scout.row("attention pattern").text == "3x chunked(8192)/RoPE + 1x full/NoPE, repeated 12x"
    assert scout.numbers["kv_bytes"] == (36 * 8192 + 12 * 131072) * 2 * 8 * 128 * 2


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "llama4-scout", "llama4-maverick", "qwen3-30b-a3b"])
def test_kv_bytes_of_moe_presets_equal_the_allocated_cache(name):
    cfg = llmarch.get_config(name)
    model = build_model(cfg, device="meta")
    for context in (4096, 131072):
        assert profile(cfg, context=context).numbers["kv_bytes"] == model.new_cache(1, context, dtype=torch.bfloat16).nbytes


def test_diff_dense_to_moe_and_mla():
    d = _diff("llama3-8b", "deepseek-v3")
    assert "attention: GQA 8 KV heads -> MLA latent 512" in d
    assert "FFN: dense -> MoE 256 experts, 8 active + 1 shared, first 3 layers dense" in d
    d = _diff("qwen3-32b", "qwen3-235b-a22b")
    assert "FFN: dense -> MoE 128 experts, 8 active, every layer" in d
    assert "attention: GQA 8 KV heads -> GQA 4 KV heads" in d
    assert not any(line.startswith(("norm", "QK-norm", "positions", "FFN kind")) for line in d)
    d = _diff("llama4-scout", "llama4-maverick")
    assert ("FFN: MoE 16 experts, 1 active + 1 shared, every layer -> "
            "MoE 128 experts, 1 active + 1 shared, MoE every 2nd layer") in d
    d = _diff("llama3-8b", "llama4-scout")
    assert "attention pattern: global -> 3:1 chunked(8192):global" in d
    assert "positions: RoPE every layer -> NoPE every 4th layer" in d


def test_gemma3n_components_and_kv_sharing():
    p = profile(llmarch.get_config("gemma3n-e4b"), context=32768)
    assert {"AltUp", "LAuReL", "per-layer inputs"} <= set(p.breakdown)
    # the per-layer embedding table is a component of its own (the article's point about Gemma 3n); the
    # parameter counts file it with the embeddings
    table = p.model.ple.table.weight.numel()
    assert p.breakdown["embedding"] == p.model.embed.weight.numel()
    assert p.breakdown["per-layer embedding table"] == table
    assert p.numbers["embedding_params"] == p.model.embed.weight.numel() + table
    assert p.numbers["effective_params"] == p.numbers["total_params"] - table
    # the last 15 layers reuse K/V: 20 layers cache, 4 of every 5 of them sliding(512)
    assert p.numbers["kv_bytes"] == (16 * 512 + 4 * 32768) * 2 * 2 * 256 * 2
    d = diff(profile(llmarch.get_config("gemma3-4b")), p)
    assert "other per-layer modules: none -> AltUp, Laurel, PerLayerInput" in d
    assert "attention pattern: 5:1 sliding(1024):global -> 4:1 sliding(512):global" in d


def test_diff_positions_and_identity():
    assert "positions: RoPE every layer -> NoPE every 4th layer" in _diff("llama3-8b", "smollm3-3b")
    assert _diff("qwen3-8b", "qwen3-8b") == []


# ----------------------------------------------------------------------------------------
# inputs and command line
# ----------------------------------------------------------------------------------------


def test_compare_reads_a_checkpoint_config_only(tmp_path):
    import transformers as T

    hf = T.Qwen3Config(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    hf.save_pretrained(tmp_path)  # config.json only: no weights needed
    cfg = load_config(str(tmp_path))
    assert cfg.name == tmp_path.name and cfg.num_layers == 2 and cfg.qk_norm == "head"
    p = profile(cfg, context=100)
    assert p.numbers["kv_bytes"] == 2 * 100 * 2 * 2 * 32 * 2


def test_cli_compare_formats(capsys):
    assert main(["compare", "gpt2", "qwen3-0.6b", "--json", "--context", "2048"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gpt2", "qwen3-0.6b"]
    assert rows[1]["kv_bytes"] == 28 * 2048 * 2 * 8 * 128 * 2
    assert main(["compare", "gpt2", "qwen3-0.6b", "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model,total params") and lines[1].startswith("gpt2,124439808")
    assert main(["compare", "gpt2", "qwen3-0.6b", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| gpt2 | qwen3-0.6b |" in md and "| tied head | yes | yes |" in md
    assert main(["diff", "llama3-8b", "olmo2-7b"]) == 0
    assert "norm: pre -> post inside residual" in capsys.readouterr().out


def test_cli_errors_are_clean(capsys):
    assert main(["compare", "gpt3"]) == 2
    assert "Did you mean 'gpt2'" in capsys.readouterr().err
    assert main(["compare", "gpt2", "--context", "0"]) == 2
    assert "context" in capsys.readouterr().err


def test_compare_reads_only_the_config_of_a_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, value in ((w.add_block_count, 3), (w.add_context_length, 256), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 96), (w.add_head_count, 4), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((50, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = profile(load_config(str(tmp_path / "tiny.gguf")), context=10)
    assert p.name == "tiny" and p.short["attention"] == "MQA 1 KV head"
    assert p.numbers["kv_bytes"] == 3 * 10 * 2 * 1 * 16 * 2


# ----------------------------------------------------------------------------------------
# plots, diagrams, report
# ----------------------------------------------------------------------------------------


def _variance(png_path) -> float:
    from PIL import Image

    px = np.asarray(Image.open(png_path).convert("L"), dtype=np.float64)
    return float(px.std())


def test_kv_plot_lines_are_the_cache_sizes(tmp_path):
    from llmarch.analysis import plots

    profs = profiles(["gemma3-27b", "llama3-8b"])
    fig = plots.kv_figure(profs, 131072)
    lines = {ln.get_gid().removeprefix("kv-"): ln for ln in fig.axes[0].lines if ln.get_gid()}
    assert set(lines) == {"gemma3-27b", "llama3-8b"}
    # each legend entry ends with the cache at the longest context
    assert lines["llama3-8b"].get_label() == "llama3-8b: 16 GiB @ 131,072"
    for p in profs:
        xs, ys = lines[p.name].get_data()
        for x, y in zip(xs, ys):
            assert y == pytest.approx(an.kv_cache_bytes(p.model, int(x), 2) / 2**30)
    gx, gy = lines["gemma3-27b"].get_data()  # sliding layers stop growing past the window
    assert gy[-1] / gy[0] < gx[-1] / gx[0] / 4
    paths = plots.plot("kv", ["gemma3-27b", "llama3-8b"], tmp_path)
    assert [p.name for p in paths] == ["kv.png", "kv.svg"]
    assert _variance(paths[0]) > 10
    root = ET.parse(paths[1]).getroot()
    assert root.tag.endswith("svg")
    assert "gemma3-27b" in paths[1].read_text()  # matplotlib keeps each label as a comment


def _stroke_colours(svg: str) -> list[str]:
    """The stroke colour of each data line matplotlib wrote (its <g id="kv-..."> group)."""
    return [m.group(1) for m in re.finditer(r'<g id="kv-[^"]+">\s*<path[^>]*?style="[^"]*?stroke: (#[0-9a-f]{6})', svg)]


def test_kv_plot_never_repeats_a_colour(tmp_path):
    from llmarch.analysis import plots
    from llmarch.families import preset_names

    names = preset_names()
    svg = plots.plot("kv", names, tmp_path)[1].read_text()
    colours = _stroke_colours(svg)
    assert len(colours) == len(names) > 24
    assert len(set(colours)) == len(colours)
    assert {s["ls"] for s in plots.series_styles(len(names))} == set(plots.LINE_STYLES)


def test_breakdown_plot_shares_sum_to_100():
    from llmarch.analysis import plots

    profs = profiles(["gpt2", "gemma3-270m"])
    fig = plots.breakdown_figure(profs)
    totals = [0.0, 0.0]
    for patch in fig.axes[0].patches:
        row = round(patch.get_y() + patch.get_height() / 2)
        totals[row] += patch.get_width()
    assert totals == [pytest.approx(100), pytest.approx(100)]
    # total vs active: a linear 0-100% scale, the active share drawn over the whole, the counts written inside
    profs = profiles(["gpt2", "deepseek-v3"])
    fig = plots.params_figure(profs)
    widths = sorted(round(b.get_width(), 6) for b in fig.axes[0].patches)
    share = 100 * profs[1].numbers["active_params"] / profs[1].numbers["total_params"]
    assert widths == [round(share, 6), 100, 100, 100]
    assert fig.axes[0].get_xscale() == "linear" and fig.axes[0].get_xlim() == (0, 100)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["124.44M", f"37.55B of 671.03B ({share:.1f}%)"]
    assert all(0 < t.get_position()[0] <= 100 for t in fig.axes[0].texts)  # inside the axes


def _boxes(g):
    out = []
    for box in g.iter(f"{SVG}g"):
        if box.get("class") == "box":
            rect = box.find(f"{SVG}rect")
            text = " ".join(t.text or "" for t in box.iter(f"{SVG}tspan"))
            out.append((box.get("data-role"), float(rect.get("x")), float(rect.get("y")), text))
    return out


SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("pair", [("llama3-8b", "olmo2-7b"), ("gemma3-27b", "gpt2"), ("qwen3-8b", "deepseek-v3")])
def test_diagram_svg_structure(tmp_path, pair):
    from llmarch.analysis.diagram import COL_W, write

    svg, png = write(list(pair), tmp_path / "d.svg")
    root = ET.parse(svg).getroot()
    models = [g for g in root.iter(f"{SVG}g") if g.get("class") == "model"]
    assert [g.get("data-model") for g in models] == list(pair)
    for col, (g, name) in enumerate(zip(models, pair)):
        cfg = llmarch.get_config(name)
        boxes = _boxes(g)
        assert all(col * COL_W <= x < (col + 1) * COL_W for _, x, _, _ in boxes), "columns side by side"
        roles = [r for r, *_ in boxes]
        ffn_role = "moe" if cfg.moe is not None else "ffn"
        for role in ("embedding", "attention", ffn_role, "head", "block"):
            assert roles.count(role) == 1, (name, role, roles)
        texts = [t.text for t in g.iter(f"{SVG}text") if t.get("class") == "repeat"]
        assert texts == [f"x {cfg.num_layers}"]
        block_norms = roles.count("norm") - 1  # minus the final norm
        assert block_norms == {"pre": 2, "post": 2, "sandwich": 4}[cfg.norm_placement]
        attn = next(b for b in boxes if b[0] == "attention")
        first_norm = max((b for b in boxes if b[0] == "norm"), key=lambda b: b[2])  # lowest on the page
        # a pre-norm sits below attention (it comes first); a post-norm sits above
        assert (first_norm[2] > attn[2]) == (cfg.norm_placement != "post")
        caption = " ".join(t.text for t in g.iter(f"{SVG}text") if t.get("class") == "pattern")
        assert profile(cfg).row("attention pattern").text.split(",")[0] in caption
    boxes = {name: _boxes(g) for g, name in zip(models, pair)}
    attn_text = {n: next(t for r, _, _, t in b if r == "attention") for n, b in boxes.items()}
    if "deepseek-v3" in pair:
        assert "Multi-head latent attention" in attn_text["deepseek-v3"] and "MLA latent 512" in attn_text["deepseek-v3"]
        moe = next(t for r, _, _, t in boxes["deepseek-v3"] if r == "moe")
        assert "256 experts, 8 active + 1 shared" in moe and "expert width 2,048" in moe
    elif "gemma3-27b" in pair:
        assert "5:1 sliding(1024):global" in attn_text["gemma3-27b"]
        assert "Multi-head attention" in attn_text["gpt2"]
        assert "GeGLU" in next(t for r, _, _, t in boxes["gemma3-27b"] if r == "ffn")
    else:
        assert "Grouped-query attention" in attn_text["llama3-8b"] and "8 KV heads" in attn_text["llama3-8b"]
        assert "QK-norm" in attn_text["olmo2-7b"] and "QK-norm" not in attn_text["llama3-8b"]
    assert float(root.get("width")) == 2 * COL_W
    assert _variance(png) > 10


REPORT_MODELS = ["llama3-8b", "olmo2-7b", "gemma3-27b"]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    from llmarch.analysis.report import write_report

    return write_report(tmp_path_factory.mktemp("report"), REPORT_MODELS, context=4096)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.svgs, self.external, self.scripts = [], [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-model" in a:
            self.rows.append(a["data-model"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "svg":
            self.svgs += 1
        if tag in ("script", "link", "iframe", "object"):
            self.scripts += 1
        for k in ("src", "href"):
            if k in a and not a[k].startswith(("data:", "#")):
                self.external.append(a[k])


def test_report_html_structure(report_path):
    import base64

    html = report_path.read_text()
    page = _Page()
    page.feed(html)
    assert page.rows == REPORT_MODELS
    assert sorted(i["data-plot"] for i in page.imgs) == ["breakdown", "kv", "params"]
    for img in page.imgs:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.svgs == 2  # the diagrams, two models per figure
    assert page.external == [] and page.scripts == 0
    assert "norm: pre -&gt; post inside residual" in html  # the llama3 -> olmo2 diff
    kv = profile(llmarch.get_config("gemma3-27b"), context=4096).row("KV cache @ 4,096 (bf16)").text
    assert kv in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(url: str, shot, profile_dir) -> list[str]:
    """Screenshot ``url`` headless; returns the page's console messages."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile_dir}",
           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1400,2400",
           f"--screenshot={shot}", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return [line for line in res.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report_path, tmp_path):
    # the harness sees console errors: a page with a script error must report one
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    assert _chromium(bad.as_uri(), tmp_path / "bad.png", tmp_path / "profile-bad")
    console = _chromium(report_path.as_uri(), tmp_path / "shot.png", tmp_path / "profile")
    assert console == []
    from PIL import Image

    px = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"), dtype=np.float64)
    assert px.shape[:2] == (2400, 1400)
    assert px.std() > 20, "blank screenshot"
    # the table, the plots and the diagrams all drew something: no horizontal band is empty
    bands = [px[i : i + 600].std() for i in range(0, 2400, 600)]
    assert min(bands) > 5, bands


@pytest.mark.parametrize("name,roles,absent", [
    ("deepseek-v3", {"router", "experts", "shared-expert", "latent", "down-projection"}, {"extra", "ple-table"}),
    ("qwen3-235b-a22b", {"router", "experts"}, {"shared-expert", "latent"}),
    ("gemma3n-e4b", {"extra", "ple-table"}, {"router", "latent"}),
    ("llama3-8b", set(), {"router", "experts", "shared-expert", "latent", "extra", "ple-table"}),
])
def test_diagram_draws_the_concepts(tmp_path, name, roles, absent):
    from llmarch.analysis.diagram import layout, to_svg

    p = profile(llmarch.get_config(name))
    root = ET.fromstring(to_svg(layout([p])))
    boxes = {b.get("data-role"): b for b in root.iter(f"{SVG}g") if b.get("class") == "box"}
    assert roles <= set(boxes) and not absent & set(boxes)
    text = {r: " ".join(t.text or "" for t in b.iter(f"{SVG}tspan")) for r, b in boxes.items()}
    s = p.summary
    if "router" in roles:
        m = s.moe[0]
        assert f"top-{m.active} of {m.experts}" in text["router"]
        assert f"{m.experts} routed experts" in text["experts"] and f"width {m.width:,}" in text["experts"]
    if "shared-expert" in roles:
        assert "width 2,048" in text["shared-expert"]
        assert "3 dense layers: FFN width 18432" in text["moe"]
    if "latent" in roles:
        assert "latent 512" in text["latent"] and "1.12 KiB/token" in text["latent"]  # (512 + 64) x bf16
        assert "7,168 -> 576" in text["down-projection"]
    if "extra" in roles:
        names = [b.get("data-name") for b in root.iter(f"{SVG}g") if b.get("data-role") == "extra"]
        assert names == ["AltUp", "LAuReL", "per-layer inputs"]
        assert "2.35B parameters" in text["ple-table"]
    # the per-layer schedules: one cell per layer, where the kinds vary
    strips = {g.get("data-kind"): [r.get("data-kind") for r in g.iter(f"{SVG}rect") if r.get("data-layer")]
              for g in root.iter(f"{SVG}g") if g.get("class") == "strip"}
    if name == "deepseek-v3":
        assert strips == {"ffn": ["dense FFN"] * 3 + ["MoE"] * 58}
    if name == "gemma3n-e4b":
        assert strips["attention"] == (["sliding"] * 4 + ["global"]) * 4 + ["shared K/V"] * 15
    if name == "llama3-8b":
        assert strips == {}


def test_diagram_columns_are_aligned():
    from llmarch.analysis.diagram import layout, to_svg

    root = ET.fromstring(to_svg(layout(profiles(["gemma3-27b", "gemma3n-e4b"]))))
    tops = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "model":
            tops[g.get("data-model")] = {b.get("data-role"): (float(b.find(f"{SVG}rect").get("y")),
                                                              float(b.find(f"{SVG}rect").get("height")))
                                         for b in g.iter(f"{SVG}g") if b.get("class") == "box"}
    a, b = tops.values()
    assert a["head"][0] == b["head"][0]  # the output heads start on one row
    assert a["block"] == b["block"]  # the repeated blocks span the same rows
    assert a["embedding"][0] == b["embedding"][0]


@pytest.mark.parametrize("argv,message", [
    (["compare", "llama3-8b", "--context", "100000000000"], "beyond every model's maximum context"),
    (["plot", "kv", "llama3-8b", "--out", "{file}"], "is a file, not a folder"),
    (["report", "llama3-8b", "--out", "{file}"], "is a file, not a folder"),
    (["diagram", "llama3-8b", "--out", "{dir}"], "is a folder"),
    (["diagram", "llama3-8b", "--out", "{file}/x.svg"], "is a file, not a folder"),
])
def test_analysis_commands_refuse_bad_output_and_context(tmp_path, capsys, argv, message):
    """One `llmarch: error:` line and exit 2, before any slow work (issue: silently accepted
    contexts beyond every model; tracebacks for an --out that is a file)."""
    f = tmp_path / "a-file"
    f.write_text("mine")
    code = main([a.format(file=f, dir=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("llmarch: error: ") and message in err[0], err
    assert f.read_text() == "mine"
