"""Hugging Face checkpoint files: ``config.json`` and (sharded) safetensors, checked before reading."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path} has no config.json (expected a Hugging Face checkpoint directory or a .gguf file)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
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


def _check_safetensors_file(f: Path) -> None:
    """Catch truncated files before reading: the header must fit and its data must fit."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{f} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(f"{f} is truncated: header says {n} bytes of metadata, the file has {size} bytes")
            header = json.loads(fh.read(n))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is corrupt: its safetensors header is not valid JSON ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{f} is truncated: its tensors need {8 + n + end} bytes, the file has {size} bytes"
        )


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        _check_safetensors_file(f)
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {f}: {e}") from None
