"""The learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, steps: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate of ``step`` (counted from 0) in a run of ``steps``: ``lr * (step + 1) / warmup``
    over the first ``warmup`` steps, then a cosine from ``lr`` down to ``floor * lr`` at ``steps``
    (and ``floor * lr`` after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
