"""Flow matching: every sample on the diagonal, v_{t,t}(I_t) regressed on dI_t/dt."""

from __future__ import annotations

from dataclasses import replace

from pyflowmap.objectives.base import Objective
from pyflowmap.times import TimeSampler


class FM(Objective):
    """Plain flow matching of the diagonal velocity (the ODE baseline).

    Trains only v_{t,t}; sample it with :func:`pyflowmap.sample_ode`. Off-diagonal entries of
    the map are untrained.
    """

    name = "fm"

    def __init__(self, times: TimeSampler | None = None, **kwargs):
        times = replace(times, diag_fraction=1.0) if times is not None else TimeSampler(diag_fraction=1.0)
        super().__init__(times=times, **kwargs)

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None, cond=None):  # pragma: no cover - never off-diagonal
        raise RuntimeError("FM has no off-diagonal term")
