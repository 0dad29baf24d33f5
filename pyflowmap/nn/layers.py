"""Layers that run in primal mode, ``layer(x)``, and in dual mode, ``layer.dual(xx)`` on the
stacked ``[x; x_dot]`` (see :mod:`pyflowmap.reference.dual`). Parameters carry no tangent."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap.nn import functional as DF
from pyflowmap.nn import forward_ad


class DualModule(nn.Module):
    """A module with a primal ``forward`` and a tangent-carrying ``dual``."""

    def dual(self, xx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Linear(nn.Linear, DualModule):
    """y = x W^T + b; dual: one GEMM over [x; x_dot], bias on the primal half (y_dot = x_dot W^T)."""

    def dual(self, xx):
        return DF.dual_linear(xx, self.weight, self.bias)


class Conv2d(nn.Conv2d, DualModule):
    """Convolution; the tangent is the same convolution of x_dot without bias (one conv over 2B)."""

    def dual(self, xx):
        y = self._conv_forward(xx, self.weight, None)
        if self.bias is None:
            return y
        half = y.shape[0] // 2
        # under autocast the bias follows the convolution's dtype, as in nn.Conv2d
        return torch.cat([y[:half] + self.bias.to(y.dtype).view(1, -1, 1, 1), y[half:]])


class Activation(DualModule):
    """GELU (exact) or SiLU; dual: y_dot = a'(z) z_dot, fused."""

    def __init__(self, kind: str = "gelu"):
        super().__init__()
        if kind not in ("gelu", "silu"):
            raise ValueError(f"activation must be 'gelu' or 'silu', got {kind!r}")
        self.kind = kind

    def forward(self, x):
        return forward_ad.activation(x, self.kind)

    def dual(self, xx):
        return DF.dual_act(xx, self.kind)

    def extra_repr(self):
        return self.kind


def GELU():
    return Activation("gelu")


def SiLU():
    return Activation("silu")


class LayerNorm(nn.LayerNorm, DualModule):
    """nn.LayerNorm whose primal forward has a jvp rule with correct gradients (forward_ad.LayerNormFn)."""

    def forward(self, x):
        return forward_ad.layer_norm(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps)

    def dual(self, xx):
        return DF.dual_layer_norm(xx, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(DualModule):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y

    def dual(self, xx):
        return DF.dual_rms_norm(xx, self.weight, self.eps)


class GroupNorm(nn.GroupNorm, DualModule):
    def dual(self, xx):
        return DF.dual_group_norm(xx, self.num_groups, self.weight, self.bias, self.eps)


class Sequential(nn.Sequential, DualModule):
    """nn.Sequential whose ``dual`` chains the children's ``dual``."""

    def dual(self, xx):
        for layer in self:
            xx = layer.dual(xx)
        return xx


def modulate(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FiLM / AdaLN: h (1 + scale) + shift (primal)."""
    return h * (1 + scale) + shift


stack = DF.stack  # re-exported: models build their stacked inputs with it
