"""The ramps the trainers share: a linear learning-rate warm-up and the EMA decay warm-up."""

from __future__ import annotations


def linear_warmup(step: int, warmup: int) -> float:
    """The learning-rate factor (step + 1) / warmup, capped at 1 (1 throughout for warmup 0)."""
    return min(1.0, (step + 1) / max(1, warmup))


def ramped_ema_decay(ema: float, step: int) -> float:
    """min(ema, (1 + n) / (10 + n)): early on the EMA follows the weights instead of keeping the
    initialization for ~1 / (1 - ema) steps, later it averages with the full decay."""
    return min(ema, (1 + step) / (10 + step))
