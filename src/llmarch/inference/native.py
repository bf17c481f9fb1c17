"""llmarch's native CPU kernels (``kernels.c`` beside this file), compiled on first use.

A few loops that PyTorch's CPU kernels leave slow for decoding (each measured against the torch
kernel it replaces; see ``kernels.c``) are compiled with the machine's C compiler (``$CC``, else
``cc``) as ``-O3 -march=native -fopenmp`` into ``$LLMARCH_CACHE/native/<key>/`` and loaded with
``ctypes``; the key hashes the source, the flags, the compiler (path, size, mtime) and the CPU's
feature flags, so a changed source, compiler or CPU gets its own build. The library is written
to a temporary name and renamed into place (a killed compile leaves nothing half-written), and
one that fails to load or reports another ABI version is rebuilt once.

Where nothing can be built (no compiler, a compile error, a read-only cache) or
``LLMARCH_NATIVE=0`` is set, :func:`library` returns None and callers use the torch kernels
(:func:`status` says why): the native kernels make decoding faster, never different in kind.

OpenMP: the library links ``libgomp.so.1`` by soname; torch has loaded its own copy under that
soname by the time this runs, so the kernels share torch's thread team and thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
ABI_VERSION = 14
# -ffp-contract=off: a * b + c rounds twice, as torch's separate operations do (the kernels'
# explicit fused multiply-adds are unaffected)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11")
LIBS = ("-lm",)
LIBRARY_NAME = "libllmarch_kernels.so"
COMPILE_TIMEOUT = 300.0  # seconds

# dtype codes of kernels.c
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# what kernels.c's llmarch_simd() reports: the vector instructions its loops were built with
SIMD_NAMES = {2: "AVX-512", 1: "AVX2", 0: "portable loops"}

#: inputs per scale of llmarch_q8_linear's grouped int8 weights (its other layout: one scale a row)
Q8_GROUP = 32

_lib: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet
_disabled = 0  # depth of disabled() blocks


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _key(cc: str, flags: tuple[str, ...]) -> str:
    st = os.stat(cc)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(flags).encode(), os.path.realpath(cc).encode(),
                 f"{st.st_size}:{st.st_mtime_ns}".encode(), platform.machine().encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _build(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCE to ``target`` (atomically); None, or why it failed."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), *LIBS], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return f"{os.path.basename(cc)} failed: {lines[0] if lines else f'exit {proc.returncode}'}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not compile: {exc}"
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _open(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        if lib.llmarch_abi_version() != ABI_VERSION:
            return None
    except (OSError, AttributeError):
        return None
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.llmarch_q8_linear.argtypes = [P, I, I64, I64, I64, P, I64, I64, P, I64, P, I, P, I]
    lib.llmarch_q8_linear.restype = I
    lib.llmarch_q5_0_linear.argtypes = [P, I, I64, I64, I64, P, I64, I64, P, P, I, P, I]
    lib.llmarch_q5_0_linear.restype = I
    lib.llmarch_q5_0_dequant.argtypes = [P, I64, P, I64, I64, I64, P]
    lib.llmarch_q5_0_dequant.restype = I
    lib.llmarch_q4_linear.argtypes = [P, I, I64, I64, I64, P, I64, I64, P, I64, I64, P, I, P, I]
    lib.llmarch_q4_linear.restype = I
    lib.llmarch_rms_norm.argtypes = [P, I, I64, I64, I64, I, P, I, I64, I, ctypes.c_float, P, P, P, I, I64]
    lib.llmarch_rms_norm.restype = I
    lib.llmarch_attend_one.argtypes = [P, I, I64, I64, P, P, I, *[I64] * 6, P, I, I64, *[I64] * 5, ctypes.c_float, P]
    lib.llmarch_attend_one.restype = I
    lib.llmarch_q4_dequant_t.argtypes = [P, I64, I64, P, I64, I64, I64, I64, P]
    lib.llmarch_q4_dequant_t.restype = I
    lib.llmarch_int8_mm.argtypes = [P, I64, P, I64, I64, I64, I64, P, I64]
    lib.llmarch_int8_mm.restype = I
    lib.llmarch_w8a8_combine.argtypes = [P, P, P, P, I64, I64, P]
    lib.llmarch_w8a8_combine.restype = None
    lib.llmarch_argmax.argtypes = [P, I64, I64, I64, P]
    lib.llmarch_argmax.restype = None
    lib.llmarch_layer_struct_size.argtypes = []
    lib.llmarch_layer_struct_size.restype = I64
    lib.llmarch_decode_layers.argtypes = [P, I64, P, I, I64, I64, P, P, ctypes.c_float]
    lib.llmarch_decode_layers.restype = I
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LLMARCH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "torch's (LLMARCH_NATIVE=0)"
    if sys.platform == "win32":
        return None, "torch's (native ones not built on Windows)"
    cc = _compiler()
    if cc is None:
        return None, "torch's (no C compiler: set CC)"
    from ..checkpoints.assets import cache_dir

    flag_sets = [FLAGS, tuple(f for f in FLAGS if f != "-fopenmp")]  # a compiler without OpenMP: one thread
    why = ""
    for flags in flag_sets:
        try:
            target = cache_dir() / "native" / _key(cc, flags) / LIBRARY_NAME
        except OSError as exc:
            return None, f"torch's (no cache folder: {exc})"
        if target.exists():
            lib = _open(target)
            if lib is not None:
                return lib, _describe(lib, flags)
        why = _build(cc, flags, target) or ""
        if not why:
            lib = _open(target)
            if lib is not None:
                return lib, _describe(lib, flags)
            why = "the native library did not load"
    return None, f"torch's ({why})"


def _describe(lib: ctypes.CDLL, flags: tuple[str, ...]) -> str:
    simd = SIMD_NAMES.get(lib.llmarch_simd(), "portable loops")
    return f"native ({simd}{'' if '-fopenmp' in flags else ', one thread'})"


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None where they cannot be (see :func:`status`)."""
    global _lib, _status
    if _disabled:
        return None
    if _status is None:
        _lib, _status = _load()
    return _lib


