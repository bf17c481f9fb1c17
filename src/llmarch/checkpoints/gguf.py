"""Read GGUF files: validation, metadata, tensor listing, raw data and dequantisation.

A GGUF file (llama.cpp's format) holds metadata under llama.cpp key names
(``general.architecture``, ``{architecture}.block_count``, ``tokenizer.ggml.tokens``...) and
tensors under llama.cpp tensor names (``blk.0.attn_q.weight``), possibly block-quantised.
:class:`GGUFFile` reads all of that and knows nothing about any architecture: which
``general.architecture`` names llmarch reads, how their metadata becomes a ``config.json``
and how their tensors become llmarch's is each family's business (``families/``), and
:mod:`llmarch.checkpoints.formats` puts the two together.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["GGML_BLOCK_SIZES", "SUPPORTED_TENSOR_TYPES", "GGMLType", "GGUFFile", "GGUFMetadata", "GGUFTensor", "dequantize",
           "is_gguf_file", "round_f32"]

GGUF_MAGIC = b"GGUF"

#: Tensor types we dequantise (all through ``gguf.quants``); tested ones first.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


#: ggml tensor types: id -> (name, elements per block, bytes per block), as in ggml.h
_GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
#: The ggml tensor type of a tensor; an ``IntEnum`` equal to ``gguf.GGMLQuantizationType`` (without importing gguf).
GGMLType = IntEnum("GGMLType", {name: i for i, (name, _, _) in _GGML_TYPES.items()})
#: type -> (elements per block, bytes per block): ``gguf.GGML_QUANT_SIZES`` without importing gguf
#: (its import, about 0.1 s, is left to the loads that dequantise with it)
GGML_BLOCK_SIZES = {GGMLType(i): (block, size) for i, (_, block, size) in _GGML_TYPES.items()}
#: Types whose data is read as a typed array (the rest as uint8 blocks), as ``gguf.GGUFReader`` does.
_PLAIN_DTYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}

# GGUF metadata value types
_UINT32, _STRING, _ARRAY, _UINT64 = 4, 8, 9, 10
#: scalar value type -> struct / numpy format character
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", _UINT32: "I", 5: "i", 6: "f", 7: "?", _UINT64: "Q", 11: "q", 12: "d"}
_ALIGNMENT = 32


class _Lazy(NamedTuple):
    """A metadata array not decoded yet: its element type, element count and first element's offset."""

    item_type: int
    count: int
    offset: int


class _Parser:
    """Reads GGUF values from a memory map with bounds checks; arrays are skipped, not decoded."""

    def __init__(self, buf: mmap.mmap, endian: str):
        self.buf, self.endian = buf, endian
        self.size = len(buf)
        self._formats: dict[str, struct.Struct] = {}

    def unpack(self, fmt: str, offset: int) -> Any:
        s = self._formats.get(fmt)
        if s is None:
            s = self._formats[fmt] = struct.Struct(self.endian + fmt)
        return s.unpack_from(self.buf, offset)[0]

    def string(self, offset: int) -> tuple[str, int]:
        n = self.unpack("Q", offset)
        end = offset + 8 + n
        if end > self.size:
            raise ValueError(f"string at offset {offset} extends past the end of the file")
        return str(self.buf[offset + 8:end], "utf-8"), end

    def value(self, vtype: int, offset: int) -> tuple[Any, int]:
        """A scalar or string value, or a :class:`_Lazy` array; and the offset after it."""
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            return self.unpack(fmt, offset), offset + struct.calcsize(fmt)
        if vtype == _STRING:
            return self.string(offset)
        if vtype == _ARRAY:
            item_type, count = self.unpack("I", offset), self.unpack("Q", offset + 4)
            return _Lazy(item_type, count, offset + 12), self.skip_array(item_type, count, offset + 12)
        raise ValueError(f"unknown metadata value type {vtype} at offset {offset}")

    def skip_array(self, item_type: int, count: int, offset: int) -> int:
        """The offset after ``count`` elements of ``item_type`` starting at ``offset``."""
        fmt = _SCALARS.get(item_type)
        min_size = struct.calcsize(fmt) if fmt is not None else 8
        if offset + count * min_size > self.size:
            raise ValueError(f"array of {count} elements at offset {offset} extends past the end of the file")
        if fmt is not None:
            return offset + count * min_size
        if item_type == _STRING:
            unpack = struct.Struct(self.endian + "Q").unpack_from
            buf = self.buf
            for _ in range(count):
                offset += 8 + unpack(buf, offset)[0]
            if offset > self.size:
                raise ValueError("string array extends past the end of the file")
            return offset
        for _ in range(count):
            offset = self.value(item_type, offset)[1]
        return offset

    def decode(self, lazy: _Lazy) -> list[Any]:
        """The elements of an array, as ``gguf.GGUFReader``'s ``contents()`` gives them."""
        fmt = _SCALARS.get(lazy.item_type)
        if fmt is not None:
            return np.frombuffer(self.buf, np.dtype(self.endian + fmt), lazy.count, lazy.offset).tolist()
        out, offset = [], lazy.offset
        for _ in range(lazy.count):
            item, offset = self.value(lazy.item_type, offset)
            out.append(self.decode(item) if isinstance(item, _Lazy) else item)
        return out


