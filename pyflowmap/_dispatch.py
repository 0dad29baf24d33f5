"""Choosing between a fused op of :mod:`pyflowmap.ops` and its reference twin.

A fused op is used when it has a kernel for the tensor's device and dtype; otherwise (CUDA
before the CUDA kernels land, float16 on CPU, ...) the twin runs, which computes the same
function. ``with reference_ops():`` forces the twins everywhere, to debug a kernel.

Everything here is a plain lookup of module-level values, so torch.compile traces through
``pick`` without graph breaks (a dispatcher query per call broke the graph at every layer).
"""

from __future__ import annotations

import contextlib

import torch

# A process-wide switch rather than a thread-local: Dynamo traces globals (and guards on
# them), not threading.local.
_REFERENCE = {"on": False}
_KERNELS: dict[tuple[str, str], bool] = {}


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Run every dispatched op through its pure-PyTorch twin inside this block (process-wide)."""
    old = _REFERENCE["on"]
    _REFERENCE["on"] = enabled
    try:
        yield
    finally:
        _REFERENCE["on"] = old


def _query(op: str, device_type: str) -> bool:
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    name = f"pyflowmap::{op}"
    return key is not None and (torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
                                or torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"))


def register_kernels() -> None:
    """Record which fused ops have kernels on which device types (called once by pyflowmap.ops)."""
    from pyflowmap import ops

    for name in ops.__all__:
        op = getattr(getattr(ops, name), "op_name", name)
        for device_type in ("cpu", "cuda"):
            _KERNELS[(op, device_type)] = _query(op, device_type)


CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pick(name: str, like: torch.Tensor):
    """The fused ``pyflowmap.ops.<name>`` for ``like``, or ``pyflowmap.reference.<name>``."""
    from pyflowmap import ops, reference

    if not _REFERENCE["on"]:
        fused = getattr(ops, name, None)
        # a wrapper may name the dispatcher op it runs and the CPU dtypes its kernel covers
        # (every CUDA kernel covers float32/64, bfloat16 and float16)
        dtypes = CUDA_DTYPES if like.device.type == "cuda" else getattr(fused, "dtypes", CPU_DTYPES)
        if (fused is not None and like.dtype in dtypes
                and _KERNELS.get((getattr(fused, "op_name", name), like.device.type), False)):
            return fused
    return getattr(reference, name)
