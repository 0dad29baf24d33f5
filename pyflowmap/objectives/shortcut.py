"""Shortcut models (Frans et al. 2024; docs/objectives.md section 18): PSD-M on the dyadic grid."""

from __future__ import annotations

from pyflowmap.objectives.progressive import PSD
from pyflowmap.times import DyadicTimeSampler


class Shortcut(PSD):
    """The shortcut model's loss in pyflowmap's flow-map convention: s(x_t, t, d) is the
    flow-map velocity v_{t,t+d}(x_t), so the update x_{t+d} = x_t + d s(x_t, t, d) is the jump
    X_{t,t+d}. Per batch, ``diag_fraction`` (1 - k, default 3/4) of the samples are flow
    matching at d = 0 (the diagonal), the rest self-consistency on the dyadic grid
    (:class:`~pyflowmap.times.DyadicTimeSampler`, ``levels`` = log2 of the finest step count):

        || v_{t,t+2d}(x_t) - sg((v_{t,t+d}(x_t) + v_{t+d,t+2d}(x_t + d v_{t,t+d}(x_t))) / 2) ||^2

    which is PSD-M's residual (the midpoint split) at those times. The network's step-size
    conditioning is built with ``step_embedding="dyadic"`` (an embedding of log2 d, d = 0 the
    finest level); with the default sinusoidal embedding of t - s this is PSD-M on the grid.
    Sampling: ``pf.sample(flowmap, noise, steps=K)``, K jumps of 1/K (K a power of two up to
    2^levels). Three network calls per self-consistency sample, no derivatives.
    """

    name = "shortcut"

    def __init__(self, levels: int = 7, diag_fraction: float = 0.75, **kwargs):
        if "times" in kwargs or "gamma" in kwargs:
            raise ValueError("Shortcut draws its own dyadic times and uses the midpoint split: pass levels= and "
                             "diag_fraction=, not times= or gamma=")
        super().__init__(gamma="midpoint", times=DyadicTimeSampler(diag_fraction=diag_fraction, levels=levels),
                         **kwargs)
        self.levels = levels

    def extra_repr(self) -> str:
        return super().extra_repr() + f", levels={self.levels}"
