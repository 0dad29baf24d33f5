"""Per-sample losses between a prediction and its (usually stop-gradient) target.

The objectives reduce through :func:`residual_loss`, which runs the fused ``flowmap_loss``
kernel (residual, metric, weighting, mean and closed-form gradient in one pass per direction)
where it exists, else its reference twin.
"""

from __future__ import annotations

import torch

from pyflowmap import ops
from pyflowmap._tensors import acc_dtype
from pyflowmap.derivatives import CentralDifference
from pyflowmap.validation import scalar_target


def residual_loss(pred, target: torch.Tensor | float | None = None,
                  weight: torch.Tensor | None = None, metric: str = "l2sq", c: float = 0.0):
    """``(mean_i w_i m_i, m)`` with m_i the metric of |pred_i - target_i|^2 (see
    :func:`pyflowmap.reference.flowmap_loss`). ``pred`` may be a deferred
    :class:`~pyflowmap.derivatives.CentralDifference`, which runs the fused
    central-difference loss instead."""
    target = scalar_target(target, "residual_loss")
    lead = pred.plus if isinstance(pred, CentralDifference) else pred
    if target is not None and target.dtype != lead.dtype:
        target = target.to(lead.dtype)
    if weight is not None:
        weight = weight.to(acc_dtype(lead.dtype))
    if isinstance(pred, CentralDifference):
        loss, m = ops.flowmap_fd_loss.dispatch(pred.plus, pred.minus, target, weight, pred.inv_2h, metric, c)
    else:
        loss, m = ops.flowmap_loss.dispatch(pred, target, weight, metric, c)
    return loss, m

