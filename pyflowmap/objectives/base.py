"""What every flow-map objective shares: draw (x0, s, t), flow matching on the diagonal, a
distillation term off it, optional learned weighting, one reduction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pyflowmap.derivatives import DerivativeMode, resolve_mode
from pyflowmap.flowmap import FlowMap, as_velocity  # noqa: F401  (re-exported)
from pyflowmap.interpolants import GaussianBase, Interpolant, make_interpolant
from pyflowmap.losses import residual_loss
from pyflowmap.objectives.weighting import LearnedWeighting
from pyflowmap.times import TimeSampler

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate. ``per_sample``: unweighted per-sample losses
    ``[B]`` (flow matching for the first ``n_diag`` samples, distillation for the rest).
    ``metrics``: detached scalars (``fm``, ``distill``, ``loss``) for logging."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    n_diag: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def freeze(module):
    if isinstance(module, nn.Module):
        module.requires_grad_(False)
        module.eval()
    return module


class Objective(nn.Module):
    """Base of all flow-map objectives.

    Per batch: x0 ~ base, (s, t) from ``times`` (the first ``n_diag`` on the diagonal), then

        L = mean_diag |v_{t,t}(I_t) - target_t|^2  +  mean_offdiag |pred - target|^2

    with ``target_t = dI_t/dt`` (self-distillation) or the teacher's b_t(I_t) (distillation)
    and (pred, target) from :meth:`offdiag_terms`. With ``weighting`` each per-sample loss l
    becomes exp(-w(s,t)) l + w(s,t). Norms are summed over all non-batch dimensions.

    Subclasses implement :meth:`offdiag_terms`; they never call torch.func themselves but ask
    ``self.derivative`` (a :class:`~pyflowmap.derivatives.DerivativeMode`).
    """

    name = "objective"
    uses_derivative = False

    def __init__(
        self,
        interpolant: str | Interpolant = "linear",
        base: GaussianBase | None = None,
        times: TimeSampler | None = None,
        derivative: str | DerivativeMode = "auto",
        weighting: LearnedWeighting | None = None,
        diagonal_teacher: Velocity | None = None,
    ):
        super().__init__()
        self.interpolant = make_interpolant(interpolant)
        self.base = base if base is not None else GaussianBase(1.0)
        self.times = times if times is not None else TimeSampler()
        self.derivative = derivative
        self.weighting = weighting
        self._diagonal_teacher = diagonal_teacher

    def mode(self, flowmap: FlowMap) -> DerivativeMode:
        return resolve_mode(self.derivative, flowmap)

    def diagonal_target(self, x0, x1, xt, t):
        if self._diagonal_teacher is not None:
            with torch.no_grad():
                return self._diagonal_teacher(xt, t)
        return self.interpolant.velocity_target(x0, x1, t)

    def offdiag_terms(self, flowmap: FlowMap, x0, x1, s, t, generator=None):
        """(pred, target) for off-diagonal samples; ``target`` may be a scalar 0."""
        raise NotImplementedError

    def part_weight(self, key: str, pred, target) -> torch.Tensor | None:
        """An extra per-sample weight ``[B]`` for part ``key`` ("fm" | "distill"), or None.
        Computed from detached values (MeanFlow's adaptive weight overrides this)."""
        return None

    def forward(self, flowmap: FlowMap, x1: torch.Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """The loss on a data batch ``x1`` ``[B, ...]``; randomness from ``generator``."""
        if x1.dim() < 2:
            raise ValueError(f"x1 must be a batch [B, ...] with at least one feature dim, got {tuple(x1.shape)}")
        if x1.shape[0] == 0:
            raise ValueError("empty batch: x1 has batch size 0")
        if not x1.is_floating_point():
            raise TypeError(f"x1 must be floating point, got {x1.dtype}")
        B, dev, dt = x1.shape[0], x1.device, x1.dtype
        x0 = self.base.sample(x1.shape, generator=generator, device=dev, dtype=dt)
        s, t, n_diag = self.times.sample(B, generator=generator, device=dev, dtype=dt)

        parts = []  # (name, pred, target, s, t)
        if n_diag > 0:
            x0d, x1d, td = x0[:n_diag], x1[:n_diag], t[:n_diag]
            xt = self.interpolant.interpolate(x0d, x1d, td)
            parts.append(("fm", flowmap.velocity(xt, td), self.diagonal_target(x0d, x1d, xt, td), td, td))
        if n_diag < B:
            so, to = s[n_diag:], t[n_diag:]
            pred, target = self.offdiag_terms(flowmap, x0[n_diag:], x1[n_diag:], so, to, generator)
            parts.append(("distill", pred, target, so, to))

        loss, metrics, per_sample = x1.new_zeros(()), {}, []
        for key, pred, target, ps, pt in parts:
            # one fused residual -> metric -> (weight) -> mean per part; with learned weighting
            # exp(-w) l + w is the weighted mean of l plus the mean of w
            extra = self.part_weight(key, pred, target)
            if self.weighting is not None:
                w = self.weighting(ps.to(self.weighting.dtype), pt.to(self.weighting.dtype))
                ew = torch.exp(-w)
                part, per = residual_loss(pred, target, weight=ew if extra is None else ew * extra.to(ew.dtype))
                part = part + w.mean()
            else:
                part, per = residual_loss(pred, target, weight=extra)
            loss = loss + part.to(loss.dtype)
            metrics[key] = per.detach().mean()
            per_sample.append(per)
        metrics["loss"] = loss.detach()
        per_sample = torch.cat(per_sample)
        return LossOutput(loss=loss, per_sample=per_sample, n_diag=n_diag, metrics=metrics)

    def extra_repr(self) -> str:
        return f"interpolant={self.interpolant!r}, base={self.base!r}, times={self.times!r}, derivative={self.derivative!r}"
