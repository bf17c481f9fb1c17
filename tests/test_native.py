"""llmarch's native CPU kernels (llmarch.inference.native, kernels.c): each kernel against a
float64 product within float32's rounding, in each of its builds (AVX-512, AVX2, portable), rows
and threads never changing a result, and the build cache: rebuilt when damaged, refused
politely where nothing can be built."""

import platform

import pytest
import torch

from llmarch.inference import native
from llmarch.inference.quant import (
    NATIVE_ROWS_WITHOUT_AVX512,
    W8A8_MIN_ROWS,
    Int8Linear,
    batch_invariant,
    many_rows_in_float,
    native_rows,
)

EPS32 = 2.0**-24
BF16 = 2.0**-8


def _operands(m, k, n, x_dtype, bias_dtype, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k + pad), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(x_dtype)
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, w, scales, bias


def _check(y, x, w, k, scales, bias):
    """|y - x W^T scale - b| within the activations' 16-bit codes (half a step, max |x| / 65534,
    per input), the final float32 products and the output's rounding."""
    if scales.dim() == 2:  # one scale per 32 inputs of a row
        wd = w[:, :k].double() * scales.double().repeat_interleave(32, dim=1)
    else:
        wd = w[:, :k].double() * scales.double()[:, None]
    ref = x.double() @ wd.T
    codes = x.double().abs().amax(1, keepdim=True) / 65534 @ wd.abs().sum(1, keepdim=True).T
    mag = x.double().abs() @ wd.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    out = BF16 if y.dtype == torch.bfloat16 else EPS32
    tol = codes * 1.001 + 4 * EPS32 * mag + out * ref.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), float((err / tol).max())


