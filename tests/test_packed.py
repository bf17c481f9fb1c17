"""Pre-packed oneDNN linear layers (llmarch.packed): same logits, same checkpoint, safe to train."""

import copy

import pytest
import torch
from hf_tiny import SEQ, VOCAB, make_hf_model

import llmarch
from llmarch.packed import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN not available in this torch build")


@pytest.fixture(scope="module", params=["gemma3_text", "qwen2"])  # tied head + biases, untied head
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param).save_pretrained(d)
    return llmarch.from_pretrained(d)


def _ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_packed_logits_match(model, dtype, tol):
    ref_model = copy.deepcopy(model).to(dtype)
    packed = pack_linears(copy.deepcopy(model).to(dtype))
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    with torch.inference_mode():
        ref, out = ref_model(_ids()), packed(_ids())
    assert (out.float() - ref.float()).abs().max().item() <= tol


def test_checkpoint_unchanged(model):
    packed = pack_linears(copy.deepcopy(model))
    before, after = model.state_dict(), packed.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert llmarch.count_params(model.config).total == sum(p.numel() for p in packed.parameters())


def test_training_falls_back_and_repacks_after_an_update(model):
    packed = pack_linears(copy.deepcopy(model))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        packed(_ids())  # packs every weight
    loss = packed(_ids()).float().logsumexp(-1).mean()
    loss.backward()  # autograd goes through F.linear
    assert all(p.grad is not None for p in packed.parameters())
    for m in (packed, ref):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.9)  # an in-place update, like an optimizer step
    with torch.no_grad():
        assert (packed(_ids()) - ref(_ids())).abs().max().item() < 1e-5


def test_fused_projections_are_used_and_follow_weight_changes(model):
    """q/k/v and gate/up run as one packed product each (one oneDNN call instead of 3 and 2);
    changing one source weight in place, converting the model, or replacing a layer re-packs."""
    from llmarch.packed import FusedLinears

    packed = pack_linears(copy.deepcopy(model))
    fused = [m.__dict__["_fused"] for m in packed.modules() if "_fused" in m.__dict__]
    assert {g for f in fused for g in f} == {"qkv", "gate_up"}
    assert all(isinstance(f, FusedLinears) for groups in fused for f in groups.values())

    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    cfg = model.config

    def count(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch.ops.mkldnn._linear_pointwise = count
    try:
        with torch.inference_mode():
            packed(_ids())
    finally:
        torch.ops.mkldnn._linear_pointwise = real
    assert len(calls) == 4 * cfg.num_layers + 1  # qkv, o, gate_up, down per layer + head

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in (packed, ref):
            m.layers[0].attn.k_proj.weight.mul_(1.5)  # only one of the three fused matrices
            m.layers[-1].mlp.up_proj.weight.add_(0.01)
        assert (packed(_ids()) - ref(_ids())).abs().max().item() < 1e-5
        for m in (packed, ref):
            m.layers[0].attn.v_proj = torch.nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        packed.layers[0].attn.v_proj.load_state_dict(ref.layers[0].attn.v_proj.state_dict())
        assert (packed(_ids()) - ref(_ids())).abs().max().item() < 1e-5
        packed.to(torch.bfloat16)
        ref.to(torch.bfloat16)
        assert (packed(_ids()).float() - ref(_ids()).float()).abs().max().item() == 0.0
