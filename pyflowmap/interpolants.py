"""Interpolants I_t = alpha_t x0 + beta_t x1 between a base sample x0 and a data sample x1.

Time runs from the base (t = 0) to the data (t = 1). The EDM sigma path of the consistency
models has its own time variable (sigma, data at sigma = 0) and lives with them in
:mod:`pyflowmap.consistency`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from pyflowmap import _moved
from pyflowmap._tensors import expand_time


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


class GaussianBase:
    """Base distribution N(mean, std^2) with ``std`` a float or a per-coordinate tensor.

    :meth:`adaptive` scales it to the data's per-coordinate std, as the paper does for 2D data.
    """

    def __init__(self, std: float | torch.Tensor = 1.0, mean: float | torch.Tensor = 0.0):
        for name, v in (("std", std), ("mean", mean)):
            if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)) or \
                    (isinstance(v, torch.Tensor) and (v.numel() == 0 or not v.is_floating_point())):
                raise TypeError(f"GaussianBase: {name} must be a number or a non-empty floating tensor, got {v!r}")
            # finite in float32 too: samples are drawn in the data's dtype
            if not torch.isfinite(torch.as_tensor(v, dtype=torch.float64).float()).all():
                raise ValueError(f"GaussianBase: {name} must be finite (in float32), got {v}")
        if torch.any(torch.as_tensor(std, dtype=torch.float64) <= 0):
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
        if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"GaussianBase.sample: shape must be a tuple of sizes, got {type(shape).__name__}")
        try:  # checked by torch on the way, not before: this runs every training step
            z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
            std = torch.as_tensor(self.std, dtype=dtype, device=z.device)
            mean = torch.as_tensor(self.mean, dtype=dtype, device=z.device)
            return mean + std * z
        except RuntimeError as e:  # a negative size, or std / mean that do not broadcast against it
            raise ValueError(f"GaussianBase.sample: no samples of shape {tuple(shape)} with std of shape "
                             f"{tuple(torch.as_tensor(self.std).shape)} and mean of shape "
                             f"{tuple(torch.as_tensor(self.mean).shape)}: {str(e).splitlines()[0]}") from None

    def state_dict(self) -> dict:
        return {"std": self.std, "mean": self.mean}

    def __repr__(self) -> str:
        std = self.std.tolist() if isinstance(self.std, torch.Tensor) else self.std
        return f"GaussianBase(std={std})"


# moved in the restructure; the old path keeps working with a DeprecationWarning
__getattr__ = _moved.forward(__name__, {'EDMSigmaPath': 'pyflowmap.consistency'})
