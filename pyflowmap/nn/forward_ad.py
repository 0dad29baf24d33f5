"""autograd.Functions that give pyflowmap layers a forward-mode (``jvp``) rule built on the
fused dual kernels, so ``torch.func.jvp`` over a pyflowmap.nn model in PRIMAL mode works and
runs the same fused code as dual mode. This is for users' own models and tools that insist on
torch.func; pyflowmap's objectives use dual mode directly, which also works under DDP, FSDP
and torch.compile.

The attention rule matters most: PyTorch's fused attention has no forward-AD rule at all
("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu ...").
The LayerNorm rule is a correctness fix: reverse mode through the forward-AD tangent of the
native ``F.layer_norm`` gives wrong gradients in torch 2.13 (pytorch/pytorch#196700; its saved
mean / rstd carry no history), so ``derivative="jvp"`` over a native LayerNorm trains on wrong
gradients without an error. GroupNorm and RMSNorm are right natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyflowmap.nn import functional as DF
from pyflowmap.reference import math_attention


def _recomputed_grads(fn, inputs, g):
    """Gradients of ``fn(create_graph, *inputs)`` against ``g``, recomputed under autograd (None
    for a None input). Inside a double backward (grad mode on) the recomputation keeps its graph."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        ins = [t if t is None or (create_graph and t.requires_grad) else t.detach().requires_grad_() for t in inputs]
        out = fn(create_graph, *ins)
        grads = iter(torch.autograd.grad(out, [t for t in ins if t is not None], g, create_graph=create_graph))
    return [None if t is None else next(grads) for t in ins]


class ActivationFn(torch.autograd.Function):
    """y = a(z) with backward a'(z) g and jvp a'(z) z_dot (the fused dual kernel)."""

    @staticmethod
    def forward(z, kind):
        return F.gelu(z) if kind == "gelu" else F.silu(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, kind = inputs
        ctx.kind = kind
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        if ctx.kind == "gelu":
            return torch.ops.aten.gelu_backward(g, z), None
        s = torch.sigmoid(z)
        return g * s * (1 + z * (1 - s)), None

    @staticmethod
    def jvp(ctx, z_dot, _kind_dot):
        (z,) = ctx.saved_tensors
        return DF.split(DF.dual_act(torch.cat([z, z_dot]), ctx.kind))[1]


class LayerNormFn(torch.autograd.Function):
    """y = layer_norm(x) * weight + bias with the dual LayerNorm kernel as its jvp, whose
    tangent is itself differentiable (the reason this exists, see the module docstring)."""

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.normalized_shape, weight, bias, ctx.eps = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.save_for_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        # recompute under autograd: one extra normalisation, and a double backward comes for free
        gx, gw, gb = _recomputed_grads(lambda _, x, w, b: F.layer_norm(x, ctx.normalized_shape, w, b, ctx.eps),
                                       ctx.saved_tensors, g)
        return gx, None, gw, gb, None

    @staticmethod
    def jvp(ctx, x_dot, _shape_dot, w_dot, b_dot, _eps_dot):
        x, weight, bias = ctx.saved_tensors
        if x_dot is None:
            x_dot = torch.zeros_like(x)
        if w_dot is None and b_dot is None:  # the usual case: parameters carry no tangent
            return DF.split(DF.dual_layer_norm(torch.cat([x, x_dot]), ctx.normalized_shape, weight, bias, ctx.eps))[1]
        xhat, xhat_dot = DF.split(DF.dual_layer_norm(torch.cat([x, x_dot]), ctx.normalized_shape, None, None, ctx.eps))
        y_dot = xhat_dot * weight if weight is not None else xhat_dot
        if w_dot is not None:
            y_dot = y_dot + xhat * w_dot
        return y_dot + b_dot if b_dot is not None else y_dot


class AttentionFn(torch.autograd.Function):
    """O = softmax(Q K^T / sqrt(d)) V through SDPA, with the attention tangent rule
    (docs/tangents.md section 8) as its jvp. The backward recomputes SDPA under autograd (one extra forward)."""

    @staticmethod
    def forward(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal = inputs
        ctx.causal = causal
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, g):
        # Inside a double backward the recomputation must itself be differentiable: SDPA's CPU
        # backward has no derivative, so math attention runs then.
        grads = _recomputed_grads(lambda create_graph, q, k, v: math_attention(q, k, v, ctx.causal) if create_graph
                                  else F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal),
                                  ctx.saved_tensors, g)
        return (*grads, None)

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _causal_dot):
        q, k, v = ctx.saved_tensors
        oo = DF.dual_attention(DF.stack(q, q_dot), DF.stack(k, k_dot), DF.stack(v, v_dot), ctx.causal)
        return DF.split(oo)[1]


# The primal layers call these. Under torch.compile they run the native op: Dynamo cannot trace
# an autograd.Function with a custom jvp (a graph break at every layer), and the jvp rules
# serve torch.func.jvp alone, which a compiled step does not use (docs/precision.md).
def activation(z, kind: str):
    if torch.compiler.is_compiling():
        return F.gelu(z) if kind == "gelu" else F.silu(z)
    return ActivationFn.apply(z, kind)


def layer_norm(x, normalized_shape, weight, bias, eps: float):
    if torch.compiler.is_compiling():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return LayerNormFn.apply(x, normalized_shape, weight, bias, eps)


def attention(q, k, v, causal: bool):
    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return AttentionFn.apply(q, k, v, causal)
