"""Per-sample distances between a prediction and its (usually stop-gradient) target.

These are the reduction points the fused loss kernels of :mod:`pyflowmap.ops` replace.
"""

from __future__ import annotations

import torch


def squared_distance(pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """|pred - target|^2 summed over every non-batch dimension: shape ``[B]``."""
    diff = pred - target
    return diff.reshape(diff.shape[0], -1).pow(2).sum(dim=1)
