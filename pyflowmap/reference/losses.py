"""Reference twin of ``pyflowmap.ops.flowmap_loss``."""

from __future__ import annotations

import torch

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
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    diff = pred.double() if target is None else pred.double() - target.double()
    d = diff.reshape(diff.shape[0], -1).pow(2).sum(1)
    m = d if metric == "l2sq" else torch.sqrt(d + c * c) - c
    w = torch.ones_like(m) if weight is None else weight.double()
    return (w * m).mean().to(acc), m.to(acc)


def flowmap_fd_loss(plus: torch.Tensor, minus: torch.Tensor, target: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, inv_2h: float = 1.0, metric: str = "l2sq",
                    c: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flowmap_loss` of the central difference (plus - minus) * inv_2h, formed in float64."""
    diff = (plus.double() - minus.double()) * inv_2h
    loss, m = flowmap_loss(diff, None if target is None else target.double(),
                           None if weight is None else weight.double(), metric, c)
    acc = torch.float64 if plus.dtype == torch.float64 else torch.float32
    return loss.to(acc), m.to(acc)
