"""Time samplers for flow-map training: the diagonal s = t and the upper triangle s < t."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyflowmap import _moved
from pyflowmap.validation import MAX_BATCH, check_count, check_real


@dataclass
class TimeSampler:
    """Draws (s, t) pairs: a fraction ``diag_fraction`` on the diagonal, the rest with s < t.

    The first ``n_diag`` entries are diagonal (s = t, trained by flow matching), the others
    off-diagonal (trained by the distillation term), as in the paper's code:
    ``n_diag = max(1, int(n * diag_fraction))`` when ``diag_fraction > 0``.

    ``distribution="uniform"``: t ~ U[t_min, t_max] on the diagonal and (s, t) uniform on the
    triangle (the min and max of two uniforms). ``"logit_normal"``: every draw is
    sigmoid(N(logit_mean, logit_std)) mapped to [t_min, t_max].
    """

    diag_fraction: float = 0.75
    distribution: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        for name in ("diag_fraction", "logit_mean", "logit_std", "t_min", "t_max"):
            check_real(f"TimeSampler: {name}", getattr(self, name))
        if not 0.0 <= self.diag_fraction <= 1.0:
            raise ValueError(f"diag_fraction must be in [0, 1], got {self.diag_fraction}")
        if self.distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"distribution must be 'uniform' or 'logit_normal', got {self.distribution!r}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"TimeSampler: need 0 <= t_min < t_max <= 1 (noise at 0, data at 1), "
                             f"got t_min={self.t_min}, t_max={self.t_max}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}")

    def n_diagonal(self, n: int) -> int:
        if n == 0 or self.diag_fraction == 0.0:
            return 0
        return min(n, max(1, int(n * self.diag_fraction)))

    def _draw(self, n, generator, device, dtype):
        if self.distribution == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        else:
            z = torch.randn(n, generator=generator, device=device, dtype=dtype)
            u = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return self.t_min + (self.t_max - self.t_min) * u

    def sample(self, n: int, generator=None, device=None, dtype=torch.float32):
        """Returns ``(s, t, n_diag)`` with ``s``, ``t`` of shape ``[n]``."""
        n = check_count("TimeSampler.sample: n", n, minimum=0, maximum=MAX_BATCH)
        n_diag = self.n_diagonal(n)
        n_off = n - n_diag
        t_diag = self._draw(n_diag, generator, device, dtype)
        a = self._draw(n_off, generator, device, dtype)
        b = self._draw(n_off, generator, device, dtype)
        s = torch.cat([t_diag, torch.minimum(a, b)])
        t = torch.cat([t_diag, torch.maximum(a, b)])
        return s, t, n_diag


@dataclass
class DyadicTimeSampler(TimeSampler):
    """Shortcut models' times (Frans et al. 2024): the diagonal as :class:`TimeSampler`'s (flow
    matching, d = 0), and off it a jump t - s = D = 2^-j with j uniform in {0, ..., levels - 1}
    starting on that grid, s = i D with i uniform in {0, ..., 2^j - 1}. The self-consistency
    target is built from two half jumps of d = D / 2; the finest half jump 2^-levels is the level
    the diagonal trains (:class:`pyflowmap.nn.embeddings.DyadicStepEmbedding`)."""

    levels: int = 7

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 1 <= self.levels <= 30:
            raise ValueError(f"DyadicTimeSampler: levels must be an int in [1, 30], got {self.levels!r}")
        if (self.t_min, self.t_max) != (0.0, 1.0):
            raise ValueError("DyadicTimeSampler: the dyadic grid spans [0, 1]; t_min and t_max cannot change")

    def sample(self, n: int, generator=None, device=None, dtype=torch.float32):
        n = check_count("DyadicTimeSampler.sample: n", n, minimum=0, maximum=MAX_BATCH)
        n_diag = self.n_diagonal(n)
        n_off = n - n_diag
        t_diag = self._draw(n_diag, generator, device, dtype)
        j = torch.randint(0, self.levels, (n_off,), generator=generator, device=device)
        slots = torch.pow(2.0, j.to(torch.float64))  # 2^j jumps of D = 1 / 2^j, exact in float64
        # i uniform in {0, ..., 2^j - 1}: floor(u 2^j)
        u = torch.rand(n_off, generator=generator, device=device, dtype=torch.float64)
        start = torch.floor(u * slots).clamp_max(slots - 1)
        s = torch.cat([t_diag, (start / slots).to(dtype)])
        t = torch.cat([t_diag, ((start + 1) / slots).to(dtype)])
        return s, t, n_diag


def psd_gamma(n: int, kind: str | float = "uniform", generator=None, device=None, dtype=torch.float32):
    """The PSD split weight g, shape ``[n]``.

    ``"uniform"`` (PSD-U): g ~ U[0,1]; ``"midpoint"`` (PSD-M): g = 1/2; a float in [0, 1]: that
    constant (g = 0 or 1 makes the PSD residual vanish identically, a useful check).
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    if kind == "midpoint":
        kind = 0.5
    if isinstance(kind, (int, float)) and not isinstance(kind, bool) and 0.0 <= kind <= 1.0:
        return torch.full((n,), float(kind), device=device, dtype=dtype)
    raise ValueError(f"PSD gamma must be 'uniform', 'midpoint' or a float in [0, 1], got {kind!r}")


def intermediate_time(s: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """u = g s + (1 - g) t, so that u - s = (1 - g)(t - s) and t - u = g (t - s)."""
    if g.shape != s.shape or t.shape != s.shape:
        raise ValueError(f"intermediate_time: s, t and g must share a shape, got {tuple(s.shape)}, "
                         f"{tuple(t.shape)}, {tuple(g.shape)}")
    return g * s + (1 - g) * t


# moved in the restructure; the old path keeps working with a DeprecationWarning
__getattr__ = _moved.forward(__name__, {'ECTSchedule': 'pyflowmap.consistency'})
