"""Logit parity with Hugging Face transformers on tiny random models, loaded through llmarch's
own loader, in float32."""

import pytest
import torch
from conftest import (
    cached_vs_full_diff,
    export_round_trip_diff,
    max_logit_diff,
    random_ids,
    save_hf_models,
)
from hf_tiny import SEQ, VOCAB, hf_configs, make_hf_model

import llmarch

ARCHS = list(hf_configs())
TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (directory of the saved HF model, HF model)."""
    return save_hf_models(tmp_path_factory, ARCHS, make_hf_model)


def _ids(batch=2, seq=SEQ, seed=0):
    return random_ids(VOCAB, batch, seq, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, saved):
    d, hf = saved[arch]
    err = max_logit_diff(llmarch.from_pretrained(d), hf, _ids())
    assert err < TOL, f"{arch}: max abs logit difference {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_matches_full_forward(arch, saved):
    d, _ = saved[arch]
    model = llmarch.from_pretrained(d)
    # prefill 7 tokens (longer than the sliding windows), then 3-token chunks, then one by one
    err = cached_vs_full_diff(model, _ids(seq=SEQ + 6, seed=1), splits=[7, 10, 13])
    assert err < TOL, f"{arch}: cached vs full max abs difference {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_loads_in_transformers(arch, saved, tmp_path):
    d, _ = saved[arch]
    model = llmarch.from_pretrained(d)
    err = export_round_trip_diff(model, tmp_path / "export", _ids(seed=2))
    assert err < TOL, f"{arch}: exported model differs in transformers by {err:.2e}"
    # and it loads back into llmarch with the same configuration
    again = llmarch.from_pretrained(tmp_path / "export")
    assert again.config.layer_types == model.config.layer_types
    assert again.config.rope_layers == model.config.rope_layers


def test_sliding_window_is_exercised(saved):
    """The parity inputs are longer than the windows, so window masking is actually tested."""
    cfgs = {a: llmarch.from_pretrained(saved[a][0]).config for a in ("mistral", "qwen2", "gemma3_text")}
    for arch, cfg in cfgs.items():
        assert "sliding" in cfg.layer_types, arch
        assert cfg.sliding_window < SEQ, arch
    assert "full" in cfgs["gemma3_text"].layer_types
    assert cfgs["gemma3_text"].rope_local.theta != cfgs["gemma3_text"].rope.theta


def test_nope_layers_read_from_config(saved):
    cfg = llmarch.from_pretrained(saved["smollm3"][0]).config
    assert cfg.rope_layers == [True, False, True, False]


def test_dtype_argument(saved):
    d, _ = saved["qwen3"]
    model = llmarch.from_pretrained(d, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(_ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
