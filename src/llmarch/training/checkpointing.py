"""Checkpoints with exact resume: one ``checkpoint.pt`` per run folder holds the step, the model and
optimizer states, the run and model configurations and the torch / numpy / Python RNG states.
Under DDP the unwrapped module's state is saved; under FSDP2 the full tensors are gathered on save
and scattered back on load, so a checkpoint does not depend on how the run was parallelised."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..model.config import ModelConfig
from .config import TrainConfig
from .distributed import rank_and_world
from .optim import Optimizers

CHECKPOINT = "checkpoint.pt"


def _state_dicts(model: nn.Module, opt: Optimizers) -> tuple[dict, list[dict] | dict]:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module.state_dict(), opt.state_dict()
    if dist.is_initialized():  # FSDP2: gather full tensors
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        return get_state_dict(model, opt.optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), opt.state_dict()


def _load_state_dicts(model: nn.Module, opt: Optimizers, model_state: dict, opt_state) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.module.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    elif dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        set_state_dict(model, opt.optimizers, model_state_dict=model_state, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)


def save_checkpoint(path: Path, step: int, model: nn.Module, opt: Optimizers, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    model_state, opt_state = _state_dicts(model, opt)
    if rank_and_world()[0] != 0:
        return
    state = dict(
        step=step,
        model=model_state,
        optimizer=opt_state,
        train_config=cfg.to_dict(),
        model_config=model_cfg.to_dict(),
        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()),
    )
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def read_checkpoint(run_dir: str | Path) -> dict:
    f = Path(run_dir) / CHECKPOINT
    if not f.is_file():
        raise CheckpointError(f"no {CHECKPOINT} in {run_dir}; --resume expects the --out folder of an earlier run")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise CheckpointError(f"cannot read {f}: {e}") from None


def resume_config(run_dir: str | Path, arch: str | None = None, model_cfg: ModelConfig | None = None) -> TrainConfig:
    """The run configuration stored in a checkpoint; refuse another architecture."""
    ck = read_checkpoint(run_dir)
    cfg = TrainConfig(**ck["train_config"])
    if arch is not None and arch != cfg.arch:
        raise CheckpointError(
            f"checkpoint in {run_dir} is of architecture {cfg.arch!r}, not {arch!r}; resume it without --arch "
            "or start a new run in another --out folder"
        )
    if model_cfg is not None and model_cfg.to_dict() != ck["model_config"]:
        raise CheckpointError(f"checkpoint in {run_dir} was trained with a different model configuration")
    return cfg


def load_checkpoint(model: nn.Module, opt: Optimizers, ck: dict, run_dir: str | Path) -> int:
    """Put a checkpoint read by :func:`read_checkpoint` back into the model, optimizer and RNGs; return its step."""
    try:
        _load_state_dicts(model, opt, ck["model"], ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not fit this model: {e}") from None
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    return int(ck["step"])


__all__ = ["CHECKPOINT", "load_checkpoint", "read_checkpoint", "resume_config", "save_checkpoint"]
