"""How each fused op behaves under ``torch.autocast`` (docs/precision.md), registered at the
dispatcher's Autocast keys so every caller sees it: the layers, ``torch.ops.pyflowmap.*``
called directly, opcheck, and torch.compile's tracing.

The policies follow PyTorch's own for the matching native ops:

* ``"lower"`` (GEMM-like: dual_linear, dual_attention): float32 / 16-bit inputs are cast to
  the autocast dtype (bf16, or fp16 on CUDA); the GEMMs accumulate in fp32 inside the kernel.
* ``"follow"`` (norms): the op runs in the dtype of its first input, and the affine
  parameters (fp32 master weights) are cast to it; statistics are kept in double whatever the
  dtype. PyTorch's CPU layer_norm / group_norm keep a bf16 input bf16 the same way.
* ``"fp32"`` (losses): 16-bit inputs are cast to float32, so the residual and its reduction
  are formed in fp32.
* ``"promote"`` (the sampler's x + (t - s) v): every input in the widest dtype among them.
* ``"keep"`` (the backward ops): inputs as they come, but the kernel runs with autocast off.
  A backward called inside an autocast region (opcheck does; so does a user's
  ``loss.backward()`` under ``with autocast``) would otherwise autocast the ATen GEMMs inside a
  kernel written with them (the chunked attention backward) from fp32 to 16 bits: ~3x the
  rounding error of the same backward outside the region.

float64 is never cast (autocast leaves it alone too). Without a registration an op falls
through autocast, which is right for dtype-preserving elementwise ops (dual_act).
"""

from __future__ import annotations

import torch

POLICIES = ("lower", "follow", "fp32", "promote", "keep")
_LOW = (torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


def _floats(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _target(policy: str, args, device_type: str):
    """The dtype the op's floating inputs are cast to (None: leave them)."""
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    if policy == "fp32":
        return torch.float32
    if policy == "keep":
        return None
    floats = _floats(args)
    if not floats:
        return None
    if policy == "follow":
        return floats[0].dtype
    widest = floats[0].dtype
    for a in floats[1:]:
        widest = torch.promote_types(widest, a.dtype)
    return widest


def cast_args(policy: str, args, device_type: str):
    """``args`` with their floating tensors cast as ``policy`` says (float64 kept)."""
    dt = _target(policy, args, device_type)
    if dt is None:
        return args

    def cast(a):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == dt:
            return a
        if policy == "lower" and a.dtype == torch.float64:
            return a
        if policy == "fp32" and a.dtype not in _LOW:  # float64 included
            return a
        return a.to(dt)

    return tuple(cast(a) for a in args)


def register_autocast(qualname: str, policy: str, lib: torch.library.Library) -> None:
    """Registers ``policy`` for op ``qualname`` (``"pyflowmap::name"``) at AutocastCPU and
    AutocastCUDA, in ``lib`` (kept alive by the caller's module)."""
    if policy not in POLICIES:
        raise ValueError(f"autocast policy must be one of {POLICIES}, got {policy!r}")
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    for device_type in _DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _key=key, _dev=device_type):
            # the op runs once below autocast, on the cast inputs
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast_args(policy, args, _dev))

        # the Python-dispatcher entry (what torch.compile's tracing calls) and the C++ one
        op.py_kernels.pop(key, None)
        op.py_impl(key)(run)
        lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


# Every fused op's policy, in one table; ops not named fall through autocast.
OP_POLICIES = {
    "pyflowmap::dual_linear": "lower",
    "pyflowmap::dual_attention": "lower",
    "pyflowmap::dual_norm": "follow",
    "pyflowmap::flowmap_loss": "fp32",
    "pyflowmap::flowmap_fd_loss": "fp32",
    "pyflowmap::flowmap_step": "promote",
    "pyflowmap::dual_attention_backward": "keep",
    "pyflowmap::dual_norm_backward": "keep",
    "pyflowmap::dual_act_backward": "keep",
    "pyflowmap::flowmap_loss_backward": "keep",
    "pyflowmap::flowmap_fd_loss_backward": "keep",
}

_LIB = torch.library.Library("pyflowmap", "IMPL")


def register_all() -> None:
    for qualname, policy in OP_POLICIES.items():
        register_autocast(qualname, policy, _LIB)
