"""``pyflowmap::flowmap_loss``: residual, metric, weighting, mean and its closed-form gradient."""

from __future__ import annotations

import torch

from pyflowmap import _build, reference  # noqa: F401  (_build registers the op schemas)
from pyflowmap._dispatch import fused_op
from pyflowmap._tensors import acc_dtype
from pyflowmap.ops._autograd import forbid_double_backward
from pyflowmap.reference.losses import METRICS
from pyflowmap.validation import scalar_target


@fused_op(twin=reference.flowmap_loss)
def flowmap_loss(pred: torch.Tensor, target: torch.Tensor | float | None = None,
                 weight: torch.Tensor | None = None, metric: str = "l2sq", c: float = 0.0):
    """Fused ``(loss, per_sample)`` for a prediction and its (stop-gradient or not) target.

    ``pred``: ``[B, ...]``; ``target``: same shape, ``None`` or ``0.0`` (zero); ``weight``:
    ``[B]`` per-sample weights (float32, float64 for float64 ``pred``). ``per_sample`` is the
    unweighted metric m_i (float32; float64 for float64). Gradients flow to ``pred``,
    ``target`` and ``weight``; the ``pred`` gradient is one pass over the rows.
    """
    target = scalar_target(target, "flowmap_loss")
    return torch.ops.pyflowmap.flowmap_loss(pred, target, weight, metric, float(c))


@torch.library.register_fake("pyflowmap::flowmap_loss")
def _fake(pred, target, weight, metric, c):
    torch._check(pred.dim() >= 1, lambda: "flowmap_loss: `pred` must have a batch dimension")
    torch._check(metric in METRICS, lambda: f"flowmap_loss: `metric` must be one of {METRICS}")
    if target is not None:
        torch._check(target.shape == pred.shape, lambda: "flowmap_loss: `target` shape differs from `pred`")
    acc = acc_dtype(pred.dtype)
    return pred.new_empty((), dtype=acc), pred.new_empty((pred.shape[0],), dtype=acc)


@torch.library.register_fake("pyflowmap::flowmap_loss_backward")
def _fake_bwd(grad_loss, grad_per_sample, pred, target, weight, per_sample, metric, c):
    return pred.new_empty(pred.shape)  # contiguous, as the kernel returns


def _setup(ctx, inputs, output):
    pred, target, weight, metric, c = inputs
    ctx.save_for_backward(pred, target, weight, output[1])
    ctx.metric, ctx.c = metric, c


def _backward(ctx, grad_loss, grad_per):
    pred, target, weight, m = ctx.saved_tensors
    needs_pred, needs_target, needs_weight = ctx.needs_input_grad[:3]
    gpred = gtarget = gweight = None
    if needs_pred or needs_target:
        gpred = torch.ops.pyflowmap.flowmap_loss_backward(
            grad_loss, grad_per, pred, target, weight, m, ctx.metric, ctx.c)
        if needs_target:
            gtarget = -gpred
    if needs_weight:
        gweight = grad_loss * m / m.shape[0]
    return (gpred if needs_pred else None), gtarget, gweight, None, None


torch.library.register_autograd("pyflowmap::flowmap_loss", _backward, setup_context=_setup)
forbid_double_backward("pyflowmap::flowmap_loss_backward")


@fused_op(twin=reference.flowmap_fd_loss)
def flowmap_fd_loss(plus: torch.Tensor, minus: torch.Tensor, target: torch.Tensor | float | None = None,
                    weight: torch.Tensor | None = None, inv_2h: float = 1.0, metric: str = "l2sq",
                    c: float = 0.0):
    """The fused loss of a central difference: residual (plus - minus) * inv_2h - target,
    formed in float64 inside the kernel, so a bfloat16 or float32 pair of evaluations loses
    nothing to the subtraction. Gradients flow to ``plus`` (+), ``minus`` (-), ``target``,
    ``weight``."""
    target = scalar_target(target, "flowmap_fd_loss")
    return torch.ops.pyflowmap.flowmap_fd_loss(plus, minus, target, weight, float(inv_2h), metric, float(c))


@torch.library.register_fake("pyflowmap::flowmap_fd_loss")
def _fake_fd(plus, minus, target, weight, inv_2h, metric, c):
    torch._check(minus.shape == plus.shape, lambda: "flowmap_fd_loss: `minus` shape differs from `plus`")
    return _fake(plus, target, weight, metric, c)


@torch.library.register_fake("pyflowmap::flowmap_fd_loss_backward")
def _fake_fd_bwd(grad_loss, grad_per_sample, plus, minus, target, weight, per_sample, inv_2h, metric, c):
    return plus.new_empty(plus.shape)


def _setup_fd(ctx, inputs, output):
    plus, minus, target, weight, inv_2h, metric, c = inputs
    ctx.save_for_backward(plus, minus, target, weight, output[1])
    ctx.cfg = (inv_2h, metric, c)


def _backward_fd(ctx, grad_loss, grad_per):
    plus, minus, target, weight, m = ctx.saved_tensors
    inv_2h, metric, c = ctx.cfg
    need = ctx.needs_input_grad
    gplus = gminus = gtarget = gweight = None
    if need[0] or need[1] or need[2]:
        g = torch.ops.pyflowmap.flowmap_fd_loss_backward(grad_loss, grad_per, plus, minus, target, weight, m,
                                                          inv_2h, metric, c)
        gplus = g if need[0] else None
        gminus = -g if need[1] else None
        gtarget = -g / inv_2h if need[2] else None
    if need[3]:
        gweight = grad_loss * m / m.shape[0]
    return gplus, gminus, gtarget, gweight, None, None, None


torch.library.register_autograd("pyflowmap::flowmap_fd_loss", _backward_fd, setup_context=_setup_fd)
forbid_double_backward("pyflowmap::flowmap_fd_loss_backward")
