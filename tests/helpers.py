"""Shared test models: the exact Gaussian flow map and small networks."""

from __future__ import annotations

import torch
from torch import nn


class GaussianFlowMap(nn.Module):
    """The exact velocity of the linear interpolant between N(0, s0^2 I) and N(m, diag(d)).

    I_t ~ N(t m, diag(sig_t^2)), sig_t^2 = (1 - t)^2 s0^2 + t^2 d. The probability flow is
    affine per coordinate: X_{s,t}(x) = mu_t + (sig_t / sig_s)(x - mu_s), hence
    v_{s,t}(x) = (X_{s,t}(x) - x) / (t - s), and on the diagonal
    b_t(x) = m + (sig_t' / sig_t)(x - mu_t). ``scale`` != 1 perturbs the off-diagonal map.
    """

    def __init__(self, mean, var, base_std=1.0, scale: float = 1.0):
        super().__init__()
        self.register_buffer("m", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("d", torch.as_tensor(var, dtype=torch.float64))
        self.s0 = base_std
        self.scale = scale

    def sig(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s0**2 + t**2 * self.d)

    def dsig(self, t):
        return (-(1 - t) * self.s0**2 + t * self.d) / self.sig(t)

    def velocity(self, x, t):
        t = t[:, None].to(x.dtype)
        return self.m + self.dsig(t) / self.sig(t) * (x - t * self.m)

    def exact_map(self, x, s, t):
        s, t = s[:, None].to(x.dtype), t[:, None].to(x.dtype)
        return t * self.m + self.sig(t) / self.sig(s) * (x - s * self.m)

    def forward(self, x, s, t):
        dt = (t - s)[:, None]
        diag = dt.abs() < 1e-12
        safe = torch.where(diag, torch.ones_like(dt), dt)
        v_off = (self.exact_map(x, s, t) - x) / safe
        v = torch.where(diag, self.velocity(x, t), v_off)
        # the perturbation vanishes on the diagonal, so the velocity stays exact
        return v * (1 + (self.scale - 1) * dt)


def rand(*shape, seed=0, dtype=torch.float64):
    """A seeded standard normal tensor (float64 by default), independent of the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mlp(dim=2, hidden=32, depth=2, dtype=torch.float64, seed=0):
    """A small FlowMapMLP with a non-zero head (so residuals are non-trivial)."""
    from pyflowmap.nn import FlowMapMLP

    torch.manual_seed(seed)
    net = FlowMapMLP(dim=dim, hidden=hidden, depth=depth, emb_dim=8).to(dtype)
    nn.init.normal_(net.head.weight, std=0.3)
    nn.init.normal_(net.head.bias, std=0.1)
    # slower embedding frequencies keep finite differences accurate in tests
    net.emb_s.freqs.div_(10)
    net.emb_dt.freqs.div_(10)
    return net


class TinyDualNet(nn.Module):
    """A one-hidden-layer tanh network that carries tangents explicitly (the ``dual`` protocol).

    v = tanh(x W + s a + t b + c) W2; with tangents, z_dot = x_dot W + s_dot a + t_dot b and
    v_dot = ((1 - tanh(z)^2) z_dot) W2. Used to prove the objectives accept such networks.
    """

    supports_tangents = True

    def __init__(self, dim=2, hidden=16, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=dtype) * 0.5)
        self.a = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.1)
        self.W2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) * 0.5)

    def forward(self, x, s, t, tangents=None):
        z = x @ self.W + s[:, None] * self.a + t[:, None] * self.b + self.c
        h = torch.tanh(z)
        v = h @ self.W2
        if tangents is None:
            return v
        x_dot, s_dot, t_dot = tangents
        z_dot = torch.zeros_like(z)
        if x_dot is not None:
            z_dot = z_dot + x_dot @ self.W
        if s_dot is not None:
            z_dot = z_dot + torch.as_tensor(s_dot, dtype=z.dtype).reshape(-1, 1) * self.a
        if t_dot is not None:
            z_dot = z_dot + torch.as_tensor(t_dot, dtype=z.dtype).reshape(-1, 1) * self.b
        return v, ((1 - h**2) * z_dot) @ self.W2


# the short image runs on the 8x8 digits (tests/test_images_train.py, test_images_scm.py)
DIGITS_TINY = dict(dataset="digits", ch=16, emb_dim=16, batch=64, lr=2e-3, warmup=10, log_every=10, ckpt_every=1000)
