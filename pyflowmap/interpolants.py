"""Interpolants I_t = alpha_t x0 + beta_t x1 between a base sample x0 and a data sample x1.

Time runs from the base (t = 0) to the data (t = 1). The EDM sigma path used by ECT has its own
time variable (sigma, data at sigma = 0) and lives in :class:`EDMSigmaPath`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time ``[B]`` (or a scalar) so it broadcasts against ``x`` ``[B, ...]``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    return t.reshape((t.shape[0],) + (1,) * (x.dim() - 1))


class Interpolant(ABC):
    """Deterministic interpolant with alpha_0 = beta_1 = 1 and alpha_1 = beta_0 = 0."""

    name: str = "interpolant"

    @abstractmethod
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, beta_t)."""

    @abstractmethod
    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha/dt, d beta/dt)."""

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """I_t = alpha_t x0 + beta_t x1; ``t`` is ``[B]``."""
        a, b = self.coefficients(expand_time(t, x0))
        return a * x0 + b * x1

    def velocity_target(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dI_t/dt = alpha'_t x0 + beta'_t x1, the flow-matching regression target."""
        da, db = self.derivatives(expand_time(t, x0))
        return da * x0 + db * x1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearInterpolant(Interpolant):
    """alpha = 1 - t, beta = t (the paper's): dI/dt = x1 - x0."""

    name = "linear"

    def coefficients(self, t):
        return 1 - t, t

    def derivatives(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


class TrigInterpolant(Interpolant):
    """alpha = cos(pi t / 2), beta = sin(pi t / 2): variance preserving for unit-variance ends."""

    name = "trig"

    def coefficients(self, t):
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def derivatives(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


INTERPOLANTS = {"linear": LinearInterpolant, "trig": TrigInterpolant}


def make_interpolant(name: str | Interpolant) -> Interpolant:
    if isinstance(name, Interpolant):
        return name
    try:
        return INTERPOLANTS[name]()
    except KeyError:
        raise ValueError(f"unknown interpolant {name!r}; choose from {sorted(INTERPOLANTS)}") from None


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


class GaussianBase:
    """Base distribution N(mean, std^2) with ``std`` a float or a per-coordinate tensor.

    :meth:`adaptive` scales it to the data's per-coordinate std, as the paper does for 2D data.
    """

    def __init__(self, std: float | torch.Tensor = 1.0, mean: float | torch.Tensor = 0.0):
        std_t = torch.as_tensor(std, dtype=torch.float64)
        if not torch.all(torch.isfinite(std_t)) or torch.any(std_t <= 0):
            raise ValueError(f"GaussianBase: std must be finite and positive, got {std}")
        self.std = std
        self.mean = mean

    @classmethod
    def adaptive(cls, data: torch.Tensor) -> GaussianBase:
        """Per-coordinate std (and zero mean) matched to a data sample ``[N, ...]``."""
        if data.shape[0] < 2:
            raise ValueError("GaussianBase.adaptive needs at least two data samples")
        return cls(std=data.double().std(dim=0).clamp_min(1e-6).float())

    def sample(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        std = torch.as_tensor(self.std, dtype=dtype, device=z.device)
        mean = torch.as_tensor(self.mean, dtype=dtype, device=z.device)
        return mean + std * z

    def state_dict(self) -> dict:
        return {"std": self.std, "mean": self.mean}

    def __repr__(self) -> str:
        std = self.std.tolist() if isinstance(self.std, torch.Tensor) else self.std
        return f"GaussianBase(std={std})"
