"""``pyflowmap::flowmap_step``: out = x + (t - s) v, the update of every few-step sampler."""

from __future__ import annotations

import torch

from pyflowmap import _build, reference  # noqa: F401  (_build registers the op schema)
from pyflowmap._dispatch import fused_op
from pyflowmap._tensors import acc_dtype

_OP = "pyflowmap::flowmap_step"


# the CPU kernel covers float16 too
@fused_op(twin=reference.flowmap_step, cpu_dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
def flowmap_step(x: torch.Tensor, v: torch.Tensor, s, t) -> torch.Tensor:
    """One flow-map jump ``x + (t - s) * v`` through the fused kernel.

    Args:
        x: state, shape ``[B, ...]``; float32, float64, bfloat16 or float16.
        v: velocity ``v_{s,t}(x)``, same shape and dtype as ``x``.
        s, t: start and end times, Python floats, 0-d tensors or ``[B]`` tensors; converted to
            float32 (float64 for float64 ``x``) on ``x``'s device.
    Returns:
        A new tensor shaped like ``x``. Differentiable in ``x``, ``v``, ``s`` and ``t``.
    """
    tdtype = acc_dtype(x.dtype)
    return torch.ops.pyflowmap.flowmap_step(x, v, torch.as_tensor(s, dtype=tdtype, device=x.device),
                                            torch.as_tensor(t, dtype=tdtype, device=x.device))


@torch.library.register_fake(_OP)
def _flowmap_step_fake(x, v, s, t):
    torch._check(x.dim() >= 1, lambda: "flowmap_step: `x` must have a batch dimension")
    torch._check(v.shape == x.shape, lambda: f"flowmap_step: `v` shape {v.shape} != `x` {x.shape}")
    torch._check(v.dtype == x.dtype, lambda: "flowmap_step: `v` and `x` dtypes differ")
    for name, time in (("s", s), ("t", t)):
        torch._check(
            time.dim() == 0 or (time.dim() == 1 and time.shape[0] == x.shape[0]),
            lambda: f"flowmap_step: `{name}` must be a scalar or [batch] tensor",
        )
        torch._check(time.dtype == acc_dtype(x.dtype), lambda: f"flowmap_step: `{name}` dtype")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, v, s, t = inputs
    ctx.save_for_backward(v, s, t)
    ctx.time_shapes = (s.dim(), t.dim())


def _per_row_sum(g: torch.Tensor, scalar: bool) -> torch.Tensor:
    flat = g.reshape(g.shape[0], -1).sum(dim=1)
    return flat.sum() if scalar else flat


def _backward(ctx, grad):
    v, s, t = ctx.saved_tensors
    tdtype = s.dtype
    gx = gv = gs = gt = None
    shape = (-1,) + (1,) * (v.dim() - 1)
    if ctx.needs_input_grad[0]:
        gx = grad
    if ctx.needs_input_grad[1]:
        dt = (t - s).reshape(shape) if (t.dim() or s.dim()) else (t - s)
        gv = (grad.to(tdtype) * dt).to(v.dtype)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        gvdot = grad.to(tdtype) * v.to(tdtype)
        if ctx.needs_input_grad[3]:
            gt = _per_row_sum(gvdot, t.dim() == 0)
        if ctx.needs_input_grad[2]:
            gs = -_per_row_sum(gvdot, s.dim() == 0)
    return gx, gv, gs, gt


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
