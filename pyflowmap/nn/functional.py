"""The dual ops the layers call: the fused kernels of :mod:`pyflowmap.ops` where one exists,
else the reference twin. ``with reference_ops():`` forces the twins (to debug a kernel)."""

from __future__ import annotations

import contextlib
import threading

from pyflowmap.reference import dual as _ref

_state = threading.local()


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Run every dual op through its pure-PyTorch twin inside this block."""
    old = getattr(_state, "reference", False)
    _state.reference = enabled
    try:
        yield
    finally:
        _state.reference = old


def _impl(name: str):
    if not getattr(_state, "reference", False):
        from pyflowmap import ops

        fused = getattr(ops, name, None)
        if fused is not None:
            return fused
    return getattr(_ref, name)


def dual_act(zz, kind="gelu"):
    return _impl("dual_act")(zz, kind)


def dual_linear(xx, weight, bias=None):
    return _impl("dual_linear")(xx, weight, bias)


def dual_layer_norm(xx, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _impl("dual_layer_norm")(xx, normalized_shape, weight, bias, eps)


def dual_rms_norm(xx, weight=None, eps=1e-6):
    return _impl("dual_rms_norm")(xx, weight, eps)


def dual_group_norm(xx, groups, weight=None, bias=None, eps=1e-5):
    return _impl("dual_group_norm")(xx, groups, weight, bias, eps)


def dual_modulate(hh, scale, shift):
    return _impl("dual_modulate")(hh, scale, shift)


def dual_attention(qq, kk, vv, causal=False, scale=None):
    return _impl("dual_attention")(qq, kk, vv, causal, scale)


def dual_sinusoidal(t, t_dot, freqs):
    return _impl("dual_sinusoidal")(t, t_dot, freqs)


split = _ref.split
