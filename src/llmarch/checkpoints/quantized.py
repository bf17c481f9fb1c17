"""A GGUF tensor still in its quantised blocks, as the loader streams it when asked to keep them.

Block-quantised GGUF types (``Q4_K``, ``Q8_0``, ...) store each row of a matrix as its own run
of blocks: a row's scales never reach into another row. So the surgery a family's ``sanitize``
does on rows (llama.cpp's Q/K row permutation, undone by indexing the rows) is a reordering of
those runs, and needs no float copy. A :class:`QuantizedTensor` supports just that:
``t[rows]`` with an integer index; anything else is :meth:`QuantizedTensor.dequantize`'s job.
The inference side turns it into a quantised layer (:mod:`llmarch.inference.gguf_quant`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .gguf import GGMLType, dequantize

#: GGML types stored as plain floats (everything else is block-quantised)
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


class QuantizedTensor:
    """A block-quantised tensor: raw bytes (rows, bytes per row), GGML type and torch shape.

    ``data``: the bytes, or a function reading them, called when :attr:`data` is first used (a
    loader that finds what it would make from them in a cache never reads them)."""

    def __init__(self, data: np.ndarray | Callable[[], np.ndarray], qtype, shape: tuple[int, ...],
                 name: str = "<tensor>"):
        self._data = data
        self.qtype = GGMLType(int(qtype))  # equal to gguf's GGMLQuantizationType, without importing gguf
        self.shape = torch.Size(shape)
        self.name = name

    @property
    def data(self) -> np.ndarray:
        if callable(self._data):
            self._data = self._data()
        return self._data

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return False  # the loader must not cast it to the model's dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, tuple(self.shape), name=self.name, dtype=dtype)

    def __getitem__(self, rows: torch.Tensor) -> QuantizedTensor:
        """The rows ``rows`` (a 1-D integer tensor) in that order: the blocks of each row moved whole
        (when the result's :attr:`data` is first used: a cache hit reads neither)."""
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.is_floating_point():
            raise TypeError(f"a QuantizedTensor ({self.name}) can only be indexed by a 1-D integer tensor of rows")
        index = rows.numpy().copy()
        return QuantizedTensor(lambda: self.data[index], self.qtype, tuple(self.shape), self.name)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.name!r}, {self.qtype.name}, shape={tuple(self.shape)})"
