"""Weight-only int8 / int4 inference (llmarch.inference.quant, gguf_quant): every kernel path
against the float product within the error its format allows, GGUF blocks against gguf's own
dequantisation, and whole quantised models against their float originals."""

import threading

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn

import llmarch
from llmarch.errors import ConfigError
from llmarch.inference.gguf_quant import Q, gguf_embedding, gguf_linear, int4_codes
from llmarch.inference.quant import (
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    QuantExperts,
    QuantHead,
    FLOAT_MIN_ROWS,
    W8A8_MIN_ROWS,
    int8_rows,
    quantize,
    quantize_linear,
)
from llmarch.model.config import MLAConfig, ModelConfig, MoEConfig

BF16 = 2.0**-8  # the unit roundoff of bfloat16 (8 significant bits): its largest relative rounding error


def _weight_error_bound(w: torch.Tensor, mode: str, group: int) -> torch.Tensor:
    """Largest |w - dequantised w| the format allows, per element, from the float weights:
    half a step (int8: max |w| / 127 per row; int4: (max - min) / 15 per group), plus the
    rounding of the scale and zero to bfloat16 (it moves the ends of the int4 range)."""
    if mode == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 * (1 + BF16) / 2).expand_as(w)
    g = w.view(w.shape[0], -1, group)
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    amax = g.abs().amax(-1, keepdim=True)
    # the kernel's range [zero - 8 scale, zero + 7 scale], |zero| <= amax + 8 scale, ends moved by
    # the rounding of zero and of 15 scales
    return (step / 2 * (1 + BF16) + BF16 * (24 * step + amax)).expand_as(g).reshape(w.shape)


def _product_bound(x, w, b, elem):
    """|x W^T + b - kernel| bound: the weight error, plus the bfloat16 rounding of the
    activations, of the output and of the bias."""
    ax = x.double().abs()
    return ax @ elem.double().T + BF16 * (ax @ (w.double().abs() + elem.double()).T + b.double().abs())


CASES = [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)]


