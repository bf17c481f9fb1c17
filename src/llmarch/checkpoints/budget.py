"""Budgets from the file, checked before anything is built.

A checkpoint's configuration (``config.json``, or a GGUF file's metadata) says how big the model
is; its tensor headers say what the file really holds. :func:`check_budget` compares the two
before :func:`llmarch.model.decoder.build_model` runs, so that a file claiming a million layers
is refused in milliseconds instead of building a module tree until memory runs out, and
refuses a model whose weights will not fit in the memory available, with both figures.

Only headers are read: GGUF tensor infos, safetensors headers. No tensor data is touched.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..model.config import ModelConfig
from .gguf import GGUFFile
from .safetensors import DTYPE_BYTES, read_header, safetensors_files

__all__ = ["FileTensors", "available_memory", "check_budget", "file_tensors", "min_parameters"]

# the layer index in a tensor name: HF "model.layers.3.", GPT-2 "h.3.", llama.cpp "blk.3."
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blk)\.(\d+)\.")


@dataclass(frozen=True)
class FileTensors:
    """What a checkpoint file holds, from its headers: tensor count, values, bytes once loaded, layers."""

    count: int
    values: int
    loaded_bytes: int
    layers: int  # 1 + the highest layer index in a tensor name; 0 when no name has one


def file_tensors(ck: Any, dtype: torch.dtype | None = None) -> FileTensors:
    """The tensors of an opened checkpoint (a GGUF file or an HF directory), from headers only.

    ``loaded_bytes`` counts each floating tensor at ``dtype``'s size, or as stored when ``dtype``
    is None (GGUF tensors are dequantised to float32).
    """
    if isinstance(ck, GGUFFile):
        infos = [(name, math.prod(ck.tensor_shape(name)), 4) for name in ck.gguf_tensor_names()]
    else:
        infos = [(name, math.prod(e["shape"]), DTYPE_BYTES[e["dtype"]])
                 for f in safetensors_files(ck.path) for name, e in read_header(f).items()]
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    layers = [int(m.group(1)) for name, _, _ in infos if (m := _LAYER.search(name))]
    return FileTensors(
        count=len(infos),
        values=sum(n for _, n, _ in infos),
        loaded_bytes=sum(n * (size or stored) for _, n, stored in infos),
        layers=max(layers) + 1 if layers else 0,
    )


def min_parameters(cfg: ModelConfig) -> int:
    """A lower bound on the parameter count ``cfg`` describes, computed without building anything.

    Counted: the embedding, each layer's query and output projections, and the two (MLP) or
    three (GLU) projections of each dense FFN or routed expert. Biases, norms, keys and values
    are left out, so any real checkpoint of ``cfg`` holds at least this many values.
    """
    h = cfg.hidden_size
    if cfg.attention_kind == "mla" and cfg.mla is not None:
        attn = cfg.num_heads * cfg.mla.v_head_dim * h
    else:
        attn = 2 * h * cfg.num_heads * cfg.head_dim
    mats = 2 if cfg.ffn_kind == "mlp" else 3
    ffn = 0
    for i in range(cfg.num_layers):
        if cfg.layer_is_moe(i):
            ffn += cfg.moe.num_experts * mats * h * cfg.moe.expert_size
        else:
            ffn += mats * h * cfg.layer_intermediate_size(i)
    return cfg.vocab_size * h + cfg.num_layers * attn + ffn


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_budget(ck: Any, cfg: ModelConfig, dtype: torch.dtype | None = None, device: Any = None) -> FileTensors:
    """Refuse, before building the model, a checkpoint whose configuration its tensors cannot fill
    or whose weights do not fit in memory.

    ``ck`` is an opened checkpoint (:func:`llmarch.checkpoints.formats.open_checkpoint`), ``cfg``
    its configuration; ``dtype`` and ``device`` are those :func:`from_pretrained` loads to (the
    memory check applies when the weights land in host memory).
    """
    held = file_tensors(ck, dtype)
    where = getattr(ck, "path", ck)
    if held.layers and cfg.num_layers > held.layers:
        raise CheckpointError(
            f"{where}: the configuration has num_layers = {cfg.num_layers}, but the file's tensors cover only "
            f"{held.layers} layer(s); the configuration (config.json or GGUF metadata) does not match the weights"
        )
    need = min_parameters(cfg)
    if need > held.values:
        raise CheckpointError(
            f"{where}: the configuration describes at least {need:,} parameters (num_layers = {cfg.num_layers}, "
            f"hidden_size = {cfg.hidden_size}, vocab_size = {cfg.vocab_size}), but the file's {held.count} tensors "
            f"hold only {held.values:,} values; the configuration does not match the weights"
        )
    on_host = device is None or torch.device(device).type == "cpu"
    free = available_memory() if on_host else None
    if free is not None and held.loaded_bytes > free:
        shown = "as stored" if dtype is None else f"as {str(dtype).replace('torch.', '')}"
        raise CheckpointError(
            f"{where}: loading needs about {_gb(held.loaded_bytes)} of memory ({held.values:,} values {shown}), "
            f"but only {_gb(free)} is available; free memory, or load in a smaller dtype (e.g. bfloat16)"
        )
    return held
