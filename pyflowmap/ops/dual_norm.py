"""``pyflowmap::dual_norm``: fused dual LayerNorm / RMSNorm / GroupNorm, forward and backward."""

from __future__ import annotations

import math

import torch

from pyflowmap import _build  # noqa: F401  (registers the op schemas)
from pyflowmap._dispatch import fused_op
from pyflowmap.ops._autograd import forbid_double_backward
from pyflowmap.reference import dual as _ref
from pyflowmap.reference.dual import check_normalized_shape

def _norm(xx, weight, bias, length, groups, spatial, center, eps):
    yy, _, _ = torch.ops.pyflowmap.dual_norm(
        xx, None if weight is None else weight.reshape(-1), None if bias is None else bias.reshape(-1),
        length, groups, spatial, center, float(eps))
    return yy


@fused_op(twin=_ref.dual_layer_norm, kernel="dual_norm")
def dual_layer_norm(xx, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Fused twin of :func:`pyflowmap.reference.dual_layer_norm`."""
    check_normalized_shape(xx, normalized_shape)
    return _norm(xx, weight, bias, math.prod(tuple(normalized_shape)), 1, 1, True, eps)


@fused_op(twin=_ref.dual_rms_norm, kernel="dual_norm")
def dual_rms_norm(xx, weight=None, eps=1e-6):
    """Fused twin of :func:`pyflowmap.reference.dual_rms_norm`."""
    return _norm(xx, weight, None, xx.shape[-1], 1, 1, False, eps)


@fused_op(twin=_ref.dual_group_norm, kernel="dual_norm")
def dual_group_norm(xx, groups, weight=None, bias=None, eps=1e-5):
    """Fused twin of :func:`pyflowmap.reference.dual_group_norm` for ``[2B, C, ...]``."""
    c = xx.shape[1]
    if c % groups:
        raise ValueError(f"channels {c} not divisible by groups {groups}")
    spatial = math.prod(xx.shape[2:])
    return _norm(xx, weight, bias, (c // groups) * spatial, groups, spatial, True, eps)


@torch.library.register_fake("pyflowmap::dual_norm")
def _fake(xx, weight, bias, length, groups, spatial, center, eps):
    torch._check(xx.shape[0] % 2 == 0, lambda: "dual_norm: `xx` needs an even leading dim")
    rows = xx.numel() // (2 * length)
    # the kernel returns contiguous tensors whatever the input strides
    return (xx.new_empty(xx.shape), xx.new_empty((rows,), dtype=torch.float64),
            xx.new_empty((rows,), dtype=torch.float64))


@torch.library.register_fake("pyflowmap::dual_norm_backward")
def _fake_bwd(grad, xx, weight, mean, rstd, length, groups, spatial, center, eps, mask):
    ch = groups * (length // spatial)
    return (xx.new_empty(xx.shape), xx.new_empty((ch,)) if mask[1] and weight is not None else None,
            xx.new_empty((ch,)) if mask[2] else None)


def _setup(ctx, inputs, output):
    xx, weight, bias, length, groups, spatial, center, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(xx, weight, mean, rstd)
    ctx.cfg = (length, groups, spatial, center, eps)
    ctx.has_bias = bias is not None


def _backward(ctx, gyy, _gmean, _grstd):
    xx, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], bool(need[1]) and weight is not None, bool(need[2]) and ctx.has_bias]
    gxx, gw, gb = torch.ops.pyflowmap.dual_norm_backward(gyy, xx, weight, mean, rstd, *ctx.cfg, mask)
    return gxx if need[0] else None, gw, gb, None, None, None, None, None


torch.library.register_autograd("pyflowmap::dual_norm", _backward, setup_context=_setup)
forbid_double_backward("pyflowmap::dual_norm_backward")
