"""Data parallelism under ``torchrun``: the process's rank, the process group, DDP or FSDP2
wrapping, and the all-reduce of logged scalars. Without ``WORLD_SIZE`` (one process) each is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..model.decoder import Decoder


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as ``torchrun`` sets them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU); return this process's device
    (under ``torchrun`` on CUDA: the GPU numbered ``LOCAL_RANK``)."""
    _, world = rank_and_world()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: Decoder, kind: str, world: int, device: torch.device) -> nn.Module:
    """``model`` under DDP (``kind="ddp"``) or FSDP2 sharded layer by layer (``"fsdp"``)."""
    if world == 1:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def mean_across(x: float, world: int) -> float:
    """The mean of ``x`` over all processes."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a float; under FSDP2 it is a DTensor to gather first."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


__all__ = ["full_norm", "mean_across", "rank_and_world", "setup", "wrap"]