@pytest.mark.parametrize("mode, group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [100, 192])  # not a multiple of the int4 row block; several blocks
def test_linear_within_the_format_error(mode, group, dtype, out_features):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(out_features, 512, generator=g), torch.randn(out_features, generator=g)
    x = torch.randn(2, 3, 512, generator=g).to(dtype)
    layer = quantize_linear(w, b, mode, group)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, out_features)
    ref = x.double() @ w.double().T + b.double()
    tol = _product_bound(x.reshape(-1, 512), w, b, _weight_error_bound(w, mode, group)).view(ref.shape)
    assert ((y.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("rows", [W8A8_MIN_ROWS, 16, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_with_many_rows_multiplies_int8_activations_within_their_error(rows, dtype, monkeypatch):
    """From W8A8_MIN_ROWS rows on, Int8Linear runs torch._int_mm on two-level int8 activations
    (the weight-only kernel is not called): within the weight's error plus the activations'
    (at most max |x| / (2 * 254 * 127) per element), and each row's result is the same in any
    batch (rows never mix)."""
    from llmarch.inference import quant

    monkeypatch.setattr(quant, "many_rows_in_float", lambda: False)  # as on an AVX-512 CPU
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(100, 512, generator=g), torch.randn(100, generator=g)
    x = (torch.randn(rows, 512, generator=g) * torch.rand(rows, 1, generator=g) * 10).to(dtype)
    x[0, 7] = 300.0  # an outlier feature: per-token int8 alone would lose the small entries of row 0
    layer = Int8Linear.from_float(w, b)

    def no_weight_only(*a):
        raise AssertionError("the weight-only kernel was called")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", no_weight_only)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 100)
    codes, s1, s2 = int8_rows(x)
    assert codes.dtype == torch.int8 and codes.shape == (2 * rows, 512)
    dx = (x.double().abs().amax(1, keepdim=True) / (2 * 254 * 127)).expand(rows, 512)
    # (up to float32 rounding: a bfloat16 input can sit exactly on a half step)
    assert ((s1 * codes[:rows] + s2 * codes[rows:]).double() - x.double()).abs().le(dx * 1.001 + 1e-6 * x.double().abs()).all()
    ref = x.double() @ w.double().T + b.double()
    elem = _weight_error_bound(w, "int8", 32)
    out_round = (BF16 if dtype == torch.bfloat16 else 1e-6) * (ref.abs() + b.double().abs())
    tol = x.double().abs() @ elem.double().T + dx @ (w.double().abs() + elem.double()).T + out_round + 1e-5
    assert ((y.double() - ref).abs() <= tol).all()
    # the same rows inside another batch: bit for bit
    assert torch.equal(layer(x[:W8A8_MIN_ROWS]), y[:W8A8_MIN_ROWS])
    # a per-token int8 product of row 0 (one level) is visibly worse than the two-level one
    one = (torch.round(x[0].float() / s1[0]) * s1[0]).double()
    assert (one - x[0].double()).abs().max() > 100 * dx[0, 0]


@pytest.mark.parametrize("mode, group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [FLOAT_MIN_ROWS, 200])
def test_many_rows_multiply_float_copies_of_the_weights(mode, group, dtype, rows, monkeypatch):
    """Where many_rows_in_float (CPUs without AVX-512), products of FLOAT_MIN_ROWS rows or more run
    a float32 GEMM on the dequantised weight, a few hundred rows of it at a time: the product of x
    with exactly the weights the layer holds (``rows``), up to float32 rounding; no int8 or int4
    kernel is called. A 700-row weight is made in several chunks (the last one partial)."""
    from llmarch.inference import native, quant

    monkeypatch.setattr(quant, "many_rows_in_float", lambda: True)
    if mode == "int4" and native.library() is None:
        pytest.skip("the int4 weights are dequantised by llmarch's native kernels (not built here)")

    def not_called(*a, **k):
        raise AssertionError("a quantised kernel was called")

    for op in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm"):
        monkeypatch.setattr(torch.ops.aten, op, not_called)
    monkeypatch.setattr(torch, "_int_mm", not_called)
    monkeypatch.setattr(native, "int8_mm", not_called)
    g = torch.Generator().manual_seed(rows + group)
    w, b = torch.randn(700, 256, generator=g), torch.randn(700, generator=g)
    layer = quantize_linear(w, b, mode, group)
    x = (torch.randn(rows, 256, generator=g) * 3).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 700)
    wq = layer.rows(torch.arange(700)).double()  # the weights the layer holds
    ref = x.double() @ wq.T + b.double()
    # float32 sums of 256 products, then the rounding of the product, of the bias and of their sum
    # to the output's dtype (each at most half its unit: together within one unit of |x||w| + |b|)
    size = x.double().abs() @ wq.abs().T
    tol = 256 * 2.0**-23 * size + (BF16 if dtype == torch.bfloat16 else 2.0**-23) * 1.01 * (size + b.double().abs())
    assert ((y.double() - ref).abs() <= tol + 1e-6).all()
    # below FLOAT_MIN_ROWS the quantised kernels run as before
    monkeypatch.undo()
    assert torch.equal(layer(x[: FLOAT_MIN_ROWS - 1]), quantize_linear(w, b, mode, group)(x[: FLOAT_MIN_ROWS - 1]))


def test_many_rows_in_float_only_without_avx512(monkeypatch):
    """The float32 products stand in for the int8 GEMM only where oneDNN has none (no AVX-512)."""
    from llmarch.inference import quant

    for capability, expect in (("AVX2", True), ("DEFAULT", True), ("AVX512", False)):
        quant.many_rows_in_float.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert quant.many_rows_in_float() is expect
    quant.many_rows_in_float.cache_clear()


@pytest.mark.parametrize("out_features", [64, 100, 300])
def test_native_int4_dequantisation_is_the_layers_rows(out_features):
    """llmarch_q4_dequant_t gives (in, rows) float32 of any whole blocks of torch's int4 packing:
    to the bit the values ``Int4Linear.rows`` reads from the packed codes."""
    from llmarch.inference import native

    if native.library() is None or not native.int4_block_rows():
        pytest.skip("llmarch's native kernels are not built here")
    br = native.int4_block_rows()
    g = torch.Generator().manual_seed(out_features)
    layer = Int4Linear.from_float(torch.randn(out_features, 192, generator=g), None, 64)
    npad = layer.weight_int4pack.shape[0]
    full = layer.rows(torch.arange(npad))  # the padding rows too
    for start, end in ((0, npad), (br, npad), (0, br), (npad - br, npad), (br, br)):
        t = native.q4_dequant_t(layer.weight_int4pack, 192, layer.scales_and_zeros, 64, (start, end))
        assert t.shape == (192, end - start) and torch.equal(t.t(), full[start:end])
    # what the kernel does not take: None, never a wrong answer
    assert native.q4_dequant_t(layer.weight_int4pack, 192, layer.scales_and_zeros, 64, (1, br)) is None
    assert native.q4_dequant_t(layer.weight_int4pack, 192, layer.scales_and_zeros, 64, (0, npad + br)) is None
    assert native.q4_dequant_t(layer.weight_int4pack, 192, layer.scales_and_zeros.float(), 64, (0, br)) is None


def test_batch_invariant_layers_keep_exact_products_at_many_rows(monkeypatch):
    """A server's batch-invariant model never takes the float32 products (a GEMM's sums depend on
    how many rows it blocks together): a row's result is the same alone and among 100 rows."""
    from llmarch.inference import quant
    from llmarch.inference.packed import pack_linears

    monkeypatch.setattr(quant, "many_rows_in_float", lambda: True)
    model = quant.batch_invariant(pack_linears(quantize(_model("dense_tied"), "int8"), release=True))
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert layers and not any(m.float_rows for m in layers)
    x = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    head = model.lm_head
    many = head(x)
    for i in (0, 57, 99):
        assert torch.equal(many[i], head(x[i : i + 1])[0])
    layer4 = quant.batch_invariant(Int4Linear.from_float(torch.randn(64, 64), None, 32))
    assert not layer4.float_rows


@pytest.mark.parametrize("mode, group, kernel", [(m, g, "torch") for m, g in CASES] + [("int8", 32, "native")])
def test_embedding_rows_are_the_kernel_weights(mode, group, kernel, request):
    """The rows a lookup dequantises are exactly the matrix the kernel multiplies (read off the
    kernel with an identity input), so the tied head and the embedding agree."""
    request.getfixturevalue(f"{kernel}_kernels")
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(1))
    emb = QuantEmbedding.from_float(w, mode, group)
    eye = torch.eye(256)
    step = W8A8_MIN_ROWS - 1  # the weight-only kernel: fewer rows at a time than W8A8_MIN_ROWS
    kernel_w = torch.cat([emb.table(eye[i : i + step]) for i in range(0, 256, step)]).T
    rows = emb.table.rows(torch.arange(200))
    # torch's kernels round their results to bfloat16; the native one returns x's float32 (q * scale: exact)
    assert torch.equal(rows if kernel == "native" else rows.to(torch.bfloat16).float(), kernel_w.float())
    if mode == "int8":  # all 256 rows at once: int8 activations, float32 results
        assert torch.allclose(emb.table(eye).T, rows, rtol=1e-6, atol=0)
    ids = torch.tensor([[5, 199, 64], [0, 63, 5]])
    assert torch.equal(emb(ids), rows[ids])
    assert ((rows - w).abs() <= _weight_error_bound(w, mode, group)).all()


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, max_position_embeddings=64, **kw)


CONFIGS = {
    "dense_tied": _tiny(tie_embeddings=True, qkv_bias=True),
    "moe": _tiny(tie_embeddings=False, moe=MoEConfig(num_experts=8, top_k=2, expert_size=64, shared_expert_size=64)),
    "mla": _tiny(attention_kind="mla", mla=MLAConfig(q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=16,
                                                    qk_rope_head_dim=16, v_head_dim=16)),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = llmarch.build_model(CONFIGS[name]).eval()
    with torch.no_grad():  # weights of a trained model's scale, so logits spread and argmax means something
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
        model.embed.weight.normal_(0, 1.0)
    return model


# logits relative RMS error and argmax agreement observed here: int8 ~0.01 / 100%, int4 ~0.1 / 90%
@pytest.mark.parametrize("mode, group, max_rel, min_agree", [("int8", 32, 0.03, 0.95), ("int4", 32, 0.2, 0.75)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_model_close_to_float(name, mode, group, max_rel, min_agree):
    ref_model = _model(name)
    model = quantize(_model(name), mode, group)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = ref_model(ids), model(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel < max_rel and agree >= min_agree, (rel, agree)
    kept = {n for m in model.modules() for n in getattr(m, "reads_weights", ())}
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert all(n.rsplit(".", 1)[-1] in kept for n in linears), linears
    floats = [n for n, p in model.named_parameters() if p.dim() > 1 and not p.is_meta]
    assert all(n.endswith("router.weight") or n.rsplit(".", 2)[-2] in kept for n in floats), floats
    assert isinstance(model.embed, QuantEmbedding)
    if name == "moe":
        assert sum(isinstance(m, QuantExperts) for m in model.modules()) == len(model.layers)
    if name == "mla":
        assert type(model.layers[0].attn.kv_b_proj) is nn.Linear  # read as a matrix by the absorbed decode


def test_tied_head_reads_the_embedding_table_once():
    model = quantize(_model("dense_tied"), "int4", 32)
    assert isinstance(model.lm_head, QuantHead) and model.lm_head.embedding is model.embed
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    h = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.equal(model.lm_head(h), model.embed.table(h))


def test_quantized_moe_decodes_like_its_prefill():
    """One token at a time through the cache gives the logits of the full sequence (the
    single-token expert path and the multi-token one use the same quantised experts)."""
    model = quantize(_model("moe"), "int8")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 16)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(6)], dim=1)
    assert (steps - full).abs().max() < 0.02 * full.abs().max()


# ---- GGUF blocks ----------------------------------------------------------------------------
SHAPE = (64, 512)


def _random_blocks(qtype, f16_at: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes in qtype's block layout with sane float16 scale fields at byte offsets f16_at
    (for the types gguf.quants cannot quantise)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (SHAPE[0], SHAPE[1] // block, size), dtype=np.uint8)
    for at in f16_at:
        b[..., at : at + 2] = rng.uniform(1e-3, 1e-2, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    return b.reshape(SHAPE[0], -1)


def _gguf_data(qtype) -> np.ndarray:
    if qtype == Q.Q4_K or qtype == Q.Q5_K:
        return _random_blocks(qtype, (0, 2))
    if qtype == Q.Q6_K:
        return _random_blocks(qtype, (208,))
    w = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    return gguf_quantize(w, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_4bit_blocks_map_exactly(qtype):
    data = _gguf_data(qtype)
    ref = torch.from_numpy(dequantize(data, qtype)).double()
    codes, scales, zeros = (torch.from_numpy(a).double() for a in int4_codes(data, qtype, SHAPE))
    s, z = scales.repeat_interleave(32, 1), zeros.repeat_interleave(32, 1)
    exact = (codes - 8) * s + z
    assert ((exact - ref).abs() <= 4 * torch.finfo(torch.float32).eps * (8 * s.abs() + z.abs())).all()
    layer = gguf_linear(data, qtype, SHAPE)
    assert isinstance(layer, Int4Linear)
    rows = layer.rows(torch.arange(SHAPE[0])).double()
    # in the kernel: the scale and zero rounded to bfloat16, nothing else
    assert ((rows - ref).abs() <= BF16 * (8 * s.abs() + z.abs()) * (1 + 1e-3)).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K])
def test_gguf_wider_blocks_requantised_to_int8(qtype):
    """A linear layer keeps a float16 scale per 32 weights: Q8_0 and Q5_0 blocks exactly as the
    file holds them (gguf's own dequantisation, to the bit), the other types within half a step
    of their group's largest / 127; the token table one scale a row (the row's bound)."""
    from llmarch.inference import native

    if native.library() is None:
        pytest.skip("the grouped int8 layout is loaded where llmarch's native kernels are built")
    data = _gguf_data(qtype)
    ref = torch.from_numpy(dequantize(data, qtype))
    layer = gguf_linear(data, qtype, SHAPE)
    if qtype == Q.Q5_0:  # --quant compact: the file's codes (see test_q5_0_layer_is_the_int8_layer_of_its_codes)
        from llmarch.inference.quant import Q5Linear

        q5 = gguf_linear(data, qtype, SHAPE, mode="compact")
        assert isinstance(q5, Q5Linear) and q5.blocks.shape == (SHAPE[0], SHAPE[1] // 32 * 20)
        assert torch.equal(q5.rows(torch.arange(SHAPE[0])), ref)
        assert torch.equal(q5.codes().float().sub(16).view(SHAPE[0], -1, 32) * q5.scales.float()[..., None],
                           ref.view(SHAPE[0], -1, 32))
    assert isinstance(layer, Int8Linear) and layer.grouped and layer.scales.dtype == torch.float16
    rows = layer.rows(torch.arange(SHAPE[0]))
    if qtype in (Q.Q8_0, Q.Q5_0):
        assert torch.equal(rows, ref)
    else:
        g = ref.view(SHAPE[0], -1, 32).abs().amax(-1, keepdim=True) / 127
        bound = (g / 2 * (1 + 2.0**-10) + 1e-12).expand(-1, -1, 32).reshape(SHAPE)  # plus the float16 scale's rounding
        assert ((rows - ref).abs() <= bound).all()
    per_row = gguf_linear(data, qtype, SHAPE, grouped=False)
    assert not per_row.grouped
    assert ((per_row.rows(torch.arange(SHAPE[0])) - ref).abs() <= _weight_error_bound(ref, "int8", 32)).all()
    emb = gguf_embedding(data, qtype, SHAPE, torch.bfloat16)
    assert not emb.table.grouped
    assert emb(torch.tensor([3])).dtype == torch.bfloat16
    with native.disabled():  # torch's int8 kernels take one scale a row: so is it loaded without the native ones
        assert not gguf_linear(data, qtype, SHAPE).grouped


def test_gguf_scales_beyond_float16_fall_back_to_one_a_row():
    """Q8_0 blocks hold float16 scales, but a Q6_K super-block's scale times its int8 sub-scales
    can pass float16's range (only a made-up file): such a matrix keeps one scale a row, finite."""
    from llmarch.inference.gguf_quant import int8_weights

    data = _random_blocks(Q.Q6_K, (208,))
    blocks = data.reshape(SHAPE[0], -1, 210)
    blocks[:, :, 208:210] = np.frombuffer(np.float16(60000.0).tobytes(), np.uint8)  # d, at the block's end
    blocks[:, :, 192:208] = 127  # the int8 sub-scales
    q, scales = int8_weights(data, Q.Q6_K, SHAPE, grouped=True)
    assert scales.shape == (SHAPE[0],) and scales.dtype == torch.bfloat16 and torch.isfinite(scales.float()).all()
    ref = torch.from_numpy(dequantize(data, Q.Q6_K))
    err = (q.float() * scales.float()[:, None] - ref).abs()
    assert (err <= _weight_error_bound(ref, "int8", 32) * 1.01).all()


@pytest.mark.parametrize("rows", [1, 5, W8A8_MIN_ROWS, 40])
def test_grouped_int8_layer_at_every_row_count(rows, monkeypatch):
    """An int8 layer with a float16 scale per 32 inputs (as GGUF blocks load): the native kernel
    for few rows, the float32 product for more (torch's int8 kernels take one scale a row), each
    within float32 rounding (and the activations' 16-bit codes) of the product with its weights;
    batch-invariant, every row count gives each row its own result; without the native kernels,
    the float32 product."""
    from llmarch.inference import native, quant

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 256, generator=g) * 0.1, torch.randn(96, generator=g)
    layer = Int8Linear(*quant.int8_quantize_groups(w), b)
    assert layer.grouped and layer.scales.shape == (96, 8)
    wq = layer.rows(torch.arange(96)).double()
    assert ((wq - w.double()).abs() <= w.view(96, 8, 32).abs().amax(-1).repeat_interleave(32, 1) / 254 * 1.01 + 1e-9).all()
    x = torch.randn(rows, 256, generator=g)
    ref = x.double() @ wq.T + b.double()
    size = x.double().abs() @ wq.abs().T + b.double().abs()
    codes = x.double().abs().amax(1, keepdim=True) / 65534 @ wq.abs().sum(1, keepdim=True).T
    y = layer(x)
    assert ((y.double() - ref).abs() <= codes * 1.001 + 64 * 2.0**-23 * size).all()
    invariant = quant.batch_invariant(Int8Linear(*quant.int8_quantize_groups(w), b))
    yi = invariant(x)
    for i in range(rows):
        assert torch.equal(invariant(x[i : i + 1])[0], yi[i])
    monkeypatch.setattr(native, "library", lambda: None)
    assert ((layer(x).double() - ref).abs() <= 64 * 2.0**-23 * size).all()
    yi = invariant(x)
    for i in range(rows):
        assert torch.equal(invariant(x[i : i + 1])[0], yi[i])


@pytest.mark.parametrize("rows", [1, 5, W8A8_MIN_ROWS, 40])
def test_q5_0_layer_is_the_int8_layer_of_its_codes(rows, monkeypatch):
    """A GGUF Q5_0 matrix kept in its blocks gives, at every row count (native kernel, float32
    product; batch-invariant; without the native kernels), the bits of the grouped int8 layer
    holding the same codes and scales, within the bound of the product with gguf's weights."""
    from llmarch.inference import native, quant
    from llmarch.inference.gguf_quant import int8_weights
    from llmarch.inference.quant import Q5Linear

    if native.library() is None:
        pytest.skip("Q5_0 blocks are kept where llmarch's native kernels are built")
    data = _gguf_data(Q.Q5_0)
    ref = torch.from_numpy(dequantize(data, Q.Q5_0)).double()
    b = torch.randn(SHAPE[0], generator=torch.Generator().manual_seed(rows))
    q5 = gguf_linear(data, Q.Q5_0, SHAPE, b, mode="compact")
    assert isinstance(q5, Q5Linear) and q5.blocks.shape == (SHAPE[0], SHAPE[1] // 32 * 20)
    int8 = Int8Linear(*int8_weights(data, Q.Q5_0, SHAPE, grouped=True), b)
    x = torch.randn(rows, SHAPE[1], generator=torch.Generator().manual_seed(rows + 1))
    y = q5(x)
    assert torch.equal(y, int8(x))
    size = x.double().abs() @ ref.abs().T + b.double().abs()
    codes = x.double().abs().amax(1, keepdim=True) / 65534 @ ref.abs().sum(1, keepdim=True).T
    assert ((y.double() - (x.double() @ ref.T + b.double())).abs() <= codes * 1.001 + 64 * 2.0**-23 * size).all()
    inv5 = quant.batch_invariant(Q5Linear(q5.blocks, q5.scales, SHAPE[1], b))
    inv8 = quant.batch_invariant(Int8Linear(int8.weight_int8, int8.scales, b))
    yi = inv5(x)
    assert torch.equal(yi, inv8(x))
    for i in range(rows):
        assert torch.equal(inv5(x[i : i + 1])[0], yi[i])
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(q5(x), int8(x))
    assert ((q5(x).double() - (x.double() @ ref.T + b.double())).abs() <= 64 * 2.0**-23 * size).all()
    with pytest.raises(ConfigError, match="Q5_0 codes"):
        Q5Linear(q5.blocks[:, :-1], q5.scales, SHAPE[1])
    with pytest.raises(ConfigError, match="Q5_0 codes"):
        Q5Linear(q5.blocks, q5.scales.float(), SHAPE[1])


# ---- errors ---------------------------------------------------------------------------------
def test_errors_say_what_to_do():
    model = _model("dense_tied")
    with pytest.raises(ConfigError, match="unknown quantisation mode 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ConfigError, match="group size 48 is not supported"):
        quantize(model, "int4", group_size=48)
    with pytest.raises(ConfigError, match="in_features 96 is not divisible by the int4 group size 64"):
        Int4Linear.from_float(torch.randn(16, 96), group_size=64)
    with pytest.raises(ConfigError, match="not divisible"):
        quantize(_model("dense_tied"), "int4", group_size=128)  # hidden 64


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0])
def test_torch_dequantisation_equals_gguf(qtype):
    """The vectorised torch path for the common 5- and 8-bit types gives gguf.quants' values exactly
    (random bytes: every code and high-bit pattern)."""
    from llmarch.inference.gguf_quant import _dequantize_torch

    for data in (_gguf_data(qtype), _random_blocks(qtype, (0,), seed=3)):
        ref = torch.from_numpy(dequantize(data, qtype)).reshape(SHAPE[0], -1)
        assert torch.equal(_dequantize_torch(data, qtype), ref)


# ---- fbgemm's int8 x int8 kernel on exact two-level codes (fast_kernels) -----------------------
def _head_model(vocab=1000, hidden=96, tied=False, seed=0):
    from llmarch.inference.quant import QuantEmbedding, QuantHead

    g = torch.Generator().manual_seed(seed)
    table = Int8Linear.from_float(torch.randn(vocab, hidden, generator=g) * 0.05)
    m = nn.Module()
    if tied:
        m.embed = QuantEmbedding(table, torch.float32)
        m.lm_head = QuantHead(m.embed)
    else:
        m.lm_head = table
    return m, table


@pytest.fixture
def any_size(monkeypatch, torch_kernels):
    """fast_kernels packs layers of every size (the tests' matrices are below FAST_MIN_WEIGHTS),
    on torch's kernels (with llmarch's native kernels built, fast_kernels leaves the model be)."""
    from llmarch.inference import quant

    if not quant.dynamic_available():
        pytest.skip("this torch build has no fbgemm (x86) quantized engine")
    monkeypatch.setattr(quant, "FAST_MIN_WEIGHTS", 0)


@pytest.mark.parametrize("tied", [False, True])
def test_fast_kernels_few_rows_within_the_two_level_code_bound(tied, any_size):
    from concurrent.futures import Future

    from llmarch.inference.quant import batch_invariant, fast_kernels

    model, table = _head_model(tied=tied)
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(1)) * 3
    x[..., 5] = 40.0  # an outlier sets the first level's step
    w = table.weight_int8.double() * table.scales.double()[:, None]
    ref = x.double().reshape(1, -1) @ w.t()
    plain = table(x).double().reshape(1, -1)
    fast_kernels(model)  # packed on a second thread
    pending = table.dynamic
    assert isinstance(pending, Future)
    early = model.lm_head(x)  # packed or not yet: never waits, the same bits either way
    pending.result()  # the packing done
    y = model.lm_head(x).double().reshape(1, -1)
    assert not isinstance(table.dynamic, Future) and table.dynamic is not None
    assert torch.equal(early.double().reshape(1, -1), y)
    # two levels of 7-bit codes: s1 = max|x| / 63, the rest within s1 / 2, s2 = max|rest| / 63, so
    # each activation is off by at most s2 / 2 <= s1 / 252; the int32 sums are exact
    step = x.abs().max().item() / 63 / 252
    bound = w.abs().sum(1) * step + 1e-5 * ref.abs()[0] + 1e-6
    assert ((y - ref).abs()[0] <= bound).all()
    assert (y - ref).abs().max() < (plain - ref).abs().max() / 4  # nearer than bfloat16 activations (6x here)
    # packed in the background or not, the same numbers
    sync_model, _ = _head_model(tied=tied)
    fast_kernels(sync_model, background=False)
    assert torch.equal(sync_model.lm_head(x), model.lm_head(x))
    # a few rows: each row is what it is alone (rows never mix)
    x3 = torch.randn(1, 3, 96, generator=torch.Generator().manual_seed(2))
    y3 = model.lm_head(x3)
    for i in range(3):
        assert torch.equal(y3[:, i], model.lm_head(x3[:, i : i + 1])[:, 0])
    # from W8A8_MIN_ROWS rows on, the many-row path: the same as without the fast kernels
    x8 = torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(3))
    without, _ = _head_model(tied=tied)
    assert torch.equal(model.lm_head(x8), without.lm_head(x8))
    # a server's batch-invariant model drops it: every row count takes one product
    batch_invariant(model)
    assert table.dynamic is None


def test_fast_kernels_extreme_codes_do_not_saturate(any_size):
    from llmarch.inference.quant import fast_kernels

    # every code at +-63 against weights at +-127 of the same sign: the largest pair sums an
    # int16-accumulating (non-VNNI) kernel would form; exact sums give 127 x 256 per row
    weight = torch.full((64, 256), 127, dtype=torch.int8)
    weight[1::2] = -127
    layer = Int8Linear(weight, torch.ones(64))
    fast_kernels(layer, background=False)
    assert layer.dynamic is not None
    for sign in (1.0, -1.0):
        y = layer(torch.full((1, 256), sign))
        expect = torch.tensor([127.0 * 256 * sign, -127.0 * 256 * sign] * 32)[None]
        torch.testing.assert_close(y, expect, rtol=1e-6, atol=0)


def test_fast_kernels_leave_small_and_other_layers_alone():
    from llmarch.inference.quant import FAST_MIN_WEIGHTS, fast_kernels

    m = nn.Module()
    m.lm_head = nn.Linear(8, 16, bias=False)
    assert fast_kernels(m) is m and not hasattr(m.lm_head, "dynamic")
    q = nn.Module()
    q.lm_head = Int4Linear.from_float(torch.randn(64, 64), None, 32)
    fast_kernels(q)
    assert getattr(q.lm_head, "dynamic", None) is None
    small, _ = _head_model()  # 96,000 weights, below FAST_MIN_WEIGHTS: faster without
    assert small.lm_head.weight_int8.numel() < FAST_MIN_WEIGHTS
    fast_kernels(small)
    assert small.lm_head.dynamic is None


@pytest.mark.parametrize("k", [24, 100, 104, 96])
def test_int8_linear_of_any_width_against_the_dequantised_product(k, monkeypatch):
    """torch's int8 kernel segfaults or returns NaN for widths off a multiple of 16: the layer pads
    them (96 needs no padding), at every row count and path, the lookups unpadded."""
    from llmarch.inference import quant

    g = torch.Generator().manual_seed(k)
    layer = Int8Linear.from_float(torch.randn(40, k, generator=g) * 0.1, torch.randn(40, generator=g))
    assert layer.in_features == k and layer.weight_int8.shape[1] % 16 == 0
    w = layer.rows(torch.arange(40)).double()
    assert w.shape == (40, k)
    for rows in (1, 4, 9):  # the weight-only kernel, and int8 activations from 8 rows on
        x = torch.randn(rows, k, generator=g)
        ref = x.double() @ w.t() + layer.bias.double()
        y = layer(x).double()
        assert torch.isfinite(y).all()
        assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    if quant.dynamic_available():  # and fbgemm's packed copy
        monkeypatch.setattr(quant, "FAST_MIN_WEIGHTS", 0)
        quant.fast_kernels(layer, background=False)
        x = torch.randn(3, k, generator=g)
        ref = x.double() @ w.t() + layer.bias.double()
        assert (layer(x).double() - ref).abs().max() <= 1e-3 * ref.abs().max()


# ---- fused int8 groups (q/k/v, gate/up) ------------------------------------------------------
def _qkv_module(k=100, bias=(True, False, True), seed=0):
    """A module with three int8 layers of one input width (off a multiple of 16: padded)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    for name, n, b in zip(("q_proj", "k_proj", "v_proj"), (48, 16, 16), bias):
        setattr(m, name, Int8Linear.from_float(torch.randn(n, k, generator=g) * 0.1,
                                               torch.randn(n, generator=g) if b else None))
    return m


@pytest.mark.parametrize("rows", [1, 3, 9])  # the weight-only kernel, and int8 activations from 8 rows on
def test_fused_int8_layers_equal_the_layers_apart(rows):
    from llmarch.inference.quant import FusedInt8

    names = ("q_proj", "k_proj", "v_proj")
    apart = _qkv_module()
    m = _qkv_module()
    fused = FusedInt8(m, names)
    x = torch.randn(2, rows, 100, generator=torch.Generator().manual_seed(rows))
    expect = torch.cat([getattr(apart, n)(x) for n in names], dim=-1)
    assert fused.usable(x)
    assert torch.equal(fused(x), expect)
    # each layer still runs on its own, on views of the fused buffers (no second copy)
    for n in names:
        layer, ref = getattr(m, n), getattr(apart, n)
        assert torch.equal(layer(x), ref(x))
        assert layer.weight_int8.untyped_storage().data_ptr() == fused.layer.weight_int8.untyped_storage().data_ptr()
        assert layer.scales.untyped_storage().data_ptr() == fused.layer.scales.untyped_storage().data_ptr()
    assert m.k_proj.bias is None and torch.equal(fused.layer.bias[48:64], torch.zeros(16))
    # a layer replaced, or a buffer converted since: the group is no longer used
    m.k_proj = _qkv_module(seed=1).k_proj
    assert not fused.usable(x)
    m2 = _qkv_module()
    f2 = FusedInt8(m2, names)
    m2.to(torch.float32)  # casts the bfloat16 scales: new tensors
    assert not f2.usable(x)


def test_only_int8_layers_of_one_width_fuse():
    from llmarch.inference.quant import FusedInt8

    m = _qkv_module()
    assert FusedInt8.fusable([m.q_proj, m.k_proj, m.v_proj])
    assert not FusedInt8.fusable([m.q_proj])
    assert not FusedInt8.fusable([m.q_proj, Int4Linear.from_float(torch.randn(64, 128), None, 32)])
    assert not FusedInt8.fusable([m.q_proj, Int8Linear.from_float(torch.randn(8, 64))])  # another width
    assert not FusedInt8.fusable([m.q_proj, nn.Linear(100, 8)])


def test_packed_int8_model_fuses_and_keeps_its_logits(any_size):
    """pack_linears fuses an int8 model's q/k/v and gate/up; logits and cached decoding are those
    of the unfused model; fast_kernels and batch_invariant reach the fused layers, not their members."""
    from llmarch.inference.packed import _fused, pack_linears
    from llmarch.inference.quant import FusedInt8, batch_invariant, fast_kernels, int8_layers

    ref = quantize(_model("dense_tied"), "int8")
    model = pack_linears(quantize(_model("dense_tied"), "int8"), release=True)
    groups = [f for m in model.modules() for f in _fused(m).values()]
    assert len(groups) == 2 * len(model.layers) and all(isinstance(f, FusedInt8) for f in groups)
    assert not any("fused" in k for k in model.state_dict())
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
        cache, ref_cache = model.new_cache(2, 16), ref.new_cache(2, 16)
        for i in range(4):
            assert torch.equal(model(ids[:, i : i + 1], cache=cache), ref(ids[:, i : i + 1], cache=ref_cache))
    layers = int8_layers(model)
    assert {id(f.layer) for f in groups} <= {id(m) for m in layers}
    members = {id(getattr(f.module, n)) for f in groups for n in f.names}
    assert not members & {id(m) for m in layers}
    fast_kernels(model, background=False)
    assert all(f.layer.dynamic is not None for f in groups)
    assert all(getattr(f.module, n).dynamic is None for f in groups for n in f.names)
    batch_invariant(model)
    assert all(f.layer.dynamic is None and f.layer.w8a8_min_rows == 1 for f in groups)


def test_fused_int8_view_of_back_to_back_weights_in_another_order():
    """Weights that lie back to back in memory (here v, q, k) are fused as a view, not copied; the
    outputs come back in the group's order, and the view outlives the caller's buffer."""
    import gc

    from llmarch.inference.quant import FusedInt8

    g = torch.Generator().manual_seed(5)
    block = torch.randint(-127, 128, (80, 96), dtype=torch.int8, generator=g)
    m, apart = nn.Module(), nn.Module()
    for name, (a, b) in {"q_proj": (16, 64), "k_proj": (64, 80), "v_proj": (0, 16)}.items():
        scales = torch.rand(b - a, generator=g) + 0.5
        setattr(m, name, Int8Linear(block[a:b], scales))
        setattr(apart, name, Int8Linear(block[a:b].clone(), scales))
    fused = FusedInt8(m, ("q_proj", "k_proj", "v_proj"))
    assert fused.order == [2, 0, 1] and fused.layer.weight_int8.data_ptr() == block.data_ptr()
    del block
    gc.collect()
    for rows in (1, 9):
        x = torch.randn(rows, 96, generator=g)
        expect = torch.cat([apart.q_proj(x), apart.k_proj(x), apart.v_proj(x)], dim=-1)
        assert torch.equal(fused(x), expect)
    # not back to back (a gap), or of another width: copied as before
    from llmarch.inference.quant import adjacent_order

    gap = torch.zeros(100, 96, dtype=torch.int8)

    assert adjacent_order([gap[0:16], gap[20:40]]) is None
    assert adjacent_order([gap[16:40], gap[0:16]]) == [1, 0]
    assert adjacent_order([gap[0:16], gap[16:40, :48]]) is None


@pytest.mark.parametrize("k, rows", [(96, 1), (100, 3), (640, 1), (2048, 7)])
def test_products_while_packing_are_the_packed_products_to_the_bit(k, rows, any_size):
    """Until a layer's fbgemm copy is packed, its few-row products go through torch._int_mm on the
    same codes: no wait (a packing that never ends does not block), and the very bits the packed
    copy gives afterwards."""
    from concurrent.futures import Future

    from llmarch.inference.quant import _pack_dynamic, int_mm_codes, packed_mm

    g = torch.Generator().manual_seed(k)
    layer = Int8Linear.from_float(torch.randn(300, k, generator=g) * 0.05, torch.randn(300, generator=g))
    pending = Future()
    layer.dynamic = pending  # as fast_kernels leaves it while its thread packs
    x = torch.randn(2, rows, k, generator=g).bfloat16()[:1]
    done: list = []
    worker = threading.Thread(target=lambda: done.append(layer(x)), daemon=True)
    worker.start()
    worker.join(60)  # a product that waited for the packing would never return
    assert done, "the product waited for a packing that had not finished"
    before = done[0]
    assert layer.dynamic is pending
    pending.set_result(_pack_dynamic(layer.weight_int8, layer.scales))
    after = layer(x)
    assert layer.dynamic is not pending
    assert torch.equal(before, after)
    x2 = torch.nn.functional.pad(x.reshape(-1, k), (0, layer.pad))
    assert torch.equal(int_mm_codes(x2, layer.weight_int8, layer.scales), packed_mm(x2, layer.dynamic))
