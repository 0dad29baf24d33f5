"""``pyflowmap::dual_attention``: attention with its JVP in one streaming pass, and the backward
through both O and O_dot.

On CUDA (float16 / bfloat16, head dim 64 or 128) it runs the flash-style kernels of
``csrc/dual_attention/dual_attention.cu``; everywhere else a chunked path over blocks of keys
(the same online-softmax recurrence in ATen ops), so memory stays linear in the sequence
length on every device. The math and the backward formulas are in
``csrc/dual_attention/dual_attention.h``; the reference twin is
:func:`pyflowmap.reference.dual_attention` (math attention, N x N memory).
"""

from __future__ import annotations

import math

import torch

from pyflowmap import _build  # noqa: F401  (registers the op schemas)
from pyflowmap._dispatch import fused_op
from pyflowmap._tensors import acc_dtype
from pyflowmap.ops._autograd import forbid_double_backward
from pyflowmap.reference import dual as _ref

# the chunked path covers every floating dtype on every device
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scale(q, scale):
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0


@fused_op(twin=_ref.jvp_attention, kernel="dual_attention", cpu_dtypes=_CPU_DTYPES)
def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor | None = None,
                  k_dot: torch.Tensor | None = None, v_dot: torch.Tensor | None = None, causal: bool = False,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, O_dot)`` for ``O = softmax(scale Q K^T) V`` on ``[batch, heads, N, D]`` and the tangents.

    Any tangent may be None (zero): with ``k_dot = v_dot = None`` (a fixed context) the kernel
    does 4 instead of 6 matmuls per tile. ``causal`` masks bottom-right aligned (key j is seen
    by query i iff ``j <= i + Nk - Nq``); a query that sees no key gets O = O_dot = 0.
    Differentiable in all six inputs; a loss on O alone takes the primal-only backward.
    """
    o, o_dot, _, _ = torch.ops.pyflowmap.dual_attention(q, k, v, q_dot, k_dot, v_dot, causal, _scale(q, scale))
    return o, o_dot


@fused_op(twin=_ref.dual_attention, kernel="dual_attention", cpu_dtypes=_CPU_DTYPES)
def dual_attention(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, causal: bool = False,
                   scale: float | None = None) -> torch.Tensor:
    """The stacked form the dual layers use: ``[2B, H, N, D]`` inputs ``[x; x_dot]``, output
    ``[O; O_dot]``."""
    for name, t in (("qq", qq), ("kk", kk), ("vv", vv)):
        if t.dim() != 4 or t.shape[0] % 2:
            raise ValueError(f"dual_attention: `{name}` must be a stacked [2B, heads, N, D] tensor, got {tuple(t.shape)}")
    b = qq.shape[0] // 2
    o, o_dot = jvp_attention(qq[:b], kk[:b], vv[:b], qq[b:], kk[b:], vv[b:], causal, scale)
    return torch.cat([o, o_dot])


def _check(q, k, v, q_dot, k_dot, v_dot, op="dual_attention"):
    torch._check(q.dim() == 4, lambda: f"{op}: `q` must be [batch, heads, Nq, D], got {tuple(q.shape)}")
    torch._check(k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3],
                 lambda: f"{op}: `k` must be [batch, heads, Nk, D] matching `q`")
    torch._check(v.shape == k.shape, lambda: f"{op}: `v` must have the shape of `k`")
    for name, t, like in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        torch._check(t is None or (t.shape == like.shape and t.dtype == like.dtype),
                     lambda: f"{op}: `{name}` must match its primal in shape and dtype")


@torch.library.register_fake("pyflowmap::dual_attention")
def _fake(q, k, v, q_dot, k_dot, v_dot, causal, scale):
    _check(q, k, v, q_dot, k_dot, v_dot)
    stats = q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake("pyflowmap::dual_attention_backward")
def _fake_backward(grad_o, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, causal, scale):
    _check(q, k, v, q_dot, k_dot, v_dot, "dual_attention_backward")

    def like(t, present=True):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if present else q.new_empty(0)

    return (like(q), like(k), like(v), like(q, q_dot is not None), like(k, k_dot is not None),
            like(v, v_dot is not None))


def _setup(ctx, inputs, output):
    q, k, v, q_dot, k_dot, v_dot, causal, scale = inputs
    o, o_dot, lse, mu = output
    ctx.mark_non_differentiable(lse, mu)
    ctx.has = (q_dot is not None, k_dot is not None, v_dot is not None)
    ctx.causal, ctx.scale = causal, scale
    z = q.new_empty(0)  # placeholders keep the saved list fixed-length
    ctx.save_for_backward(q, k, v, q_dot if q_dot is not None else z, k_dot if k_dot is not None else z,
                          v_dot if v_dot is not None else z, o, o_dot, lse, mu)


def _backward(ctx, grad_o, grad_o_dot, _grad_lse, _grad_mu):
    q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu = ctx.saved_tensors
    tangents = [t if has else None for t, has in zip((q_dot, k_dot, v_dot), ctx.has)]
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    grads = torch.ops.pyflowmap.dual_attention_backward(grad_o, grad_o_dot, q, k, v, *tangents, o, o_dot, lse, mu,
                                                        ctx.causal, ctx.scale)
    dq, dk, dv, dqd, dkd, dvd = grads
    return (dq, dk, dv, dqd if ctx.has[0] else None, dkd if ctx.has[1] else None, dvd if ctx.has[2] else None,
            None, None)


torch.library.register_autograd("pyflowmap::dual_attention", _backward, setup_context=_setup)
forbid_double_backward("pyflowmap::dual_attention_backward")
