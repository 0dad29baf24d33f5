"""Reference twin of ``pyflowmap.ops.flowmap_step``."""

from __future__ import annotations

import torch

from pyflowmap._tensors import acc_dtype


def flowmap_step(x: torch.Tensor, v: torch.Tensor, s, t) -> torch.Tensor:
    """``x + (t - s) * v`` computed in the time dtype (float32, float64 for float64 ``x``)."""
    tdtype = acc_dtype(x.dtype)
    s = torch.as_tensor(s, dtype=tdtype, device=x.device)
    t = torch.as_tensor(t, dtype=tdtype, device=x.device)
    dt = t - s
    if dt.dim() == 1:
        dt = dt.reshape((-1,) + (1,) * (x.dim() - 1))
    return (x.to(tdtype) + dt * v.to(tdtype)).to(x.dtype)
