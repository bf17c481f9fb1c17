"""One entry for every checkpoint format: a path becomes an opened checkpoint of its family.

:func:`open_checkpoint` is the one place that tells a Hugging Face directory from a ``.gguf``
file. Either way the result has the ``config.json`` dict (``hf_config``), the
:class:`ModelConfig`, the :class:`Family` that reads it, its ``format`` (``HF`` or ``GGUF``)
and ``raw_tensors()`` (the tensors under the file's own names) for the family's ``sanitize``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..families import config_from_hf, config_json_from_gguf, family_for_model_type
from ..families.base import GGUF, HF, Family, gguf_to_hf_name
from ..model.config import ModelConfig
from .gguf import GGUFFile
from .quantized import FLOAT_TYPES, QuantizedTensor
from .safetensors import iter_safetensors, read_config_json, safetensors_files


class _Opened:
    """What both formats share: the config dict -> ModelConfig -> Family."""

    hf_config: dict[str, Any]

    @cached_property
    def config(self) -> ModelConfig:
        return config_from_hf(self.hf_config)

    @property
    def family(self) -> Family:
        return family_for_model_type(self.hf_config.get("model_type"))


class HFDirectory(_Opened):
    """A Hugging Face checkpoint directory: ``config.json`` + safetensors shards."""

    format = HF

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hf_config = read_config_json(self.path)

    def raw_tensors(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` as stored (safetensors hold no block-quantised tensors: ``quantized`` changes nothing)."""
        return iter_safetensors(safetensors_files(self.path))


class GGUFCheckpoint(GGUFFile, _Opened):
    """A GGUF file read through its family: a ``config.json`` dict and HF-named tensors in HF layout.

    >>> ckpt = GGUFCheckpoint("gemma-3-270m-q4_k_m.gguf")
    >>> ckpt.hf_config["model_type"]
    'gemma3_text'
    >>> dict(ckpt.tensors())["model.norm.weight"].shape
    torch.Size([640])
    """

    format = GGUF

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.hf_config: dict[str, Any] = config_json_from_gguf(self)
        keys = self.family.gguf_keys
        where = f" in {self.path} for architecture {self.architecture!r}"
        names = {g: gguf_to_hf_name(keys, g, where) for g in self.gguf_tensor_names()}
        self._name_map = {g: hf for g, hf in names.items() if hf is not None}

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    def raw_tensors(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """``(gguf_name, tensor)`` as stored, for the family's ``sanitize``: float32 tensors, or
        with ``quantized`` each block-quantised matrix as a :class:`QuantizedTensor` (its blocks
        as stored, never dequantised)."""
        if not quantized:
            yield from GGUFFile.tensors(self)
            return
        for name in self.gguf_tensor_names():
            shape = self.tensor_shape(name)
            if self.tensor_type(name) in FLOAT_TYPES or len(shape) != 2:
                yield name, self.load(name)
            else:
                read = lambda n=name: self.raw(n)[0]  # noqa: E731 -- read when first used
                yield name, QuantizedTensor(read, self._tensors[name].tensor_type, shape, name)

    def tensor_names(self) -> list[str]:
        """HF names of the tensors :meth:`tensors` yields, in file order."""
        return list(self._name_map.values())

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGML type name (``Q4_K``, ``F32``, ...)."""
        return {hf: self.tensor_type(g) for g, hf in self._name_map.items()}

    def _hf_view(self, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype):
        keys = self.family.keys
        for native, t in self.family.to_native(tensors, self.config, GGUF):
            yield keys.to_hf(native), t if dtype == torch.float32 else t.to(dtype)

    def get_tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by HF name, dequantised and in HF layout."""
        for gguf_name, name in self._name_map.items():
            if name == hf_name:
                return next(self._hf_view(iter([(gguf_name, self.load(gguf_name))]), dtype))[1]
        raise KeyError(hf_name)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor, dequantised to ``dtype``, in HF layout.

        ``lm_head.weight`` is only yielded when the file has an ``output.weight``
        (otherwise ``hf_config["tie_word_embeddings"]`` is true).
        """
        return self._hf_view(self.raw_tensors(), dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return dict(self.tensors(dtype))


def open_checkpoint(path: str | os.PathLike) -> HFDirectory | GGUFCheckpoint:
    """A Hugging Face checkpoint directory or a ``.gguf`` file, opened (config read, tensors not yet)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file() and p.suffix == ".gguf":
        return GGUFCheckpoint(p)
    if p.is_dir():
        return HFDirectory(p)
    raise CheckpointError(f"{p} is neither a checkpoint directory nor a .gguf file")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory or ``.gguf`` file, without reading its tensors."""
    return open_checkpoint(path).config
