"""The configuration of one training run (:class:`TrainConfig`), as ``llmarch train`` fills it,
``train_config.json`` records it and a checkpoint stores it for an exact resume."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .distributed import rank_and_world
from .optim import OPTIMIZERS

SCHEDULES = ("cosine", "wsd")


@dataclass
class TrainConfig:
    arch: str  # preset name or config.json
    data: str  # prepared data folder (llmarch data prepare)
    out: str
    scale: str | None = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    tokens: int = 1_000_000  # training budget in tokens (steps = tokens // tokens per step)
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup: int = 20  # steps
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    qk_clip: float | None = None  # tau of MuonClip's QK-clip
    aux_loss: float = 0.0  # coefficient of the MoE load-balancing loss
    bias_update: float = 0.0  # gamma of DeepSeek-V3's auxiliary-loss-free balancing
    eval_every: int = 50
    eval_batches: int = 8
    # after the last step, validation loss at these multiples of seq_len (same validation tokens each)
    length_multiples: list[int] = field(default_factory=lambda: [1, 2, 4])
    save_every: int = 0  # 0: only at the end
    stop_at: int | None = None  # stop (after saving) at this step, as if pre-empted
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU | float32 | bf16
    dist: str = "ddp"  # under torchrun: ddp | fsdp
    # intra-op CPU threads (None: torch's default, one per core). On a machine shared with other
    # jobs 1 is often much faster: an op split over 2 threads waits for the slower one.
    threads: int | None = None
    progress: bool = True

    def check(self) -> None:
        """Refuse settings that would fail or mislead later, with the option a user can fix."""
        for name in ("tokens", "batch_size", "seq_len", "grad_accum", "eval_batches", "eval_every"):
            _require(self, name, lambda v: v > 0, "a positive integer")
        _require(self, "lr", lambda v: math.isfinite(v) and v > 0, "a positive number")
        for name in ("warmup", "save_every"):
            _require(self, name, lambda v: v >= 0, "0 or more")
        for name in ("weight_decay", "grad_clip", "aux_loss", "bias_update"):
            _require(self, name, lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more")
        for name in ("min_lr_ratio", "decay_fraction"):
            _require(self, name, lambda v: 0 <= v <= 1, "between 0 and 1")
        _require(self, "qk_clip", lambda v: v is None or (math.isfinite(v) and v > 0), "a positive number")
        _require(self, "stop_at", lambda v: v is None or v > 0, "a positive step")
        _require(self, "threads", lambda v: v is None or v >= 1, "at least 1")
        _require(self, "length_multiples", _positive_ints, "a list of positive integers, e.g. 1,2,4")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in ("auto", "float32", "bf16"):
            raise ConfigError(f"dtype must be auto, float32 or bf16, got {self.dtype!r}")
        if self.dist not in ("ddp", "fsdp"):
            raise ConfigError(f"dist must be ddp or fsdp, got {self.dist!r}")
        if self.dist == "fsdp" and rank_and_world()[1] > 1:
            if self.optimizer == "muon":
                raise ConfigError("Muon orthogonalises whole matrices, FSDP2 holds shards of them: use --dist ddp with Muon")
            if self.qk_clip:
                raise ConfigError("QK-clip rescales whole heads of W_q/W_k, FSDP2 holds shards of them: use --dist ddp")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in v)


def _require(cfg: TrainConfig, name: str, ok: Callable[[Any], bool], expected: str) -> None:
    value = getattr(cfg, name)
    try:
        good = ok(value)
    except TypeError:  # e.g. a string from an ablation spec
        good = False
    if not good:
        raise ConfigError(f"--{name.replace('_', '-')} must be {expected}, got {value}")


__all__ = ["SCHEDULES", "TrainConfig"]
