"""Sparse and latent families: layer schedules and checkpoint layouts read from transformers'
files, the MoE module's dispatch, active-parameter accounting and published parameter counts.
Logits, cached decoding and export against transformers: tests/test_parity.py."""

import pytest
import torch
from oracle import SEQ, SPARSE, random_ids

import llmarch
from llmarch.model.config import ModelConfig, MoEConfig
from llmarch.model.moe import MoE

TOL = 1e-4


def test_layer_schedules_read_from_config(tiny_reference):
    cfg = {a: llmarch.from_pretrained(tiny_reference(a)[0]).config for a in SPARSE}
    assert cfg["deepseek_v3"].moe_layers == [False, True, True]  # first_k_dense_replace 1
    assert cfg["deepseek_v3"].moe.n_group == 4 and cfg["deepseek_v3"].moe.topk_group == 2
    assert cfg["qwen3_moe"].moe_layers == [True, False, True]  # mlp_only_layers [1]
    assert cfg["qwen3_moe_sparse_step"].moe_layers == [False, True]  # decoder_sparse_step 2
    assert cfg["llama4_text"].moe_layers == [False, True, False, True]  # interleave_moe_layer_step 2
    assert cfg["llama4_text"].rope_layers == [True, True, True, False]
    assert cfg["llama4_text"].layer_types == ["chunked", "chunked", "chunked", "full"]
    assert cfg["llama4_text"].attention_chunk_size < SEQ
    assert cfg["llama4_text_scout"].qk_norm == "l2" and cfg["llama4_text"].qk_norm == "none"


def test_fused_expert_checkpoint_names_load(tiny_reference, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj (E, 2I, H)) loads as well as per-expert tensors."""
    from safetensors.torch import save_file

    d, hf = tiny_reference("qwen3_moe")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    model = llmarch.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (model(random_ids()) - hf(random_ids()).logits).abs().max() < TOL


def test_llama4_multimodal_prefixes(tiny_reference, tmp_path):
    """Both language_model.model.* (hub) and model.language_model.* prefixes load; the vision tower is dropped."""
    import json

    from safetensors.torch import save_file

    d, hf = tiny_reference("llama4_text")
    text_cfg = json.loads((d / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for prefix in ("language_model.model.", "model.language_model."):
        out = tmp_path / prefix.replace(".", "_")
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text_cfg}))
        tensors = {(prefix + k[len("model."):] if k.startswith("model.") else "language_model." + k): v
                   for k, v in state.items()}
        tensors["vision_model.patch_embedding.weight"] = torch.zeros(3, 3)
        save_file(tensors, str(out / "model.safetensors"))
        with pytest.warns(UserWarning, match="dropped 1 non-text"):
            model = llmarch.from_pretrained(out)
        with torch.no_grad():
            assert (model(random_ids()) - hf(random_ids()).logits).abs().max() < TOL


# ---------------------------------------------------------------------------------------
# the MoE module on its own
# ---------------------------------------------------------------------------------------


def _moe_cfg(**moe):
    base = dict(num_experts=8, top_k=3, expert_size=24, score="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2,
                routed_scaling_factor=2.0, score_correction_bias=True, shared_expert_size=16)
    base.update(moe)
    return ModelConfig(vocab_size=32, hidden_size=20, num_layers=1, num_heads=2, num_kv_heads=2,
                       intermediate_size=40, moe=MoEConfig(**base))


def _dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, weighted by a dense (N, E) routing matrix."""
    r = moe.router(x)
    dense_w = torch.zeros_like(r.scores).scatter_(1, r.indices, r.weights)
    ex = moe.experts
    ys = []
    for e in range(dense_w.shape[1]):
        w = dense_w[:, e : e + 1]
        ys.append(ex.expert(e, x * w) if moe.scale_input else ex.expert(e, x) * w)
    out = torch.stack(ys).sum(0)
    return out + moe.shared_expert(x) if moe.shared_expert is not None else out


@pytest.mark.parametrize("kind", [dict(), dict(score="softmax", n_group=1, topk_group=1, score_correction_bias=False,
                                                shared_expert_size=0, routed_scaling_factor=1.0),
                                  dict(top_k=1, n_group=1, topk_group=1, norm_topk_prob=False, scale_input=True,
                                       score_correction_bias=False, routed_scaling_factor=1.0)])
