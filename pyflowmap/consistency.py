"""Consistency models in EDM's sigma parameterization (ECT, MATH.md section 5): the
preconditioned model f(x, sigma) and its 1-step / multi-step samplers."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap.flowmap import batch_time
from pyflowmap.interpolants import EDMSigmaPath, expand_time


class EDMConsistency(nn.Module):
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) around an image network ``net(x, s, t)``
    (a :class:`pyflowmap.nn.UNetFlowMap` built with ``data_std=1``; it gets s = t = c_noise, so
    its t - s embedding is constant).

    ``boundary=True`` (evaluation) uses sigma - sigma_min in c_skip / c_out, so that
    f(x, sigma_min) = x exactly; training uses sigma itself, as ECT does.
    """

    def __init__(self, net: nn.Module, path: EDMSigmaPath | None = None):
        super().__init__()
        self.net = net
        self.path = path if path is not None else EDMSigmaPath(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)

    def forward(self, x: torch.Tensor, sigma, boundary: bool = False) -> torch.Tensor:
        sigma = batch_time(sigma, x)
        if not bool((sigma > 0).all()):
            raise ValueError("EDMConsistency: sigma must be positive (c_noise = log(sigma) / 4)")
        c_skip, c_out, c_in, c_noise = self.path.precondition(sigma, boundary=boundary)
        out = self.net(expand_time(c_in, x) * x, c_noise, c_noise)
        return expand_time(c_skip, x) * x + expand_time(c_out, x) * out


def karras_sigmas(n: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> list[float]:
    """EDM's rho-spaced grid of ``n`` levels from sigma_max down to sigma_min."""
    if n == 1:
        return [float(sigma_max)]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [float((a + i / (n - 1) * (b - a)) ** rho) for i in range(n)]


def intermediate_sigmas(steps: int, t_mid: float = 0.821, sigma_low: float = 0.02) -> list[float]:
    """The re-noise levels of a ``steps``-step consistency sampler: none for 1 step, ECT's
    ``t_mid`` for 2, and a rho = 7 grid from ``t_mid`` down to ``sigma_low`` beyond."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [] if steps == 1 else karras_sigmas(steps - 1, t_mid, sigma_low) if steps > 2 else [float(t_mid)]


@torch.no_grad()
def consistency_sample(model: EDMConsistency, noise: torch.Tensor, steps: int = 1, sigmas: list[float] | None = None,
                       t_mid: float = 0.821, generator: torch.Generator | None = None) -> torch.Tensor:
    """x = f(sigma_max z, sigma_max); then for each re-noise level s_i: x = f(x + s_i n, s_i)
    with fresh Gaussian n (ECT's 2-step sampler re-noises to t_mid = 0.821)."""
    if not torch.isfinite(noise).all():
        raise ValueError("consistency_sample: noise contains NaN or inf")
    path = model.path
    levels = intermediate_sigmas(steps, t_mid) if sigmas is None else list(sigmas)
    if any(not (path.sigma_min < s <= path.sigma_max) for s in levels):
        raise ValueError(f"consistency_sample: re-noise levels must lie in ({path.sigma_min}, {path.sigma_max}]")
    x = model(path.sigma_max * noise, path.sigma_max, boundary=True)
    for s in levels:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x = model(x + s * z, s, boundary=True)
    return x
