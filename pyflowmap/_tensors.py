"""The small tensor conventions every layer of pyflowmap shares: the accumulation dtype, and
times given as a number, a 0-d or a ``[B]`` tensor."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) accumulates in float32.

    Also the dtype of times, per-sample losses and loss weights that go with a tensor of
    ``dtype`` (bfloat16 times would be off by ~4e-3 near t = 1). ``acc_type`` in
    ``csrc/common/checks.h`` is the same rule on the C++ side.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_time(t, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A time given as float, 0-d or ``[B]`` tensor, as a ``[B]`` tensor on ``x``'s device in
    ``dtype`` (default ``x``'s dtype)."""
    t = torch.as_tensor(t, dtype=x.dtype if dtype is None else dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def batch_tangent(d, x: torch.Tensor) -> torch.Tensor | None:
    """A time tangent (None = zero, or anything :func:`batch_time` takes) as None or ``[B]``."""
    return None if d is None else batch_time(d, x)


def expand_time(t, x: torch.Tensor) -> torch.Tensor:
    """A per-sample time ``[B]`` (or a scalar) reshaped to broadcast against ``x`` ``[B, ...]``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    return t.reshape((t.shape[0],) + (1,) * (x.dim() - 1))
