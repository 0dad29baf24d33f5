"""Per-sample losses between a prediction and its (usually stop-gradient) target.

The objectives reduce through :func:`residual_loss`, which runs the fused ``flowmap_loss``
kernel (residual, metric, weighting, mean and closed-form gradient in one pass per direction)
where it exists, else its reference twin.
"""

from __future__ import annotations

import torch

from pyflowmap._dispatch import pick


def residual_loss(pred: torch.Tensor, target: torch.Tensor | float | None = None,
                  weight: torch.Tensor | None = None, metric: str = "l2sq", c: float = 0.0):
    """``(mean_i w_i m_i, m)`` with m_i the metric of |pred_i - target_i|^2 (see
    :func:`pyflowmap.reference.flowmap_loss`)."""
    if isinstance(target, (int, float)):
        if target != 0:
            raise ValueError("residual_loss: a scalar target must be 0")
        target = None
    if target is not None and target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    if weight is not None:
        weight = weight.to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
    return pick("flowmap_loss", pred)(pred, target, weight, metric, c)


def squared_distance(pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """|pred - target|^2 summed over every non-batch dimension: shape ``[B]``."""
    return residual_loss(pred, target)[1]
