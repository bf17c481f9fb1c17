"""Weight-only quantised inference on CPU: int8 and int4 linear layers, embedding and tied head.

Decoding one token reads every weight once, so its speed is the speed of reading the weights;
int8 halves and int4 quarters the bytes of bfloat16. The products run on PyTorch's own CPU
kernels (no extra dependency):

* :class:`Int8Linear`: ``aten._weight_int8pack_mm``; int8 weight (out, in), one symmetric
  scale per output channel: ``w = q * scale``.
* :class:`Int4Linear`: ``aten._weight_int4pack_mm_for_cpu``; 4-bit codes packed by
  ``aten._convert_weight_to_int4pack_for_cpu``, a scale and a zero per group of
  ``group_size`` (32, 64, 128, 256) inputs: ``w = (code - 8) * scale + zero`` (asymmetric).

Both kernels are vectorised (AVX2/AVX512) for bfloat16 activations only; with float32 they
fall back to a scalar loop 20-40x slower than ``F.linear`` (measured). So the layers always
compute in bfloat16 (scales and zeros stored in bfloat16) and return the input's dtype:
a float32 model gets bfloat16-rounded activations inside its linear layers.

Those weight-only kernels cost time in proportion to the rows (they dequantise for each): at
16 rows (a server's batched decode step, a prefill) ``_weight_int8pack_mm`` is several times
slower than a bfloat16 product. From ``W8A8_MIN_ROWS`` rows on, :class:`Int8Linear` instead
quantises the activations too and multiplies int8 by int8 (``torch._int_mm``, exact int32
sums): each row x is written as ``s1 * q1 + s2 * q2`` (``q2`` the int8 codes of what
``q1`` missed), both rows in one product, so the activations keep about bfloat16's precision
(per-token int8 alone, as in llama.cpp's Q8 blocks, cost Qwen2.5-0.5B 0.8-1.5% perplexity
here; the two-level split costs nothing measurable). Rows never mix, so a row's result does
not depend on the others in its batch.

The output head is the largest product of a decoding step (262k x 640 for Gemma 3 270M, 45% of
the step) and ``_weight_int8pack_mm`` converts each int8 weight to bfloat16 before its
multiply-add and rounds its sums to bfloat16, reading only about 10 GB/s. So products of fewer
than ``W8A8_MIN_ROWS`` rows (:func:`native_rows`: fewer than ``NATIVE_ROWS_WITHOUT_AVX512`` on
a CPU without AVX-512, which has no int8 GEMM) go through llmarch's own kernel where it could be built
(:func:`llmarch.inference.native.q8_linear`: AVX-512 loops compiled on first use; each row of x
as 16-bit codes, ``x ~= sx * qx`` with ``sx = max|x| / 32767``, multiplied by the int8 weights in
exact integer sums, then one scale per row and the bias before the one rounding to the output's
dtype; rows never mix, and no order or thread count changes a result): measured one row, 2
threads, Gemma's head 4.8-5.9 ms against 15.7; a Gemma 3 270M decoding step 17 ms against 36,
Qwen2.5-0.5B 27 against 56 (with the other native kernels of :mod:`llmarch.inference.native`).

Where the native kernels are not built (no C compiler), :func:`fast_kernels` gives the large int8 layers
(``FAST_MIN_WEIGHTS``: the head's table, Qwen2.5-0.5B's MLP matrices) a copy packed for fbgemm's
int8 x int8 GEMM (the x86 engine: AVX512-VNNI where the CPU has it), used for products of fewer
than ``W8A8_MIN_ROWS`` rows: each row is written in two levels of 7-bit codes,
``x ~= s1 * q1 + s2 * q2`` (:func:`two_level_codes`; about 13 bits, finer than the bfloat16
activations of the weight-only kernel), both levels go through the GEMM as rows with unit scale
and zero point 64, so the int32 sums are exact, and ``s1 * acc1 + s2 * acc2`` gives the row.
7 bits keep each input byte at most 127: on CPUs without VNNI fbgemm adds pairs of uint8 x int8
products in int16 (``vpmaddubsw``), and 2 x 127 x 127 = 32,258 stays below int16's 32,767
where 8-bit codes (2 x 255 x 127) would saturate. Rows never mix, so a row's result does not
depend on the others in its product. Measured one row, 2 threads: Gemma's head 6.4 ms against
the weight-only kernel's 12-16; the codes and the scaling of the sums cost about 40 us of small
operations, so a layer below about 3M weights is faster without (2048 x 640: 90 against 53 us).
Packing costs fbgemm 2.2 s for Gemma's head and 3.6 s for Qwen2.5-0.5B's 62 large layers, on a
second thread (``chat`` packs while the user types), and the packed layers' int8 bytes once
more in memory (168 and 534 MB).

:class:`Q5Linear` holds a GGUF file's Q5_0 matrices in the file's own blocks (5.5 bits a weight)
for llmarch's native kernel, with the results of the int8 layout on the same codes.

:class:`FusedInt8`: int8 layers that read the same input (q, k and v; gate and up) computed as
one product, set up by ``llmarch.inference.packed.pack_linears`` (read in place where the
weights lie back to back, as a derived-weights entry stores them).

:class:`QuantEmbedding` keeps the token table quantised (one of the layers above, read as a
``hidden -> vocab`` linear), gathers only the looked-up rows and dequantises them; a tied
output head (:class:`QuantHead`) multiplies by the same table, held once.

    model = llmarch.from_pretrained(path)
    llmarch.inference.quant.quantize(model, "int4", group_size=32)   # in place; inference only

:func:`quantize` swaps every ``nn.Linear`` (keeping the attribute names), the embedding and a
tied head, and each routed expert of a stacked MoE. Linear layers whose module reads their
matrix directly (``reads_weights``: MLA's absorbed decode, AltUp's clipped coefficients) stay
in float. GGUF blocks convert to these layouts without a float round trip where the formats
match (:mod:`llmarch.inference.gguf_quant`).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import warnings
from concurrent.futures import Future

import torch
from torch import nn

from ..checkpoints.cache import release_mapped_pages
from ..errors import ConfigError
from ..model.layers import as_dtype as _as
from ..model.moe import Experts
from . import native

MODES = ("int8", "int4")
#: what a loader's ``quant`` takes: ``auto`` (a GGUF file as it is, a float checkpoint in float), ``none``, a
#: mode, or ``compact`` (a GGUF file as ``auto``, its Q5_0 matrices in their 5-bit codes: :class:`Q5Linear`)
QUANT_CHOICES = ("auto", "none", *MODES, "compact")
GROUP_SIZES = (32, 64, 128, 256)
KERNEL_DTYPE = torch.bfloat16  # the only activation dtype the CPU kernels vectorise (see above)
ROW_BLOCK = 64  # the int4 packing interleaves rows in blocks of up to 64: out_features is padded to it
#: Int8Linear's inputs are padded to a multiple of this (see the class: torch's int8 kernel needs it)
INT8_K_MULTIPLE = 16
#: inputs per scale of a grouped Int8Linear (float16 scales (out, in / INT8_GROUP), a GGUF block's
#: own scale type, so Q8_0 and Q5_0 blocks are held exactly; the other layout: one bfloat16 a row)
INT8_GROUP = native.Q8_GROUP
GROUP_SCALE_DTYPE = torch.float16
#: from this many rows on, Int8Linear multiplies int8 activations (see the module docstring);
#: measured on Qwen2.5-0.5B's shapes: slower than the weight-only kernel below 4-8 rows, 2-7x faster at 16
W8A8_MIN_ROWS = 8


#: from this many rows on, on CPUs without AVX-512 (:func:`many_rows_in_float`), the int8 and
#: int4 layers multiply float32 copies of their weights, a few hundred rows of the weight at a
#: time. Measured on an AVX2 EPYC, 2 threads, six shapes from 640 -> 1280 to 4864 -> 896: at 32
#: rows as fast as the int8-activation product and torch's int4 kernel (0.9-1.2x), at 48-64
#: 1.1-1.8x faster, at 512 rows 2.5x (896 -> 4864: 25 ms against 64); below 32 slower (the
#: dequantisation costs what a few rows of products do)
FLOAT_MIN_ROWS = 32
#: float32 weight elements :func:`float_product` makes at a time (a few MB: they stay in cache)
FLOAT_CHUNK_ELEMENTS = 1 << 18
#: on those CPUs (:func:`many_rows_in_float`), int8 products of fewer rows than this take the
#: native kernel (which reads each weight row once for all the rows): measured on an AVX2 EPYC, 2
#: threads, at 32 rows 1.2-2.2x faster than the float32 product and 1.6-2.1x than the int8
#: activations' (1536 x 2048: 1.6 ms against 3.5 and 3.4; a Q8_0 2048 x 640: 1.2 against 1.4),
#: at 64 rows even with the float32 product for one scale a row, 10-20% slower for one a group
NATIVE_ROWS_WITHOUT_AVX512 = 48


@functools.cache
def many_rows_in_float() -> bool:
    """Whether products of many rows run on float32 copies of the quantised weights
    (:func:`float_product`) rather than int8 activations (``torch._int_mm``) and torch's int4
    kernel: on x86 CPUs without AVX-512, where oneDNN has no int8 GEMM (torch's falls back to a
    reference loop; llmarch's :func:`llmarch.inference.native.int8_mm` reaches 48-70 GFLOP/s
    on an AVX2 EPYC, 2 threads, where a float32 GEMM reaches 156-181) and the int4 kernel
    reaches 80. With AVX-512 (oneDNN's int8 GEMM, VNNI) int8 activations are kept."""
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")


def float_product(x: torch.Tensor, rows: int, dequantize, step: int, transposed: bool = False,
                  spare: int = 0) -> torch.Tensor:
    """x (m, k) times a quantised weight (rows, k) transposed, in float32: ``dequantize(a, b, out)``
    gives rows a..b of the weight as float32 (b - a, k), or (k, b - a) when ``transposed``, a
    ``step`` rows at a time (so the float copy stays small and in cache), written into ``out``
    where it can (a flat float32 buffer of ``(step + spare) * k``, the same for every step: no
    allocation per step, whose freed megabytes would scatter over the heap); (m, rows) float32."""
    x = x.float()
    k = x.shape[1]
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    buf = torch.empty((min(step, rows) + spare) * k, dtype=torch.float32)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        w = dequantize(a, b, buf)
        torch.mm(x, w if transposed else w.t(), out=y[:, a:b])
    return y


def check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown quantisation mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(
            f"int4 group size {group_size} is not supported: the CPU int4 kernel takes {GROUP_SIZES}"
        )


def _check_group(in_features: int, group_size: int) -> None:
    check_mode("int4", group_size)
    if in_features % group_size:
        raise ConfigError(
            f"in_features {in_features} is not divisible by the int4 group size {group_size}: "
            f"pick a group size in {GROUP_SIZES} that divides it (or int8)"
        )


def _bias_buffer(module: nn.Module, bias: torch.Tensor | None) -> None:
    module.register_buffer("bias", None if bias is None else bias.detach().clone())


def _linear_out(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernel's (tokens, out) bfloat16 result back in x's dtype and shape, plus the bias."""
    if y.shape[1] != module.out_features:  # padded to the kernel's row block
        y = y[:, : module.out_features]
    y = _as(y, x.dtype)
    if module.bias is not None:
        y = y + _as(module.bias, x.dtype)
    return y.view(*x.shape[:-1], module.out_features)


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation of (out, in): int8 codes and scale = max |w| / 127, the
    codes chosen against the scale as the kernel reads it (rounded to its dtype)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE)
    q = torch.div(w, scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_quantize_groups(weight: torch.Tensor, group: int = INT8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation of (out, in) with one scale per ``group`` inputs of a row: int8
    codes and scales (out, in / group) = max |w| / 127 of each group, the codes chosen against
    the scales as the kernel reads them. What a GGUF file's block-quantised matrices become: each
    32-weight group keeps its own step, where one scale a row makes the groups of small weights
    coarse (Gemma 3 270M: 0.8-1% relative error a matrix, 1.2% perplexity, against 0.1%)."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group:
        raise ConfigError(f"in_features {k} is not a multiple of the int8 group size {group}")
    g = w.view(n, k // group, group)
    step = g.abs().amax(dim=-1) / 127
    if not bool(torch.isfinite(step).all()) or float(step.max()) > torch.finfo(GROUP_SCALE_DTYPE).max:
        raise ConfigError(f"weights beyond float16 scales (group maximum {float(step.max()) * 127:.3g}): "
                          "use one scale a row (int8_quantize)")
    scales = step.clamp(min=2.0**-24).to(GROUP_SCALE_DTYPE)  # float16's smallest step
    q = torch.div(g, scales.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), scales


def batch_invariant(model: nn.Module) -> nn.Module:
    """Make every int8 layer of ``model`` use int8 activations at any number of rows, and every
    int4 layer torch's kernel, so that a row's result never depends on how many rows share its
    product (a server's request gives the same tokens alone and in a batch). Costs single-row
    decoding about 8% (Qwen2.5-0.5B, before the native kernels)."""
    for m in int8_layers(model):
        m.w8a8_min_rows = 1
        m.float_rows = False  # a float GEMM's sums depend on how many rows it blocks together
        m.dynamic = None  # one product for every row count (fast_kernels' is another)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.float_rows = False
        if isinstance(m, Q5Linear):
            m.w8a8_min_rows = 1
        if isinstance(m, Int4Linear):
            m.native = False  # torch's kernel at every row count (the native one serves few rows)
            m.float_rows = False
    return model


def dynamic_available() -> bool:
    """Whether this torch has fbgemm's int8 linear (x86 builds; see :func:`fast_kernels`)."""
    return "x86" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


def _pack_dynamic(weight_int8: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # torch's notice that quantized tensors are being phased out
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(
            weight_int8, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


#: the largest code of each level of :func:`packed_mm`'s activation codes (7 bits: see the module docstring)
CODE_MAX = 63
#: :func:`fast_kernels` packs int8 layers of at least this many weights. The packed product costs
#: about 40 us more in the activations' codes and the sums' scaling (12 small operations), so it
#: gains only on large matrices; measured one row, 2 threads: 2048 x 640 53 us weight-only against
#: 90 packed, 3072 x 1024 115 against 106, 4864 x 896 184-250 against 121-170, Gemma's head 12 ms
#: against 6.4
FAST_MIN_WEIGHTS = 1 << 22


def _two_level_product(x: torch.Tensor, product) -> torch.Tensor:
    """x (m, k) as two levels of 7-bit codes (2m, k), ``product`` of the codes (float32 (2m, n):
    the exact int32 sums times the weight's per-row scales), and the two levels' rows combined:
    float32 (m, n). The one arithmetic of :func:`packed_mm` and :func:`int_mm_codes`."""
    codes, s1, s2 = two_level_codes(x, CODE_MAX)
    acc = product(codes)
    m = x.shape[0]
    return acc[:m].mul_(s1).add_(acc[m:].mul_(s2))


def packed_mm(x: torch.Tensor, packed) -> torch.Tensor:
    """x (m, k) times an fbgemm-packed int8 weight (n, k) with per-row scales: float32 (m, n),
    on two-level 7-bit codes of x with exact int32 sums (see the module docstring)."""
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return _two_level_product(x, lambda codes: op(codes, 1.0, CODE_MAX + 1, packed))


def int_mm_codes(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What :func:`packed_mm` computes, without the packed copy: the same two-level codes of x
    (m, k) through ``torch._int_mm`` against the plain int8 weight (n, k), the same exact int32
    sums, scaled in the same order: the same float32 (m, n), to the bit (tested). Slower for the
    head (it reads the weight as ``_int_mm`` lays it out); for the products a layer computes
    while its packed copy is still being made (see :func:`fast_kernels`)."""
    return _two_level_product(
        x, lambda codes: torch._int_mm(codes.to(torch.int8), weight_int8.t()).float().mul_(scales.float()))


def fast_kernels(model: nn.Module, background: bool = True) -> nn.Module:
    """Give every int8 layer of ``model`` with at least ``FAST_MIN_WEIGHTS`` weights (the output
    head's table, the larger MLP matrices) fbgemm's packed copy for products of fewer than
    ``W8A8_MIN_ROWS`` rows (see the module docstring), in place; a no-op where llmarch's native
    kernels are built (they are faster still, with no second copy: Gemma 3 270M's decoding step
    22 ms against 32 with fbgemm's, measured in one run), fbgemm is missing or the weights are not
    on the CPU. Costs the int8 weights' size in memory once more (the plain copies stay for
    lookups and many-row products).

    Packing takes fbgemm 2.2 s for Gemma 3 270M (its head only: 168M weights) and 3.6 s for
    Qwen2.5-0.5B (62 layers, 534M weights; as much memory again), on one core without the GIL: with
    ``background`` it runs on a second thread while the caller goes on (reading the tokenizer,
    the prefill, the user typing); until a layer's copy is ready its products of few rows go
    through :func:`int_mm_codes`, which gives the packed product's very bits, so no token waits
    for the packing and none depends on its timing."""
    layers = [m for m in int8_layers(model) if m.weight_int8.device.type == "cpu" and m.weight_int8.numel() >= FAST_MIN_WEIGHTS
              and not m.grouped]  # fbgemm's int8 product takes one scale a row
    if not layers or not dynamic_available() or native.library() is not None:
        return model
    torch.backends.quantized.engine = "x86"
    if not background:
        for m in layers:
            m.dynamic = _pack_dynamic(m.weight_int8, m.scales)
        return model
    futures = [Future() for _ in layers]
    for m, f in zip(layers, futures):
        m.dynamic = f

    def pack() -> None:
        for m, f in zip(layers, futures):
            try:
                f.set_result(_pack_dynamic(m.weight_int8, m.scales))
            except BaseException as exc:  # noqa: BLE001 -- raised where the result is waited for
                f.set_exception(exc)

    # A thread of its own that ends when done, not a pool's: a live thread keeps its OpenMP team,
    # and with more OpenMP threads than cores libgomp stops spinning between parallel regions
    # for every team, which cut decoding to 60% for as long as the pool lived (measured).
    threading.Thread(target=pack, name="llmarch-pack-int8", daemon=True).start()
    return model


def two_level_codes(x: torch.Tensor, code_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two levels of integer codes of the rows of x (m, k): float (2m, k) codes [q1; q2] in
    [-code_max, code_max] and scales s1, s2 (m, 1) with x ~= s1 * q1 + s2 * q2 (q2 codes the
    rounding error of s1 * q1)."""
    xf = x.float()
    tiny = torch.finfo(torch.float32).tiny
    s1 = xf.abs().amax(-1, keepdim=True).clamp_(min=tiny).div_(code_max)
    q1 = torch.round(xf / s1)
    rest = xf - q1 * s1
    s2 = rest.abs().amax(-1, keepdim=True).clamp_(min=tiny).div_(code_max)
    return torch.cat([q1, torch.round(rest / s2)]), s1, s2


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-level int8 codes of the rows of x (m, k): (2m, k) int8 codes [q1; q2] and scales s1,
    s2 (m, 1) with x ~= s1 * q1 + s2 * q2 (:func:`two_level_codes` with 127)."""
    codes, s1, s2 = two_level_codes(x, 127)
    return codes.to(torch.int8), s1, s2


def w8a8_mm(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (m, k) times the int8 weight (n, k) with per-row ``scales`` (n,), computed on int8
    activations (:func:`int8_rows`) with exact int32 sums; float32 (m, n)."""
    codes, s1, s2 = int8_rows(x)
    m = x.shape[0]
    if native.int8_mm_preferred():  # the same sums, combined by the same float32 operations: the same bits
        acc = native.int8_mm(codes, weight_int8)
        y = native.w8a8_combine(acc, s1, s2, scales) if acc is not None else None
        if y is not None:
            return y
    acc = torch._int_mm(codes, weight_int8.t()).float()
    return (acc[:m].mul_(s1) + acc[m:].mul_(s2)).mul_(scales.float())


def _float_step(in_features: int) -> int:
    """Rows of a weight :func:`float_product` dequantises at a time (FLOAT_CHUNK_ELEMENTS weights)."""
    return max(1, FLOAT_CHUNK_ELEMENTS // in_features)


def native_rows(layer: nn.Module) -> int:
    """Products of fewer rows than this go through llmarch's native int8 kernels: the layer's
    ``w8a8_min_rows`` (where int8 activations take over), raised to
    ``NATIVE_ROWS_WITHOUT_AVX512`` on a CPU without AVX-512 (:func:`many_rows_in_float`: no
    int8 GEMM there). A batch-invariant layer (``w8a8_min_rows`` 1) keeps its one path."""
    m = layer.w8a8_min_rows
    return max(m, NATIVE_ROWS_WITHOUT_AVX512) if m > 1 and many_rows_in_float() else m


def _grouped_product(layer: nn.Module, x: torch.Tensor, x2: torch.Tensor, native_product) -> torch.Tensor:
    """The product of a layer with one scale per INT8_GROUP inputs (a grouped :class:`Int8Linear`,
    a :class:`Q5Linear`): few rows through llmarch's native kernel (``native_product(x2)``, None
    where it does not apply; exact sums per group), more rows the float32 product on the
    dequantised weight (``layer._float_rows``); a batch-invariant layer (``w8a8_min_rows`` 1)
    takes the native kernel at every row count, or, where it is not built, one float32 product a row."""
    rows, invariant = x2.shape[0], layer.w8a8_min_rows <= 1
    if layer.native and x2.device.type == "cpu" and not torch.compiler.is_compiling() and (
            invariant or rows < native_rows(layer)):
        y = native_product(x2)
        if y is not None:
            return y.view(*x.shape[:-1], layer.out_features)
    step = _float_step(layer.in_features)
    if invariant and rows > 1:  # each row its own product: no row depends on the others
        y = torch.cat([float_product(x2[i : i + 1], layer.out_features, layer._float_rows, step) for i in range(rows)])
    else:
        y = float_product(x2, layer.out_features, layer._float_rows, step)
    return _linear_out(layer, x, y)


class Int8Linear(nn.Module):
    """y = x W^T + b with W = int8 (out, in) * a per-output-channel scale (bfloat16 (out,)), or
    * a float16 scale per INT8_GROUP inputs of a row ((out, in / INT8_GROUP): :attr:`grouped`,
    what a GGUF file's block-quantised matrices load as; see :meth:`_grouped_forward`).

    ``aten._weight_int8pack_mm`` needs the inputs in multiples of ``INT8_K_MULTIPLE``: measured
    with torch 2.13 on x86, K = 24, 40 or 104 segfaults at 4 rows and K = 100 returns NaN at one
    row, while multiples of 16 (16 to 136) are right at 1 to 33 rows. A weight of another width
    is stored with zero columns up to the next multiple, and the inputs are padded with zeros to
    match (the sums are unchanged)."""

    #: int8 activations from this many rows on (an instance may lower it: see :func:`batch_invariant`)
    w8a8_min_rows = W8A8_MIN_ROWS

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        if scales.dim() == 2 and (self.in_features % INT8_GROUP or scales.dtype != GROUP_SCALE_DTYPE
                                  or scales.shape != (self.out_features, self.in_features // INT8_GROUP)):
            raise ConfigError(f"grouped int8 scales {tuple(scales.shape)} {scales.dtype} do not fit a "
                              f"{tuple(weight_int8.shape)} weight: expected float16, one per {INT8_GROUP} inputs of a row")
        self.pad = -self.in_features % INT8_K_MULTIPLE  # zero columns stored after the weight's own
        if self.pad:
            weight_int8 = torch.nn.functional.pad(weight_int8, (0, self.pad))
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", (scales if scales.dim() == 2 else scales.to(KERNEL_DTYPE)).contiguous())
        _bias_buffer(self, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls(*int8_quantize(weight), bias)

    @property
    def grouped(self) -> bool:
        """Whether the weight has one scale per INT8_GROUP inputs of a row (else one a row)."""
        return self.scales.dim() == 2

    def _scales_per_input(self, scales: torch.Tensor) -> torch.Tensor:
        s = scales.float()
        return s.repeat_interleave(INT8_GROUP, dim=1) if s.dim() == 2 else s[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantised weight, float32 (len(ids), in)."""
        return self.weight_int8[ids, : self.in_features].float() * self._scales_per_input(self.scales[ids])

    #: products of fewer than :func:`native_rows` rows through :func:`llmarch.inference.native.q8_linear` where it is built
    native = True
    #: products of FLOAT_MIN_ROWS rows or more on float32 copies of the weight where
    #: :func:`many_rows_in_float` (see :func:`batch_invariant`, which turns it off)
    float_rows = True
    #: fbgemm's packed copy for products of few rows, or the Future of one being packed (:func:`fast_kernels`)
    dynamic = None
    #: tensors owning the memory a weight viewed in place reads (see :class:`FusedInt8`)
    keep_alive: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.grouped:
            return self._grouped_forward(x, x2)
        if self.native and not torch.compiler.is_compiling() and x2.shape[0] < native_rows(self):
            # few rows: llmarch's own kernel (see the module docstring), where it is built (a
            # compiled graph keeps torch's: a ctypes call cannot be traced)
            y = native.q8_linear(x2, self.weight_int8, self.in_features, self.scales, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        if (self.float_rows and x2.shape[0] >= FLOAT_MIN_ROWS and x2.device.type == "cpu"
                and many_rows_in_float()):
            y = float_product(x2, self.out_features, self._float_rows, _float_step(self.in_features))
            return _linear_out(self, x, y)
        if self.pad:
            x2 = torch.nn.functional.pad(x2, (0, self.pad))
        if x2.shape[0] >= self.w8a8_min_rows and x2.device.type == "cpu":
            return _linear_out(self, x, w8a8_mm(x2, self.weight_int8, self.scales))
        if self.dynamic is not None and x2.device.type == "cpu":
            if isinstance(self.dynamic, Future):
                if not self.dynamic.done():  # still being packed: the same bits without the packed copy
                    return _linear_out(self, x, int_mm_codes(x2, self.weight_int8, self.scales))
                self.dynamic = self.dynamic.result()
            return _linear_out(self, x, packed_mm(x2, self.dynamic))
        y = torch.ops.aten._weight_int8pack_mm(_as(x2, KERNEL_DTYPE), self.weight_int8, _as(self.scales, KERNEL_DTYPE))
        return _linear_out(self, x, y)

    def _grouped_forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """One scale per INT8_GROUP inputs: torch's int8 kernels take one a row (see :func:`_grouped_product`)."""
        return _grouped_product(self, x, x2, lambda rows: native.q8_linear(rows, self.weight_int8, self.in_features,
                                                                           self.scales, self.bias))

    def _float_rows(self, a: int, b: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Rows a..b of the weight, float32 (b - a, in), in ``buf`` (flat float32) where given."""
        k, w = self.in_features, self.weight_int8[a:b, : self.in_features]
        out = torch.empty(b - a, k) if buf is None else buf[: (b - a) * k].view(b - a, k)
        out.copy_(w)  # converted in place (a mixed-dtype multiply would first make a float copy)
        if self.grouped:  # times each group's scale
            out.view(b - a, -1, INT8_GROUP).mul_(self.scales[a:b].float()[..., None])
        else:
            out.mul_(self.scales[a:b].float()[:, None])
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FusedInt8:
    """Int8 layers of one module that read the same input, computed as one :class:`Int8Linear`
    (q, k and v; gate and up): one product reads the weights at a higher rate than three small
    ones (measured one row, 2 threads: Gemma 3 270M's q, k, v 31 + 16 + 16 us, fused 43; Qwen2.5's
    gate and up 2 x 151, fused 280) and saves each call's dozen small operations.

    Holds no weight twice. Where the layers' int8 weights already lie back to back in memory
    (a :class:`~llmarch.checkpoints.cache.DerivedTensors` entry stores a layer's matrices side by
    side, in the order of their names: k, q, v; gate, up), the fused weight is a view over them
    (nothing copied or read at load; the rows in that memory order, the outputs put back in the
    group's order); otherwise the weights are copied into one buffer, each layer's weight, scales
    and bias become views of it, and the pages of the old buffers that a mapped entry served are
    released (:func:`~llmarch.checkpoints.cache.release_mapped_pages`). Either way the layers still
    run on their own (and ``state_dict`` is unchanged). Not an ``nn.Module``: stored beside the
    module (see ``llmarch.inference.packed.fuse``); when a layer or one of its buffers was
    replaced since (``.to()``, a new layer), :meth:`usable` says no and the module runs its
    layers apart."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        self.module = module
        self.names = names
        layers = [getattr(module, n) for n in names]
        order = adjacent_order([m.weight_int8 for m in layers]) if not layers[0].pad else None
        self.order = None if order is None or order == list(range(len(layers))) else order
        members = [layers[i] for i in order] if order is not None else layers
        biases = [m.bias for m in members]
        bias = None
        if any(b is not None for b in biases):  # zeros for a layer without: adding 0 changes nothing
            dtype = next(b.dtype for b in biases if b is not None)
            bias = torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=dtype) for m, b in zip(members, biases)])
        scales = torch.cat([m.scales for m in members])
        if order is not None:  # a view of the weights where they lie
            rows = sum(m.out_features for m in members)
            self.layer = fused = Int8Linear(_span(members[0].weight_int8, rows), scales, bias)
            fused.keep_alive = [m.weight_int8 for m in members]  # the memory the view reads
            # where each layer's outputs sit in the fused output (memory order), in the group's order
            starts = list(itertools.accumulate((m.out_features for m in members), initial=0))
            self._slices = [(starts[order.index(i)], starts[order.index(i) + 1]) for i in range(len(layers))]
        else:
            self.layer = fused = Int8Linear(torch.cat([m.weight_int8[:, : m.in_features] for m in layers]), scales, bias)
            sources = [t for m in layers for t in (m.weight_int8, m.scales, m.bias) if t is not None]
            start = 0
            for m in layers:
                end = start + m.out_features
                m.weight_int8, m.scales = fused.weight_int8[start:end], fused.scales[start:end]
                if m.bias is not None:
                    m.bias = fused.bias[start:end]
                start = end
            # the layers' old buffers are mapped from a DerivedTensors entry when it served them:
            # their pages, read to make the copy, need not stay in this process's memory
            release_mapped_pages(sources)
        fused.w8a8_min_rows = layers[0].w8a8_min_rows
        fused.float_rows = layers[0].float_rows
        self._parts = [(m, m.weight_int8, m.scales, m.bias) for m in layers]

    @staticmethod
    def fusable(layers: list[nn.Module]) -> bool:
        """Int8 layers of one input width on the CPU, none given fast kernels or batch settings of its own."""
        return (
            len(layers) > 1
            and all(type(m) is Int8Linear for m in layers)
            and len({(m.in_features, m.w8a8_min_rows, m.float_rows, m.grouped, m.weight_int8.device) for m in layers}) == 1
            and all(m.dynamic is None and m.weight_int8.device.type == "cpu" for m in layers)
        )

    def usable(self, x: torch.Tensor) -> bool:
        modules = self.module._modules
        for n, (m, w, s, b) in zip(self.names, self._parts):  # on every call: plain dict reads, no generator
            bufs = m._buffers
            if modules[n] is not m or bufs["weight_int8"] is not w or bufs["scales"] is not s or bufs["bias"] is not b:
                return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """All the layers' outputs side by side (..., sum of out_features), in the group's order."""
        y = self.layer(x)
        if self.order is None:
            return y
        return torch.cat([y[..., a:b] for a, b in self._slices], dim=-1)

    def pack_now(self) -> None:  # the interface of packed.FusedLinears: nothing to pack
        pass

    def sources_released(self) -> None:
        pass


def adjacent_order(weights: list[torch.Tensor]) -> list[int] | None:
    """The order (indices into ``weights``) in which these contiguous CPU matrices of one width
    and dtype lie back to back in memory, each starting where the one before ends; None if they
    do not."""
    if any(not w.is_contiguous() or w.device.type != "cpu" or w.dtype != weights[0].dtype
           or w.shape[1:] != weights[0].shape[1:] for w in weights):
        return None
    order = sorted(range(len(weights)), key=lambda i: weights[i].data_ptr())
    for a, b in zip(order, order[1:]):
        wa = weights[a]
        if wa.data_ptr() + wa.numel() * wa.element_size() != weights[b].data_ptr():
            return None
    return order


def _span(first: torch.Tensor, rows: int) -> torch.Tensor:
    """A (rows, width) tensor over the memory that starts at ``first`` and runs on past it
    (matrices that :func:`adjacent_order` found back to back). The caller keeps the tensors
    that own that memory alive for as long as the view is used."""
    import ctypes

    width = first.shape[1]
    raw = (ctypes.c_byte * (rows * width * first.element_size())).from_address(first.data_ptr())
    with warnings.catch_warnings():  # the memory is writable; torch warns for read-only buffers only
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=first.dtype).view(rows, width)


def int8_layers(model: nn.Module) -> list[Int8Linear]:
    """The int8 layers that compute ``model``'s products: each fused group's layer
    (:class:`FusedInt8`) in place of its members, and every other :class:`Int8Linear`."""
    fused = [f for m in model.modules() for f in m.__dict__.get("_fused", {}).values() if isinstance(f, FusedInt8)]
    members = {id(m) for f in fused for m, *_ in f._parts}
    return [f.layer for f in fused] + [m for m in model.modules() if isinstance(m, Int8Linear) and id(m) not in members]


class Int4Linear(nn.Module):
    """y = x W^T + b with W = (code - 8) * scale + zero, one (scale, zero) per ``group_size``
    inputs of each output row; codes in torch's packed CPU layout."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        out_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.group_size = group_size
        self.out_features = out_features
        self.in_features = packed.shape[1] * 2
        self.register_buffer("weight_int4pack", packed)  # (out padded to ROW_BLOCK, in / 2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(KERNEL_DTYPE).contiguous())  # (in/G, out, 2)
        _bias_buffer(self, bias)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
    ) -> Int4Linear:
        """From codes (out, in) in 0..15 and a scale and zero per group (out, in / group_size):
        ``w = (code - 8) * scale + zero``."""
        n, k = codes.shape
        _check_group(k, group_size)
        pad = -n % ROW_BLOCK
        codes = nn.functional.pad(codes.to(torch.int32), (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        sz = torch.stack([scales, zeros], dim=-1).to(KERNEL_DTYPE)  # (out, groups, 2)
        sz = nn.functional.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1)
        return cls(packed, sz, group_size, n, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Int4Linear:
        """Asymmetric min/max quantisation per group; the codes are chosen against the scale and
        zero as the kernel will read them (rounded to its dtype)."""
        n, k = weight.shape
        _check_group(k, group_size)
        w = weight.detach().float().view(n, k // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE).float()
        zeros = (lo + 8 * scales).to(KERNEL_DTYPE).float()
        codes = torch.round((w - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
        return cls.from_codes(codes.view(n, k).to(torch.uint8), scales, zeros, bias, group_size)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantised weight, float32 (len(ids), in), read from the packed
        codes in place (no unpacked copy of the matrix)."""
        k = self.in_features
        where = _int4_nibbles(k)[ids % ROW_BLOCK] + (ids // ROW_BLOCK * ROW_BLOCK * k)[:, None]
        byte = self.weight_int4pack.view(-1)[where >> 1]
        codes = (byte >> ((where & 1) * 4).to(torch.uint8)) & 15
        sz = self.scales_and_zeros[:, ids].float().transpose(0, 1)  # (len, groups, 2)
        w = (codes.float() - 8).view(len(ids), -1, self.group_size)
        return (w * sz[..., :1] + sz[..., 1:]).view(len(ids), k)

    #: products of fewer than ``W8A8_MIN_ROWS`` rows through :func:`llmarch.inference.native.q4_linear` where it is built
    native = True
    #: products of FLOAT_MIN_ROWS rows or more on float32 copies of the weight (dequantised by
    #: :func:`llmarch.inference.native.q4_dequant_t`, where it is built) where :func:`many_rows_in_float`
    float_rows = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if (self.float_rows and x2.shape[0] >= FLOAT_MIN_ROWS and x2.device.type == "cpu" and many_rows_in_float()
                and native.library() is not None and native.int4_block_rows() and not torch.compiler.is_compiling()):
            br = native.int4_block_rows()  # whole blocks of the packing at a time
            step = br * max(1, FLOAT_CHUNK_ELEMENTS // (self.in_features * br))
            return _linear_out(self, x, float_product(x2, self.out_features, self._float_rows, step, transposed=True,
                                                      spare=br))
        if self.native and x2.shape[0] < W8A8_MIN_ROWS and not torch.compiler.is_compiling():
            # few rows: llmarch's own kernel on the same packed codes, where it is built
            y = native.q4_linear(x2, self.weight_int4pack, self.in_features, self.out_features,
                                 self.scales_and_zeros, self.group_size, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        x2 = _as(x2, KERNEL_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight_int4pack, self.group_size, _as(self.scales_and_zeros, KERNEL_DTYPE)
        )
        return _linear_out(self, x, y)

    def _float_rows(self, a: int, b: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Rows a..b of the weight, float32 transposed (in, b - a): the native kernel where built
        (into ``buf``, flat float32, where it holds the whole blocks of rows), else :meth:`rows`."""
        br = native.int4_block_rows()
        start, end = a - a % br, min(-(-b // br) * br, self.weight_int4pack.shape[0])
        w = native.q4_dequant_t(self.weight_int4pack, self.in_features, self.scales_and_zeros, self.group_size,
                                (start, end), buf)
        if w is None:
            return self.rows(torch.arange(a, b)).t()
        return w[:, a - start : b - start]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


@functools.cache
def _int4_nibbles(k: int) -> torch.Tensor:
    """(ROW_BLOCK, k) int64: where torch's int4 packing puts element (row, col) of a block of
    ROW_BLOCK rows, as a nibble index (2 * byte + high) into that block's bytes.

    The layout differs by CPU (AVX512 interleaves rows 0/32 and 16/48, AVX2 rows 0/16, the
    scalar build neighbours), so it is read off the packing op itself: pack matrices whose
    entries are base-16 digits of the row and of the column, and see where each digit lands."""
    rows = torch.arange(ROW_BLOCK)[:, None].expand(ROW_BLOCK, k)
    cols = torch.arange(k)[None].expand(ROW_BLOCK, k)
    col_digits = max(1, math.ceil(math.log(k, 16)))
    probes = [rows % 16, rows // 16] + [(cols >> (4 * i)) % 16 for i in range(col_digits)]
    found = []
    for p in probes:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(p.to(torch.int32).contiguous(), 1)
        found.append(torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).long())
    row_at = found[0] + 16 * found[1]
    col_at = sum(d << (4 * i) for i, d in enumerate(found[2:]))
    where = torch.empty(ROW_BLOCK, k, dtype=torch.long)
    where[row_at, col_at] = torch.arange(ROW_BLOCK * k)
    return where


_BITS = torch.arange(8, dtype=torch.uint8)


def q5_0_codes(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q5_0 blocks (blocks, 22) uint8 (float16 d, 32 fifth bits, 16 bytes of low nibbles) ->
    their 5-bit codes in 0..31, uint8 (blocks, 32); the weights are ``d * (code - 16)``."""
    # weight j's fifth bit is bit j of the little-endian 32 bits: bit j % 8 of byte j // 8
    high = ((blocks[:, 2:6, None] >> _BITS) & 1).reshape(-1, 32) << 4
    qs = blocks[:, 6:]
    return torch.cat([qs & 15, qs >> 4], dim=1) | high  # weights 0..15 low nibbles, 16..31 high ones


def q5_0_dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """Rows of GGUF Q5_0 blocks (rows, blocks * 22) uint8 -> float32 (rows, blocks * 32), exactly."""
    b = blocks.reshape(-1, 22)
    d = b[:, :2].contiguous().view(torch.float16).float()
    return (d * q5_0_codes(b).float().sub_(16)).reshape(blocks.shape[0], -1)


#: where the fifth bit of weight j of a block sits in Q5Linear's 4 bytes: bit j // 4 of byte j % 4
_Q5_BYTE, _Q5_BIT = torch.arange(32) % 4, (torch.arange(32) // 4).to(torch.uint8)


class Q5Linear(nn.Module):
    """y = x W^T + b with W a GGUF file's Q5_0 matrix as the file has it, 5.5 bits a weight where
    the int8 layout takes 8.5: 32 weights of a row share a float16 scale d, ``w = d * (code - 16)``
    with 5-bit codes. Held re-laid for the native kernel's vector loops: ``scales`` (out, in / 32)
    float16 (as :class:`Int8Linear`'s grouped layout) and ``blocks`` (out, in / 32 * 20) uint8,
    per block the 16 bytes of low nibbles as the file stores them (weight j < 16 in byte j's low
    nibble, j + 16 in its high one) after 4 bytes of fifth bits (weight j's: bit j // 4 of byte
    j % 4). Few rows run :func:`llmarch.inference.native.q5_0_linear` (the bits :class:`Int8Linear`
    gives on the same codes and scales), more rows the float32 product on the dequantised
    weight, a few hundred rows at a time (as Int8Linear's grouped layout; a batch-invariant
    layer: the native kernel at every row count). Made for ``quant="compact"`` where the native
    kernels are built (:func:`llmarch.inference.gguf_quant.gguf_linear`; without them every product
    would be the float32 one). Measured on a 2-core AVX2 EPYC, its decoding is compute-bound where
    the int8 layout's is bound by memory (unpacking the fifth bits: 17 vector instructions per 32
    weights against 9): Gemma 3 270M 3-9% and Qwen2.5-0.5B 8-15% slower, for 28 and 102 MiB less
    at ``llmarch generate``'s peak."""

    #: batch invariance (see :func:`batch_invariant`) sets 1: the native kernel at every row count
    w8a8_min_rows = W8A8_MIN_ROWS
    #: products of fewer than ``w8a8_min_rows`` rows through the native kernel where it is built
    native = True

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        groups = in_features // INT8_GROUP
        if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or in_features % INT8_GROUP
                or blocks.shape[1] != groups * native.Q5_0_BLOCK_BYTES or scales.dtype != GROUP_SCALE_DTYPE
                or tuple(scales.shape) != (blocks.shape[0], groups)):
            raise ConfigError(f"Q5_0 codes {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                              f"{scales.dtype} do not hold rows of {in_features} weights: expected uint8, "
                              f"{native.Q5_0_BLOCK_BYTES} bytes per {INT8_GROUP} weights, and float16, one per {INT8_GROUP}")
        self.out_features, self.in_features = blocks.shape[0], in_features
        self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("scales", scales.contiguous())
        _bias_buffer(self, bias)

    @classmethod
    def from_gguf(cls, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None) -> Q5Linear:
        """From a matrix's GGUF Q5_0 bytes (out, in / 32 * 22): the same codes and scales, re-laid."""
        n = blocks.shape[0]
        b = blocks.reshape(-1, 22)
        high = (q5_0_codes(b) >> 4).view(-1, 8, 4)  # (block, j // 4, j % 4): weight j's fifth bit
        packed = (high << torch.arange(8, dtype=torch.uint8)[:, None]).sum(1, dtype=torch.uint8)  # (block, 4)
        relaid = torch.cat([packed, b[:, 6:]], dim=1).reshape(n, -1)
        return cls(relaid, b[:, :2].contiguous().view(torch.float16).reshape(n, -1), in_features, bias)

    def codes(self) -> torch.Tensor:
        """The 5-bit codes, uint8 (out, in) in 0..31."""
        b = self.blocks.reshape(-1, native.Q5_0_BLOCK_BYTES)
        qs = b[:, 4:]
        high = (b[:, _Q5_BYTE] >> _Q5_BIT) & 1
        return (torch.cat([qs & 15, qs >> 4], dim=1) | (high << 4)).reshape(self.out_features, -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight, float32 (len(ids), in), exactly."""
        codes = self.codes()[ids].float().sub_(16).view(len(ids), -1, INT8_GROUP)
        return (codes * self.scales[ids].float()[..., None]).view(len(ids), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grouped_product(self, x, x.reshape(-1, self.in_features), lambda rows: native.q5_0_linear(
            rows, self.blocks, self.scales, self.in_features, self.bias))

    def _float_rows(self, a: int, b: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        w = native.q5_0_dequant(self.blocks, self.scales, self.in_features, (a, b), buf)
        return self.rows(torch.arange(a, b)) if w is None else w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q5_0, bias={self.bias is not None}"


QuantLinear = Int8Linear | Int4Linear | Q5Linear


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 32) -> QuantLinear:
    """A float linear layer's weight (out, in) and bias as an :class:`Int8Linear` or :class:`Int4Linear`."""
    check_mode(mode, group_size)
    if mode == "int8":
        return Int8Linear.from_float(weight, bias)
    return Int4Linear.from_float(weight, bias, group_size)


class QuantEmbedding(nn.Module):
    """A token table held quantised: a lookup dequantises only the rows it reads."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = table  # (num_embeddings, embedding_dim), i.e. a linear embedding_dim -> num_embeddings
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str, group_size: int = 32) -> QuantEmbedding:
        return cls(quantize_linear(weight, None, mode, group_size), weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


class QuantHead(nn.Module):
    """A tied output head: logits = h E^T with the embedding's quantised table (not a copy)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # registered by the model as its embedding, not twice

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.embedding.table(h)


class QuantExperts(Experts):
    """Stacked MoE experts with each expert's two matrices quantised. The stacked parameters
    remain as shape-only (meta) tensors, so routing, counting and ``describe`` see the same
    sizes; every expert runs through :meth:`expert`."""

    def __init__(self, experts: Experts, mode: str, group_size: int):
        nn.Module.__init__(self)
        self.width = experts.width
        self.act = experts.act
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().to("meta"), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.detach().to("meta"), requires_grad=False)
        count = experts.gate_up_proj.shape[0]
        self.gate_up = nn.ModuleList(quantize_linear(experts.gate_up_proj[e], None, mode, group_size) for e in range(count))
        self.down = nn.ModuleList(quantize_linear(experts.down_proj[e], None, mode, group_size) for e in range(count))

    def run_batched(self, x: torch.Tensor, counts: torch.Tensor) -> bool:
        return False  # always expert by expert: the all-experts batched path reads the stacked float weights

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).split(self.width, dim=-1)
        return self.down[e](self.act(gate) * up)


def quantize_experts(experts: Experts, mode: str, group_size: int) -> QuantExperts:
    """MoE stacked experts, quantised per expert."""
    return QuantExperts(experts, mode, group_size)


def _swappable(model: nn.Module):
    """(qualified name, parent, attribute, layer) of each layer :func:`quantize` swaps: plain
    linear layers not read as a matrix (``reads_weights``) and stacked experts."""
    for prefix, mod in list(model.named_modules()):
        keep = set(getattr(mod, "reads_weights", ()))
        for name, child in list(mod.named_children()):
            if (type(child) is nn.Linear and name not in keep) or type(child) is Experts:
                yield f"{prefix}.{name}".lstrip("."), mod, name, child


def check_quantizable(model: nn.Module, mode: str, group_size: int = 32) -> None:
    """Raise a ConfigError naming the first layer :func:`quantize` could not quantise (an int4
    group size that does not divide its input width); works on a meta model, before loading."""
    check_mode(mode, group_size)
    if mode != "int4":
        return
    embed = getattr(model, "embed", None)
    widths = [("embed", embed.embedding_dim)] if isinstance(embed, nn.Embedding) else []
    for name, _, _, child in _swappable(model):
        if isinstance(child, Experts):
            widths += [(name, child.gate_up_proj.shape[-1]), (name, child.down_proj.shape[-1])]
        else:
            widths.append((name, child.in_features))
    for name, width in widths:
        if width % group_size:
            raise ConfigError(
                f"layer {name} has input width {width}, not divisible by the int4 group size {group_size}: "
                f"pick a group size in {GROUP_SIZES} that divides it (or int8)"
            )


@torch.no_grad()
def quantize(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Quantise a model's weights for inference, in place, and return it.

    Every ``nn.Linear`` becomes an :class:`Int8Linear` / :class:`Int4Linear` under the same
    attribute name (except layers its module reads as a matrix, ``reads_weights``); stacked
    MoE experts become :class:`QuantExperts`; the token embedding a :class:`QuantEmbedding`,
    and a tied head a :class:`QuantHead` on the same table. Layers already quantised stay as
    they are. The model can no longer train."""
    check_quantizable(model, mode, group_size)
    for _, parent, name, child in _swappable(model):
        if isinstance(child, Experts):
            setattr(parent, name, quantize_experts(child, mode, group_size))
        else:
            setattr(parent, name, quantize_linear(child.weight, child.bias, mode, group_size))
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding):
        tied = getattr(model, "lm_head", False) is None
        model.embed = QuantEmbedding.from_float(embed.weight, mode, group_size)
        if tied:
            model.lm_head = QuantHead(model.embed)
    return model
