"""``pyflowmap::dual_linear``: the Linear layer on stacked [x; x_dot] as one op and one node."""

from __future__ import annotations

import torch

from pyflowmap import _build  # noqa: F401  (registers the op schema)
from pyflowmap._dispatch import fused_op
from pyflowmap.reference import dual as _ref


@fused_op(twin=_ref.dual_linear)
def dual_linear(xx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[x W^T + b; x_dot W^T]`` for ``xx = [x; x_dot]`` ``[2B, ..., in]``: one GEMM over all rows.

    Backward: g_xx = g W, g_W = g^T xx (again one GEMM over all rows), g_b = sum of the primal
    half of g.
    """
    return torch.ops.pyflowmap.dual_linear(xx, weight, bias)


@torch.library.register_fake("pyflowmap::dual_linear")
def _fake(xx, weight, bias):
    torch._check(xx.dim() >= 2 and xx.shape[0] % 2 == 0,
                 lambda: "dual_linear: `xx` must be [2B, ..., in] with an even leading dim")
    torch._check(xx.shape[-1] == weight.shape[1], lambda: "dual_linear: feature mismatch")
    return xx.new_empty((*xx.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    xx, weight, bias = inputs
    ctx.save_for_backward(xx, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    xx, weight = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (g2 @ weight).view(xx.shape)
    if ctx.needs_input_grad[1]:
        gw = g2.t() @ xx.reshape(-1, xx.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g2[: g2.shape[0] // 2].sum(0)
    return gx, gw, gb


torch.library.register_autograd("pyflowmap::dual_linear", _backward, setup_context=_setup)
