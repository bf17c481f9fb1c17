"""The native decoding step (llmarch.inference.step, llmarch_decode_layers in kernels.c): a packed,
quantised model's layers in one call, against the same model's modules step by step (logits, the
caches' keys, values, positions and bookkeeping), over every layer kind it takes (sandwich / pre /
post norms, head QK-norm, biases, sliding ring buffers wrapping round, chunked and NoPE layers,
SiLU and tanh-GELU, int8 and int4), in float32 and bfloat16; and each thing that must make it
step aside (a kind it does not run, batch invariance, hooks, a changed norm, a full cache)."""

import copy

import pytest
import torch

import llmarch
from llmarch.errors import GenerationError
from llmarch.inference import native, step
from llmarch.inference.packed import pack_linears
from llmarch.inference.quant import batch_invariant, quantize
from llmarch.model.config import ModelConfig, RopeConfig

pytestmark = pytest.mark.usefixtures("native_kernels")


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = {
    # Gemma 3: sandwich norms (1 + w in float32), head QK-norm, GeGLU, scaled embeddings, sliding
    # layers with their own RoPE base beside a global one, a tied head
    "gemma3": _cfg(norm_placement="sandwich", qk_norm="head", norm_unit_offset=True, norm_weight_fp32=True,
                   activation="gelu_tanh", embed_scale=8.0, query_pre_attn_scalar=32.0, tie_embeddings=True,
                   layer_types=["sliding", "sliding", "full"], sliding_window=5,
                   rope=RopeConfig(theta=1e6), rope_local=RopeConfig(theta=1e4)),
    # Qwen2.5: q/k/v biases, SwiGLU, an untied head
    "qwen2": _cfg(qkv_bias=True),
    # SmolLM3: NoPE every third layer here
    "nope": _cfg(rope_layers=[True, True, False]),
    # chunked attention (Llama 4's local layers) beside a full layer; post-norm placement (OLMo 2)
    "chunked_post": _cfg(layer_types=["chunked", "full", "chunked"], attention_chunk_size=4, norm_placement="post"),
}


def _model(name: str, mode: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = llmarch.build_model(CONFIGS[name]).eval()
    with torch.no_grad():  # a trained model's scale, norms off 1, biases off 0
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.7 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0 if "norm" in n and CONFIGS[name].norm_unit_offset else 1 if "norm" in n else 0, 0.2)
        model.embed.weight.normal_(0, 1.0)
    model = quantize(model.to(dtype), "int8" if mode in ("int8g", "q5_0") else mode, 32)
    if mode in ("int8g", "q5_0"):  # a float16 scale per 32 inputs, as a GGUF file's blocks load
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        from llmarch.inference.quant import Int8Linear, Q5Linear, int8_quantize_groups

        for mod in list(model.modules()):
            for cn, child in list(mod.named_children()):
                if type(child) is Int8Linear and child.in_features % 32 == 0 and cn != "table":
                    w = child.rows(torch.arange(child.out_features))
                    if mode == "q5_0":  # the file's Q5_0 blocks, read in place
                        blocks = gguf_quantize(w.numpy(), GGMLQuantizationType.Q5_0)
                        setattr(mod, cn, Q5Linear.from_gguf(torch.from_numpy(blocks), child.in_features, child.bias))
                    else:
                        setattr(mod, cn, Int8Linear(*int8_quantize_groups(w), child.bias))
    return pack_linears(model, release=True)


def _steps(model, ids, n, use_step):
    """Prefill ids, then n teacher-forced decoding steps (the next id of a fixed sequence); the
    logits of each step, and the cache."""
    g = torch.Generator().manual_seed(7)
    feed = torch.randint(0, 256, (n,), generator=g)
    out = []
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + n)
        model(ids, cache=cache)
        before = step.enabled
        step.enabled = use_step
        try:
            for t in feed:
                out.append(model(t.view(1, 1), cache=cache)[0, -1].float())
        finally:
            step.enabled = before
    return torch.stack(out), cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["int8", "int8g", "q5_0", "int4"])  # int8g, q5_0: as GGUF blocks load
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_is_the_modules_step(name, mode, dtype, monkeypatch):
    """Twelve decoding steps (the sliding window of 5 and the chunks of 4 wrap round several
    times) with the native step and with the modules: logits within the activation function's
    difference (float32: a few units of the last place, carried through the layers; bfloat16: an
    activation that rounds the other way), keys, values and positions alike, the same bookkeeping."""
    if mode == "int4" and not native.int4_block_rows():
        pytest.skip("torch packs int4 in a layout the native kernel does not read")
    model = _model(name, mode, dtype)
    if mode == "int8g":
        from llmarch.inference.quant import Int8Linear

        assert any(m.grouped for m in model.modules() if isinstance(m, Int8Linear))
    if mode == "q5_0":
        from llmarch.inference.quant import Q5Linear

        assert any(isinstance(m, Q5Linear) for m in model.modules())
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    ran = []
    real = step.decode
    monkeypatch.setattr(step, "decode", lambda *a: ran.append(r := real(*a)) or r)
    ours, c1 = _steps(model, ids, 12, True)
    assert len(ran) == 12 and all(r is not None for r in ran), step.why_not(model)
    ran.clear()
    theirs, c2 = _steps(model, ids, 12, False)
    assert all(r is None for r in ran)  # switched off: the modules ran
    scale = theirs.abs().amax(-1, keepdim=True)
    tol = 1e-4 if dtype == torch.float32 else 0.06
    assert ((ours - theirs).abs() <= tol * scale).all(), ((ours - theirs).abs() / scale).max()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree >= (1.0 if dtype == torch.float32 else 0.9)
    assert c1.seq_len == c2.seq_len == 18
    for a, b in zip(c1.layers, c2.layers):
        assert type(a) is type(b) and torch.equal(a.pos, b.pos)
        assert (a.len, a.max_len) == (b.len, b.max_len) if hasattr(a, "len") else (a.written, a._returned) == (b.written, b._returned)
        for x, y in ((a.k, b.k), (a.v, b.v)):
            assert ((x.float() - y.float()).abs() <= tol * 4 * y.float().abs().amax() + 1e-6).all()


