"""Llama 4 specifics beyond logit parity (tests/test_moe.py): the features are really exercised."""

import torch
from oracle import random_ids

import llmarch


def test_temperature_tuning_acts_on_nope_layers_only(tiny_reference):
    model = llmarch.from_pretrained(tiny_reference("llama4_text_scout")[0])
    assert [blk.attn.temperature_tuning for blk in model.layers] == [False, False, False, True]
    ids = random_ids(batch=1)
    with torch.no_grad():
        tuned = model(ids)
        model.layers[3].attn.temperature_tuning = False
        plain = model(ids)
    # floor_scale 4: the query scale is exactly 1 for positions 0..2 and grows from position 3
    assert torch.equal(tuned[:, :3], plain[:, :3])
    assert (tuned[:, 3:] - plain[:, 3:]).abs().amax(-1).min() > 1e-4


def test_presets_layer_schedule():
    scout, maverick = llmarch.get_config("llama4-scout"), llmarch.get_config("llama4-maverick")
    for cfg in (scout, maverick):
        assert cfg.rope_layers == [(i + 1) % 4 != 0 for i in range(48)]
        assert cfg.layer_types == ["chunked" if r else "full" for r in cfg.rope_layers]
        assert cfg.attention_chunk_size == 8192 and cfg.attn_temperature_tuning
    assert scout.moe_layers == [True] * 48 and scout.qk_norm == "l2" and scout.moe.num_experts == 16
    assert maverick.moe_layers == [i % 2 == 1 for i in range(48)] and maverick.qk_norm == "none"
    assert maverick.moe.num_experts == 128 and maverick.intermediate_size == 16384 and maverick.moe.expert_size == 8192
