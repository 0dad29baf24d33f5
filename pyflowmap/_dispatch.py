"""Each fused op of :mod:`pyflowmap.ops` paired with its pure-PyTorch twin in
:mod:`pyflowmap.reference`, at the op's definition:

    @fused_op(twin=reference.dual_act, kernel="dual_act")
    def dual_act(zz, kind="gelu"): ...

``pyflowmap.ops.dual_act`` stays the fused kernel itself (what the op tests and opcheck call);
``pyflowmap.ops.dual_act.dispatch`` is the choice every caller inside pyflowmap (layers,
losses, samplers) goes through: the fused kernel when it has one for the first tensor
argument's device and dtype, else the twin, which computes the same function (CUDA without a
CUDA build, float16 on CPU, ...). ``with reference_ops():`` forces the twins everywhere, to
debug a kernel.

Everything here is a plain lookup of module-level values, so torch.compile traces through
:meth:`FusedOp.__call__` without graph breaks (a dispatcher query per call broke the graph at
every layer): which kernels exist is asked once, when the op is defined.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

# A process-wide switch rather than a thread-local: Dynamo traces globals (and guards on
# them), not threading.local.
_REFERENCE = {"on": False}

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# every CUDA kernel covers float32/64, bfloat16 and float16
CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Run every dispatched op through its pure-PyTorch twin inside this block (process-wide)."""
    old = _REFERENCE["on"]
    _REFERENCE["on"] = enabled
    try:
        yield
    finally:
        _REFERENCE["on"] = old


def _has_kernel(kernel: str, device_type: str) -> bool:
    key = {"cuda": "CUDA", "cpu": "CPU"}[device_type]
    name = f"pyflowmap::{kernel}"
    return (torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            or torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"))


class FusedOp:
    """The fused function ``fused`` (running dispatcher op ``pyflowmap::<kernel>``) and its
    twin ``twin``; calling it runs whichever applies to the first argument's device and dtype."""

    def __init__(self, fused: Callable, twin: Callable, kernel: str, cpu_dtypes: tuple):
        self.fused, self.twin, self.kernel = fused, twin, kernel
        self.dtypes = {"cpu": cpu_dtypes, "cuda": CUDA_DTYPES}
        self.kernels = {d: _has_kernel(kernel, d) for d in ("cpu", "cuda")}

    def pick(self, like: torch.Tensor) -> Callable:
        """The function that runs for a first argument like ``like``."""
        device = like.device.type
        if not _REFERENCE["on"] and self.kernels.get(device, False) and like.dtype in self.dtypes[device]:
            return self.fused
        return self.twin

    def __call__(self, *args, **kwargs):
        return self.pick(args[0])(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FusedOp(pyflowmap::{self.kernel}, fused={self.fused.__qualname__}, twin=reference.{self.twin.__name__})"


def fused_op(twin: Callable, kernel: str | None = None, cpu_dtypes: tuple = CPU_DTYPES):
    """Decorator of a fused op's Python entry: pairs it with ``twin`` (its definition) and
    attaches the :class:`FusedOp` as ``.dispatch``. ``kernel``: the dispatcher op it runs
    (default: the function's name); ``cpu_dtypes``: what its CPU kernel covers."""

    def wrap(fn):
        fn.dispatch = FusedOp(fn, twin, kernel or fn.__name__, cpu_dtypes)
        fn.twin = twin
        return fn

    return wrap