class GGUFMetadata(Mapping[str, Any]):
    """A GGUF file's metadata, key -> value; arrays (the vocabulary...) are decoded on first access."""

    def __init__(self, parser: _Parser, values: dict[str, Any], path: Path):
        self._parser, self._values, self._path = parser, values, path
        #: how many arrays have been decoded so far
        self.decoded_arrays = 0

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, _Lazy):
            try:
                value = self._parser.decode(value)
            except (ValueError, struct.error) as exc:
                raise CheckpointError(
                    f"truncated or corrupt GGUF file {self._path}: cannot read metadata {key!r}: {exc}"
                ) from exc
            self._values[key] = value
            self.decoded_arrays += 1
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def array_length(self, key: str) -> int | None:
        """Number of elements of the array ``key`` (without decoding it), or None when absent or not an array."""
        value = self._values.get(key)
        if isinstance(value, _Lazy):
            return value.count
        return len(value) if isinstance(value, list) else None


class GGUFTensor(NamedTuple):
    """One tensor's entry in a GGUF file (the fields of ``gguf.ReaderTensor`` that llmarch reads)."""

    name: str
    tensor_type: GGMLType
    #: ggml's ``ne``: the fastest-varying dimension first
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    buffer: mmap.mmap
    endian: str

    @property
    def data(self) -> np.ndarray:
        """The raw data, a read-only view of the file: a typed array for plain types, uint8 blocks otherwise."""
        np_shape = tuple(reversed(self.shape))
        plain = _PLAIN_DTYPES.get(self.tensor_type.name)
        if plain is not None:
            return np.frombuffer(self.buffer, np.dtype(self.endian + plain), self.n_elements, self.data_offset).reshape(np_shape)
        _, block, type_size = _GGML_TYPES[self.tensor_type]
        byte_shape = (*np_shape[:-1], np_shape[-1] // block * type_size)
        return np.frombuffer(self.buffer, np.uint8, self.n_bytes, self.data_offset).reshape(byte_shape)


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _type_name(qtype: Any) -> str:
    return getattr(qtype, "name", str(qtype))


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...], *,
               name: str = "<tensor>", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise raw GGUF tensor data to a torch tensor.

    ``shape`` is the tensor's shape in *numpy/torch order*, i.e. ggml's ``ne``
    reversed (ggml lists the fastest-varying dimension first).
    """
    kind = _GGML_TYPES.get(int(qtype), ("",))[0]
    if kind in ("F32", "F16", "F64", "BF16"):  # plain floats: no need to import gguf (about 0.1 s of a start)
        raw = np.asarray(data)
        if kind == "BF16":
            array = (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.astype(np.float32, copy=False)
        return _as_tensor(array, shape, dtype)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _gguf_dequantize

    try:
        qtype = GGMLQuantizationType(int(qtype))
    except ValueError as exc:
        raise CheckpointError(f"tensor {name!r} has unknown GGML type id {qtype}") from exc
    try:
        array = _gguf_dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"tensor {name!r} has unsupported type {qtype.name} "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
        ) from exc
    return _as_tensor(array, shape, dtype)


def _as_tensor(array: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # F32 data is a view of the read-only memory map
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor if dtype == torch.float32 else tensor.to(dtype)


def round_f32(value: float) -> float:
    """A float32 metadata value as the short decimal a config.json would hold (1e-06, not 9.99e-07)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