def _run(lib, x, w, k, scales, bias):
    """The kernel of ``lib`` (a ctypes library) called directly."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    dt = native._DTYPES
    rc = lib.llmarch_q8_linear(x.data_ptr(), dt[x.dtype], x.stride(0), x.shape[0], k, w.data_ptr(), w.stride(0),
                               w.shape[0], scales.data_ptr(), 0 if scales.dim() == 1 else 32,
                               None if bias is None else bias.data_ptr(),
                               0 if bias is None else dt[bias.dtype], y.data_ptr(), dt[x.dtype])
    assert rc == 0
    return y


SHAPES = [(1, 16, 40, 0), (3, 31, 70, 1), (7, 33, 513, 15), (2, 100, 64, 12), (1, 640, 1031, 0), (5, 1000, 300, 8)]


@pytest.mark.parametrize("m, k, n, pad", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_q8_linear_within_float32_rounding(m, k, n, pad, x_dtype, bias_dtype, native_kernels):
    """Widths that are not multiples of the vector (masked tails), weights stored wider than
    their inputs (Int8Linear's padded rows), 1-7 rows, both activation and bias dtypes."""
    x, w, scales, bias = _operands(m, k, n, x_dtype, bias_dtype, pad)
    y = native.q8_linear(x, w, k, scales, bias)
    _check(y, x, w, k, scales, bias)


GROUPED_SHAPES = [(1, 32, 40, 0), (3, 64, 70, 16), (7, 640, 513, 0), (2, 2048, 96, 32)]


def _grouped(m, k, n, x_dtype, bias_dtype, pad, seed=0):
    """Operands with one float16 scale per 32 inputs of a row, spread over three decades (as a
    GGUF file's block scales are)."""
    x, w, _, bias = _operands(m, k, n, x_dtype, bias_dtype, pad)
    g = torch.Generator().manual_seed(seed + 1)
    scales = (10 ** (torch.rand(n, k // 32, generator=g) * 3 - 4)).to(torch.float16)
    return x, w, scales, bias


@pytest.mark.parametrize("m, k, n, pad", GROUPED_SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32])
def test_q8_linear_with_a_scale_per_32_inputs(m, k, n, pad, x_dtype, bias_dtype, native_kernels):
    """Grouped scales (n, k / 32): within the same bound against the float64 product of the
    weights as the groups scale them; each row's result the same alone and in the batch."""
    x, w, scales, bias = _grouped(m, k, n, x_dtype, bias_dtype, pad)
    y = native.q8_linear(x, w, k, scales, bias)
    _check(y, x, w, k, scales, bias)
    for i in range(m):
        assert torch.equal(native.q8_linear(x[i : i + 1], w, k, scales, bias), y[i : i + 1])
    # what the grouped kernel does not take: None, never a wrong answer
    assert native.q8_linear(x[:, :k - 16], w, k - 16, scales[:, :-1], bias) is None  # width not a multiple of 32
    assert native.q8_linear(x, w, k, scales[:, :-1].contiguous(), bias) is None  # a group missing


def test_q8_linear_rows_and_threads_do_not_change_a_result(native_kernels):
    """Each output is one row's dot product summed in one order: a row alone, in a batch, on one
    thread or two gives the same bits (a server's batch gives a request its solo tokens)."""
    x, w, scales, bias = _operands(6, 896, 3000, torch.bfloat16, torch.float32)
    both = native.q8_linear(x, w, 896, scales, bias)
    for i in range(6):
        assert torch.equal(native.q8_linear(x[i : i + 1], w, 896, scales, bias), both[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.q8_linear(x, w, 896, scales, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, both)


def test_q8_linear_declines_what_it_does_not_take(native_kernels):
    """Anything but the shapes and dtypes it reads: None (the caller's torch path), never a read
    past a buffer."""
    x, w, scales, bias = _operands(2, 64, 32, torch.float32, None)
    assert native.q8_linear(x[:, :48], w, 64, scales, bias) is None  # inputs narrower than the layer
    assert native.q8_linear(x, w[:, :48], 64, scales, bias) is None  # a weight narrower than its inputs
    assert native.q8_linear(x, w.float(), 64, scales, bias) is None
    assert native.q8_linear(x, w, 64, scales[:31], bias) is None
    assert native.q8_linear(x, w, 64, scales, torch.zeros(31)) is None
    assert native.q8_linear(x.double(), w, 64, scales, bias) is None
    assert native.q8_linear(x.t().contiguous().t(), w, 64, scales, bias) is None  # columns not contiguous
    assert native.q8_linear(x, w, 64, scales.float(), bias) is None
    assert native.q8_linear(x, w, 64, scales, torch.zeros(32, dtype=torch.float16)) is None


def _q5_0_case(m, k, n, x_dtype, bias_dtype, seed=0):
    """Random GGUF Q5_0 blocks (every fifth bit and nibble random, float16 block scales over three
    decades) re-laid as Q5Linear holds them (blocks (n, k / 32 * 20), scales (n, k / 32)); with the
    same weights as int8 codes, the file's own decoding (gguf's bit order, not Q5Linear's)."""
    from llmarch.inference.quant import Q5Linear, q5_0_codes

    g = torch.Generator().manual_seed(seed)
    gguf = torch.randint(0, 256, (n * (k // 32), 22), dtype=torch.uint8, generator=g)
    d = (10 ** (torch.rand(n * (k // 32), generator=g) * 3 - 4)).to(torch.float16)
    gguf[:, :2] = d.view(-1, 1).view(torch.uint8)
    codes = (q5_0_codes(gguf).to(torch.int8) - 16).reshape(n, k)
    layer = Q5Linear.from_gguf(gguf.reshape(n, -1), k)
    x, _, _, bias = _operands(m, k, n, x_dtype, bias_dtype, seed=seed)
    return x, layer.blocks, layer.scales, codes, d.reshape(n, k // 32), bias


@pytest.mark.parametrize("m, k, n", [(1, 32, 40), (3, 64, 70), (7, 640, 513), (2, 2048, 96), (5, 160, 1)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32])
def test_q5_0_linear_is_the_grouped_int8_product_of_its_codes(m, k, n, x_dtype, bias_dtype, native_kernels):
    """Q5_0 blocks read in place give the bits of the grouped int8 kernel on the same codes and
    scales (within the float64 bound), each row alone as in the batch; their dequantisation is
    exact; what the kernels do not take gives None."""
    x, blocks, scales, codes, d, bias = _q5_0_case(m, k, n, x_dtype, bias_dtype)
    assert torch.equal(scales, d)
    y = native.q5_0_linear(x, blocks, scales, k, bias)
    assert torch.equal(y, native.q8_linear(x, codes, k, scales, bias))
    _check(y, x, codes, k, scales, bias)
    for i in range(m):
        assert torch.equal(native.q5_0_linear(x[i : i + 1], blocks, scales, k, bias), y[i : i + 1])
    exact = codes.float() * scales.float().repeat_interleave(32, dim=1)
    assert torch.equal(native.q5_0_dequant(blocks, scales, k, (0, n)), exact)
    assert torch.equal(native.q5_0_dequant(blocks, scales, k, (n // 2, n)), exact[n // 2 :])
    assert native.q5_0_dequant(blocks, scales, k, (0, n + 1)) is None
    assert native.q5_0_linear(x, blocks[:, :-20], scales, k, bias) is None  # a block missing
    assert native.q5_0_linear(x, blocks, scales[:, :-1].contiguous(), k, bias) is None  # a scale missing
    assert native.q5_0_linear(x, blocks, scales.float(), k, bias) is None
    assert native.q5_0_linear(x, blocks.view(torch.int8), scales, k, bias) is None
    assert native.q5_0_linear(x[:, : k - 16], blocks, scales, k - 16, bias) is None  # width not a multiple of 32
    assert native.q5_0_linear(x, blocks, scales, k, torch.zeros(n + 1)) is None


def _cpu_has(*flags: str) -> bool:
    line = native._cpu_flags().split()
    return all(f in line for f in flags)


# the builds another machine makes: (-march, what llmarch_simd() reports)
OTHER_BUILDS = [("x86-64-v2", 0), ("x86-64-v3", 1)]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 build flags")
@pytest.mark.parametrize("march, simd", OTHER_BUILDS, ids=["portable", "avx2"])
def test_every_build_computes_the_same_products(march, simd, tmp_path, native_kernels):
    """The loops compiled for a CPU without AVX-512 (x86-64-v3: AVX2 and FMA) or without either
    (the portable loops), as another machine builds them: the library says which build it is;
    int8 products to the bit of this machine's build (exact integer sums), the extremes over long
    rows still exact; int4, norms and attention within float32's reordering of this build's."""
    if simd == 1 and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU cannot run AVX2 code")
    cc = native._compiler()
    flags = tuple(f if f != "-march=native" else f"-march={march}" for f in native.FLAGS)
    target = tmp_path / native.LIBRARY_NAME
    assert native._build(cc, flags, target) is None
    lib = native._open(target)
    assert lib is not None and lib.llmarch_simd() == simd
    assert native.library().llmarch_simd() == (2 if _cpu_has("avx512f", "avx512bw") else 1 if _cpu_has("avx2", "fma") else 0)
    for m, k, n, pad in SHAPES:
        x, w, scales, bias = _operands(m, k, n, torch.bfloat16, torch.float32, pad)
        y = _run(lib, x, w, k, scales, bias)
        _check(y, x, w, k, scales, bias)
        assert torch.equal(y, native.q8_linear(x, w, k, scales, bias))
    for m, k, n, pad in GROUPED_SHAPES:  # one scale per 32 inputs: float32 lanes in a fixed order, the same bits
        x, w, scales, bias = _grouped(m, k, n, torch.float32, torch.float32, pad)
        assert torch.equal(_run(lib, x, w, k, scales, bias), native.q8_linear(x, w, k, scales, bias))
    for m, k, n in [(3, 640, 70), (1, 2048, 33)]:  # Q5_0 blocks: the same bits, and the same dequantisation
        x, blocks, scales, _, _, bias = _q5_0_case(m, k, n, torch.float32, torch.float32)
        y = torch.empty(m, n)
        assert lib.llmarch_q5_0_linear(x.data_ptr(), 0, k, m, k, blocks.data_ptr(), blocks.stride(0), n,
                                       scales.data_ptr(), bias.data_ptr(), 0, y.data_ptr(), 0) == 0
        assert torch.equal(y, native.q5_0_linear(x, blocks, scales, k, bias))
        w = torch.empty(n, k)
        assert lib.llmarch_q5_0_dequant(blocks.data_ptr(), blocks.stride(0), scales.data_ptr(), k, 0, n,
                                        w.data_ptr()) == 0
        assert torch.equal(w, native.q5_0_dequant(blocks, scales, k, (0, n)))
    # the extremes over long rows (an int32 sum of one chunk would overflow): still exact
    k = 3 * 4096 + 77
    x, w = torch.full((1, k), 5.0), torch.full((2, k), -128, dtype=torch.int8)
    w[1] = 127
    ones = torch.ones(2, dtype=torch.bfloat16)
    assert torch.equal(_run(lib, x, w, k, ones, None), torch.tensor([[5.0 * -128 * k, 5.0 * 127 * k]]))
    g = torch.Generator().manual_seed(8)
    if native.int4_block_rows():  # int4 on torch's packing: float32 sums in another order
        from llmarch.inference.quant import Int4Linear

        layer = Int4Linear.from_float(torch.randn(100, 256, generator=g), torch.randn(100, generator=g), 64)
        x = torch.randn(3, 256, generator=g)
        y = torch.empty(3, 100)
        assert lib.llmarch_q4_linear(x.data_ptr(), 0, 256, 3, 256, layer.weight_int4pack.data_ptr(), 100, 128,
                                     layer.scales_and_zeros.data_ptr(), 64, native.int4_block_rows(),
                                     layer.bias.data_ptr(), 0, y.data_ptr(), 0) == 0
        ref = native.q4_linear(x, layer.weight_int4pack, 256, 100, layer.scales_and_zeros, 64, layer.bias)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    for x in _argmax_cases():  # argmax: the same index
        out = torch.empty(x.shape[0], dtype=torch.int64)
        lib.llmarch_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
        assert torch.equal(out, x.argmax(-1))
    for dtype in (torch.float32, torch.bfloat16):  # norms and attention: the same loops, other vectors
        x, scale = _norm_case(3, 640, dtype, "fp32")
        y = torch.empty_like(x)
        lib.llmarch_rms_norm(x.data_ptr(), native._DTYPES[dtype], 640, 3, 640, 1, scale.data_ptr(), 0, 0, 1, 1e-6,
                             None, None, y.data_ptr(), native._DTYPES[dtype], 640)
        ref = native.rms_norm(x, scale, True, 1e-6)
        assert torch.allclose(y.float(), ref.float(), rtol=2 * BF16 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
        q, kk, v, mask = _attention_case(1, 4, 2, 300, 64, dtype, True)
        out = torch.empty(1, 4, 1, 64, dtype=dtype)
        d = native._DTYPES[dtype]
        assert lib.llmarch_attend_one(q.data_ptr(), d, q.stride(0), q.stride(1), kk.data_ptr(), v.data_ptr(), d,
                                      *kk.stride()[:3], *v.stride()[:3], mask.data_ptr(), d, mask.stride(0),
                                      1, 4, 2, 300, 64, 0.125, out.data_ptr()) == 0
        ref = native.attend_one(q, kk, v, mask, 0.125)
        assert torch.allclose(out.float(), ref.float(), rtol=2 * BF16 if dtype == torch.bfloat16 else 1e-4, atol=1e-5)


def _argmax_cases():
    """Rows whose first largest value is hard to find: ties (first one wins), NaNs (the first
    counts as the largest, before or after a tie), infinities, signed zeros, lengths around the
    vector widths, a vocabulary's length, strided rows."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for n in (1, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 1000, 262144):
        x = torch.randn(6, n, generator=g)
        x[1] = torch.randint(-3, 3, (n,), generator=g).float()  # many ties
        x[2] = float("-inf")
        x[3, n // 2] = float("nan")
        x[4, n - 1] = float("nan")
        x[4, n // 3] = x[4].nan_to_num(nan=-1e30).max() if n > 1 else x[4, 0]
        x[5] = 0.0
        x[5, n // 2:] = -0.0
        cases.append(x)
    wide = torch.randn(3, 300, generator=g)
    wide[1, 5] = float("inf")
    cases.append(wide[:, :257])  # rows of 257 values, 300 apart
    return cases


def test_argmax_is_torch_argmax(native_kernels):
    for x in _argmax_cases():
        assert torch.equal(native.argmax(x), x.argmax(-1)), x.shape
    assert native.argmax(torch.randn(2, 5, dtype=torch.bfloat16)) is None  # float32 only
    assert native.argmax(torch.randn(5, 2).t()) is None  # rows not contiguous


def test_q8_linear_zero_and_non_finite_rows(native_kernels):
    """A zero row gives the bias; a row holding inf or NaN gives NaN (never a finite number);
    the other rows are untouched by them."""
    x, w, scales, bias = _operands(3, 200, 50, torch.float32, torch.float32)
    x[0] = 0
    x[1, 7] = float("inf")
    y = native.q8_linear(x, w, 200, scales, bias)
    assert torch.equal(y[0], bias) and y[1].isnan().all()
    assert torch.equal(y[2:], native.q8_linear(x[2:], w, 200, scales, bias))
    x[1, 7] = float("nan")
    assert native.q8_linear(x, w, 200, scales, bias)[1].isnan().all()


def test_q8_linear_long_rows_sum_exactly(native_kernels):
    """Rows longer than one int32 chunk (4096 inputs) at the extremes of both codes: the integer
    sum is exact, so the result is the float64 product of the codes, rounded once."""
    k = 3 * 4096 + 77
    x = torch.full((1, k), 5.0)
    w = torch.full((2, k), -128, dtype=torch.int8)
    w[1] = 127
    scales = torch.ones(2, dtype=torch.bfloat16)
    y = native.q8_linear(x, w, k, scales, None)
    assert torch.equal(y, torch.tensor([[5.0 * -128 * k, 5.0 * 127 * k]]))


def test_int8_linear_takes_the_native_kernel_for_few_rows(native_kernels, monkeypatch):
    """Fewer than native_rows rows (W8A8_MIN_ROWS; on a CPU without AVX-512, where there is no
    int8 GEMM, NATIVE_ROWS_WITHOUT_AVX512): the native kernel, not torch's (whose results it
    matches within their bfloat16 rounding); from there on another product."""
    g = torch.Generator().manual_seed(3)
    layer = Int8Linear.from_float(torch.randn(200, 100, generator=g), torch.randn(200, generator=g))
    x = torch.randn(2, 3, 100, generator=g).to(torch.bfloat16)
    calls = []
    real = native.q8_linear
    monkeypatch.setattr(native, "q8_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    y = layer(x)
    assert calls == [6] and y.shape == (2, 3, 200) and y.dtype == torch.bfloat16
    monkeypatch.setattr(native, "library", lambda: None)  # torch's weight-only kernel
    ref = layer(x)
    assert ((y.float() - ref.float()).abs() <= 3 * BF16 * (ref.float().abs() + 1)).all()
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(native, "q8_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    limit = native_rows(layer)
    assert limit == (NATIVE_ROWS_WITHOUT_AVX512 if many_rows_in_float() else W8A8_MIN_ROWS)
    layer(torch.randn(limit - 1, 100))
    layer(torch.randn(limit, 100))
    assert calls == [limit - 1]
    batch_invariant(layer)  # one path for every row count: never this kernel, whose rows would differ
    layer(torch.randn(3, 100))
    assert calls == [limit - 1]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """native's library not yet loaded, its builds cached under tmp_path."""
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", None)
    return tmp_path


def test_a_damaged_build_is_rebuilt(native_kernels, fresh):
    cc = native._compiler()
    target = fresh / "native" / native._key(cc, native.FLAGS) / native.LIBRARY_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF not really a library")
    lib = native.library()
    assert lib is not None and native.status().startswith("native (")
    assert target.read_bytes()[:4] == b"\x7fELF" and target.stat().st_size > 1000
    assert [p.name for p in target.parent.iterdir()] == [native.LIBRARY_NAME]  # no temporary left


def test_switched_off_or_unbuildable_means_torch_kernels(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMARCH_NATIVE", "0")
    assert native.library() is None and "LLMARCH_NATIVE=0" in native.status()
    monkeypatch.delenv("LLMARCH_NATIVE")
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library() is None and "no C compiler" in native.status() and native.status().startswith("torch's (")
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'error: this compiler refuses' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setattr(native, "_status", None)
    assert native.library() is None and "this compiler refuses" in native.status()
    # and an int8 layer still computes, on torch's kernel
    layer = Int8Linear.from_float(torch.randn(40, 64, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(10))
    ref = x.double() @ (layer.weight_int8[:, :64].double() * layer.scales.double()[:, None]).T
    assert (layer(x).double() - ref).abs().max() <= 4 * BF16 * ref.abs().max()


# ---- RMSNorm ----------------------------------------------------------------------------------


def _norm_case(rows, dim, dtype, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 5).to(dtype)
    scale = None
    if mode == "fp32":
        scale = 1.0 + torch.randn(dim, generator=g) * 0.3
    elif mode == "dtype":
        scale = (torch.randn(dim, generator=g) * 0.3 + 1).to(dtype)
    elif mode == "per-row":
        scale = (torch.randn(rows, dim, generator=g) * 0.3 + 1).to(dtype)
    return x, scale


@pytest.mark.parametrize("rows, dim", [(1, 16), (3, 17), (2, 640), (5, 259), (300, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "fp32", "dtype", "per-row"])
def test_rms_norm_within_its_roundings(rows, dim, dtype, mode, native_kernels):
    """Against float64: the float32 normalisation (a sum of dim squares) plus the roundings to
    the output dtype (two where the scale multiplies in that dtype)."""
    x, scale = _norm_case(rows, dim, dtype, mode)
    y = native.rms_norm(x, scale, mode == "fp32", 1e-6)
    xd = x.double()
    h = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    ref = h if scale is None else h * scale.double()
    unit = BF16 if dtype == torch.bfloat16 else EPS32
    roundings = 1 if mode in ("none", "fp32") else 2
    tol = ((dim + 8) * EPS32 + roundings * unit * 1.01) * ref.abs() + 1e-30
    assert y.dtype == dtype and y.shape == x.shape
    assert ((y.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset, weight_fp32", [(True, True), (False, False), (True, False)])
def test_packed_rms_norm_is_the_model_norm(dtype, unit_offset, weight_fp32, native_kernels):
    """PackedRMSNorm (native) against RMSNorm's own torch operations: the same numbers up to the
    order of the sum of squares (a float32 result a few units of its last place; a bfloat16 one
    at most one unit, 2^-7 relative, where the two land on either side of a rounding boundary)."""
    from llmarch.inference.packed import PackedRMSNorm
    from llmarch.model.layers import RMSNorm

    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(640, 1e-6, unit_offset, weight_fp32).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(640, generator=g) * 0.2 + (0 if unit_offset else 1))
    x = (torch.randn(2, 3, 640, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        ref = norm(x)
        norm.__class__ = PackedRMSNorm
        calls = []
        real = native.rms_norm
        native.rms_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            y = norm(x)
        finally:
            native.rms_norm = real
    assert calls and y.dtype == ref.dtype == dtype and y.shape == ref.shape
    tol = (2 * BF16 + 648 * EPS32) if dtype == torch.bfloat16 else 648 * EPS32
    assert ((y.float() - ref.float()).abs() <= tol * ref.float().abs() + 1e-30).all()
    # under autograd it is the model's norm: gradients flow
    x = x.float().requires_grad_(True)
    norm.float()(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


# ---- one-query attention ----------------------------------------------------------------------


def _attention_case(b, h, kv, s, d, dtype, masked, seed=0):
    """q (b, h, 1, d) and k, v views of the first s slots of a larger cache (as a cache not yet
    full returns them), an additive mask in dtype hiding about a third of the keys (never all)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    cache_k = torch.randn(b, kv, s + 5, d, generator=g).to(dtype)
    cache_v = torch.randn(b, kv, s + 5, d, generator=g).to(dtype)
    mask = None
    if masked:
        hide = torch.rand(b, s, generator=g) < 0.35
        hide[:, 0] = False
        mask = torch.zeros(b, s, dtype=dtype).masked_fill_(hide, torch.finfo(dtype).min)[:, None, None]
    return q, cache_k[:, :, :s], cache_v[:, :, :s], mask


@pytest.mark.parametrize("b, h, kv", [(1, 4, 1), (2, 8, 2), (1, 4, 4), (1, 14, 2)])
@pytest.mark.parametrize("s, d", [(1, 16), (7, 100), (300, 64), (40, 256), (600, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_one_against_float64(b, h, kv, s, d, dtype, masked, native_kernels):
    from llmarch.inference.packed import single_query_attention

    q, k, v, mask = _attention_case(b, h, kv, s, d, dtype, masked)
    out = native.attend_one(q, k, v, mask, d**-0.5)
    g = h // kv
    qd = q.double().reshape(b, kv, g, d)
    scores = qd @ k.double().transpose(-1, -2) * d**-0.5
    if mask is not None:
        scores = scores + mask.double()
    p = scores.softmax(-1)
    ref = (p @ v.double()).reshape(b, h, 1, d)
    assert out.dtype == dtype and out.shape == (b, h, 1, d)
    # float32 scores of d terms and a weighted sum of s values, plus the rounding to the output
    vmax = v.double().abs().amax(dim=(2, 3), keepdim=True).repeat_interleave(g, 1)
    unit = BF16 if dtype == torch.bfloat16 else EPS32
    tol = unit * ref.abs() + (2 * d + s + 20) * EPS32 * 8 * vmax
    assert ((out.double() - ref).abs() <= tol).all()
    # the torch operations it stands in for: the same numbers within their roundings
    with native.disabled():
        torch_out = single_query_attention(q, k, v, mask, d**-0.5)
    assert ((out.double() - torch_out.double()).abs() <= 2 * tol).all()


def test_attend_one_chunks_whole_masked_spans_and_threads(native_kernels):
    """Keys are taken in fixed chunks, each head's combined in order: a span of keys hidden
    across whole chunks (a sliding window's past, a sequence's padding) counts nothing, the
    chunks' order and the thread count change no bit, and every key hidden is torch's NaN."""
    q, k, v, _ = _attention_case(2, 4, 1, 700, 64, torch.float32, False, seed=5)
    mask = torch.zeros(2, 1, 1, 700)
    mask[0, ..., :400] = float("-inf")  # whole chunks of -inf (the kernel skips them)
    mask[1, ..., 300:] = torch.finfo(torch.float32).min  # whole chunks of the float minimum
    out = native.attend_one(q, k, v, mask, 0.125)
    ref = (q.double() @ k.double().transpose(-1, -2) * 0.125 + mask.double()).softmax(-1) @ v.double()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.attend_one(q, k, v, mask, 0.125), out)
    finally:
        torch.set_num_threads(threads)
    mask[0] = float("-inf")
    assert torch.isnan(native.attend_one(q, k, v, mask, 0.125)[0]).all()
    with native.disabled():
        from llmarch.inference.packed import single_query_attention

        assert torch.isnan(single_query_attention(q, k, v, mask, 0.125)[0]).all()


def test_attend_one_declines_what_it_does_not_take(native_kernels):
    q, k, v, mask = _attention_case(1, 4, 2, 9, 32, torch.float32, True)
    assert native.attend_one(q.expand(1, 4, 2, 32), k, v, mask, 1.0) is None  # two queries
    assert native.attend_one(q, k, v.bfloat16(), mask, 1.0) is None  # k and v of two dtypes
    assert native.attend_one(q[:, :3], k, v, mask, 1.0) is None  # 3 heads over 2 KV heads
    assert native.attend_one(q, k, v, mask.double(), 1.0) is None
    assert native.attend_one(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask, 1.0) is None


# ---- RoPE after the norm -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 64, 256])
def test_rope_is_apply_rope_to_the_bit(dtype, dim, native_kernels):
    """RoPE in the kernel rounds where llmarch.model.layers.apply_rope's three operations do:
    alone (normalize=False) it gives apply_rope's very bits; after the norm, apply_rope of the
    kernel's own norm."""
    from llmarch.model.config import RopeConfig
    from llmarch.model.layers import Rotary, apply_rope

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(5, dim, generator=g) * 3).to(dtype)
    cos, sin = Rotary(RopeConfig(theta=10_000.0), dim, 4096)(torch.tensor([[1234]]), dtype)
    cs = (cos.reshape(dim), sin.reshape(dim))
    ref = apply_rope(x[None, :, None], cos, sin)[0, :, 0]
    assert torch.equal(native.rms_norm(x, None, False, 0.0, rope=cs, normalize=False), ref)
    for scale, fp32 in ((None, False), (torch.rand(dim, generator=g) + 0.5, True), ((torch.rand(5, dim, generator=g) + 0.5).to(dtype), False)):
        normed = native.rms_norm(x, scale, fp32, 1e-6)
        both = native.rms_norm(x, scale, fp32, 1e-6, rope=cs)
        assert torch.equal(both, apply_rope(normed[None, :, None], cos, sin)[0, :, 0])
    # what it does not take: an odd width, tables of another dtype or length
    assert native.rms_norm(x, None, False, 0.0, rope=(cs[0].double(), cs[1]), normalize=False) is None
    assert native.rms_norm(x[:, :-1], None, False, 0.0, rope=(cs[0][:-1], cs[1][:-1]), normalize=False) is None


# ---- int4 in torch's packed layout ---------------------------------------------------------------


@pytest.mark.parametrize("m, n, k, group", [(1, 64, 64, 32), (3, 100, 256, 64), (7, 130, 512, 128), (2, 640, 1024, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_q4_linear_reads_the_packed_codes(m, n, k, group, dtype, with_bias, native_kernels):
    """Against the float64 product of the dequantised weight (Int4Linear.rows: read off torch's
    packing), rows that are not a multiple of the packing's row block included; within float32 sums
    and the output's rounding; and Int4Linear takes this kernel for few rows."""
    from llmarch.inference.quant import Int4Linear

    if not native.int4_block_rows():
        pytest.skip("this torch packs int4 in a layout llmarch_q4_linear does not read")
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(n, generator=g) if with_bias else None
    layer = Int4Linear.from_float(torch.randn(n, k, generator=g), bias, group)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    y = native.q4_linear(x, layer.weight_int4pack, k, n, layer.scales_and_zeros, group, layer.bias)
    wd = layer.rows(torch.arange(n)).double()
    ref = x.double() @ wd.T + (bias.double() if bias is not None else 0)
    mag = x.double().abs() @ (wd.abs() + 8 * layer.scales_and_zeros[..., 0].double().abs().repeat_interleave(group, 0)[:, :n].T).T
    unit = BF16 if dtype == torch.bfloat16 else EPS32
    tol = 4 * (group + k // group + 4) * EPS32 * (mag + ref.abs()) + unit * ref.abs() + 1e-6
    assert y.dtype == dtype and y.shape == (m, n)
    assert ((y.double() - ref).abs() <= tol).all()
    assert torch.equal(layer(x), y)  # Int4Linear's few-row product is this kernel's
    with native.disabled():  # torch's kernel: the same numbers within its bfloat16 rounding
        theirs = layer(x)
    assert ((theirs.double() - y.double()).abs() <= 4 * BF16 * (ref.abs() + mag * 2**-7) + tol).all()


def test_q4_linear_declines_what_it_does_not_take(native_kernels):
    from llmarch.inference.quant import Int4Linear

    layer = Int4Linear.from_float(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)), None, 32)
    x = torch.randn(2, 128)
    assert native.q4_linear(x, layer.weight_int4pack, 128, 64, layer.scales_and_zeros, 64, None) is None  # group
    assert native.q4_linear(x[:, :64], layer.weight_int4pack, 128, 64, layer.scales_and_zeros, 32, None) is None
    assert native.q4_linear(x, layer.weight_int4pack, 128, 65, layer.scales_and_zeros, 32, None) is None
    assert native.q4_linear(x, layer.weight_int4pack, 128, 64, layer.scales_and_zeros.float(), 32, None) is None
    assert native.q4_linear(x, layer.weight_int4pack, 128, 64, layer.scales_and_zeros, 32, torch.zeros(63)) is None


def test_an_unwritable_cache_means_torch_kernels(fresh, monkeypatch, tmp_path):
    """A cache folder that cannot be written (a file where the folder should be): no build, no
    crash, torch's kernels, and the reason in the status."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LLMARCH_CACHE", str(blocked))
    assert native.library() is None and native.status().startswith("torch's (could not compile")


# ---- int8 x int8 products (torch._int_mm's stand-in where oneDNN has no int8 kernel) --------------


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (3, 5, 17), (130, 67, 640), (65, 4, 96), (16, 130, 4864)])
def test_int8_mm_is_int_mm_to_the_bit(m, n, k, native_kernels):
    """Exact integer sums: the same int32 values as torch._int_mm (and the int64 product), the
    extremes (-128 * -128 over a whole row) included; rows and columns not multiples of the tiles."""
    g = torch.Generator().manual_seed(m * 7 + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k + 3), dtype=torch.int8, generator=g)[:, :k]  # rows k + 3 apart
    a[0] = -128
    b[0] = -128
    c = native.int8_mm(a, b)
    assert c.dtype == torch.int32 and torch.equal(c.long(), a.long() @ b.long().T)
    if m > 16 and k % 8 == 0:  # torch._int_mm's own shape rules
        assert torch.equal(c, torch._int_mm(a, b.t()))
    assert native.int8_mm(a.float(), b) is None and native.int8_mm(a[:, :-1], b) is None


def test_many_row_int8_products_take_it_where_preferred(native_kernels, monkeypatch):
    """Int8Linear's many-row path (two-level int8 activations) gives the same bits through
    llmarch_int8_mm as through torch._int_mm: only the kernel differs."""
    from llmarch.inference import quant

    g = torch.Generator().manual_seed(3)
    layer = Int8Linear.from_float(torch.randn(96, 160, generator=g), torch.randn(96, generator=g))
    x = torch.randn(37, 160, generator=g)
    monkeypatch.setattr(quant, "many_rows_in_float", lambda: False)  # int8 activations at 37 rows
    calls = []
    real = native.int8_mm
    monkeypatch.setattr(native, "int8_mm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(native, "int8_mm_preferred", lambda: True)
    ours = layer(x)
    monkeypatch.setattr(native, "int8_mm_preferred", lambda: False)
    theirs = layer(x)
    assert calls == [1] and torch.equal(ours, theirs)
    monkeypatch.undo()
    assert native.int8_mm_preferred() == (native.library().llmarch_simd() < 2)


def test_the_kernels_build_wherever_a_compiler_is_found():
    """The native-kernel tests skip where nothing can be built; so that a kernels.c that no longer
    compiles fails here rather than turning those tests into skips: with a C compiler (and
    LLMARCH_NATIVE not 0) the library builds and loads."""
    import os

    if os.environ.get("LLMARCH_NATIVE") == "0" or native._compiler() is None:
        pytest.skip("no C compiler here, or the native kernels switched off")
    assert native.library() is not None, native.status()
