"""Progressive objectives: one jump s -> t must equal two jumps s -> u -> t."""

from __future__ import annotations

import torch

from pyflowmap._tensors import expand_time
from pyflowmap.flowmap import FlowMap
from pyflowmap.objectives.base import NO_CONDITION, Objective, as_velocity, freeze, guided_call
from pyflowmap.times import intermediate_time, psd_gamma


class EulerTeacher(torch.nn.Module):
    """The first progressive teacher: one Euler step of a velocity b, X_{s,t}(x) = x + (t - s) b_s(x)."""

    def __init__(self, velocity):
        super().__init__()
        if isinstance(velocity, torch.nn.Module):
            self.velocity_module = velocity
        self._b = as_velocity(velocity)

    def velocity_field(self, x, s, t, cond=NO_CONDITION):
        return guided_call(self._b, cond, x, s)


class PSD(Objective):
    """Progressive self-distillation.

    With u = g s + (1 - g) t, residual = v_{s,t}(I_s) - sg((1 - g) v_{s,u}(I_s) + g v_{u,t}(X_{s,u}(I_s))),
    the semigroup X_{u,t} o X_{s,u} = X_{s,t} written on v (the (t - s)^2 factor dropped).
    ``gamma="uniform"`` is PSD-U (g ~ U[0,1]), ``"midpoint"`` PSD-M (g = 1/2). Three network
    evaluations, no derivatives.
    """

    name = "psd"

    def __init__(self, gamma: str = "uniform", **kwargs):
        super().__init__(**kwargs)
        psd_gamma(0, gamma)  # validates the name early
        self.gamma = gamma

    def jump_teacher(self, flowmap):
        return flowmap

    def draw_offdiag(self, n, generator, device, dtype):
        return {"g": psd_gamma(n, self.gamma, generator=generator, device=device, dtype=dtype)}

    def teacher_jump(self, flowmap, x, s, t, cond):
        """v_{s,t}(x) of the jump teacher given the rows' condition: the network itself (whose
        conditional output is already the guided one under training guidance), or a frozen
        teacher, guided from its conditional and null outputs."""
        teacher = self.jump_teacher(flowmap)
        if teacher is flowmap:
            return flowmap.velocity_field(x, s, t, **cond.kw)
        if isinstance(teacher, EulerTeacher):
            return teacher.velocity_field(x, s, t, cond)
        return guided_call(teacher.velocity_field, cond, x, s, t)

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None, cond=NO_CONDITION):
        g = draws["g"] if draws else psd_gamma(s.shape[0], self.gamma, device=s.device, dtype=s.dtype)
        u = intermediate_time(s, t, g)
        xs = self.interpolant.interpolate(x0, x1, s)
        pred = flowmap.velocity_field(xs, s, t, **cond.kw)
        with torch.no_grad():
            v_su = self.teacher_jump(flowmap, xs, s, u, cond)
            x_u = xs + expand_time(u - s, xs) * v_su
            v_ut = self.teacher_jump(flowmap, x_u, u, t, cond)
            gb = expand_time(g, xs)
            target = (1 - gb) * v_su + gb * v_ut
        return pred, target


class PFMM(PSD):
    """Progressive flow map matching: the student's jump s -> t matches two jumps of a frozen
    teacher flow map, s -> u -> t (same residual as PSD, teacher frozen).

    ``teacher`` is a :class:`FlowMap` (a previous stage) or a velocity b, which becomes the
    first-stage teacher :class:`EulerTeacher` (one Euler step of b). The default split is the
    midpoint. The diagonal regresses v_{t,t} on the teacher's velocity.
    """

    name = "pfmm"

    def __init__(self, teacher, gamma: str = "midpoint", **kwargs):
        jumps = teacher if isinstance(teacher, FlowMap) else EulerTeacher(teacher)
        jumps = freeze(jumps)
        super().__init__(gamma=gamma, diagonal_teacher=as_velocity(teacher), **kwargs)
        self.teacher = jumps

    def jump_teacher(self, flowmap):
        return self.teacher