def test_first_step_to_the_bit_in_float32():
    """Before any activation differs (one layer's FFN input is the same bits in both), the
    attention half of the first layer gives the same keys and values: the same kernels."""
    model = _model("qwen2", "int8", torch.float32)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    _, c1 = _steps(model, ids, 1, True)
    _, c2 = _steps(model, ids, 1, False)
    assert torch.equal(c1.layers[0].k, c2.layers[0].k) and torch.equal(c1.layers[0].v, c2.layers[0].v)


def _decodes(model) -> bool:
    """Whether the next decoding step of model runs natively."""
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model(ids, cache=cache)
        return step.decode(model, torch.tensor([[6]]), None, cache) is not None


def test_what_it_does_not_run_runs_the_modules():
    """A float model (packed oneDNN layers), or an attention feature it does not take: the
    modules run, and why_not says why."""
    model = pack_linears(llmarch.build_model(_cfg()).eval())
    assert not _decodes(model) and "projection" in step.why_not(model) or "group" in step.why_not(model)
    softcap = pack_linears(quantize(llmarch.build_model(_cfg(attn_logit_softcap=50.0)).eval(), "int8"), release=True)
    assert not _decodes(softcap) and "attention" in step.why_not(softcap)
    olmo = pack_linears(quantize(llmarch.build_model(_cfg(qk_norm="proj")).eval(), "int8"), release=True)
    assert not _decodes(olmo)


def test_settings_hooks_and_weights_are_rechecked_every_step():
    model = _model("gemma3", "int8", torch.float32)
    assert _decodes(model) and step.why_not(model) is None
    # a hook on any module the step would skip: the modules run (and the hook is called)
    seen = []
    handle = model.layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
    assert not _decodes(model) and seen
    handle.remove()
    assert _decodes(model)
    # a norm weight changed in place: the description is rebuilt with the new scale
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.layers[0].mlp_norm.weight.add_(0.5)
    ours, _ = _steps(model, ids, 3, True)
    theirs, _ = _steps(model, ids, 3, False)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # a weight replaced by another tensor: the description points at the new one
    o_proj = model.layers[0].attn.o_proj
    before, _ = _steps(model, ids, 3, True)
    o_proj.weight_int8 = o_proj.weight_int8.flip(0).contiguous()
    ours, _ = _steps(model, ids, 3, True)
    theirs, _ = _steps(model, ids, 3, False)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max() and not torch.allclose(ours, before)
    # batch invariance (a server's model) keeps int8 activations for every row count: not this kernel
    batch_invariant(model)
    assert not _decodes(model) and "another kernel" in step.why_not(model)
    with step.disabled():
        assert not _decodes(model)


def test_a_full_cache_is_the_modules_error():
    model = _model("qwen2", "int8", torch.float32)
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        with pytest.raises(GenerationError, match="full"):
            model(torch.tensor([[5]]), cache=cache)


def test_a_copied_model_and_a_new_cache_are_described_anew():
    """A deep copy has its own tensors: its description points at them, not the original's."""
    model = _model("gemma3", "int8", torch.float32)
    assert _decodes(model)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    a, _ = _steps(twin, ids, 4, True)
    b, _ = _steps(model, ids, 4, True)
    assert torch.equal(a, b)
    with torch.no_grad():
        twin.layers[0].attn.o_proj.weight_int8.zero_()  # the copy's, not the original's
    c, _ = _steps(twin, ids, 4, True)
    d, _ = _steps(model, ids, 4, True)
    assert torch.equal(b, d) and not torch.equal(c, d)


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-native-step"], False)])
def test_the_command_line_switches_it_off(flag, enabled, monkeypatch, capsys):
    from llmarch.cli import generate as cli_generate
    from llmarch.cli import main

    seen = []

    def fake_load(args, name, device, dtype, decoding=False):
        seen.append(step.enabled)
        raise GenerationError("stop here")

    monkeypatch.setattr(cli_generate, "load_on_device", fake_load)
    monkeypatch.setattr(step, "enabled", True)
    assert main(["generate", "hello", *flag]) == 2
    assert seen == [enabled] and "stop here" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b"])
def test_real_checkpoints_decode_natively(name):
    """Both real GGUF files as `llmarch generate` loads them (int8 / int4 as the file is), in
    float32: 32 greedy tokens through the native step are the modules' tokens, each step's
    logits within float32's reordering of the activation."""
    from llmarch.inference.generate import load

    model, tokenizer = load(name, torch.float32)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    runs = []
    for use in (True, False):
        with torch.inference_mode():
            cache = model.new_cache(1, ids.shape[1] + 32)
            logits = model(ids, cache=cache, last_only=True)[0, -1]
            tokens, steps = [], []
            before, step.enabled = step.enabled, use
            try:
                for _ in range(32):
                    tokens.append(int(logits.argmax()))
                    logits = model(torch.tensor([[tokens[-1]]]), cache=cache, last_only=True)[0, -1]
                    steps.append(logits)
            finally:
                step.enabled = before
        runs.append((tokens, torch.stack(steps)))
    assert step.why_not(model) is None
    (ours, a), (theirs, b) = runs
    assert ours == theirs
    assert ((a - b).abs() <= 1e-3 * b.abs().amax(-1, keepdim=True)).all(), ((a - b).abs().amax() / b.abs().amax())
