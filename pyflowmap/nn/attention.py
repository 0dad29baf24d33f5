"""Multi-head self-attention over tokens, with a tangent-carrying dual mode."""

from __future__ import annotations

from pyflowmap import _moved
from pyflowmap.nn import functional as DF
from pyflowmap.nn.forward_ad import attention
from pyflowmap.nn.layers import DualModule, Linear


class Attention(DualModule):
    """Self-attention on ``[B, N, dim]`` tokens: qkv projection, ``heads`` heads, output projection.

    Primal mode uses ``F.scaled_dot_product_attention`` (with a forward-AD rule, so
    ``torch.func.jvp`` works, see :mod:`pyflowmap.nn.forward_ad`); dual mode runs
    ``pyflowmap.ops.dual_attention``: O and O_dot in one streaming pass (the flash-style kernel on
    CUDA for 16-bit inputs with head dim 64 / 128, the chunked O(N)-memory path elsewhere), with
    the tangent rule of docs/tangents.md section 8.
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
        q, k, v = self._heads(self.qkv(x))
        return self.proj(self._merge(attention(q, k, v, self.causal)))

    def dual(self, xx):
        q, k, v = self._heads(self.qkv.dual(xx))
        return self.proj.dual(self._merge(DF.dual_attention(q, k, v, self.causal)))


# moved in the restructure; the old path keeps working with a DeprecationWarning
__getattr__ = _moved.forward(__name__, {'math_attention': 'pyflowmap.reference'})
