"""GGUF quantised tensors straight into the kernel layouts of :mod:`llmarch.inference.quant`.

The functions take a tensor's raw GGUF bytes (the uint8 array ``gguf.GGUFReader`` gives,
(rows, bytes per row)) and its torch shape (out, in):

* Q4_0, Q4_1 and Q4_K are 4-bit codes with an affine (scale, offset) per 32 weights, which is
  the int4 kernel's own format: the codes are copied, the scales and zeros computed from the
  block headers, no float weights are ever formed. The only loss is rounding the scales and
  zeros to the kernel's bfloat16.
* Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 (5, 6 or 8 bits, any type ``gguf.quants`` can dequantise)
  have more levels than int4 holds: a linear layer's matrix becomes int8 with a float16 scale per
  32 weights of a row, the blocks' own layout (:func:`int8_weights`): Q8_0 and Q5_0 keep their
  codes and block scales exactly, the other types are dequantised a few thousand rows at a time
  and requantised per 32 weights (error at most half a group's step, max |w| / 254). The token
  table keeps one bfloat16 scale a row (error at most max |w| of the row / 254): the tied head
  is a decoding step's largest product, and its table's precision did not show in perplexity.
  (One scale a row for every matrix, as before, cost Gemma 3 270M 1.2% perplexity.)

Loading a GGUF file with a ``quant`` choice (:func:`resolve_quant`, then
:func:`assign_quantized` on the matrices the loader kept as
:class:`~llmarch.checkpoints.quantized.QuantizedTensor`):

* ``auto``: each quantised matrix in the layout above (as the file is); float tensors stay float;
* ``compact``: as ``auto``, but Q5_0 matrices keep the file's 5-bit codes (:class:`~llmarch.inference.quant.Q5Linear`,
  5.5 bits a weight where int8 takes 8.5; where the native kernels are built): smaller, decoding
  slower on CPUs where unpacking the codes costs more than reading the bytes it saves;
* ``none``: everything dequantised to float;
* ``int8``: every quantised matrix to int8 (the 4-bit types too, in the layout above); float
  matrices quantised too, one scale a row;
* ``int4``: only from 4-bit types (copied exactly, so the group size is their 32): a file with
  wider types is refused, since rounding 5-8-bit codes to 4 bits stacks a second error on the
  file's (quantise the float checkpoint instead); float matrices are quantised at any group size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..checkpoints.cache import DerivedTensors
from ..checkpoints.formats import GGUFCheckpoint, HFDirectory
from ..checkpoints.gguf import GGML_BLOCK_SIZES as GGML_QUANT_SIZES
from ..checkpoints.gguf import GGMLType as GGMLQuantizationType
from ..checkpoints.quantized import FLOAT_TYPES, QuantizedTensor
from ..errors import CheckpointError, ConfigError
from ..model.decoder import build_model
from . import native
from .quant import (
    KERNEL_DTYPE,
    ROW_BLOCK,
    MODES,
    QUANT_CHOICES,
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    QuantHead,
    QuantLinear,
    check_mode,
    check_quantizable,
    int8_quantize,
    int8_quantize_groups,
    Q5Linear,
    q5_0_codes,
    q5_0_dequantize,
)

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # exact in the int4 kernel's format, group size 32
GROUP = 32
REQUANT_ELEMENTS = 1 << 22  # weights dequantised at once when requantising to int8 (bounds the float copy)


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    """The bytes as (out, blocks per row, bytes per block)."""
    block, size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // block, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 stored in the last axis (2 bytes) -> float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., m) bytes -> (..., 2, m) codes: low nibbles first, then high (the block order of Q4_*)."""
    return np.stack([qs & 15, qs >> 4], axis=-2)


