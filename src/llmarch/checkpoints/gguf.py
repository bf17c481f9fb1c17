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

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["SUPPORTED_TENSOR_TYPES", "GGUFFile", "dequantize", "is_gguf_file", "round_f32"]

GGUF_MAGIC = b"GGUF"

#: Tensor types we dequantise (all through ``gguf.quants``); tested ones first.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


def _reader_class():
    """``gguf.GGUFReader`` with a fast path for metadata arrays.

    Stock ``GGUFReader`` builds two numpy views per element of every metadata
    array, which takes ~10 s for Gemma's 262k-token vocabulary.  This subclass
    parses arrays of strings with ``struct`` into memoryview slices and keeps
    numeric arrays as one numpy view, which ``ReaderField.contents()`` reads the
    same way.  Anything unusual (big-endian files, nested arrays) goes through
    the stock code.
    """
    import struct

    from gguf import GGUFReader, GGUFValueType

    class _FastReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(int(raw_itype[0]))
            count = int(alen[0])
            offs = orig_offs + 12
            parts: list[Any] = [raw_itype, alen]
            if itype == GGUFValueType.STRING:
                view = getattr(self, "_llmarch_view", None)
                if view is None:
                    view = self._llmarch_view = memoryview(self.data)
                data: list[int] = []
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    (n,) = unpack(view, offs)
                    parts.append(view[offs:offs + 8])
                    parts.append(view[offs + 8:offs + 8 + n])
                    data.append(len(parts) - 1)
                    offs += 8 + n
                if offs > len(view):
                    raise ValueError("string array extends past the end of the file")
                return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError("array extends past the end of the file")
            parts.append(values)
            return 12 + int(values.nbytes), parts, [2], [GGUFValueType.ARRAY, itype]

    return _FastReader


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
            reader_class = _reader_class()
        except ImportError:
            raise CheckpointError(f"reading {self.path} needs the gguf package: pip install gguf") from None
        try:
            self._reader = reader_class(self.path, "r")
            size = self.path.stat().st_size
            for t in self._reader.tensors:
                if t.data_offset + int(t.n_bytes) > size:
                    raise ValueError(f"tensor {t.name!r} extends past the end of the file")
        except Exception as exc:  # GGUFReader raises assorted errors on damaged files
            raise CheckpointError(
                f"truncated or corrupt GGUF file {self.path}: {type(exc).__name__}: {exc}"
            ) from exc

        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise CheckpointError(
                    f"truncated or corrupt GGUF file {self.path}: cannot read metadata {key!r}: {exc}"
                ) from exc

        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise CheckpointError(f"GGUF file {self.path} has no general.architecture metadata")
        self.architecture: str = str(arch)

    # ------------------------------------------------------------------ metadata
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
        return tuple(int(d) for d in reversed(self._tensors[gguf_name].shape.tolist()))

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
