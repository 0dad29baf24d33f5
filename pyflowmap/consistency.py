"""Consistency models in EDM's sigma parameterization (docs/objectives.md section 14): the sigma path,
the preconditioned model f(x, sigma), ECT's time schedule and the re-noise levels of its
samplers. The loss is :class:`pyflowmap.objectives.ECT`; sampling is :func:`pyflowmap.sample`
with ``kind="consistency"``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyflowmap import conditioning as cond_
from pyflowmap._tensors import batch_time, expand_time


class EDMSigmaPath:
    """The variance-exploding path of EDM and ECT: x_sigma = y + sigma * eps, data at sigma = 0.

    Also gives EDM's preconditioning f(x, sigma) = c_skip x + c_out F(c_in x, c_noise). With
    ``boundary=True`` (evaluation) sigma - sigma_min replaces sigma in c_skip and c_out, so that
    f(x, sigma_min) = x exactly.
    """

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def interpolate(self, eps: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return y + expand_time(sigma, y) * eps

    def velocity_target(self, eps: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """d x_sigma / d sigma = eps."""
        return eps

    def precondition(self, sigma: torch.Tensor, boundary: bool = False):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (any shape)."""
        sd = self.sigma_data
        s_eff = sigma - self.sigma_min if boundary else sigma
        c_skip = sd**2 / (s_eff**2 + sd**2)
        c_out = s_eff * sd / torch.sqrt(s_eff**2 + sd**2)
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        c_noise = torch.log(sigma) / 4
        return c_skip, c_out, c_in, c_noise

    def __repr__(self) -> str:
        return (f"EDMSigmaPath(sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max})")


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

    def forward(self, x: torch.Tensor, sigma, boundary: bool = False, c=None, w=None,
                guidance: float | None = None) -> torch.Tensor:
        """f(x, sigma | c); ``w``: the guidance input of a net that takes one; ``guidance``:
        classifier-free guidance of the output, f_null + guidance (f_c - f_null), from one call
        on the doubled batch."""
        sigma = batch_time(sigma, x)
        if not bool((sigma > 0).all()):
            raise ValueError("EDMConsistency: sigma must be positive (c_noise = log(sigma) / 4)")
        if guidance is not None:
            if c is None:
                raise ValueError("guidance needs a condition c to guide towards")
            w = None if w is None else batch_time(w, x)
            cc, xx, ss, ww = cond_.doubled(c, cond_.null_condition(self.net, c), x, sigma, w)
            f_c, f_null = self(xx, ss, boundary=boundary, c=cc, w=ww).chunk(2)
            return cond_.combine(f_c, f_null, guidance)
        c_skip, c_out, c_in, c_noise = self.path.precondition(sigma, boundary=boundary)
        kw = {k: v for k, v in (("c", c), ("w", None if w is None else batch_time(w, x))) if v is not None}
        out = self.net(expand_time(c_in, x) * x, c_noise, c_noise, **kw)
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


@dataclass
class ECTSchedule:
    """ECT's time pairs (docs/objectives.md section 14): t ~ lognormal(p_mean, p_std) (t is sigma) and the
    staged mapping r(t) = t (1 - n(t) / q^a), n(t) = 1 + k sigmoid(-b t), a = 1 + floor(iter / d),
    clamped to r >= 0. Early stages give r = 0 for small t (plain denoising: diffusion is the
    r = 0 special case of a consistency model); every stage shrinks t - r by q.
    """

    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_length: int = 4000
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if self.q <= 1:
            raise ValueError(f"ECT q must be > 1 (the per-stage shrink factor), got {self.q}")
        if self.stage_length < 1:
            raise ValueError(f"ECT stage_length must be >= 1, got {self.stage_length}")
        if self.p_std <= 0 or self.k < 0 or self.b < 0:
            raise ValueError("ECT needs p_std > 0, k >= 0, b >= 0")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"ECTSchedule: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")

    def stage(self, iteration: int) -> int:
        """a = 1 + floor(iteration / d)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return 1 + int(iteration) // self.stage_length

    def r(self, t: torch.Tensor, iteration: int) -> torch.Tensor:
        """r(t) at this training iteration, same shape as t."""
        n = 1 + self.k * torch.sigmoid(-self.b * t)
        return (t * (1 - n / self.q ** self.stage(iteration))).clamp_min(0.0)

    def sample_t(self, n: int, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.exp(self.p_mean + self.p_std * z).clamp(self.sigma_min, self.sigma_max)