def _q4_k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit sub-block scales and mins (blocks, 12) -> (blocks, 8) each, as
    ``gguf.quants.Q4_K.get_scale_min`` unpacks them (here so that a start does not import gguf:
    bytes 0-3 hold scales 0-3 and the top bits of 4-7, bytes 4-7 the mins likewise, bytes 8-11
    the low nibbles of scales / mins 4-7)."""
    d, m, m_d = np.split(packed.view(np.uint8).reshape(-1, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(-1, 8), mn.reshape(-1, 8)


def int4_codes(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]):
    """Q4_0 / Q4_1 / Q4_K bytes -> (codes uint8 (out, in) in 0..15, scales, zeros float32
    (out, in / 32)) with ``w = (code - 8) * scale + zero`` exactly as ``gguf.quants.dequantize``."""
    n, k = shape
    b = _blocks(data, qtype, shape)
    if qtype == Q.Q4_0:  # w = (q - 8) * d
        scales = _f16(b[..., 0:2])
        zeros = np.zeros_like(scales)
        codes = _nibbles(b[..., 2:])
    elif qtype == Q.Q4_1:  # w = q * d + m
        scales, mins = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        zeros = mins + 8 * scales
        codes = _nibbles(b[..., 4:])
    elif qtype == Q.Q4_K:  # 8 sub-blocks of 32: w = q * d * sc_j - dmin * m_j
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, m = _q4_k_scale_min(b[..., 4:16].reshape(-1, 12))
        scales = d * sc.reshape(n, -1, 8).astype(np.float32)
        zeros = 8 * scales - dmin * m.reshape(n, -1, 8).astype(np.float32)
        codes = _nibbles(b[..., 16:].reshape(n, -1, 4, 32))  # sub-blocks 2c (low), 2c + 1 (high)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit affine format: use int8_weights")
    return codes.reshape(n, k), scales.reshape(n, k // GROUP), zeros.reshape(n, k // GROUP)


def _torch_blocks(rows: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Rows of raw bytes -> torch uint8 (rows * blocks, bytes per block), sharing memory."""
    block, size = GGML_QUANT_SIZES[qtype]
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8)).reshape(-1, size)


def _torch_f16(b: torch.Tensor) -> torch.Tensor:
    """(blocks, 2) little-endian float16 bytes -> float32 (blocks, 1)."""
    return b.contiguous().view(torch.float16).float()


def _dequantize_torch(rows: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor | None:
    """Q8_0 and Q5_0 rows dequantised by torch (vectorised, multi-threaded; the same float32
    values as ``gguf.quants``, each a product exact in float32), flat per row; None for other types."""
    if qtype == Q.Q8_0:  # 34 bytes: float16 d, 32 int8 q; w = d * q
        b = _torch_blocks(rows, qtype)
        return (_torch_f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()).reshape(len(rows), -1)
    if qtype == Q.Q5_0:  # w = d * (q - 16)
        return q5_0_dequantize(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8)).reshape(len(rows), -1))
    return None


def _dequantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Whole rows of a GGUF tensor -> float32 (rows, weights per row)."""
    w = _dequantize_torch(rows, qtype)
    if w is None:
        from gguf.quants import dequantize

        w = torch.from_numpy(dequantize(rows, qtype).reshape(len(rows), -1))
    return w


def _exact_int8_blocks(rows: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q8_0 and Q5_0 rows as their own codes and float16 block scales (w = d * code, code in
    -128..127 / -16..15): (int8 (rows, in), float16 (rows, in / 32)), exactly the file's
    weights; None for other types."""
    if qtype not in (Q.Q8_0, Q.Q5_0):
        return None
    b = _torch_blocks(rows, qtype)
    d = b[:, :2].contiguous().view(torch.float16)  # (blocks, 1)
    if qtype == Q.Q8_0:  # 34 bytes: float16 d, 32 int8 codes
        codes = b[:, 2:].view(torch.int8)
    else:
        codes = q5_0_codes(b).to(torch.int8) - 16
    return codes.reshape(len(rows), -1).contiguous(), d.reshape(len(rows), -1).contiguous()


