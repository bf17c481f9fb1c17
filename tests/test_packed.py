"""Pre-packed oneDNN linear layers (llmarch.inference.packed): same logits, same checkpoint, safe to train."""

import copy

import pytest
import torch
from oracle import ARCHS, random_ids

import llmarch
from llmarch.inference.packed import PackedLinear, pack_linears, packable, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN not available in this torch build")

# the inference dtype whose weights oneDNN packs here: bfloat16 needs AVX-512 (or AVX-NE-CONVERT)
PACKED_DTYPE = torch.bfloat16 if packable(torch.bfloat16) else torch.float32


@pytest.fixture(scope="module", params=["gemma3_text", "qwen2"])  # tied head + biases, untied head
def model(request, tiny_reference):
    return llmarch.from_pretrained(tiny_reference(request.param)[0])


def _ids():
    return random_ids()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_packed_logits_match(model, dtype, tol):
    ref_model = copy.deepcopy(model).to(dtype)
    packed = pack_linears(copy.deepcopy(model).to(dtype))
    if packable(dtype):
        assert any(isinstance(m, PackedLinear) for m in packed.modules())
        assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    else:  # bfloat16 on a CPU without AVX-512: oneDNN cannot pack it, the layers stay F.linear's
        assert not any(isinstance(m, PackedLinear) for m in packed.modules())
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
    from llmarch.inference.packed import FusedLinears

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


@pytest.mark.parametrize("arch", ARCHS)
def test_released_weights_give_the_same_tokens_and_refuse_training(arch, tiny_reference):
    """pack_linears(release=True) (what llmarch.inference.generate.load does) frees the plain copy of
    every packed weight: logits and cached greedy decoding equal the packed model's exactly,
    the linear weights are gone (meta), and training fails with a message saying why."""
    from llmarch.inference.generate import GenerationConfig, generate
    from llmarch.inference.packed import RELEASED

    d = tiny_reference(arch)[0]
    kept = pack_linears(llmarch.from_pretrained(d, dtype=PACKED_DTYPE))
    freed = pack_linears(llmarch.from_pretrained(d, dtype=PACKED_DTYPE), release=True)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(kept(ids), freed(ids))
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert generate(kept, None, ids[0].tolist(), config).token_ids == generate(freed, None, ids[0].tolist(), config).token_ids
    meta = sum(p.numel() for p in freed.parameters() if p.is_meta)
    total = sum(p.numel() for p in freed.parameters())
    embed = freed.embed.weight.numel()
    assert meta > 0.5 * (total - embed)  # most of what is not the embedding is freed
    assert llmarch.count_params(freed.config).total == total  # the shapes stay, for analysis
    with pytest.raises(RuntimeError, match="released"):
        freed(ids).float().sum().backward()
    assert "train" in RELEASED


def test_released_model_refuses_export(tiny_reference, tmp_path):
    from llmarch.errors import CheckpointError

    freed = pack_linears(llmarch.from_pretrained(tiny_reference("qwen2")[0]), release=True)
    with pytest.raises(CheckpointError, match="released"):
        llmarch.save_pretrained(freed, tmp_path / "out")


def _held_bytes(model) -> int:
    """Bytes of every weight the model holds: plain parameters plus oneDNN-packed copies."""
    from llmarch.inference.packed import FusedLinears

    nbytes = torch.ops.mkldnn._nbytes
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    for m in model.modules():
        if isinstance(m, PackedLinear) and m._packed is not None:
            total += nbytes(m._packed)
        for f in m.__dict__.get("_fused", {}).values():
            if isinstance(f, FusedLinears) and f._packed is not None:
                total += nbytes(f._packed[0])
    return total


def test_load_holds_the_weights_once(real_paths):
    """llmarch.inference.generate.load packs and frees: after a generation the model holds each weight
    once, plus the packed copy of the tied head (the embedding lookup needs the plain table);
    a packed model that keeps its plain weights holds the blocks twice."""
    from llmarch.inference.generate import GenerationConfig, generate, load

    model, _ = load("gemma-3-270m", PACKED_DTYPE, quant="none")  # the float path (quantised: test_quant_loading)
    kept = pack_linears(llmarch.from_pretrained(real_paths["gemma"], dtype=PACKED_DTYPE))
    for m in (model, kept):
        generate(m, None, [5, 6, 7], GenerationConfig(max_new_tokens=2, ignore_eos=True))
    cfg = model.config
    size = PACKED_DTYPE.itemsize
    plain = llmarch.count_params(cfg).total * size
    head = cfg.vocab_size * cfg.hidden_size * size
    blocks = sum(p.numel() for n, p in kept.named_parameters() if n.startswith("layers.")) * size
    assert abs(_held_bytes(model) - (plain + head)) < 0.01 * plain
    assert abs(_held_bytes(kept) - (plain + head + blocks)) < 0.01 * plain


def test_a_prefill_returns_freed_memory_when_it_grows(model, monkeypatch):
    """A forward of many rows returns the allocator's freed memory after a layer that took the
    process past the most it held earlier in that forward by more than release_growth (a first
    prefill after loading spreads its temporaries over the heap's holes), and not after a layer
    that only faulted back what it held before (each release would make the next layer fault
    its temporaries in again); a decoding step of one row never."""
    from llmarch.inference import packed

    model = pack_linears(copy.deepcopy(model))
    layers = len(model.layers)
    assert layers >= 2
    grow = packed.PackedDecoder.release_growth
    rss, released = [], []
    monkeypatch.setattr(packed, "resident_bytes", lambda: rss.pop(0) if rss else 0)
    monkeypatch.setattr(packed, "release_free_memory", lambda: released.append(True))
    monkeypatch.setattr(packed.PackedDecoder, "release_min_rows", 4)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    # the start, then after each layer: growing past the mark, back below it, up again past it
    levels = [100 << 20, (100 << 20) + 2 * grow] + [(100 << 20) + grow] * (layers - 2) + [(100 << 20) + 4 * grow]
    rss[:] = levels[: layers + 1]
    with torch.no_grad():
        model(ids)
    assert len(released) == 2
    released.clear()
    rss[:] = [0, 10 * grow] + [10 * grow] * layers
    with torch.no_grad():
        model(ids[:, :3])  # fewer rows than release_min_rows
    assert released == []