@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_sorted_dispatch_equals_dense_mixture(kind, tokens):
    torch.manual_seed(0)
    moe = MoE(_moe_cfg(**kind))
    if moe.router.e_score_correction_bias is not None:
        moe.router.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(tokens, 20)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _dense_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_looped_and_batched_expert_paths_agree():
    """Both dispatch paths equal a per-token loop over each token's k experts."""
    torch.manual_seed(0)
    ex = MoE(_moe_cfg()).experts
    x = torch.randn(7, 20)
    indices = torch.tensor([[0, 5], [0, 2], [5, 7], [5, 0], [2, 5], [7, 0], [5, 2]])  # experts 1, 3, 4, 6 idle
    weights = torch.rand(7, 2)
    with torch.no_grad():
        ref = torch.stack([
            sum(weights[t, j] * ex.expert(int(indices[t, j]), x[t : t + 1])[0] for j in range(2)) for t in range(7)
        ])
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=8)
        token = order // 2
        xs, ws = x[token], weights.reshape(-1, 1)[order]
        looped = ex._looped(x, token, ws, counts.tolist(), scale_input=False)
        batched = torch.zeros_like(x).index_add_(0, token, ex._batched(xs, flat[order], counts) * ws)
        torch.testing.assert_close(looped, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ex(x, indices, weights, scale_input=False), ref, rtol=1e-5, atol=1e-6)


