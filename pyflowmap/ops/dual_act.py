"""``pyflowmap::dual_act`` and its backward: fused dual GELU/SiLU on stacked [z; z_dot]."""

from __future__ import annotations

import torch

from pyflowmap import _build  # noqa: F401  (registers the op schemas)
from pyflowmap._dispatch import fused_op
from pyflowmap.reference import dual as _ref

KINDS = ("gelu", "silu")


@fused_op(twin=_ref.dual_act)
def dual_act(zz: torch.Tensor, kind: str = "gelu") -> torch.Tensor:
    """``[a(z); a'(z) z_dot]`` for stacked ``zz = [z; z_dot]`` (``[2B, ...]``), one fused pass.

    float32, float64 and bfloat16 (computed in float32). Differentiable in ``zz`` (the backward
    is fused too and needs a''(z)); twice differentiable through the reference formula.
    """
    return torch.ops.pyflowmap.dual_act(zz, kind)


def _check(zz, kind, name="zz"):
    torch._check(zz.dim() >= 1 and zz.shape[0] % 2 == 0,
                 lambda: f"dual_act: `{name}` must have an even leading dim, got {tuple(zz.shape)}")
    torch._check(kind in KINDS, lambda: f"dual_act: `kind` must be one of {KINDS}, got {kind!r}")


@torch.library.register_fake("pyflowmap::dual_act")
def _dual_act_fake(zz, kind):
    _check(zz, kind)
    return torch.empty(zz.shape, dtype=zz.dtype, device=zz.device)


@torch.library.register_fake("pyflowmap::dual_act_backward")
def _dual_act_backward_fake(grad, zz, kind):
    _check(zz, kind)
    torch._check(grad.shape == zz.shape, lambda: "dual_act_backward: `grad` and `zz` shapes differ")
    return torch.empty(zz.shape, dtype=zz.dtype, device=zz.device)


def _setup(ctx, inputs, output):
    zz, kind = inputs
    ctx.save_for_backward(zz)
    ctx.kind = kind


def _backward(ctx, grad):
    (zz,) = ctx.saved_tensors
    return torch.ops.pyflowmap.dual_act_backward(grad, zz, ctx.kind), None


def _setup_bwd(ctx, inputs, output):
    grad, zz, kind = inputs
    ctx.save_for_backward(grad, zz)
    ctx.kind = kind


def _backward_bwd(ctx, gg):
    # Second order (rarely needed: gradgradcheck, Hessian-vector products) through the
    # reference formula, differentiated by autograd.
    grad, zz = ctx.saved_tensors
    with torch.enable_grad():
        grad_, zz_ = grad.detach().requires_grad_(), zz.detach().requires_grad_()
        out = _ref.dual_act_backward(grad_, zz_, ctx.kind)
        g_grad, g_zz = torch.autograd.grad(out, (grad_, zz_), gg, allow_unused=True)
    return g_grad, g_zz, None


torch.library.register_autograd("pyflowmap::dual_act", _backward, setup_context=_setup)
torch.library.register_autograd("pyflowmap::dual_act_backward", _backward_bwd, setup_context=_setup_bwd)
