"""Shared autograd helpers for the ops."""

from __future__ import annotations

import torch


def forbid_double_backward(op: str) -> None:
    """Make second-order gradients through ``op`` (a backward op) fail loudly.

    Without a registration autograd would only warn and return zeros for them.
    """

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: second-order gradients through this fused kernel are not implemented; compute them "
            "inside `with pyflowmap.nn.reference_ops():`, which runs the differentiable reference twins")

    torch.library.register_autograd(op, backward, setup_context=setup)
