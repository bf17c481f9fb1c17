"""Hugging Face checkpoint files: ``config.json`` and (sharded) safetensors, checked before reading.

Everything here treats the files as untrusted: a JSON file must be UTF-8 and hold an object; a
safetensors header must be UTF-8 JSON whose entries each have a known ``dtype``, a ``shape`` of
non-negative integers and ``data_offsets`` that match the shape, lie inside the file and do not
overlap. Every failure is a :class:`CheckpointError` naming the file (and tensor).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

#: bytes per element of every safetensors dtype
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: a header larger than this is refused before it is read (the format's own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000


def read_json_object(f: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON file that must hold an object, decoded as UTF-8; a CheckpointError otherwise."""
    try:
        d = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {f} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {f} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {f}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} {f} holds a JSON {type(d).__name__}; expected an object ({{...}})")
    return d


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path} has no config.json (expected a Hugging Face checkpoint directory or a .gguf file)")
    return read_json_object(f, "config.json")


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: expected a \"weight_map\" object "
                                  "of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f]
        if outside:
            raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: {', '.join(outside)}")
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no *.safetensors file in {path}")
    return found


def _check_entry(f: Path, name: str, v: Any) -> tuple[int, int]:
    """One header entry's ``(begin, end)`` data offsets, after checking dtype, shape and size agree."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{f} is corrupt: tensor {name!r} {msg}")

    if not isinstance(v, dict):
        raise bad(f"has header entry {v!r}; expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}; expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"has {offsets[1] - offsets[0]} bytes of data; its dtype {dtype} and shape {shape} need {nbytes}")
    return offsets[0], offsets[1]


def read_header(f: Path) -> dict[str, dict[str, Any]]:
    """The validated tensor entries of a safetensors file (``__metadata__`` left out)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{f} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{f} is truncated or corrupt: header says {n} bytes of metadata, "
                                      f"the file has {size} bytes")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f} is corrupt: its safetensors header is not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is corrupt: its safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f} is corrupt: its safetensors header is a JSON {type(header).__name__}, "
                              "expected an object of tensor name -> {dtype, shape, data_offsets}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = sorted((*_check_entry(f, k, v), k) for k, v in tensors.items())
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointError(f"{f} is corrupt: the data of tensors {a!r} and {b!r} overlap")
    need = 8 + n + (spans[-1][1] if spans else 0)
    if need > size:
        raise CheckpointError(f"{f} is truncated: its tensors need {need} bytes, the file has {size} bytes")
    return tensors


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        read_header(f)
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {f}: {e}") from None
