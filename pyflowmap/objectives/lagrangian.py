"""Lagrangian objectives: d/dt X_{s,t}(I_s) must equal the velocity at X_{s,t}(I_s)."""

from __future__ import annotations

import torch

from pyflowmap.objectives.base import Objective, as_velocity, freeze


def _ones(t):
    return torch.ones_like(t)


class LSD(Objective):
    """Lagrangian self-distillation.

    residual = d/dt X_{s,t}(I_s) - sg(v_{t,t}(sg(X_{s,t}(I_s)))). X and d/dt X come from one
    derivative-mode call with tangent 1 on t; gradients reach the network only through
    d/dt X. The teacher is the current network (no EMA), evaluated without a graph.
    """

    name = "lsd"
    uses_derivative = True

    def teacher_velocity(self, flowmap, X, t):
        with torch.no_grad():
            return flowmap.velocity(X.detach(), t)

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None):
        xs = self.interpolant.interpolate(x0, x1, s)
        X, dX_dt = self.mode(flowmap).jvp(flowmap, xs, s, t, t_dot=_ones(t), lazy=True)
        return dX_dt, self.teacher_velocity(flowmap, X, t)


class LMD(LSD):
    """Lagrangian map distillation from a frozen velocity teacher b (flow map matching).

    residual = d/dt X_{s,t}(I_s) - b_t(X_{s,t}(I_s)). By default the gradient also flows
    through the teacher's input X (the teacher's own weights stay frozen);
    ``semigradient=True`` stops it there: b_t(sg(X)). The diagonal regresses v_{t,t} on b_t.
    """

    name = "lmd"

    def __init__(self, teacher, semigradient: bool = False, **kwargs):
        frozen = freeze(teacher)
        b = as_velocity(frozen)
        super().__init__(diagonal_teacher=b, **kwargs)
        self.teacher = frozen
        self.semigradient = semigradient
        self._b = b

    def teacher_velocity(self, flowmap, X, t):
        if self.semigradient:
            with torch.no_grad():
                return self._b(X.detach(), t)
        return self._b(X, t)
