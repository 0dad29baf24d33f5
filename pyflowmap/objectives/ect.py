"""ECT, Easy Consistency Tuning (Geng et al.; docs/objectives.md section 14), in EDM's sigma space."""

from __future__ import annotations

import math
import warnings

import torch

from pyflowmap import conditioning as cond_
from pyflowmap._tensors import expand_time
from pyflowmap.consistency import ECTSchedule, EDMConsistency
from pyflowmap.distributed import Shard
from pyflowmap.losses import residual_loss
from pyflowmap.objectives.base import Draws, LossOutput, ObjectiveBase, freeze, rng_state, set_rng_state
from pyflowmap.validation import check_batch


class ECT(ObjectiveBase):
    """The consistency-tuning loss for an :class:`~pyflowmap.consistency.EDMConsistency` model.

    Per sample: t ~ lognormal (the schedule), r = r(t) at this training ``step`` (staged, q^-a
    shrinking), one eps for both x_t = y + t eps and x_r = y + r eps, and the SAME dropout mask
    in both passes (the global RNG is restored before the r pass); the r pass runs without
    gradient on the live weights, and r = 0 makes the target the data itself. Loss:
    pseudo-Huber sqrt(||f(x_t, t) - sg(f(x_r, r))||^2 + c^2) - c over all pixels, weighted by
    1 / (t - r), averaged. ``c=None`` uses 0.00054 sqrt(pixels) (ECT's CIFAR value rescaled to
    the data dimension); ``c=0`` is the plain L2 norm.

    ``pretrain=True`` is the diffusion pretraining that ECT tunes from: r = 0 for every sample
    (denoising, f(x_t, t) -> y) with EDM's weight (t^2 + sd^2) / (t sd)^2 and the squared L2
    loss, i.e. the EDM denoiser objective in this same parameterization.

    Conditioned (``c`` labels or a tensor), every pass gets the row's condition; ``p_uncond``
    drops it. Guidance in training (docs/conditioning.md) replaces the data y, the
    single-sample estimate of the denoiser, by the guided D = w y + (1 - w) D_null(x_t, t):
    pretraining regresses on it with D_null the model's own sg(f(x_t, t | null)); tuning
    moves along the guided ODE, x_r = x_t - (t - r) (x_t - D) / t (which is y + r eps at
    w = 1), with D_null from ``denoiser``, the frozen pretrained model (a consistency model's
    own f is not a denoiser away from r = 0).

    Parts: ``consistency`` (ECT) or ``denoise`` (pretraining); metrics also carry
    ``r_zero_fraction``, the share of samples whose target is the data.
    """

    name = "ect"

    def __init__(self, schedule: ECTSchedule | None = None, c: float | None = None, pretrain: bool = False,
                 p_uncond: float = 0.0, guidance: float | None = None, denoiser: EDMConsistency | None = None):
        super().__init__()
        self.set_conditioning(p_uncond, guidance)
        if guidance is not None and not pretrain and denoiser is None:
            raise ValueError("ECT: guidance in consistency tuning needs denoiser=, the frozen pretrained model "
                             "whose null prediction completes the guided denoiser")
        self.denoiser = None if denoiser is None else freeze(denoiser)
        self.schedule = schedule if schedule is not None else ECTSchedule()
        if c is not None and c < 0:
            raise ValueError(f"ECT: pseudo-Huber c must be >= 0, got {c}")
        self.c = c
        self.pretrain = pretrain
        self.parts = ("denoise",) if pretrain else ("consistency",)

    def guided_data(self, denoiser, y, x_t, t, cond):
        """The denoiser target: the data y, or under training guidance w y + (1 - w)
        sg(D_null(x_t, t)) (``denoiser``: the model itself when pretraining)."""
        if cond.scale is None:
            return y
        with torch.no_grad():
            d_null = denoiser(x_t, t, **cond.null_kw)
        return cond_.combine(y, d_null, cond.scale)

    def huber_c(self, y: torch.Tensor) -> float:
        return 0.00054 * math.sqrt(y[0].numel()) if self.c is None else float(self.c)

    def forward(self, model: EDMConsistency, y: torch.Tensor, generator: torch.Generator | None = None,
                step: int = 0, shard: Shard | None = None, global_batch: int | None = None,
                iteration: int | None = None, c=None) -> LossOutput:
        """The loss on ``y`` ``[B, ...]`` at training step ``step`` (the schedule's stage
        counter); with ``shard``, ``y`` is this rank's rows of a global batch (see
        :class:`~pyflowmap.objectives.ObjectiveBase`). ``iteration`` is the old name of
        ``step`` (deprecated)."""
        if iteration is not None:
            warnings.warn("ECT(..., iteration=) is deprecated: pass step=", DeprecationWarning, stacklevel=2)
            step = iteration
        return super().forward(model, y, generator, step, shard, global_batch, c)

    def draw(self, model: EDMConsistency, y: torch.Tensor, generator: torch.Generator | None = None,
             step: int = 0, shard: Shard | None = None, global_batch: int | None = None, c=None) -> Draws:
        """sigma (``t``), eps (``noise``) and, tuning, r at this ``step`` (``extra["r"]``); the
        r = 0 rows are counted here (``n_diag``) so the loss needs no host synchronization."""
        check_batch("ECT: y", y, role="the data batch")
        if int(step) < 0:
            raise ValueError(f"ECT: step (the schedule's iteration) must be >= 0, got {step}")
        dev, dt = y.device, y.dtype
        B = self.global_batch_size(shard, global_batch, y.shape[0])
        t = self.schedule.sample_t(B, generator=generator, device=dev, dtype=dt)
        eps = torch.randn((B,) + tuple(y.shape[1:]), generator=generator, device=dev, dtype=dt)
        idx = None
        if shard is not None:
            idx = shard.indices(B, device=dev)
            t, eps = t[idx], eps[idx]
        cond = self.draw_conditions(model, c, B, generator, idx, dev, dt)
        extra, n_zero = {}, 0
        if not self.pretrain:
            extra["r"] = self.schedule.r(t, step)
            n_zero = int((extra["r"] == 0).sum())
        return Draws(noise=eps, t=t, n_diag=n_zero, extra=extra, cond=cond, counts={self.parts[0]: B}, shard=shard)

    def loss_from_draws(self, model: EDMConsistency, y: torch.Tensor, draws: Draws) -> LossOutput:
        t, eps, cond, shard = draws.t, draws.noise, draws.cond, draws.shard
        dev = y.device
        scale = self.share(shard, y.shape[0], draws.counts[self.parts[0]])
        x_t = y + expand_time(t, y) * eps
        if self.pretrain:
            sd = model.path.sigma_data
            weight = (t**2 + sd**2) / (t * sd) ** 2
            loss, per = residual_loss(model(x_t, t, **cond.kw), self.guided_data(model, y, x_t, t, cond), weight=weight)
            loss = loss * scale
            return LossOutput(loss=loss, per_sample=per, n_diag=0,
                              metrics={"loss": loss.detach(), "denoise": per.detach().mean() * scale})
        r = draws.extra["r"]
        rng = rng_state(dev)
        pred = model(x_t, t, **cond.kw)
        with torch.no_grad():
            zero = r == 0
            target = self.guided_data(self.denoiser, y, x_t, t, cond)
            # sharded, every rank runs the same network calls (FSDP2 gathers per call)
            if shard is not None or draws.n_diag < y.shape[0]:
                set_rng_state(dev, rng)  # same dropout mask as the t pass
                # every sample goes through the network so the mask lines up with the t pass;
                # r = 0 samples take the data as target
                r_safe = torch.where(zero, t, r)
                # along the (guided) ODE from x_t; with D = y this is y + r eps
                x_r = y + expand_time(r_safe, y) * eps if target is y else \
                    x_t - expand_time((t - r_safe) / t, y) * (x_t - target)
                f_r = model(x_r, r_safe, **cond.kw)
                target = torch.where(zero.reshape((-1,) + (1,) * (y.dim() - 1)), target, f_r)
        weight = 1.0 / (t - r)
        loss, per = residual_loss(pred, target, weight=weight, metric="pseudo_huber", c=self.huber_c(y))
        loss = loss * scale
        return LossOutput(loss=loss, per_sample=per, n_diag=draws.n_diag,
                          metrics={"loss": loss.detach(), "consistency": per.detach().mean() * scale,
                                   "r_zero_fraction": zero.float().mean() * scale})

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule}, c={self.c}, pretrain={self.pretrain}, p_uncond={self.p_uncond}, "
                f"guidance={self.guidance}")