@contextlib.contextmanager
def disabled():
    """Within this block :func:`library` is None: torch's kernels, to compare the two."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def status() -> str:
    """What :func:`library` found: ``native (...)``, or ``torch's (why)``."""
    library()
    return _status or ""


def q8_linear(x: torch.Tensor, weight: torch.Tensor, in_features: int, scales: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (m, k) float32/bfloat16 times int8 ``weight`` (n, >= k) with ``scales`` one a row (n,)
    bfloat16, or one per 32 inputs of a row (n, k / 32) float16, plus ``bias``: (m, n) in x's dtype, or
    None where the native kernel does not apply (no library, other dtypes or devices,
    non-contiguous operands)."""
    lib = library()
    if lib is None:
        return None
    n = weight.shape[0]
    xd, bd = _activations(x, in_features), _bias(bias, n)
    group = 0 if scales.dim() == 1 else Q8_GROUP
    if (xd is None or bd is None or weight.dtype != torch.int8 or weight.dim() != 2 or weight.stride(1) != 1
            or weight.shape[1] < in_features or scales.dtype != (torch.float16 if group else torch.bfloat16)
            or not scales.is_contiguous() or scales.shape != ((n,) if group == 0 else (n, in_features // Q8_GROUP))
            or (group and in_features % Q8_GROUP)):
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = lib.llmarch_q8_linear(x.data_ptr(), xd, x.stride(0), x.shape[0], in_features, weight.data_ptr(),
                               weight.stride(0), n, scales.data_ptr(), group, None if bias is None else bias.data_ptr(),
                               bd, y.data_ptr(), xd)
    if rc != 0:
        raise MemoryError("llmarch_q8_linear: could not allocate the activations' codes")
    return y


#: bytes of kernels.c's re-laid Q5_0 block of Q8_GROUP weights (4 of fifth bits, 16 of low nibbles;
#: the float16 scales apart): see :class:`llmarch.inference.quant.Q5Linear`
Q5_0_BLOCK_BYTES = 20


def _q5_0_weight(blocks: torch.Tensor, scales: torch.Tensor, in_features: int) -> bool:
    """Whether ``blocks`` is a CPU (n, in_features / 32 * 20) uint8 matrix of contiguous rows and
    ``scales`` its contiguous (n, in_features / 32) float16 scales."""
    n, g = blocks.shape[0], in_features // Q8_GROUP
    return (blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.device.type == "cpu"
            and blocks.stride(1) == 1 and in_features % Q8_GROUP == 0 and blocks.shape[1] == g * Q5_0_BLOCK_BYTES
            and scales.dtype == torch.float16 and scales.shape == (n, g) and scales.is_contiguous()
            and scales.device.type == "cpu")


def q5_0_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, in_features: int,
                bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (m, k) float32/bfloat16 times a weight held as re-laid Q5_0 codes (``blocks`` (n, k / 32 *
    20) uint8, ``scales`` (n, k / 32) float16; see :class:`llmarch.inference.quant.Q5Linear`), plus
    ``bias``: (m, n) in x's dtype, the bits of :func:`q8_linear` on the same codes and scales;
    None where the kernel does not apply."""
    lib = library()
    if lib is None:
        return None
    n = blocks.shape[0]
    xd, bd = _activations(x, in_features), _bias(bias, n)
    if xd is None or bd is None or not _q5_0_weight(blocks, scales, in_features):
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = lib.llmarch_q5_0_linear(x.data_ptr(), xd, x.stride(0), x.shape[0], in_features, blocks.data_ptr(),
                                 blocks.stride(0), n, scales.data_ptr(), None if bias is None else bias.data_ptr(),
                                 bd, y.data_ptr(), xd)
    if rc != 0:
        raise MemoryError("llmarch_q5_0_linear: could not allocate the activations' codes")
    return y


def _out(buf: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """A float32 tensor of ``shape``: the start of ``buf`` (flat, contiguous float32) where it is
    large enough, else a new one."""
    n = shape[0] * shape[1]
    if buf is not None and buf.dtype == torch.float32 and buf.dim() == 1 and buf.is_contiguous() and buf.numel() >= n:
        return buf[:n].view(shape)
    return torch.empty(shape, dtype=torch.float32)


def q5_0_dequant(blocks: torch.Tensor, scales: torch.Tensor, in_features: int, rows: tuple[int, int],
                 buf: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rows ``rows`` = (start, end) of a weight held as re-laid Q5_0 codes (as for :func:`q5_0_linear`)
    as float32 (end - start, in_features), exactly (in ``buf`` where it is large enough, see
    :func:`_out`); None where the kernel does not apply."""
    lib = library()
    start, end = rows
    if lib is None or not _q5_0_weight(blocks, scales, in_features) or not 0 <= start <= end <= blocks.shape[0]:
        return None
    out = _out(buf, (end - start, in_features))
    rc = lib.llmarch_q5_0_dequant(blocks.data_ptr(), blocks.stride(0), scales.data_ptr(), in_features, start, end,
                                  out.data_ptr())
    return out if rc == 0 else None


def _activations(x: torch.Tensor, in_features: int) -> int | None:
    """kernels.c's dtype code of x when it is a CPU (rows, in_features) matrix of contiguous rows
    in a dtype the kernels read, else None."""
    xd = _DTYPES.get(x.dtype)
    if xd is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != in_features:
        return None
    return xd


def _bias(bias: torch.Tensor | None, n: int) -> int | None:
    """kernels.c's dtype code of a contiguous (n,) bias (0 for no bias), else None."""
    if bias is None:
        return 0
    bd = _DTYPES.get(bias.dtype)
    return bd if bd is not None and bias.is_contiguous() and bias.shape == (n,) else None


@functools.cache
def int4_block_rows() -> int:
    """How many rows this torch's int4 packing interleaves in a block, as ``llmarch_q4_linear``
    reads it (64 on AVX-512 builds and CPUs, 32 on AVX2: byte j of a column holds row j's code
    and row j + rows / 2's), or 0 for a layout it does not read: a probe matrix packed by torch,
    against each layout's formula."""
    codes = ((torch.arange(128)[:, None] * 7 + torch.arange(64)[None] * 3) % 16).to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    except (RuntimeError, AttributeError):
        return 0
    if packed.dtype != torch.uint8 or packed.shape != (128, 32):
        return 0
    for rows in (64, 32):
        blocks = codes.view(128 // rows, 2, rows // 2, 64)  # (block, high, row j, column k)
        expect = (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(128, 32)  # k * rows / 2 + j
        if torch.equal(packed.int(), expect):
            return rows
    return 0


def q4_linear(x: torch.Tensor, packed: torch.Tensor, in_features: int, out_features: int,
              scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (m, k) float32/bfloat16 times an int4 weight in torch's packed CPU layout (``packed``
    (npad, k / 2) uint8, ``scales_and_zeros`` (k / group, npad, 2) bfloat16: ``w = (code - 8) *
    scale + zero``), plus ``bias``: (m, out_features) in x's dtype, or None where the native
    kernel does not apply (no library, another packing layout, other dtypes or shapes)."""
    lib = library()
    if lib is None:
        return None
    npad = packed.shape[0]
    xd, bd = _activations(x, in_features), _bias(bias, out_features)
    if (xd is None or bd is None or packed.dtype != torch.uint8 or not packed.is_contiguous() or npad % 64
            or packed.shape[1] * 2 != in_features or in_features % group_size
            or scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous()
            or scales_and_zeros.shape != (in_features // group_size, npad, 2) or out_features > npad
            or not int4_block_rows()):
        return None
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    rc = lib.llmarch_q4_linear(x.data_ptr(), xd, x.stride(0), x.shape[0], in_features, packed.data_ptr(), out_features,
                               npad, scales_and_zeros.data_ptr(), group_size, int4_block_rows(),
                               None if bias is None else bias.data_ptr(), bd, y.data_ptr(), xd)
    if rc != 0:
        raise MemoryError("llmarch_q4_linear: could not allocate the activations' float32 copy")
    return y


def q4_dequant_t(packed: torch.Tensor, in_features: int, scales_and_zeros: torch.Tensor, group_size: int,
                 rows: tuple[int, int], buf: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rows ``rows`` = (start, end) of an int4 weight in torch's packed CPU layout (as for
    :func:`q4_linear`), dequantised and transposed: (in_features, end - start) float32, the values
    of ``Int4Linear.rows`` to the bit; start and end multiples of :func:`int4_block_rows` (end may
    be the padded row count); in ``buf`` where it is large enough (see :func:`_out`). None where
    the kernel does not apply."""
    lib = library()
    br = int4_block_rows() if lib is not None else None
    npad = packed.shape[0]
    start, end = rows
    if (lib is None or not br or packed.dtype != torch.uint8 or not packed.is_contiguous() or npad % br
            or packed.shape[1] * 2 != in_features or in_features % group_size or start % br or end % br
            or not 0 <= start <= end <= npad or scales_and_zeros.dtype != torch.bfloat16
            or not scales_and_zeros.is_contiguous() or scales_and_zeros.shape != (in_features // group_size, npad, 2)):
        return None
    out = _out(buf, (in_features, end - start))
    rc = lib.llmarch_q4_dequant_t(packed.data_ptr(), in_features, npad, scales_and_zeros.data_ptr(), group_size,
                                  br, start // br, end // br, out.data_ptr())
    return out if rc == 0 else None


def int8_mm_preferred() -> bool:
    """Whether :func:`int8_mm` should stand in for ``torch._int_mm``: on a build without AVX-512,
    where oneDNN has no int8 kernel for the CPU and torch's falls back to a reference loop (an
    AVX2 EPYC: 150 ms for one 128 x 640 x 1536 product, a 512-token prefill at 4-18 tokens/s)."""
    lib = library()
    return lib is not None and lib.llmarch_simd() < 2


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a (m, k) int8 times b (n, k) int8 transposed: (m, n) int32, the exact integer sums of
    ``torch._int_mm(a, b.t())``; None where the kernel does not apply."""
    lib = library()
    if (lib is None or a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2
            or a.shape[1] != b.shape[1] or a.stride(1) != 1 or b.stride(1) != 1 or a.device.type != "cpu"
            or b.device.type != "cpu" or a.shape[1] >= 131072):
        return None
    m, n = a.shape[0], b.shape[0]
    c = torch.empty(m, n, dtype=torch.int32)
    if lib.llmarch_int8_mm(a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), m, n, a.shape[1], c.data_ptr(), n) != 0:
        raise MemoryError("llmarch_int8_mm: could not allocate the 16-bit copies")
    return c


def w8a8_combine(acc: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """``(acc[:m].float() * s1 + acc[m:].float() * s2) * scales.float()`` for int32 acc (2m, n),
    float32 s1, s2 (m, 1) and bfloat16 scales (n,), in one pass (the same float32 operations:
    the same bits); None where the kernel does not apply."""
    lib = library()
    m2, n = acc.shape if acc.dim() == 2 else (0, 0)
    m = m2 // 2
    if (lib is None or acc.dtype != torch.int32 or m2 % 2 or not acc.is_contiguous() or scales.dtype != torch.bfloat16
            or scales.shape != (n,) or not scales.is_contiguous()
            or any(s.dtype != torch.float32 or s.shape != (m, 1) or not s.is_contiguous() for s in (s1, s2))):
        return None
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llmarch_w8a8_combine(acc.data_ptr(), s1.data_ptr(), s2.data_ptr(), scales.data_ptr(), m, n, y.data_ptr())
    return y


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """The index of the first largest value of each row of a float32 (rows, n) tensor on the CPU, a
    NaN counting as the largest: ``x.argmax(-1)``'s result (int64, (rows,)), about 10x faster for
    a 262k-token vocabulary; None where the kernel does not apply."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] < 1 or x.stride(1) != 1
            or x.requires_grad):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.llmarch_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, scale: torch.Tensor | None, scale_f32: bool, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None, normalize: bool = True) -> torch.Tensor | None:
    """RMSNorm of the rows of x (rows, dim) as ``llmarch.model.layers.RMSNorm`` computes it (see
    ``llmarch_rms_norm`` in kernels.c): ``scale`` (dim,) for every row, (rows, dim) one per row,
    or None (weightless); ``scale_f32``: multiply in float32 and round once, else round the
    normalised row to x's dtype first. ``rope``: then (cos, sin), each (dim,) in x's dtype, as
    ``llmarch.model.layers.apply_rope`` applies them (halves layout); ``normalize=False``: RoPE
    alone. A new (rows, dim) tensor of x's dtype; None where the kernel does not apply."""
    lib = library()
    if lib is None:
        return None
    xd = _activations(x, x.shape[-1]) if x.dim() == 2 else None
    if xd is None:
        return None
    rows, dim = x.shape
    sd, ld_scale = 0, 0
    if scale is not None:
        sd = _DTYPES.get(scale.dtype)
        if sd is None or scale.stride(-1) != 1 or scale.shape[-1] != dim:
            return None
        if scale.dim() == 2:
            if scale.shape[0] != rows:
                return None
            ld_scale = scale.stride(0)
        elif scale.dim() != 1:
            return None
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        if (cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape != (dim,) or sin.shape != (dim,)
                or cos.stride(0) != 1 or sin.stride(0) != 1 or dim % 2 or dim > 8192):
            return None
    out = torch.empty(rows, dim, dtype=x.dtype)
    lib.llmarch_rms_norm(x.data_ptr(), xd, x.stride(0), rows, dim, int(normalize),
                         None if scale is None else scale.data_ptr(), sd, ld_scale, int(scale_f32), eps,
                         None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                         out.data_ptr(), xd, dim)
    return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor | None:
    """Attention of one query per sequence (decoding): q (B, H, 1, D), k and v (B, KV, S, D)
    with H a multiple of KV, ``mask`` None or additive (B, 1, 1, S); softmax(q k^T * scale +
    mask) v in float32, (B, H, 1, D) in q's dtype (see ``llmarch_attend_one`` in kernels.c).
    None where the kernel does not apply."""
    lib = library()
    if lib is None:
        return None
    b, h, t, d = q.shape
    qd, kd = _DTYPES.get(q.dtype), _DTYPES.get(k.dtype)
    if (t != 1 or qd is None or kd is None or v.dtype != k.dtype or q.device.type != "cpu" or k.dim() != 4
            or k.shape[0] != b or k.shape[3] != d or v.shape != k.shape or h % k.shape[1]
            or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1):
        return None
    kv, s = k.shape[1], k.shape[2]
    if s < 1:
        return None
    msb, md = 0, 0
    if mask is not None:
        md = _DTYPES.get(mask.dtype)
        if md is None or mask.shape != (b, 1, 1, s) or mask.stride(3) != 1:
            return None
        msb = mask.stride(0)
    out = torch.empty(b, h, 1, d, dtype=q.dtype)
    rc = lib.llmarch_attend_one(q.data_ptr(), qd, q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), kd,
                                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                None if mask is None else mask.data_ptr(), md, msb, b, h, kv, s, d, scale, out.data_ptr())
    if rc != 0:
        raise MemoryError("llmarch_attend_one: could not allocate the scores")
    return out
