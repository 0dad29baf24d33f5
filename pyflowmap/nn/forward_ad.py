"""autograd.Functions that give pyflowmap layers a forward-mode (``jvp``) rule built on the
fused dual kernels, so ``torch.func.jvp`` over a pyflowmap.nn model in PRIMAL mode works and
runs the same fused code as dual mode. This is for users' own models and tools that insist on
torch.func; pyflowmap's objectives use dual mode directly, which also works under DDP, FSDP
and torch.compile.

The attention rule matters most: PyTorch's fused attention has no forward-AD rule at all
("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu ...").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyflowmap.nn import functional as DF
from pyflowmap.reference import math_attention


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
        q, k, v = ctx.saved_tensors
        # Inside a double backward (grad mode on) the recomputation must itself be
        # differentiable: SDPA's CPU backward has no derivative, so math attention runs then.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if create_graph:
                qkv = [t if t.requires_grad else t.detach().requires_grad_() for t in (q, k, v)]
                o = math_attention(*qkv, ctx.causal)
            else:
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                o = F.scaled_dot_product_attention(*qkv, is_causal=ctx.causal)
            grads = torch.autograd.grad(o, qkv, g, create_graph=create_graph)
        return (*grads, None)

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _causal_dot):
        q, k, v = ctx.saved_tensors
        oo = DF.dual_attention(DF.stack(q, q_dot), DF.stack(k, k_dot), DF.stack(v, v_dot), ctx.causal)
        return DF.split(oo)[1]
