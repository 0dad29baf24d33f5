"""The contract of every training objective (:class:`ObjectiveBase`), and what every flow-map
objective shares (:class:`Objective`): draw (x0, s, t), flow matching on the diagonal, a
distillation term off it, optional learned weighting, one reduction per part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pyflowmap import conditioning as cond_
from pyflowmap.derivatives import DerivativeMode, Dual, resolve_mode
from pyflowmap.distributed import Shard
from pyflowmap.flowmap import FlowMap, as_velocity  # noqa: F401  (re-exported)
from pyflowmap.interpolants import GaussianBase, Interpolant, make_interpolant
from pyflowmap.losses import residual_loss
from pyflowmap.objectives.weighting import LearnedWeighting
from pyflowmap.times import TimeSampler
from pyflowmap.validation import check_batch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PART_WEIGHTINGS = ("equal", "count")


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate. ``per_sample``: unweighted per-sample losses
    ``[B]``, the objective's parts in order (flow-map objectives: flow matching for the first
    ``n_diag`` samples, distillation for the rest; ECT: ``n_diag`` counts its r = 0 samples,
    whose target is the data). ``metrics``: detached scalars for logging: ``loss`` and one
    mean per part named in the objective's ``parts``, plus any the objective adds. ``parts``:
    each part's term of ``loss``, with its graph (a trainer logs their gradient norms).
    ``diagnostics``: detached values (or numbers) for :meth:`ObjectiveBase.report`, not logged."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    n_diag: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)


@dataclass
class Conditions:
    """What an objective passes to the network beside (x, s, t), for a block of rows:

    ``c``: the condition after label dropout (None: unconditional); ``w``: the guidance scale
    fed to a network that takes it as an input (None: not one); ``scale``: the training
    guidance scale per row, 1 where the row's condition was dropped (None: no guidance in
    training); ``null``: the null condition of these rows."""

    c: torch.Tensor | None = None
    w: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    null: torch.Tensor | None = None

    @property
    def kw(self) -> dict:
        """The keyword arguments of every network call: ``c`` and ``w``."""
        return {"c": self.c, "w": self.w}

    @property
    def null_kw(self) -> dict:
        return {"c": self.null, "w": self.w}

    def rows(self, sl) -> "Conditions":
        take = lambda v: None if v is None else v[sl]  # noqa: E731
        return Conditions(take(self.c), take(self.w), take(self.scale), take(self.null))


NO_CONDITION = Conditions()


@dataclass
class Draws:
    """One step's randomness, this rank's rows: what :meth:`ObjectiveBase.draw` makes eagerly
    from the step's ``torch.Generator`` (which torch.compile cannot trace) and
    :meth:`ObjectiveBase.loss_from_draws` consumes (which it traces as one graph).

    ``noise``: x0 (flow maps) or eps (ECT, sCM); ``t``: the times (flow maps: the end times,
    ECT: sigma, sCM: tau); ``s``: flow maps' start times; ``n_diag``: this rank's diagonal rows
    (flow maps) or r = 0 rows (ECT); ``extra``: an objective's own per-row values (PSD's split,
    ECT's r, sCM's warm-up factor); ``cond``: the rows' :class:`Conditions`; ``counts``: each
    part's global count; ``shard``: this rank's :class:`~pyflowmap.distributed.Shard` or None.
    Python values are constant from step to step (a compiled loss specializes on them)."""

    noise: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor | None = None
    n_diag: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    cond: Conditions = field(default_factory=Conditions)
    counts: dict[str, int] = field(default_factory=dict)
    shard: Shard | None = None


def guided_call(fn, cond: Conditions, x, *times):
    """``fn(x, *times, c=...)`` with the rows' guidance: conditional when ``cond.scale`` is
    None, else null + scale (conditional - null) from one call on the doubled batch (a frozen
    teacher's velocity under guidance). A teacher takes no ``w``: that input is the student's."""
    if cond.c is None:
        return fn(x, *times)
    if cond.scale is None:
        return fn(x, *times, c=cond.c)
    cc, xx, *tt = cond_.doubled(cond.c, cond.null, x, *times)
    out_c, out_null = fn(xx, *tt, c=cc).chunk(2)
    return cond_.combine(out_c, out_null, cond.scale)


def rng_state(device: torch.device):
    """The global RNG state that dropout draws from on ``device`` (CUDA or CPU)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def draws_dropout(module: nn.Module) -> bool:
    """Whether a forward of ``module`` in its current mode draws dropout masks: a training
    ``nn.Dropout`` with p > 0, or a training block with a positive ``dropout`` rate (pyflowmap's
    UNet and DiT blocks)."""
    for m in module.modules():
        if not m.training:
            continue
        rate = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", None)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            return True
    return False


def primal_and_stopgrad_tangent(mode, device: torch.device, jvp, primal, module: nn.Module | None = None):
    """(output with its graph, tangent) for an objective that uses the tangent under
    stop-gradient only. ``jvp()`` returns (output, tangent) through the derivative ``mode``;
    ``primal()`` the output alone. In dual mode the dual pass runs without a graph and the
    output is recomputed with one (its backward then covers B rows, not the stacked 2B), under
    the same RNG state so that dropout masks agree; other modes call ``jvp()`` once.

    Under torch.compile the RNG state cannot be saved and restored inside a graph, so the
    recomputation is used only when ``module`` (the network) draws no dropout; otherwise the
    dual pass keeps its graph (one mask for both, a backward over 2B rows)."""
    if isinstance(mode, Dual) and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            if module is None or draws_dropout(module):
                return jvp()
            with torch.no_grad():
                _, tangent = jvp()
            return primal(), tangent
        rng = rng_state(device)
        with torch.no_grad():
            _, tangent = jvp()
        set_rng_state(device, rng)
        return primal(), tangent
    return jvp()


def freeze(module):
    if isinstance(module, nn.Module):
        module.requires_grad_(False)
        module.eval()
    return module


class ObjectiveBase(nn.Module):
    """The contract every objective keeps, so a trainer never asks which kind it holds:

        objective(model, x1, generator=None, step=0, shard=None, global_batch=None) -> LossOutput

    ``x1``: a data batch ``[B, ...]`` (with ``shard``: this rank's rows ``shard.indices(
    global_batch)`` of a global batch); all randomness from ``generator``; ``step``: the
    optimizer step (schedules such as ECT's read it, the others ignore it). The loss is a sum
    of named parts (``parts``), each averaged over its global count and, sharded, scaled by W
    so that DDP's gradient average equals one process's gradient on the global batch
    (:mod:`pyflowmap.distributed`). ``metrics`` holds ``loss`` and one mean per part.

    A call is three stages, which a compiled trainer runs apart (docs/precision.md):
    :meth:`draw` (checks and every random draw, eager), :meth:`loss_from_draws` (the network
    calls, tangents, teachers and the loss: no host synchronization, so torch.compile traces
    it as one graph) and :meth:`report` (host-side checks of the result, eager).
    """

    name = "objective"
    parts: tuple[str, ...] = ()
    p_uncond: float = 0.0
    guidance: float | None = None
    guidance_range: tuple[float, float] | None = None

    def forward(self, model, x1: torch.Tensor, generator: torch.Generator | None = None, step: int = 0,
                shard: Shard | None = None, global_batch: int | None = None, c=None) -> LossOutput:
        out = self.loss_from_draws(model, x1, self.draw(model, x1, generator, step, shard, global_batch, c))
        self.report(out)
        return out

    def draw(self, model, x1: torch.Tensor, generator: torch.Generator | None = None, step: int = 0,
             shard: Shard | None = None, global_batch: int | None = None, c=None) -> Draws:
        """The checks of the inputs and this step's :class:`Draws` (same arguments as a call)."""
        raise NotImplementedError

    def loss_from_draws(self, model, x1: torch.Tensor, draws: Draws) -> LossOutput:
        """The loss on this rank's rows ``x1`` given the step's ``draws``."""
        raise NotImplementedError

    def report(self, out: LossOutput) -> None:
        """Host-side checks of a step's result (sCM's tangent-explosion report); may add
        metrics to ``out``."""

    def set_conditioning(self, p_uncond: float = 0.0, guidance: float | None = None,
                         guidance_range: tuple[float, float] | None = None) -> None:
        """Condition dropout and guidance in training (docs/conditioning.md):

        * ``p_uncond``: each row's condition becomes the null one with this probability (the
          unconditional model that guidance needs);
        * ``guidance``: the training guidance scale w: the target of a conditional row is
          built from w x (its conditional target) + (1 - w) x sg(the null prediction), so the
          conditional model itself samples the guided distribution (1 = no guidance);
        * ``guidance_range=(lo, hi)``: w ~ U[lo, hi] per row, also given to the network as its
          ``w`` input, so one model serves every w in the range."""
        if isinstance(p_uncond, bool) or not 0 <= float(p_uncond) < 1:
            raise ValueError(f"{self.name}: p_uncond must be in [0, 1), got {p_uncond!r}")
        guidance = cond_.check_guidance(f"{self.name}: guidance", guidance)
        if guidance_range is not None:
            if guidance is not None:
                raise ValueError(f"{self.name}: give guidance (one scale) or guidance_range (w as an input), not both")
            lo, hi = (cond_.check_guidance(f"{self.name}: guidance_range", v) for v in guidance_range)
            if not lo <= hi:
                raise ValueError(f"{self.name}: guidance_range must be (lo, hi) with lo <= hi, got {guidance_range}")
            guidance_range = (lo, hi)
        if (guidance is not None or guidance_range is not None) and p_uncond == 0:
            raise ValueError(f"{self.name}: guidance in training needs p_uncond > 0 (the null prediction it uses "
                             "is learned from the dropped conditions)")
        self.p_uncond, self.guidance, self.guidance_range = float(p_uncond), guidance, guidance_range

    def draw_conditions(self, model, c, B: int, generator, idx, device, dtype) -> Conditions:
        """This rank's :class:`Conditions` for condition ``c`` (its rows ``idx`` of a global
        batch of ``B``, or all of them when ``idx`` is None). The dropout mask and the guidance
        scales are drawn for the whole global batch, after every other draw of the step, so a
        data-parallel run equals one process and an unconditional run draws nothing."""
        n = B if idx is None else idx.shape[0]
        cond_.check_condition("c", c, model, n)
        if c is not None and c.device != torch.device(device):
            raise ValueError(f"c is on {c.device} but the data batch is on {device}")
        if self.guidance_range is not None and not cond_.takes_guidance(model):
            raise TypeError(f"{self.name}: guidance_range feeds w to the network, but it does not take w "
                            "(build it with guidance_input=True)")
        if c is None:
            if self.guidance is not None or self.guidance_range is not None or self.p_uncond > 0:
                raise ValueError(f"{self.name}: condition dropout and guidance need the batch's conditions c")
            return NO_CONDITION
        take = (lambda v: v) if idx is None else (lambda v: v[idx])  # noqa: E731
        null = cond_.null_condition(model, c)
        drop = None
        if self.p_uncond > 0:
            drop = take(torch.rand(B, generator=generator, device=device) < self.p_uncond)
            c = cond_.drop_conditions(c, drop, null)
        w_in = scale = None
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            w_in = take(lo + (hi - lo) * torch.rand(B, generator=generator, device=device, dtype=dtype))
            scale = w_in
        elif self.guidance is not None:
            scale = torch.full((n,), self.guidance, device=device, dtype=dtype)
        if scale is not None:
            # a row without its condition (dropped, or given the null class) keeps its plain target
            uncond = drop if drop is not None else torch.zeros(n, dtype=torch.bool, device=device)
            if not c.is_floating_point():
                uncond = uncond | (c == null)
            scale = torch.where(uncond, torch.ones_like(scale), scale)
        return Conditions(c=c, w=w_in, scale=scale, null=null)

    @staticmethod
    def global_batch_size(shard: Shard | None, global_batch: int | None, n_local: int) -> int:
        """The global batch size; with a shard, ``n_local`` must be this rank's share of it."""
        if shard is None:
            if global_batch is not None and global_batch != n_local:
                raise ValueError(f"global_batch={global_batch} without a shard must equal the batch size {n_local}")
            return n_local
        if global_batch is None:
            raise ValueError("a shard needs global_batch, the size of the batch that is split over ranks")
        if shard.count(global_batch) != n_local:
            raise ValueError(f"rank {shard.rank} of {shard.world} owns {shard.count(global_batch)} rows of a global "
                             f"batch of {global_batch}, but x1 has {n_local}")
        return global_batch

    @staticmethod
    def share(shard: Shard | None, n_local: int, n_global: int) -> float:
        """The factor turning a local mean over ``n_local`` rows into this rank's share of the
        global mean over ``n_global`` rows, times W (1 unsharded)."""
        return 1.0 if shard is None else shard.scale(n_local, n_global)


class Objective(ObjectiveBase):
    """Base of all flow-map objectives.

    Per batch: x0 ~ base, (s, t) from ``times`` (the first ``n_diag`` on the diagonal), then

        L = mean_diag |v_{t,t}(I_t) - target_t|^2  +  mean_offdiag |pred - target|^2

    (``part_weighting="equal"``, the default); ``"count"`` weights each part by its share of
    the batch, n_diag / B and (B - n_diag) / B, which makes L the mean over all samples (the
    paper's code; benchmarks/RESULTS.md section 15 compares the two)

    with ``target_t = dI_t/dt`` (self-distillation) or the teacher's b_t(I_t) (distillation)
    and (pred, target) from :meth:`offdiag_terms`. With ``weighting`` each per-sample loss l
    becomes exp(-w(s,t)) l + w(s,t). Norms are summed over all non-batch dimensions.

    Subclasses implement :meth:`offdiag_terms`; they never call torch.func themselves but ask
    ``self.derivative`` (a :class:`~pyflowmap.derivatives.DerivativeMode`).
    """

    uses_derivative = False
    parts = ("fm", "distill")

    def __init__(
        self,
        interpolant: str | Interpolant = "linear",
        base: GaussianBase | None = None,
        times: TimeSampler | None = None,
        derivative: str | DerivativeMode = "auto",
        weighting: LearnedWeighting | None = None,
        diagonal_teacher: Velocity | None = None,
        p_uncond: float = 0.0,
        guidance: float | None = None,
        guidance_range: tuple[float, float] | None = None,
        part_weighting: str = "equal",
    ):
        super().__init__()
        self.set_conditioning(p_uncond, guidance, guidance_range)
        if part_weighting not in PART_WEIGHTINGS:
            raise ValueError(f"part_weighting must be one of {PART_WEIGHTINGS}, got {part_weighting!r}")
        self.part_weighting = part_weighting
        self.interpolant = make_interpolant(interpolant)
        self.base = base if base is not None else GaussianBase(1.0)
        self.times = times if times is not None else TimeSampler()
        self.derivative = derivative
        self.weighting = weighting
        self._diagonal_teacher = diagonal_teacher

    def mode(self, flowmap: FlowMap) -> DerivativeMode:
        return resolve_mode(self.derivative, flowmap)

    def guided_velocity(self, flowmap: FlowMap, x, t, d_i, cond: Conditions):
        """The velocity target of the diagonal at (x = I_t, t): the conditional sample d_i =
        dI_t/dt, or under training guidance w d_i + (1 - w) sg(v_{t,t}(I_t | null)) (MeanFlow's
        and the flow-map CFG construction; w = 1 on rows without a condition)."""
        if cond.scale is None:
            return d_i
        with torch.no_grad():
            v_null = flowmap.velocity(x, t, **cond.null_kw)
        return cond_.combine(d_i, v_null, cond.scale)

    def diagonal_target(self, x0, x1, xt, t, flowmap: FlowMap | None = None, cond: Conditions = NO_CONDITION):
        if self._diagonal_teacher is not None:
            with torch.no_grad():
                return guided_call(self._diagonal_teacher, cond, xt, t)
        return self.guided_velocity(flowmap, xt, t, self.interpolant.velocity_target(x0, x1, t), cond)

    def offdiag_terms(self, flowmap: FlowMap, x0, x1, s, t, draws: dict | None = None,
                      cond: Conditions = NO_CONDITION):
        """(pred, target) for off-diagonal samples; ``target`` may be a scalar 0. ``draws``:
        this objective's own per-sample random values from :meth:`draw_offdiag`; ``cond``:
        these rows' :class:`Conditions`, passed to every network call."""
        raise NotImplementedError

    def draw_offdiag(self, n: int, generator, device, dtype) -> dict:
        """Per-sample randomness of ``n`` off-diagonal samples beyond (x0, s, t), e.g. PSD's
        split; drawn for the whole global batch so that every data-parallel rank sees the
        values a single process would."""
        return {}

    def part_weight(self, key: str, pred, target) -> torch.Tensor | None:
        """An extra per-sample weight ``[B]`` for part ``key`` ("fm" | "distill"), or None.
        Computed from detached values (MeanFlow's adaptive weight overrides this)."""
        return None

    def draw(self, flowmap: FlowMap, x1: torch.Tensor, generator: torch.Generator | None = None, step: int = 0,
             shard: Shard | None = None, global_batch: int | None = None, c=None) -> Draws:
        """x0, (s, t) and the off-diagonal draws for a data batch ``x1`` ``[B, ...]`` with
        conditions ``c`` (labels ``[B]`` or a tensor ``[B, ...]``, or None); randomness from
        ``generator`` (``step`` is not used: these objectives have no schedule).

        Data-parallel use (:mod:`pyflowmap.distributed`): ``x1`` holds this rank's rows
        ``shard.indices(global_batch)`` of a global batch; the noise, times and draws are made
        for the whole global batch and sliced the same way, each part is averaged over its
        global count and scaled by W, so DDP's gradient average equals one process's gradient
        on the global batch."""
        # one host check per step: NaN data would poison the run silently
        check_batch("x1", x1, role="the data batch")
        dev, dt = x1.device, x1.dtype
        B = self.global_batch_size(shard, global_batch, x1.shape[0])
        x0 = self.base.sample((B,) + tuple(x1.shape[1:]), generator=generator, device=dev, dtype=dt)
        s, t, n_diag = self.times.sample(B, generator=generator, device=dev, dtype=dt)
        # without a generator (and unsharded) the draws stay inside offdiag_terms, after the
        # diagonal forward, where they always were: the global RNG order (dropout) is unchanged
        draws = self.draw_offdiag(B - n_diag, generator, dev, dt) if generator is not None or shard else {}
        counts = {"fm": n_diag, "distill": B - n_diag}
        idx = None
        if shard is not None:
            for key, count in counts.items():
                # every rank must run the same network calls (FSDP2 gathers weights per call)
                if 0 < count < shard.world:
                    raise ValueError(f"the {key!r} part has {count} of {B} samples, fewer than the {shard.world} "
                                     "processes: raise the batch or move diag_fraction away from 0 and 1")
            idx = shard.indices(B, device=dev)
            x0, s, t = x0[idx], s[idx], t[idx]
            off = idx[shard.count(n_diag):] - n_diag
            draws = {k: v[off] for k, v in draws.items()}
            n_diag = shard.count(n_diag)
        cond = self.draw_conditions(flowmap, c, B, generator, idx, dev, dt)
        return Draws(noise=x0, t=t, s=s, n_diag=n_diag, extra=draws, cond=cond, counts=counts, shard=shard)

    def loss_from_draws(self, flowmap: FlowMap, x1: torch.Tensor, draws: Draws) -> LossOutput:
        x0, s, t, n_diag, cond, shard = draws.noise, draws.s, draws.t, draws.n_diag, draws.cond, draws.shard
        counts = draws.counts
        n = x1.shape[0]
        parts = []  # (name, pred, target, s, t)
        if n_diag > 0:
            x0d, x1d, td = x0[:n_diag], x1[:n_diag], t[:n_diag]
            cd = cond.rows(slice(None, n_diag))
            xt = self.interpolant.interpolate(x0d, x1d, td)
            parts.append(("fm", flowmap.velocity(xt, td, **cd.kw), self.diagonal_target(x0d, x1d, xt, td, flowmap, cd),
                          td, td))
        if n_diag < n:
            so, to = s[n_diag:], t[n_diag:]
            pred, target = self.offdiag_terms(flowmap, x0[n_diag:], x1[n_diag:], so, to, draws.extra,
                                              cond.rows(slice(n_diag, None)))
            parts.append(("distill", pred, target, so, to))

        loss, metrics, per_sample, terms = x1.new_zeros(()), {}, [], {}
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
            # sharded: this rank's share of the global mean, times W (DDP averages over ranks),
            # for the loss and for the logged part means alike
            share = self.share(shard, per.shape[0], counts[key])
            weight = 1.0 if self.part_weighting == "equal" else counts[key] / sum(counts.values())
            terms[key] = (part * (share * weight)).to(loss.dtype)
            loss = loss + terms[key]
            metrics[key] = per.detach().mean() * share
            per_sample.append(per)
        metrics["loss"] = loss.detach()
        per_sample = torch.cat(per_sample)
        return LossOutput(loss=loss, per_sample=per_sample, n_diag=n_diag, metrics=metrics, parts=terms)

    def extra_repr(self) -> str:
        extra = "" if self.p_uncond == 0 else f", p_uncond={self.p_uncond}, guidance={self.guidance}, " \
            f"guidance_range={self.guidance_range}"
        pw = "" if self.part_weighting == "equal" else f", part_weighting={self.part_weighting!r}"
        return (f"interpolant={self.interpolant!r}, base={self.base!r}, times={self.times!r}, "
                f"derivative={self.derivative!r}{pw}{extra}")
