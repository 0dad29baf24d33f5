"""The dual ops the layers call: fused kernels where they exist for the tensor's device and
dtype, else the reference twins (see :mod:`pyflowmap._dispatch`)."""

from __future__ import annotations

from pyflowmap._dispatch import pick as _impl
from pyflowmap._dispatch import reference_ops  # noqa: F401  (re-exported)
from pyflowmap.reference import dual as _ref


def dual_act(zz, kind="gelu"):
    return _impl("dual_act", zz)(zz, kind)


def dual_linear(xx, weight, bias=None):
    return _impl("dual_linear", xx)(xx, weight, bias)


def dual_layer_norm(xx, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _impl("dual_layer_norm", xx)(xx, normalized_shape, weight, bias, eps)


def dual_rms_norm(xx, weight=None, eps=1e-6):
    return _impl("dual_rms_norm", xx)(xx, weight, eps)


def dual_group_norm(xx, groups, weight=None, bias=None, eps=1e-5):
    return _impl("dual_group_norm", xx)(xx, groups, weight, bias, eps)


def dual_modulate(hh, scale, shift):
    return _impl("dual_modulate", hh)(hh, scale, shift)


def dual_attention(qq, kk, vv, causal=False, scale=None):
    return _impl("dual_attention", qq)(qq, kk, vv, causal, scale)


def dual_sinusoidal(t, t_dot, freqs):
    return _impl("dual_sinusoidal", t)(t, t_dot, freqs)


split = _ref.split
