"""MeanFlow (Geng et al. 2025; docs/objectives.md section 13) in pyflowmap's flow-map convention."""

from __future__ import annotations

import torch

from pyflowmap._tensors import expand_time
from pyflowmap.objectives.base import NO_CONDITION, Objective, primal_and_stopgrad_tangent


class MeanFlow(Objective):
    """MeanFlow's average velocity is the flow-map velocity v_{s,t}: X_{s,t}(x) = x + (t - s) v.
    Holding the end t fixed, X_{s,t}(I_s) is constant along the flow in s, which gives the
    MeanFlow identity v_{s,t} = b_s + (t - s) (d/ds) v_{s,t}(I_s) with the total derivative
    taken along the conditional velocity dI_s (tangents (dI_s, 1, 0) on (x, s, t)). Loss:

        || v_{s,t}(I_s) - sg(dI_s + (t - s) jvp(v; dI_s, 1, 0)) ||^2

    the tangent under stop-gradient (a forward-mode JVP only), on the diagonal plain flow
    matching, every per-sample loss l weighted adaptively by sg(1 / (l + eps)^p) (p = 1,
    eps = 1e-3 by default; p = 0 switches it off). The derivative mode is the objective's:
    dual (explicit tangent), torch.func.jvp or finite differences.

    Conditioned with training guidance w, dI_s becomes the guided velocity
    w dI_s + (1 - w) sg(v_{s,s}(I_s | null)) in both the target and the tangent (MeanFlow's
    CFG training, their eq. 19 with kappa = 0): the conditional v_{s,t} learns the guided
    average velocity, and one step samples the guided distribution.
    """

    name = "meanflow"
    uses_derivative = True

    def __init__(self, adaptive_p: float = 1.0, adaptive_eps: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if adaptive_p < 0 or adaptive_eps <= 0:
            raise ValueError(f"MeanFlow: need adaptive_p >= 0 and adaptive_eps > 0, got {adaptive_p}, {adaptive_eps}")
        self.adaptive_p, self.adaptive_eps = adaptive_p, adaptive_eps

    def offdiag_terms(self, flowmap, x0, x1, s, t, draws=None, cond=NO_CONDITION):
        xs = self.interpolant.interpolate(x0, x1, s)
        d_i = self.guided_velocity(flowmap, xs, s, self.interpolant.velocity_target(x0, x1, s), cond)
        mode = self.mode(flowmap)
        v, dv = primal_and_stopgrad_tangent(
            mode, xs.device,
            lambda: mode.jvp(flowmap, xs, s, t, x_dot=d_i, s_dot=torch.ones_like(s), output="velocity", **cond.kw),
            lambda: flowmap.velocity_field(xs, s, t, **cond.kw), module=flowmap)
        if not isinstance(dv, torch.Tensor):  # a deferred finite difference
            dv = dv.materialize()
        target = (d_i + expand_time(t - s, xs) * dv).detach()
        return v, target

    def part_weight(self, key, pred, target):
        if self.adaptive_p == 0:
            return None
        with torch.no_grad():
            l = (pred.detach() - target).pow(2).reshape(pred.shape[0], -1).sum(1)
            return (l + self.adaptive_eps).pow(-self.adaptive_p)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", adaptive_p={self.adaptive_p}, adaptive_eps={self.adaptive_eps}"
