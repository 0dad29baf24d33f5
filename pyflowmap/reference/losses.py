"""Reference twin of ``pyflowmap.ops.flowmap_loss``."""

from __future__ import annotations

import torch

from pyflowmap._tensors import acc_dtype
from pyflowmap.validation import scalar_target

METRICS = ("l2sq", "pseudo_huber")


def flowmap_loss(pred: torch.Tensor, target: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 metric: str = "l2sq", c: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_i w_i m_i, m)`` with d_i = |pred_i - target_i|^2 over the non-batch dims and
    m_i = d_i (``"l2sq"``) or sqrt(d_i + c^2) - c (``"pseudo_huber"``; c = 0 is the L2 norm).

    Accumulates in float64 (float32 results for float32/bfloat16 inputs).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError("flowmap_loss: empty batch")
    target = scalar_target(target, "flowmap_loss")
    if target is not None and target.shape != pred.shape:
        raise ValueError(f"flowmap_loss: `target` shape {tuple(target.shape)} differs from `pred` {tuple(pred.shape)}")
    if weight is not None and weight.shape != (pred.shape[0],):
        raise ValueError(f"flowmap_loss: `weight` must have shape [{pred.shape[0]}], got {tuple(weight.shape)}")
    diff = pred.double() if target is None else pred.double() - target.double()
    d = diff.reshape(diff.shape[0], -1).pow(2).sum(1)
    if metric == "l2sq":
        m = d
    else:  # sqrt(d + c^2) - c, with the kernel's subgradient 0 at the kink d = 0 when c = 0
        pos = (d + c * c) > 0
        m = torch.where(pos, torch.sqrt(torch.where(pos, d + c * c, torch.ones_like(d))), torch.zeros_like(d)) - c
    w = torch.ones_like(m) if weight is None else weight.double()
    return (w * m).mean().to(acc_dtype(pred.dtype)), m.to(acc_dtype(pred.dtype))


def flowmap_fd_loss(plus: torch.Tensor, minus: torch.Tensor, target: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, inv_2h: float = 1.0, metric: str = "l2sq",
                    c: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flowmap_loss` of the central difference (plus - minus) * inv_2h, formed in float64."""
    if minus.shape != plus.shape:
        raise ValueError(f"flowmap_fd_loss: `minus` shape {tuple(minus.shape)} differs from `plus` {tuple(plus.shape)}")
    diff = (plus.double() - minus.double()) * inv_2h
    if isinstance(target, torch.Tensor):
        target = target.double()
    loss, m = flowmap_loss(diff, target, None if weight is None else weight.double(), metric, c)
    return loss.to(acc_dtype(plus.dtype)), m.to(acc_dtype(plus.dtype))
