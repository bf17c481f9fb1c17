"""llmarch's native CPU kernels (llmarch.inference.native, kernels.c): each kernel against a
float64 product within float32's rounding, in both of its builds (AVX-512 and portable), rows
and threads never changing a result, and the build cache: rebuilt when damaged, refused
politely where nothing can be built."""

import platform

import pytest
import torch

from llmarch.inference import native
from llmarch.inference.quant import W8A8_MIN_ROWS, Int8Linear

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
    """|y - x W^T scale - b| within float32 sums of k terms (plus the output's rounding)."""
    wd = w[:, :k].double() * scales.double()[:, None]
    ref = x.double() @ wd.T
    mag = x.double().abs() @ wd.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    out = BF16 if y.dtype == torch.bfloat16 else EPS32
    tol = (k + 2) * EPS32 * mag * 1.01 + out * ref.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), float((err / tol).max())


def _run(lib, x, w, k, scales, bias):
    """The kernel of ``lib`` (a ctypes library) called directly."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    dt = native._DTYPES
    rc = lib.llmarch_q8_linear(x.data_ptr(), dt[x.dtype], x.stride(0), x.shape[0], k, w.data_ptr(), w.stride(0),
                               w.shape[0], scales.data_ptr(), None if bias is None else bias.data_ptr(),
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
    x, w, scales, bias = _operands(2, 64, 32, torch.float32, None)
    assert native.q8_linear(x.double(), w, 64, scales, bias) is None
    assert native.q8_linear(x.t().contiguous().t(), w, 64, scales, bias) is None  # columns not contiguous
    assert native.q8_linear(x, w, 64, scales.float(), bias) is None
    assert native.q8_linear(x, w, 64, scales, torch.zeros(32, dtype=torch.float16)) is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 build flags")
def test_the_portable_build_computes_the_same_products(tmp_path, native_kernels):
    """The loops compiled for a CPU without AVX-512 (what another machine builds): the same
    bound, and the library says which build it is."""
    cc = native._compiler()
    flags = tuple(f if f != "-march=native" else "-march=x86-64-v2" for f in native.FLAGS)
    target = tmp_path / native.LIBRARY_NAME
    assert native._build(cc, flags, target) is None
    lib = native._open(target)
    assert lib is not None and lib.llmarch_avx512() == 0 and native.library().llmarch_avx512() == 1
    for m, k, n, pad in SHAPES:
        x, w, scales, bias = _operands(m, k, n, torch.bfloat16, torch.float32, pad)
        _check(_run(lib, x, w, k, scales, bias), x, w, k, scales, bias)


def test_int8_linear_takes_the_native_kernel_for_few_rows(native_kernels, monkeypatch):
    """Fewer than W8A8_MIN_ROWS rows: the native kernel, not torch's (whose results it matches
    within their bfloat16 rounding); from W8A8_MIN_ROWS rows on: the int8-activation product."""
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
    layer(torch.randn(W8A8_MIN_ROWS, 100))
    assert calls == []


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
    layer = Int8Linear.from_float(torch.randn(40, 64))
    x = torch.randn(1, 64)
    ref = x.double() @ (layer.weight_int8[:, :64].double() * layer.scales.double()[:, None]).T
    assert (layer(x).double() - ref).abs().max() <= 4 * BF16 * ref.abs().max()