def int8_weights(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int], grouped: bool = False):
    """Any dequantisable GGUF type -> (int8 (out, in), scales): one bfloat16 scale a row (out,),
    or with ``grouped`` one float16 scale per 32 inputs of a row (out, in / 32), as the file's
    own blocks: Q8_0 and Q5_0 then keep their codes and scales exactly, the other types (Q6_K's
    16-weight sub-blocks, affine types) are requantised per 32 weights (within half a step of a
    group's largest / 127). A matrix whose groups would overflow float16 scales (only a made-up
    file has them) gets one scale a row instead."""
    n, k = shape
    rows = np.ascontiguousarray(data).reshape(n, -1)
    q = torch.empty(n, k, dtype=torch.int8)
    if grouped:
        scales = torch.empty(n, k // GROUP, dtype=torch.float16)
    else:
        scales = torch.empty(n, dtype=KERNEL_DTYPE)
    step = max(1, REQUANT_ELEMENTS // k)
    for start in range(0, n, step):
        chunk = rows[start : start + step]
        exact = _exact_int8_blocks(chunk, qtype) if grouped else None
        if exact is not None:
            q[start : start + len(chunk)], scales[start : start + len(chunk)] = exact
            continue
        w = _dequantize_rows(chunk, qtype)
        if grouped:
            try:
                q[start : start + len(w)], scales[start : start + len(w)] = int8_quantize_groups(w)
                continue
            except ConfigError:  # float16 cannot hold this matrix's scales: one scale a row
                return int8_weights(data, qtype, shape, grouped=False)
        q[start : start + len(w)], scales[start : start + len(w)] = int8_quantize(w)
    return q, scales


def gguf_linear(
    data: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    mode: str = "auto",
    store: tuple[DerivedTensors, str] | None = None,
    grouped: bool = True,
) -> QuantLinear:
    """A GGUF weight as a quantised linear layer: int4 where the format maps (unless ``mode`` is
    ``int8``), int8 otherwise, with one scale per 32 inputs of a row (``grouped``, as the file's
    blocks; where llmarch's native kernels are built, the only int8 kernels that read them for
    few rows) or one a row. ``data``: the raw bytes, or a function that reads them (called only
    when needed). ``store``: a cache and this tensor's name in it, for the int8 requantisation and
    the int4 packing (Qwen2.5-0.5B's twelve Q4_K matrices: 0.3 s to repack at every start)."""
    read = data if callable(data) else lambda: data
    n, k = shape
    if qtype in INT4_TYPES and mode != "int8":
        def pack():
            codes, scales, zeros = int4_codes(read(), qtype, shape)
            layer = Int4Linear.from_codes(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros),
                                          None, GROUP)
            return layer.weight_int4pack, layer.scales_and_zeros

        npad = n + -n % ROW_BLOCK
        # torch's packing differs by CPU capability (rows interleaved by 64 on AVX-512, 32 on AVX2)
        packed, sz = _derived(store, f"{qtype.name} {n}x{k} int4 {torch.backends.cpu.get_cpu_capability()}", pack,
                              lambda p, z: p.dtype == torch.uint8 and tuple(p.shape) == (npad, k // 2)
                              and z.dtype == KERNEL_DTYPE and tuple(z.shape) == (k // GROUP, npad, 2))
        return Int4Linear(packed, sz, GROUP, n, bias)
    # (torch's int8 kernels take one scale a row: where llmarch's native kernels are not built,
    # one a row keeps decoding on them rather than on float32 copies of the weights)
    grouped = grouped and k % GROUP == 0 and native.library() is not None
    if grouped and qtype == Q.Q5_0 and mode == "compact":  # the file's codes and scales, 5.5 bits a weight
        def relay():
            layer = Q5Linear.from_gguf(torch.from_numpy(np.ascontiguousarray(read(), dtype=np.uint8)).reshape(n, -1), k)
            return layer.blocks, layer.scales

        blocks, scales = _derived(store, f"Q5_0 {n}x{k} relaid", relay,
                                  lambda b, s: b.dtype == torch.uint8 and tuple(b.shape) == (n, k // GROUP * native.Q5_0_BLOCK_BYTES)
                                  and s.dtype == torch.float16 and tuple(s.shape) == (n, k // GROUP))
        return Q5Linear(blocks, scales, k, bias)

    def fits(q, scales):  # (a grouped one may have fallen back to one scale a row)
        return q.dtype == torch.int8 and tuple(q.shape) == (n, k) and (
            (scales.dtype == torch.float16 and tuple(scales.shape) == (n, k // GROUP))
            or (scales.dtype == KERNEL_DTYPE and tuple(scales.shape) == (n,)))

    q, scales = _derived(store, f"{qtype.name} {n}x{k} {f'g{GROUP}' if grouped else 'rows'}",
                         lambda: int8_weights(read(), qtype, shape, grouped), fits)
    return Int8Linear(q, scales, bias)


def _derived(store: tuple[DerivedTensors, str] | None, what: str, compute, fits) -> tuple[torch.Tensor, ...]:
    """``compute()``, or the tensors ``store`` (a cache and the GGUF tensor's name) keeps under
    that name and ``what`` (what they are: type, shape, layout), computed and kept on a miss; an
    entry that does not ``fits(*tensors)`` (another layout) is never trusted over the file."""
    if store is None:
        return compute()
    cache, name = store
    got = cache.get(f"{name} {what}", compute)
    return got if fits(*got) else compute()


def gguf_embedding(
    data: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    mode: str = "auto",
    store: tuple[DerivedTensors, str] | None = None,
) -> QuantEmbedding:
    """A GGUF token table (vocab, hidden) as a :class:`QuantEmbedding` (also the tied head), int8
    with one scale a row: the head is a decoding step's largest product (45% of a Gemma 3 270M
    step), and per-32 scales there cost speed and 10 MB for no measurable quality (Gemma 3 270M's
    perplexity with the exact float table: 95.48, with this one 95.58, float32 96.74)."""
    return QuantEmbedding(gguf_linear(data, qtype, shape, None, mode, store, grouped=False), dtype)


def resolve_quant(checkpoint: GGUFCheckpoint | HFDirectory, quant: str, group_size: int = GROUP) -> str:
    """The quantisation a checkpoint loads with (``auto`` resolved: ``auto`` for a GGUF file with
    quantised tensors, else ``none``), or a ConfigError saying why ``quant`` cannot work for it.
    Reads only the file's header, so it runs before the tensors load."""
    if quant not in QUANT_CHOICES:
        raise ConfigError(f"unknown quantisation {quant!r}: expected one of {', '.join(QUANT_CHOICES)}")
    if quant in MODES:
        check_mode(quant, group_size)
    types = set(checkpoint.tensor_types().values()) - FLOAT_TYPES if isinstance(checkpoint, GGUFCheckpoint) else set()
    if quant == "auto":
        return "auto" if types else "none"
    if quant == "compact" and not types:
        where = checkpoint.path.name if isinstance(checkpoint, GGUFCheckpoint) else str(checkpoint.path)
        raise ConfigError(f"--quant compact keeps a GGUF file's quantised matrices in their own codes; {where} has "
                          "none: use --quant auto, int8 or int4")
    if quant == "int4" and types:
        wider = types - {t.name for t in INT4_TYPES}
        if wider:
            raise ConfigError(
                f"--quant int4: {checkpoint.path.name} holds {', '.join(sorted(wider))} tensors, wider than 4 bits; "
                "rounding them to int4 would add a second error to the file's: use --quant auto (as the file is) "
                "or int8, or quantise a float checkpoint to int4"
            )
        if group_size != GROUP:
            raise ConfigError(
                f"--quant int4: the 4-bit GGUF blocks of {checkpoint.path.name} hold one scale per {GROUP} weights; "
                f"group size {group_size} cannot be formed from them: use --group-size {GROUP}"
            )
    if quant in MODES:
        check_quantizable(build_model(checkpoint.config, device="meta"), quant, group_size)
    return quant


@torch.no_grad()
def assign_quantized(
    model: nn.Module, name: str, qt: QuantizedTensor, mode: str = "auto", dtype: torch.dtype = torch.float32,
    store: DerivedTensors | None = None,
) -> None:
    """Put a GGUF matrix the loader kept quantised into ``model`` (being loaded, on the meta
    device), in place, as it arrives (so the file's bytes are held one tensor at a time): a
    linear layer's weight becomes a quantised layer (its bias, if not loaded yet, stays a meta
    buffer the loader fills), the token table a :class:`QuantEmbedding` (and a tied head a
    :class:`QuantHead` on it); a weight read any other way is dequantised to ``dtype``.
    ``mode``: ``auto`` or ``int8`` (see the module's docstring); ``store``: where int8
    requantisations are cached between runs (:meth:`DerivedTensors.for_gguf`). The loader's
    ``quantized`` hook (:func:`llmarch.checkpoints.hf.load_tensors`) with these bound."""
    mod_name, _, attr = name.rpartition(".")
    parent_name, _, child = mod_name.rpartition(".")
    module, parent = model.get_submodule(mod_name), model.get_submodule(parent_name)
    expected = tuple(getattr(module, attr).shape)
    if expected != tuple(qt.shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(qt.shape)}; the configuration expects {expected}")
    args = (lambda: qt.data, qt.qtype, expected)  # read from the file only if needed (not on a cache hit)
    if name == "embed.weight" and type(module) is nn.Embedding:
        model.embed = gguf_embedding(*args, dtype, mode, store and (store, name))
        if getattr(model, "lm_head", False) is None:
            model.lm_head = QuantHead(model.embed)
    elif attr == "weight" and type(module) is nn.Linear and child not in getattr(parent, "reads_weights", ()):
        setattr(parent, child, gguf_linear(*args, module.bias, mode, store and (store, name)))
    else:
        setattr(module, attr, nn.Parameter(qt.dequantize(dtype), requires_grad=False))
