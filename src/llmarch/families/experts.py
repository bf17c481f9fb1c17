"""Checkpoint surgery shared by the MoE families: per-expert tensors <-> stacked experts.

The released DeepSeek-V3, Kimi K2 and Qwen3-MoE checkpoints (and transformers'
``save_pretrained``) store one tensor per expert, ``...mlp.experts.{j}.gate_proj.weight``;
llmarch stacks them into ``experts.gate_up_proj`` (E, 2 * width, hidden) and
``experts.down_proj`` (E, hidden, width), which is also transformers' in-memory layout, so a
checkpoint already written that way loads by plain renaming.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch

from ..errors import CheckpointError
from .base import KeyMap

PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<j>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")

Stream = Iterator[tuple[str, torch.Tensor]]


def stack_experts(tensors: Stream, num_experts: int) -> Stream:
    """Collect each layer's per-expert tensors and yield the two stacked tensors instead."""
    pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for name, t in tensors:
        m = PER_EXPERT.match(name)
        if m is None:
            yield name, t
            continue
        prefix, j, proj = m["prefix"], int(m["j"]), m["proj"]
        if j >= num_experts:
            raise CheckpointError(f"{name}: expert {j} does not exist, the configuration has {num_experts} experts")
        pieces = pending.setdefault(prefix, {})
        pieces[(proj, j)] = t
        if len(pieces) == 3 * num_experts:
            del pending[prefix]
            gate, up, down = ([pieces[(p, e)] for e in range(num_experts)] for p in ("gate", "up", "down"))
            yield f"{prefix}.gate_up_proj", torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            yield f"{prefix}.down_proj", torch.stack(down)
    for prefix, pieces in pending.items():
        raise CheckpointError(f"{prefix}: only {len(pieces)} of the {3 * num_experts} per-expert tensors are in the checkpoint")


def unstack_experts(state: dict[str, torch.Tensor], keys: KeyMap) -> dict[str, torch.Tensor]:
    """Native state dict -> HF names, stacked experts written one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".experts") and leaf in ("gate_up_proj", "down_proj"):
            prefix = keys.to_hf(stem + ".")
            if leaf == "down_proj":
                parts = {"down": t}
            else:
                gate, up = t.chunk(2, dim=1)
                parts = {"gate": gate, "up": up}
            for proj, stacked in parts.items():
                for j in range(stacked.shape[0]):
                    out[f"{prefix}{j}.{proj}_proj.weight"] = stacked[j].clone()  # safetensors refuses shared storage
            continue
        hf = keys.to_hf(name)
        if hf is None:
            raise CheckpointError(f"llmarch parameter {name!r} has no checkpoint name")
        out[hf] = t
    return out


def skip_layers_from(tensors: Stream, num_layers: int, what: str) -> Stream:
    """Drop ``model.layers.{i}.*`` with i >= num_layers (DeepSeek's multi-token-prediction layer), with a warning."""
    skipped: set[int] = set()
    for name, t in tensors:
        m = LAYER.match(name)
        if m and int(m.group(1)) >= num_layers:
            skipped.add(int(m.group(1)))
            continue
        yield name, t
    if skipped:
        warnings.warn(f"skipped checkpoint layer(s) {sorted(skipped)}: {what}, not part of the {num_layers}-layer main model")
