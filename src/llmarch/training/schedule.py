"""The learning-rate schedule (linear warmup, then cosine or warmup-stable-decay) and the
loss-spike count of a finished run. Both are functions of the step alone, so a resumed run
follows the uninterrupted one."""

from __future__ import annotations

import math
import statistics

from .config import TrainConfig


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warmup, then cosine or WSD."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, int(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - lo) * (step - decay_start + 1) / decay_steps


def count_spikes(losses: list[float], factor: float = 1.5, window: int = 50) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the preceding ``window`` losses."""
    spikes = 0
    for i in range(1, len(losses)):
        if losses[i] > factor * statistics.median(losses[max(0, i - window) : i]):
            spikes += 1
    return spikes


__all__ = ["count_spikes", "lr_factor"]
