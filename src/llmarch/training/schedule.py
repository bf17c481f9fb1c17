"""The learning-rate schedule (linear warmup, then cosine or warmup-stable-decay), a function of
the step alone, so a resumed run follows the uninterrupted one. (Loss spikes: ``llmarch.training.spikes``.)"""

from __future__ import annotations

import math

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


__all__ = ["lr_factor"]
