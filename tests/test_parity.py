"""The oracle checks, for every family (dense, sparse / latent, Gemma 3n) on its tiny random
transformers model loaded through llmarch's own loader, in float32: logits equal transformers',
cached decoding equals the full forward, and an exported checkpoint loads in transformers with
the same logits."""

import pytest
import torch
from oracle import (
    ARCHS,
    DENSE,
    PLE_VOCAB,
    SEQ,
    SPARSE,
    cached_vs_full_diff,
    export_round_trip,
    max_logit_diff,
    random_ids,
)

import llmarch
from llmarch.model.moe import MoE

TOL = 1e-4

# cached decoding: (input length, ends of the pieces fed before one token at a time)
DECODING = {
    # prefill 7 tokens (longer than the sliding windows), then 3-token chunks
    **{arch: [(SEQ + 6, [7, 10, 13])] for arch in DENSE},
    # prefill 7 tokens (longer than Llama 4's 5-token chunks)
    **{arch: [(SEQ + 4, [7])] for arch in SPARSE},
    # prefill shorter than, longer than and 3x the window (4), then one 3-token chunk
    "gemma3n": [(SEQ + 6, [prefill, prefill + 3]) for prefill in (3, 7, 12)],
}
assert set(DECODING) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny_reference):
    d, hf = tiny_reference(arch)
    model = llmarch.from_pretrained(d)
    err = max_logit_diff(model, hf, random_ids())
    assert err < TOL, f"{arch}: max abs logit difference {err:.2e}"
    # routing really varies: the tokens of each MoE layer use more than top_k distinct experts
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    assert bool(moe) == (arch in SPARSE)
    assert all((m.last_routing.expert_load() > 0).sum() > m.top_k for m in moe)


@pytest.mark.parametrize("arch,seq,splits", [pytest.param(a, seq, splits, id=f"{a}-{'-'.join(map(str, splits))}")
                                             for a in ARCHS for seq, splits in DECODING[a]])
def test_cached_decoding_matches_full_forward(arch, seq, splits, tiny_reference):
    model = llmarch.from_pretrained(tiny_reference(arch)[0])
    err = cached_vs_full_diff(model, random_ids(seq=seq, seed=1), splits)
    assert err < TOL, f"{arch}: cached vs full max abs difference {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_loads_in_transformers(arch, tiny_reference, tmp_path):
    d, hf = tiny_reference(arch)
    model = llmarch.from_pretrained(d)
    back, err = export_round_trip(model, tmp_path / "export", random_ids(seed=2))
    assert type(back) is type(hf)
    assert err < TOL, f"{arch}: exported model differs in transformers by {err:.2e}"
    # and it loads back into llmarch with the same configuration
    again = llmarch.from_pretrained(tmp_path / "export")
    assert again.config.to_dict() | {"name": None} == model.config.to_dict() | {"name": None}


# ---------------------------------------------------------------------------------------
# the inputs above reach the features they are meant to test
# ---------------------------------------------------------------------------------------


def test_sliding_window_is_exercised(tiny_reference):
    """The parity inputs are longer than the windows, so window masking is actually tested."""
    cfgs = {a: llmarch.from_pretrained(tiny_reference(a)[0]).config for a in ("mistral", "qwen2", "gemma3_text")}
    for arch, cfg in cfgs.items():
        assert "sliding" in cfg.layer_types, arch
        assert cfg.sliding_window < SEQ, arch
    assert "full" in cfgs["gemma3_text"].layer_types
    assert cfgs["gemma3_text"].rope_local.theta != cfgs["gemma3_text"].rope.theta


def test_per_layer_inputs_are_exercised():
    """Gemma 3n's parity input holds ids past the per-layer table (they read its row 0)."""
    assert (random_ids() >= PLE_VOCAB).any()


def test_nope_layers_read_from_config(tiny_reference):
    cfg = llmarch.from_pretrained(tiny_reference("smollm3")[0]).config
    assert cfg.rope_layers == [True, False, True, False]


def test_dtype_argument(tiny_reference):
    model = llmarch.from_pretrained(tiny_reference("qwen3")[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(random_ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