class GGUFFile:
    """A validated GGUF file: its metadata (parsed once, here) and its tensors by GGUF name.

    >>> f = GGUFFile("gemma-3-270m-q4_k_m.gguf")
    >>> f.architecture, f.value("block_count")
    ('gemma3', 18)
    >>> f.load("output_norm.weight").shape
    torch.Size([640])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        if not self.path.is_file():
            raise CheckpointError(f"not a GGUF file (not a regular file): {self.path}")
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r}): {self.path}"
            )
        try:
            self._parser = self._open()
            self._tensors, self._spans, values = self._read_header()
        except (ValueError, OverflowError, struct.error) as exc:
            raise CheckpointError(
                f"truncated or corrupt GGUF file {self.path}: {type(exc).__name__}: {exc}"
            ) from exc
        self.metadata = GGUFMetadata(self._parser, values, self.path)

        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise CheckpointError(f"GGUF file {self.path} has no general.architecture metadata")
        self.architecture: str = str(arch)

    def _open(self) -> _Parser:
        with open(self.path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        version = struct.unpack_from("<I", buf, 4)[0]
        endian = "<"
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        return _Parser(buf, endian)

    def _read_header(self) -> tuple[dict[str, GGUFTensor], dict[str, tuple[int, int]], dict[str, Any]]:
        """Tensor infos, each metadata entry's byte span, and the metadata (arrays left undecoded)."""
        p = self._parser
        n_tensors, n_kv = p.unpack("Q", 8), p.unpack("Q", 16)
        offset = 24
        values: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = offset
            key, offset = p.string(offset)
            if key in values:
                raise ValueError(f"duplicate metadata key {key!r}")
            values[key], offset = p.value(p.unpack("I", offset), offset + 4)
            spans[key] = (start, offset)
        infos = []
        for _ in range(n_tensors):
            name, offset = p.string(offset)
            n_dims = p.unpack("I", offset)
            if n_dims > 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most 4)")
            shape = tuple(p.unpack("Q", offset + 4 + 8 * i) for i in range(n_dims))
            offset += 4 + 8 * n_dims
            infos.append((name, shape, p.unpack("I", offset), p.unpack("Q", offset + 4)))
            offset += 12
        alignment = values.get("general.alignment", _ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-offset // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, rel_offset in infos:
            if name in tensors:
                raise ValueError(f"duplicate tensor {name!r}")
            if type_id not in _GGML_TYPES:
                raise ValueError(f"tensor {name!r} has unknown GGML type id {type_id}")
            _, block, type_size = _GGML_TYPES[type_id]
            n_elements = math.prod(shape)
            if shape and shape[0] % block:
                raise ValueError(f"tensor {name!r}: rows of {shape[0]} elements are not whole blocks of {block}")
            n_bytes = n_elements // block * type_size
            data_offset = data_start + rel_offset
            if data_offset + n_bytes > p.size:
                raise ValueError(f"tensor {name!r} extends past the end of the file")
            tensors[name] = GGUFTensor(name, GGMLType(type_id), shape, n_elements, n_bytes, data_offset,
                                       p.buf, p.endian)
        return tensors, spans, values

    # ------------------------------------------------------------------ metadata
    def release_pages(self) -> None:
        """Drop this process's resident pages of the file's mapping (``madvise(MADV_DONTNEED)``).

        The map is read-only and shared, so nothing is lost: a later read faults the page back
        in from the page cache. Called once a model is loaded, it keeps the bytes that loading
        read and converted (4-bit blocks repacked for torch's kernels, the vocabulary) from
        counting in the process's memory for as long as the model lives. A no-op where the
        platform has no ``madvise``."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None and hasattr(self._parser.buf, "madvise"):
            try:
                self._parser.buf.madvise(advice)
            except (OSError, ValueError):  # a closed or unusual mapping: only the accounting is at stake
                pass

    def metadata_digest(self, prefix: str) -> str:
        """SHA-256 of the raw bytes of the metadata entries whose key starts with ``prefix``, in file order.

        Cheap (no value is decoded): a cache key for what those entries determine, e.g. the tokenizer.
        """
        digest = hashlib.sha256()
        for key, (start, end) in self._spans.items():
            if key.startswith(prefix):
                digest.update(self._parser.buf[start:end])
        return digest.hexdigest()

    def value(self, key: str, default: Any = None) -> Any:
        """The architecture's own metadata ``{architecture}.{key}``, or ``default``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.value(key)
        if value is None:
            raise CheckpointError(f"GGUF file {self.path} lacks required metadata {self.architecture}.{key}")
        return value

    def float_value(self, key: str, default: float | None = None) -> float | None:
        """A float metadata value rounded as a config.json writes it; ``default`` when absent or 0."""
        value = self.value(key)
        return round_f32(value) if value else default

    def token_id(self, kind: str) -> int | None:
        """``tokenizer.ggml.{kind}_token_id`` (``bos``, ``eos``, ``padding``...) or None."""
        value = self.metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return int(value) if value is not None else None

    # ------------------------------------------------------------------- tensors
    @property
    def num_tensors(self) -> int:
        """Number of tensors in the file."""
        return len(self._tensors)

    def gguf_tensor_names(self) -> list[str]:
        """GGUF names of the file's tensors, in file order."""
        return list(self._tensors)

    def has_tensor(self, gguf_name: str) -> bool:
        return gguf_name in self._tensors

    def tensor_shape(self, gguf_name: str) -> tuple[int, ...]:
        """Shape in torch order (ggml's ``ne`` reversed)."""
        return tuple(reversed(self._tensors[gguf_name].shape))

    def tensor_type(self, gguf_name: str) -> str:
        """GGML type name (``Q4_K``, ``F32``, ...)."""
        return _type_name(self._tensors[gguf_name].tensor_type)

    def load(self, gguf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, dequantised, in the file's layout."""
        t = self._tensors[gguf_name]
        return dequantize(t.data, t.tensor_type, self.tensor_shape(gguf_name), name=gguf_name, dtype=dtype)

    def raw(self, gguf_name: str) -> tuple[np.ndarray, int]:
        """One tensor's bytes as stored, (rows, bytes per row) uint8, and its GGML type id. Read
        from the file into memory of their own (not the memory map, whose pages would stay resident)."""
        t = self._tensors[gguf_name]
        with open(self.path, "rb") as fh:
            data = np.fromfile(fh, np.uint8, int(t.n_bytes), offset=int(t.data_offset))
        return data.reshape(int(np.prod(t.shape[1:], dtype=np.int64)), -1), int(t.tensor_type)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """``(gguf_name, tensor)`` for every tensor, dequantised, in file order."""
        for name in self._tensors:
            yield name, self.load(name, dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, architecture={self.architecture!r}, "
                f"tensors={self.num_tensors})")
