"""Per-layer embedding (PLE) offloading: keep Gemma 3n's biggest table off the accelerator.

The per-layer embedding table (E2B: 262144 x 30*256, 2.0B parameters, about 40% of the text
model) is only ever *indexed* by token id, so it does not need to sit next to the compute.
:func:`offload_ple` replaces it by an :class:`OffloadedTable` that holds the table in CPU
memory or memory-maps it from a file on disk, gathers the rows of the current tokens there
and moves just those rows to the model's device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class OffloadedTable(nn.Module):
    """An embedding table that is not a parameter: rows are gathered where the table lives
    (CPU RAM or a memory-mapped file) and only they are moved to the ids' device."""

    def __init__(self, weight: torch.Tensor, path: Path | None = None):
        super().__init__()
        self.weight = weight  # a plain tensor: .to(device) and state_dict leave it where it is
        self.path = path

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # still part of the checkpoint: save_pretrained writes it straight from CPU / disk
        destination[prefix + "weight"] = self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.weight.device), self.weight).to(ids.device)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def _write_table(weight: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    weight.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(tmp)
    os.replace(tmp, path)


def map_table(path: str | os.PathLike, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Memory-map a table written by :func:`offload_ple`: pages are read from disk on first use."""
    p = Path(path)
    numel = shape[0] * shape[1]
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if not p.exists() or p.stat().st_size != expected:
        have = p.stat().st_size if p.exists() else "no file"
        raise ConfigError(f"{p} does not hold a {shape[0]}x{shape[1]} {dtype} table ({expected} bytes; found {have})")
    # shared=False: a private, copy-on-write mapping; the file is never modified
    return torch.from_file(str(p), shared=False, size=numel, dtype=dtype).view(shape)


def offload_ple(model: nn.Module, path: str | os.PathLike | None = None) -> OffloadedTable:
    """Move the model's per-layer embedding table off the model's device.

    ``path=None`` keeps the table in CPU memory; with a path the table is written there (raw,
    row-major, in its dtype) and memory-mapped, so only the rows of tokens actually seen are
    resident. The rest of the model can then be moved anywhere with ``model.to(device)``.
    Returns the new table module (``model.ple.table``).
    """
    ple = getattr(model, "ple", None)
    if ple is None or not hasattr(ple, "table"):
        raise ConfigError("this model has no per-layer embedding table (hidden_size_per_layer_input is not set)")
    table = ple.table
    if isinstance(table, OffloadedTable):
        return table
    weight = table.weight.detach()
    if weight.is_meta:
        raise ConfigError("the per-layer embedding table has no data yet (model built on the meta device); load weights first")
    if path is None:
        offloaded = OffloadedTable(weight.cpu())
    else:
        p = Path(path)
        _write_table(weight, p)
        offloaded = OffloadedTable(map_table(p, tuple(weight.shape), weight.dtype), p)
    ple.table = offloaded
    return offloaded


__all__ = ["OffloadedTable", "offload_ple", "map_table"]
