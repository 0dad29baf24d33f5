"""The dual ops the layers call: the fused kernels of :mod:`pyflowmap.ops` where one exists,
else the reference twin. ``with reference_ops():`` forces the twins (to debug a kernel)."""

from __future__ import annotations

import contextlib
import threading

import torch

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


def _has_kernel(name: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pyflowmap::{name}", key)


def _impl(name: str, like: torch.Tensor):
    """The fused op when it has a kernel for ``like``'s device (the CUDA kernels arrive in
    their own issue; until then CUDA tensors take the reference path), else the twin."""
    if not getattr(_state, "reference", False):
        from pyflowmap import ops

        fused = getattr(ops, name, None)
        if fused is not None and _has_kernel(name, like.device):
            return fused
    return getattr(_ref, name)


def dual_act(zz, kind="gelu"):
    if zz.dtype == torch.float16:  # the fused kernel covers fp32, fp64 and bf16
        return _ref.dual_act(zz, kind)
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
