"""Checkpoints with exact resume, stored without pickle.

One ``checkpoint.safetensors`` per run folder holds every tensor of the training state: the
model (``model/NAME``), the optimizer states (``optimizer/N``: AdamW's moments, Muon's momentum
buffers, their step counters) and the torch / numpy RNG states as uint8 tensors. Everything
else (the step, the run and model configurations, the optimizers' hyper-parameters and the
layout of their states, Python's RNG state) is JSON in the file's header metadata, with each
tensor replaced by a reference to its name. Reading it back parses JSON and copies tensor
bytes: nothing in a run folder can run code, unlike a pickled ``checkpoint.pt`` (llmarch's
earlier format), which is refused unread. A SHA-256 of the tensor bytes, kept in the header,
catches a file changed after it was written.

Under DDP the unwrapped module's state is saved; under FSDP2 the full tensors are gathered on
save and scattered back on load, so a checkpoint does not depend on how the run was parallelised.
The file is written to a temporary sibling, fsync'd and renamed into place
(:mod:`llmarch.atomic`): a process killed while saving leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from ..atomic import atomic_file
from ..errors import CheckpointError
from ..model.config import ModelConfig
from .config import TrainConfig
from .distributed import rank_and_world
from .optim import Optimizers

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
TRAIN_CONFIG = "train_config.json"
MODEL_CONFIG = "model_config.json"
FORMAT = "llmarch-train-state/1"
_TENSOR, _ITEMS, _TUPLE = "__tensor__", "__items__", "__tuple__"
# what a malformed or foreign file raises while its header, JSON and tensors are read back
_UNREADABLE = (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)


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


# ----------------------------------------------------------------------------------------
# nested state <-> (JSON tree, named tensors)
# ----------------------------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """``obj`` as a JSON tree; each tensor goes to ``tensors`` under ``prefix/N`` and is referenced."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}/{len(tensors)}"
        tensors[name] = obj
        return {_TENSOR: name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, prefix) for k, v in obj.items()}
        if not all(isinstance(k, int) for k in obj):
            raise CheckpointError(f"cannot store a mapping with keys of type {sorted({type(k).__name__ for k in obj})}")
        return {_ITEMS: [[k, _encode(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, prefix) for v in obj]
        return items if isinstance(obj, list) else {_TUPLE: items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if _TENSOR in tree:
        return tensors[tree[_TENSOR]]
    if _ITEMS in tree:
        return {int(k): _decode(v, tensors) for k, v in tree[_ITEMS]}
    if _TUPLE in tree:
        return tuple(_decode(v, tensors) for v in tree[_TUPLE])
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory (a tied head is the embedding: stored twice)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# save / read / resume
# ----------------------------------------------------------------------------------------


def save_checkpoint(path: Path, step: int, model: nn.Module, opt: Optimizers, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    from safetensors.torch import save_file

    model_state, opt_state = _state_dicts(model, opt)
    if rank_and_world()[0] != 0:
        return
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    np_state = np.random.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/numpy"] = torch.from_numpy(np.ascontiguousarray(np_state[1]).view(np.uint8).copy())
    optimizer = _encode(opt_state, tensors, "optimizer")
    tensors = _storable(tensors)
    py_version, py_state, py_gauss = random.getstate()
    header = {
        "format": FORMAT,
        "step": step,
        "train_config": cfg.to_dict(),
        "model_config": model_cfg.to_dict(),
        "optimizer": optimizer,
        "rng": {"numpy": [np_state[0], *np_state[2:]], "python": [py_version, list(py_state), py_gauss]},
        "sha256": _digest(tensors),
    }
    with atomic_file(Path(path) / CHECKPOINT) as tmp:
        save_file(tensors, str(tmp), metadata={"llmarch": json.dumps(header)})


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's ``checkpoint.safetensors``, or None; an old pickled ``checkpoint.pt`` is refused unread."""
    run_dir = Path(run_dir)
    f = run_dir / CHECKPOINT
    if f.is_file():
        return f
    if (run_dir / LEGACY_CHECKPOINT).exists():
        raise CheckpointError(
            f"{run_dir / LEGACY_CHECKPOINT} is a pickled checkpoint of an older llmarch; unpickling can run any code "
            f"stored in the file, so llmarch does not read it. Start the run again (llmarch train --force --out {run_dir}) "
            f"or in another --out folder; llmarch now saves {CHECKPOINT}, which holds no code"
        )
    return None


def _no_checkpoint(run_dir: str | Path) -> CheckpointError:
    return CheckpointError(f"no {CHECKPOINT} in {run_dir}; --resume expects the --out folder of an earlier run")


def _header(f: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as sf:
            header = json.loads((sf.metadata() or {})["llmarch"])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        return header
    except _UNREADABLE as e:
        raise CheckpointError(f"cannot read {f}: it is not an llmarch training checkpoint ({e})") from None


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The training state of a run folder: step, model, optimizer, train_config, model_config, rng."""
    from safetensors import safe_open

    f = find_checkpoint(run_dir)
    if f is None:
        raise _no_checkpoint(run_dir)
    header = _header(f)
    try:
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118 (safe_open is no mapping)
        if _digest(tensors) != header["sha256"]:
            raise ValueError("its tensors do not match the checksum written with them: the file was changed or damaged")
        model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
        np_name, *np_rest = header["rng"]["numpy"]
        py_version, py_state, py_gauss = header["rng"]["python"]
        return {
            "step": int(header["step"]),
            "model": model,
            "optimizer": _decode(header["optimizer"], tensors),
            "train_config": header["train_config"],
            "model_config": header["model_config"],
            "rng": {
                "torch": tensors["rng/torch"],
                "numpy": (np_name, tensors["rng/numpy"].numpy().view(np.uint32).copy(), *np_rest),
                "python": (py_version, tuple(py_state), py_gauss),
            },
        }
    except _UNREADABLE as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


def _started_run_configs(run_dir: Path) -> tuple[dict, dict]:
    """The configurations a run folder records, for a run killed before its first checkpoint."""
    try:
        return (json.loads((run_dir / TRAIN_CONFIG).read_text()), json.loads((run_dir / MODEL_CONFIG).read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the configuration of the run in {run_dir}: {e}") from None


def resume_config(run_dir: str | Path, arch: str | None = None, model_cfg: ModelConfig | None = None) -> TrainConfig:
    """The run configuration stored in a run folder (its checkpoint's, or, for a run killed before
    its first checkpoint, ``train_config.json``'s); refuse another architecture or model."""
    run_dir = Path(run_dir)
    f = find_checkpoint(run_dir)
    if f is not None:
        header = _header(f)
        train_d, model_d = header["train_config"], header["model_config"]
    elif (run_dir / TRAIN_CONFIG).is_file():
        train_d, model_d = _started_run_configs(run_dir)
    else:
        raise _no_checkpoint(run_dir)
    try:
        cfg = TrainConfig(**train_d)
    except TypeError as e:
        raise CheckpointError(f"the run configuration in {run_dir} is not one this llmarch knows: {e}") from None
    if arch is not None and arch != cfg.arch:
        raise CheckpointError(
            f"checkpoint in {run_dir} is of architecture {cfg.arch!r}, not {arch!r}; resume it without --arch "
            "or start a new run in another --out folder"
        )
    if model_cfg is not None and model_cfg.to_dict() != model_d:
        raise CheckpointError(f"checkpoint in {run_dir} was trained with a different model configuration")
    return cfg


def load_checkpoint(model: nn.Module, opt: Optimizers, ck: dict, run_dir: str | Path) -> int:
    """Put a checkpoint read by :func:`read_checkpoint` back into the model, optimizer and RNGs; return its step."""
    try:
        _load_state_dicts(model, opt, ck["model"], ck["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not fit this model: {e}") from None
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    return int(ck["step"])


__all__ = [
    "CHECKPOINT", "LEGACY_CHECKPOINT", "MODEL_CONFIG", "TRAIN_CONFIG", "find_checkpoint", "load_checkpoint",
    "read_checkpoint", "resume_config", "save_checkpoint",
]
