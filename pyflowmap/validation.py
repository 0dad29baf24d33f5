"""Argument checks for the public Python API: each message names the argument. They run on
the host at entry points (samplers, jumps, configs), never inside a captured or hot loop."""

from __future__ import annotations

import math

import torch


def check_finite_tensor(name: str, x: torch.Tensor) -> None:
    # A compiled step cannot branch on data; there the trainer's non-finite guard catches a
    # NaN batch through the loss it makes.
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_batch(name: str, x, role: str = "") -> None:
    """``x`` is a non-empty, finite, floating-point batch ``[B, ...]`` with at least one feature
    dimension: what every entry point that takes data or noise needs. ``role`` (e.g. "the data
    batch") is added to the NaN message, where a user looks for where the NaN came from."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (a floating-point tensor), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch [B, ...] with at least one feature dim, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (batch size 0)")
    check_finite_tensor(f"{name} ({role})" if role else name, x)


MAX_COUNT = 10_000_000  # sampler steps beyond this are a typo, not a plan
MAX_BATCH = 10**8  # a batch beyond this is a typo (the run configs refuse it too)


def check_count(name: str, n, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """``n`` is a whole number (an int, or a float with an integer value) in [minimum, maximum]."""
    whole = not isinstance(n, bool) and isinstance(n, (int, float)) and (not isinstance(n, float) or n.is_integer())
    if not whole or n < minimum:
        kind = "positive integer" if minimum == 1 else f"integer >= {minimum}"
        raise ValueError(f"{name} must be a {kind}, got {n!r}")
    if n > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {n:,}")
    return int(n)


def check_real(name: str, x, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False) -> float:
    """``x`` is a finite real number (not a tensor, not a bool) in [lo, hi] ((lo, hi] with
    ``open_lo``); returns it as a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or x < lo or x > hi or (open_lo and x == lo):
        raise ValueError(f"{name} must be finite and in {'(' if open_lo else '['}{lo:g}, {hi:g}], got {x:g}")
    return float(x)


def scalar_target(target, op: str):
    """A loss target given as the number 0 means "no target" (None); any other number is refused
    (a constant target is a bug in the caller, not a convention)."""
    if isinstance(target, (int, float)):
        if target != 0:
            raise ValueError(f"{op}: a scalar target must be 0")
        return None
    return target


def check_time(name: str, t, lo: float = 0.0, hi: float = 1.0) -> None:
    """``t`` (a number or tensor) is finite and inside [lo, hi]."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a real time, got dtype {t.dtype}")
        if t.numel() == 0:
            return
        tf = t.detach().double()
        if not bool(torch.isfinite(tf).all()):
            raise ValueError(f"{name} contains NaN or inf")
        bad = (tf < lo) | (tf > hi)
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in [{lo}, {hi}], got {float(tf[bad].flatten()[0]):g}")
        return
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a tensor of times, got {type(t).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {v:g}")


def check_ordered(s_name: str, s, t_name: str, t, strict: bool = False) -> None:
    """s <= t (or s < t) elementwise, for numbers or tensors."""
    s_t, t_t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    ok = (s_t < t_t) if strict else (s_t <= t_t)
    if not bool(ok.all()):
        rel = "<" if strict else "<="
        raise ValueError(f"need {s_name} {rel} {t_name}")
