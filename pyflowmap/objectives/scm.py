"""sCT and sCD, the continuous-time consistency objectives of sCM (Lu and Song 2024;
docs/objectives.md section 17), on a :class:`~pyflowmap.trigflow.TrigFlowConsistency` model."""

from __future__ import annotations

import math
import warnings

import torch

from pyflowmap._tensors import expand_time
from pyflowmap.derivatives import DerivativeMode, resolve_mode
from pyflowmap.distributed import Shard
from pyflowmap.flowmap import as_velocity
from pyflowmap.losses import residual_loss
from pyflowmap.objectives.base import Draws, LossOutput, ObjectiveBase, freeze, guided_call, primal_and_stopgrad_tangent
from pyflowmap.objectives.weighting import LearnedWeighting
from pyflowmap.trigflow import HALF_PI, TrigFlowConsistency, proposal_tau
from pyflowmap.validation import check_batch


class TangentExplosionWarning(RuntimeWarning):
    """sCM's tangent norm jumped far above its running level: the run is diverging."""


class SCM(ObjectiveBase):
    """The sCM loss per sample, with x = cos(tau) y + sin(tau) sigma_d eps at tau from the
    proposal (ln(sigma_d tan tau) ~ N(p_mean, p_std^2)):

        g   = -cos^2(tau) (sigma_d F- - dx/dtau) - r cos(tau) sin(tau) (x + sigma_d dF-/dtau)
        g  <- g / (||g|| + tangent_c)
        l   = || F_theta(x, tau) - sg(F- + g) ||^2 / dim,  L = mean exp(-w(tau)) l + w(tau)

    F- = sg(F_theta) and dF-/dtau its total derivative along (dx/dtau, 1), from the objective's
    derivative mode (dual, jvp or fd: a forward-mode tangent only, no backward through it);
    r = min(1, step / warmup_steps), the tangent warm-up; w the learned weighting (sCM's
    adaptive weight; ``weighting=None`` switches it off). sCT (``teacher=None``): dx/dtau =
    cos(tau) sigma_d eps - sin(tau) y, the conditional velocity. sCD: dx/dtau is the frozen
    teacher's velocity, a linear-interpolant velocity (a :class:`~pyflowmap.FlowMap`, e.g. an FM
    run, or a callable b(x, t)) converted by the exact TrigFlow map; with training guidance w
    the teacher is guided, v_null + w (v_c - v_null), so the student samples the guided
    distribution without guidance of its own.

    Metrics: ``consistency`` (mean l), ``tangent_norm`` (mean ||g|| before normalization),
    ``tangent_norm_max``, ``tangent_warmup`` (r). A batch whose mean tangent norm exceeds
    ``explode_factor`` times its running level warns (:class:`TangentExplosionWarning`) and
    sets the metric ``tangent_explosion`` to 1: the unstable runs of sCM are reported, not left
    to diverge silently (the non-finite guard of the trainer skips the steps that do).
    """

    name = "sct"
    parts = ("consistency",)

    def __init__(self, teacher=None, derivative: str | DerivativeMode = "auto", p_mean: float = -1.0,
                 p_std: float = 1.4, tangent_c: float = 0.1, warmup_steps: int = 10000,
                 weighting: LearnedWeighting | None | str = "learned", p_uncond: float = 0.0,
                 guidance: float | None = None, explode_factor: float = 100.0):
        super().__init__()
        self.set_conditioning(p_uncond, guidance)
        if guidance is not None and teacher is None:
            raise ValueError("sCT: guidance in training needs a teacher (sCD) to guide; sCT learns from data alone "
                             "(train with p_uncond > 0 and guide at sampling instead)")
        for name, v, ok in (("p_std", p_std, p_std > 0), ("tangent_c", tangent_c, tangent_c >= 0),
                            ("warmup_steps", warmup_steps, int(warmup_steps) == warmup_steps and warmup_steps >= 0),
                            ("explode_factor", explode_factor, explode_factor > 1),
                            ("p_mean", p_mean, math.isfinite(p_mean))):
            if not ok:
                raise ValueError(f"SCM: invalid {name}={v!r}")
        self.teacher = None if teacher is None else freeze(teacher)
        self._teacher_velocity = None if teacher is None else as_velocity(teacher)
        self.name = "sct" if teacher is None else "scd"
        self.derivative = derivative
        self.p_mean, self.p_std, self.tangent_c = float(p_mean), float(p_std), float(tangent_c)
        self.warmup_steps, self.explode_factor = int(warmup_steps), float(explode_factor)
        self.weighting = LearnedWeighting() if weighting == "learned" else weighting
        self._norm_level = None  # running level of the mean tangent norm (not checkpointed: a heuristic)

    def mode(self, model: TrigFlowConsistency) -> DerivativeMode:
        return resolve_mode(self.derivative, model.flowmap)

    def warmup(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, int(step) / self.warmup_steps)

    def draw(self, model: TrigFlowConsistency, y: torch.Tensor, generator: torch.Generator | None = None,
             step: int = 0, shard: Shard | None = None, global_batch: int | None = None, c=None) -> Draws:
        """tau (``t``), eps (``noise``) and the tangent warm-up factor at this ``step``
        (``extra["warmup"]``, a 0-d tensor so that a compiled loss does not specialize on it)."""
        if not isinstance(model, TrigFlowConsistency):
            raise TypeError(f"{self.name}: the model must be a pyflowmap.TrigFlowConsistency, got {type(model).__name__}")
        check_batch(f"{self.name}: y", y, role="the data batch")
        if int(step) < 0:
            raise ValueError(f"{self.name}: step must be >= 0, got {step}")
        path, dev, dt = model.path, y.device, y.dtype
        B = self.global_batch_size(shard, global_batch, y.shape[0])
        tau = proposal_tau(B, path, self.p_mean, self.p_std, generator=generator, device=dev, dtype=dt)
        eps = torch.randn((B,) + tuple(y.shape[1:]), generator=generator, device=dev, dtype=dt)
        idx = None
        if shard is not None:
            idx = shard.indices(B, device=dev)
            tau, eps = tau[idx], eps[idx]
        cond = self.draw_conditions(model.net, c, B, generator, idx, dev, dt)
        warmup = torch.tensor(self.warmup(step), device=dev, dtype=dt)
        return Draws(noise=eps, t=tau, extra={"warmup": warmup}, cond=cond, counts={"consistency": B}, shard=shard)

    def loss_from_draws(self, model: TrigFlowConsistency, y: torch.Tensor, draws: Draws) -> LossOutput:
        tau, eps, cond, shard = draws.t, draws.noise, draws.cond, draws.shard
        path, dev, dt = model.path, y.device, y.dtype
        x = path.interpolate(y, eps, tau)
        with torch.no_grad():
            if self._teacher_velocity is None:
                dx = path.velocity_target(y, eps, tau)
            else:
                i, t = path.to_linear(x, tau)
                u = guided_call(self._teacher_velocity, cond, i, t.to(dt))
                dx = path.velocity_from_linear(i, u, t)
        v, g = self.tangent(model, x, tau, dx, warmup=draws.extra["warmup"], **cond.kw)
        sd = path.sigma_d
        with torch.no_grad():
            norm = g.reshape(g.shape[0], -1).norm(dim=1)
            target = v.detach() / sd + g / expand_time(norm + self.tangent_c, g)
        pred = v / sd
        dim = y[0].numel()
        weight = torch.full((y.shape[0],), 1.0 / dim, device=dev, dtype=dt)
        w = None
        if self.weighting is not None:
            e = (tau / HALF_PI).to(self.weighting.dtype)
            w = self.weighting(e, e)
            weight = weight * torch.exp(-w).to(dt)
        part, per = residual_loss(pred, target, weight=weight)
        if w is not None:
            part = part + w.mean()
        share = self.share(shard, y.shape[0], draws.counts["consistency"])
        loss = part * share
        metrics = {"loss": loss.detach(), "consistency": per.detach().mean() / dim * share,
                   "tangent_norm": norm.mean() * share, "tangent_norm_max": norm.max(),
                   "tangent_warmup": draws.extra["warmup"].detach().float()}
        floor = 0.01 * path.sigma_d * math.sqrt(dim)  # a level far below the data scale is roundoff, not a level
        return LossOutput(loss=loss, per_sample=per / dim, n_diag=0, metrics=metrics,
                          diagnostics={"tangent_level": norm.mean(), "tangent_floor": floor})

    def report(self, out: LossOutput) -> None:
        """The tangent-explosion check (``metrics["tangent_explosion"]``) of this rank's mean
        tangent norm against the level of the earlier batches."""
        d = out.diagnostics
        exploded = self._check_explosion(float(d["tangent_level"]), float(d["tangent_floor"]))
        out.metrics["tangent_explosion"] = torch.tensor(float(exploded))
    def tangent(self, model: TrigFlowConsistency, x, tau, dx, step: int = 0, c=None, w=None, warmup=None):
        """(sigma_d F_theta(x, tau) with its graph, g before normalization): g = cos(tau) df-/dtau
        along dx/dtau = ``dx`` with the warm-up r on its second term (class docstring). g is
        affine in ``dx``, so its mean over the data and noise behind one x is g at the
        probability-flow velocity: zero for the exact consistency function. ``warmup``: the
        warm-up factor r itself (a 0-d tensor) instead of ``step``'s."""
        mode = self.mode(model)
        v, v_dot = primal_and_stopgrad_tangent(mode, x.device,
                                               lambda: model.velocity_and_tangent(mode, x, tau, dx, c=c, w=w),
                                               lambda: model.velocity(x, tau, c=c, w=w), module=model)
        r = self.warmup(step) if warmup is None else warmup
        with torch.no_grad():
            cs, sn = expand_time(torch.cos(tau), x), expand_time(torch.sin(tau), x)
            g = -cs * cs * (v.detach() - dx) - r * cs * sn * (x + v_dot.detach())
        return v, g.to(x.dtype)

    def _check_explosion(self, level: float, floor: float) -> bool:
        """Compare the batch's mean tangent norm ``level`` with its running level (an EMA of
        the earlier batches', at least ``floor``); warn on a jump of ``explode_factor`` or on a
        non-finite norm."""
        if not math.isfinite(level):
            warnings.warn(f"{self.name}: the tangent norm is not finite; the step will be skipped by the "
                          "non-finite guard, and the run is diverging", TangentExplosionWarning, stacklevel=3)
            return True
        prev = self._norm_level
        ref = None if prev is None else max(prev, floor)
        exploded = ref is not None and level > self.explode_factor * ref
        if exploded:
            warnings.warn(f"{self.name}: the mean tangent norm jumped to {level:.3g}, {level / ref:.0f}x its running "
                          f"level {ref:.3g}; sCM runs diverge this way (lower the learning rate, lengthen "
                          "warmup_steps or check the data scale against sigma_d)", TangentExplosionWarning,
                          stacklevel=3)
        else:
            self._norm_level = level if prev is None else 0.9 * prev + 0.1 * level
        return exploded

    def extra_repr(self) -> str:
        return (f"derivative={self.derivative!r}, p_mean={self.p_mean}, p_std={self.p_std}, tangent_c={self.tangent_c}, "
                f"warmup_steps={self.warmup_steps}, p_uncond={self.p_uncond}, guidance={self.guidance}")
