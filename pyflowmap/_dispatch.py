"""Choosing between a fused op of :mod:`pyflowmap.ops` and its reference twin.

A fused op is used when it has a kernel for the tensor's device and dtype; otherwise (CUDA
before the CUDA kernels land, float16 on CPU, ...) the twin runs, which computes the same
function. ``with reference_ops():`` forces the twins everywhere, to debug a kernel.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Run every dispatched op through its pure-PyTorch twin inside this block."""
    old = getattr(_state, "reference", False)
    _state.reference = enabled
    try:
        yield
    finally:
        _state.reference = old


def _has_kernel(name: str, device: torch.device) -> bool:
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device.type)
    op = f"pyflowmap::{name}"
    return key is not None and (torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                                or torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd"))


def pick(name: str, like: torch.Tensor, dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    """The fused ``pyflowmap.ops.<name>`` for ``like``, or ``pyflowmap.reference.<name>``."""
    from pyflowmap import ops, reference

    if not getattr(_state, "reference", False):
        fused = getattr(ops, name, None)
        # a wrapper may name the dispatcher op it runs and the dtypes its kernel covers
        if (fused is not None and like.dtype in getattr(fused, "dtypes", dtypes)
                and _has_kernel(getattr(fused, "op_name", name), like.device)):
            return fused
    return getattr(reference, name)
