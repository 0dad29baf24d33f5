"""Eulerian objectives: d/ds X_{s,t}(x) + grad_x X_{s,t}(x) . v_s(x) = 0 at x = I_s."""

from __future__ import annotations

import torch

from pyflowmap.objectives.base import NO_CONDITION, Objective, as_velocity, freeze, guided_call


class ESD(Objective):
    """Eulerian self-distillation.

    residual = d/ds X_{s,t}(I_s) + sg(grad_x X_{s,t}(I_s) . v_{s,s}(I_s)) with the default
    ``spatial_stopgrad=True`` (the paper's image setting): gradients flow through d/ds X only,
    and the spatial term is a second derivative call without a graph. With
    ``spatial_stopgrad=False`` both terms come from one augmented call (tangent 1 on s,
    v_{s,s} on x) and both carry gradient; v_{s,s} itself is always a stop-gradient teacher.
    """

    name = "esd"
    uses_derivative = True

    def __init__(self, spatial_stopgrad: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.spatial_stopgrad = spatial_stopgrad

    def transport_velocity(self, flowmap, xs, s, cond=NO_CONDITION):
        with torch.no_grad():
            return flowmap.velocity(xs, s, **cond.kw)

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None, cond=NO_CONDITION):
        mode = self.mode(flowmap)
        xs = self.interpolant.interpolate(x0, x1, s)
        v = self.transport_velocity(flowmap, xs, s, cond)
        ones = torch.ones_like(s)
        if not self.spatial_stopgrad:
            _, total = mode.jvp(flowmap, xs, s, t, x_dot=v, s_dot=ones, lazy=True, **cond.kw)
            return total, 0.0
        _, dX_ds = mode.jvp(flowmap, xs, s, t, s_dot=ones, lazy=True, **cond.kw)
        with torch.no_grad():
            _, spatial = mode.jvp(flowmap, xs, s, t, x_dot=v, **cond.kw)
        return dX_ds, -spatial


class EMD(ESD):
    """Eulerian map distillation from a frozen velocity teacher b.

    residual = d/ds X_{s,t}(I_s) + grad_x X_{s,t}(I_s) . b_s(I_s). ``semigradient=True`` stops
    the gradient of the spatial term (Align Your Flow's distillation); the default lets both
    terms carry gradient. The diagonal regresses v_{t,t} on b_t.
    """

    name = "emd"

    def __init__(self, teacher, semigradient: bool = False, **kwargs):
        frozen = freeze(teacher)
        b = as_velocity(frozen)
        super().__init__(spatial_stopgrad=semigradient, diagonal_teacher=b, **kwargs)
        self.teacher = frozen
        self.semigradient = semigradient
        self._b = b

    def transport_velocity(self, flowmap, xs, s, cond=NO_CONDITION):
        with torch.no_grad():
            return guided_call(self._b, cond, xs, s)