def test_group_limited_routing_only_picks_from_kept_groups():
    torch.manual_seed(0)
    moe = MoE(_moe_cfg())
    moe.router.e_score_correction_bias.normal_(0, 0.5)
    r = moe.router(torch.randn(64, 20))
    groups = [set((row // 2).tolist()) for row in r.indices]
    assert all(len(g) <= 2 for g in groups)  # 8 experts in 4 groups of 2, topk_group 2
    assert len({frozenset(g) for g in groups}) > 1
    torch.testing.assert_close(r.weights.sum(-1), torch.full((64,), 2.0))  # renormalised, times 2.0


def test_correction_bias_steers_selection_not_weights():
    torch.manual_seed(0)
    moe = MoE(_moe_cfg(n_group=1, topk_group=1))
    x = torch.randn(16, 20)
    before = moe.router(x)
    moe.router.e_score_correction_bias[5] = 100.0  # expert 5 always chosen ...
    after = moe.router(x)
    assert (after.indices == 5).any(-1).all()
    chosen = after.scores.gather(1, after.indices)  # ... weighted by the unbiased scores
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True) * 2.0)
    assert not torch.equal(before.indices, after.indices)


def test_decode_touches_only_selected_experts():
    torch.manual_seed(0)
    moe = MoE(_moe_cfg())
    x = torch.randn(1, 20, requires_grad=True)
    moe(x).sum().backward()
    used = set(moe.last_routing.indices[0].tolist())
    touched = {e for e in range(8) if moe.experts.gate_up_proj.grad[e].abs().sum() > 0}
    assert touched == used


def test_active_params_subtract_unused_routed_experts():
    cfg = _moe_cfg().replace(num_layers=2, layer_types=None, moe_layers=[False, True])
    c = llmarch.count_params(cfg)
    per_expert = 3 * 20 * 24
    assert c.total - c.active == (8 - 3) * per_expert
    dense = llmarch.count_params(cfg.replace(moe=None, moe_layers=None))
    # layer 0 is a dense FFN of intermediate_size: it is the same in both models
    assert c.total - dense.total == (8 * per_expert + 3 * 20 * 16 + 8 * 20) - 3 * 20 * 40


# Published figures (total / active per token). Sources: DeepSeek-V3 technical report and
# model card ("671B total, 37B activated"; the 685B on the hub includes the 14B MTP module);
# Kimi K2 model card ("1T total, 32B activated"; 1.04T / 32.6B in the brief);
# Qwen3 model cards (30.5B / 3.3B; 235B / 22B); Llama 4 model cards (Scout 109B / 17B,
# Maverick 400B / 17B, multimodal: the ~1.7B of vision encoder/projector are not counted here).
PUBLISHED = {
    "deepseek-v3": (671e9, 37e9, 0.01, 0.02),
    "kimi-k2": (1.04e12, 32.6e9, 0.02, 0.02),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 0.01, 0.02),
    "qwen3-235b-a22b": (235e9, 22e9, 0.01, 0.01),
    "llama4-scout": (109e9, 17e9, 0.02, 0.015),
    "llama4-maverick": (400e9, 17e9, 0.01, 0.015),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    total, active, tol_total, tol_active = PUBLISHED[name]
    c = llmarch.count_params(llmarch.get_config(name))
    assert abs(c.total / total - 1) < tol_total, f"{name}: total {c.total:,} vs published {total:,.0f}"
    assert abs(c.active / active - 1) < tol_active, f"{name}: active {c.active:,} vs published {active:,.0f}"


def test_packed_experts_equal_plain_experts():
    """pack_linears (the inference path) pre-packs each expert; outputs equal the plain path,
    and a weight changed after packing is re-packed, not served stale."""
    from llmarch.inference.packed import pack_linears, packing_available
    from llmarch.model.config import ModelConfig, MoEConfig
    from llmarch.model.moe import MoE

    if not packing_available():
        pytest.skip("oneDNN is not available in this torch build")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_size=48, score="softmax", norm_topk_prob=True))
    moe = MoE(cfg).eval()
    x = torch.randn(1, 37, 64)
    with torch.no_grad():
        ref = moe(x)
        ref1 = moe(x[:, :1])
        pack_linears(moe)
        assert moe.experts._packed is not None
        assert (moe(x) - ref).abs().max() < 1e-5
        assert (moe(x[:, :1]) - ref1).abs().max() < 1e-5
        moe.experts.down_proj.mul_(2.0)
        changed = moe(x)
    moe.experts._packed = None
    with torch.no_grad():
        assert (changed - moe(x)).abs().max() < 1e-5


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "llama4_text_scout"])
def test_moe_layers_bit_exact_in_bfloat16(arch, tiny_reference, pack):
    """In bfloat16 the inference path (packed experts, what ``llmarch generate`` runs) equals
    transformers' MoE layers to the last bit, for prefill-sized and single-token inputs: the
    same router precision (float32 logits for DeepSeek, activation dtype for Qwen3-MoE and
    Llama 4), the same weight casts and the same summation order, so near-tied routing
    decisions and bfloat16 roundings come out as in the reference. Unpacked, a prefill runs
    all experts as one padded batched product (training's path), whose kernel rounds
    differently: equal within bfloat16 rounding there.

    The reference is the experts' own forward in the modeling file ("eager"); transformers'
    grouped_mm kernel integration sums the k weighted outputs in float32 instead, so in
    bfloat16 it differs from its own eager path."""
    import copy

    from llmarch.inference.packed import pack_linears, packable

    d, hf = tiny_reference(arch)
    hf = copy.deepcopy(hf).to(torch.bfloat16)
    hf.config._experts_implementation = "eager"
    model = llmarch.from_pretrained(d, dtype=torch.bfloat16)
    if pack:
        pack_linears(model)
        # oneDNN packs bfloat16 only with AVX-512 (or AVX-NE-CONVERT): elsewhere the experts stay plain
        pack = packable(torch.bfloat16)
    checked = 0
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.mlp, MoE):
                continue
            for tokens in (1, 48):
                x = torch.randn(1, tokens, model.config.hidden_size, generator=g).to(torch.bfloat16)
                ref = hf.model.layers[i].feed_forward(x) if arch.startswith("llama4") else hf.model.layers[i].mlp(x)
                ref = ref[0] if isinstance(ref, tuple) else ref
                out = layer.mlp(x)
                assert out.dtype == torch.bfloat16
                ref = ref.view_as(out)
                if pack or tokens == 1:
                    assert torch.equal(out, ref), f"layer {i}, {tokens} tokens: {(out - ref).abs().max()}"
                else:
                    # within one bfloat16 rounding step of the output's scale
                    torch.testing.assert_close(out, ref, rtol=0, atol=2**-7 * ref.abs().max().item())
                checked += 1
    assert checked >= 2
