"""Lagrangian objectives: d/dt X_{s,t}(I_s) must equal the velocity at X_{s,t}(I_s)."""

from __future__ import annotations

import torch

from pyflowmap.objectives.base import NO_CONDITION, Objective, as_velocity, freeze, guided_call


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

    def teacher_velocity(self, flowmap, X, t, cond=NO_CONDITION):
        # the network's own diagonal given the same condition: under training guidance it is
        # the guided velocity the diagonal learns
        with torch.no_grad():
            return flowmap.velocity(X.detach(), t, **cond.kw)

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None, cond=NO_CONDITION):
        xs = self.interpolant.interpolate(x0, x1, s)
        X, dX_dt = self.mode(flowmap).jvp(flowmap, xs, s, t, t_dot=_ones(t), lazy=True, **cond.kw)
        return dX_dt, self.teacher_velocity(flowmap, X, t, cond)


class LMD(LSD):
    """Lagrangian map distillation from a frozen velocity teacher b (flow map matching).

    residual = d/dt X_{s,t}(I_s) - b_t(X_{s,t}(I_s)). By default the gradient also flows
    through the teacher's input X (the teacher's own weights stay frozen);
    ``semigradient=True`` stops it there: b_t(sg(X)). The diagonal regresses v_{t,t} on b_t.
    Conditioned, the teacher is called ``b(x, t, c=c)``; under training guidance it is the
    guided b_null + w (b_c - b_null).
    """

    name = "lmd"

    def __init__(self, teacher, semigradient: bool = False, **kwargs):
        frozen = freeze(teacher)
        b = as_velocity(frozen)
        super().__init__(diagonal_teacher=b, **kwargs)
        self.teacher = frozen
        self.semigradient = semigradient
        self._b = b

    def teacher_velocity(self, flowmap, X, t, cond=NO_CONDITION):
        if self.semigradient:
            with torch.no_grad():
                return guided_call(self._b, cond, X.detach(), t)
        return guided_call(self._b, cond, X, t)
