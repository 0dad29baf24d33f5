"""Multi-head self-attention over tokens, with a tangent-carrying dual mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyflowmap.nn import functional as DF
from pyflowmap.nn.layers import DualModule, Linear


class Attention(DualModule):
    """Self-attention on ``[B, N, dim]`` tokens: qkv projection, ``heads`` heads, output projection.

    Primal mode uses ``F.scaled_dot_product_attention`` (with a forward-AD rule, so
    ``torch.func.jvp`` works, see :mod:`pyflowmap.nn.forward_ad`); dual mode the tangent formula of
    KERNELS.md section 2 (reference math attention here; the JVP flash kernel plugs into
    ``pyflowmap.ops.dual_attention`` on CUDA in its own issue).
    """

    def __init__(self, dim: int, heads: int = 4, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def _heads(self, x):
        b, n, d = x.shape
        q, k, v = x.reshape(b, n, 3, self.heads, d // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, o):
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x):
        from pyflowmap.nn.forward_ad import AttentionFn

        q, k, v = self._heads(self.qkv(x))
        return self.proj(self._merge(AttentionFn.apply(q, k, v, self.causal)))

    def dual(self, xx):
        q, k, v = self._heads(self.qkv.dual(xx))
        return self.proj.dual(self._merge(DF.dual_attention(q, k, v, self.causal)))


def math_attention(q, k, v, causal=False):
    """softmax(Q K^T / sqrt(d)) V in plain ops (forward-AD capable, O(N^2) memory)."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v
