"""Samplers: N-step flow-map jumps, multistep consistency sampling (flow maps and EDM
consistency models), and Euler / Heun integration of the diagonal velocity; :func:`draw`
picks one by name."""

from __future__ import annotations

import math

from typing import Sequence

import torch

from pyflowmap import conditioning as cond_
from pyflowmap import ops
from pyflowmap._tensors import batch_time
from pyflowmap.consistency import EDMConsistency, intermediate_sigmas
from pyflowmap.cuda_graphs import graph_sampler
from pyflowmap.flowmap import FlowMap, as_velocity
from pyflowmap.trigflow import HALF_PI, TrigFlowConsistency
from pyflowmap.validation import check_batch, check_count, check_ordered, check_time


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform grid t0 = g_0 < g_1 < ... < g_steps = t1 (``steps + 1`` points)."""
    steps = check_count("steps", steps)
    for name, v in (("t0", t0), ("t1", t1)):
        if isinstance(v, torch.Tensor) and v.numel() != 1:
            raise ValueError(f"{name} must be a single time, got a tensor of shape {tuple(v.shape)}")
        check_time(name, v)
    t0, t1 = float(t0), float(t1)
    check_ordered("t0", t0, "t1", t1, strict=True)
    return torch.linspace(t0, t1, steps + 1, device=device, dtype=dtype)


def _resolve_grid(steps, grid, x, t0=0.0, t1=1.0) -> torch.Tensor:
    if grid is None:
        if steps is None:
            raise ValueError("give either steps or grid")
        return time_grid(steps, t0, t1, device=x.device, dtype=torch.float64)
    g = torch.as_tensor(grid, dtype=torch.float64).to(x.device)
    if g.dim() != 1 or g.numel() < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least two times, got shape {tuple(g.shape)}")
    if not torch.all(torch.isfinite(g)):
        raise ValueError("grid contains non-finite times")
    if not torch.all(g[1:] > g[:-1]):
        raise ValueError("grid must be strictly increasing")
    # base noise lives at t = 0 and data at t = 1: a grid outside [0, 1] extrapolates the map
    check_time("grid", g)
    return g


KINDS = ("flowmap", "consistency")


def _loop(model: FlowMap, x: torch.Tensor, g: torch.Tensor, kind: str, base, generator,
          traj: list | None, c=None, w=None, guidance=None) -> torch.Tensor:
    """The K-step loop shared by eager sampling and CUDA-graph capture (no host syncs)."""
    last = g.numel() - 1
    for k in range(last):
        s, t = g[k].to(x.dtype), g[k + 1].to(x.dtype)
        if kind == "flowmap":
            x = model._jump(x, s, t, c, w, guidance)
        else:
            x1 = model._jump(x, s, g[last].to(x.dtype), c, w, guidance)  # jump to the data end
            if k + 1 < last:  # re-noise onto the interpolant at the next grid time
                eps = base.sample(x.shape, generator=generator, device=x.device, dtype=x.dtype) \
                    if base is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = (1 - t) * eps + t * x1
            else:
                x = x1
        if traj is not None:
            traj.append(x)
    return x


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int | None = 1,
           grid: Sequence[float] | torch.Tensor | None = None, kind: str | None = None, base=None,
           generator: torch.Generator | None = None, graph: bool = False, return_trajectory: bool = False,
           t_mid: float | None = None, c: torch.Tensor | None = None, guidance: float | None = None, w=None):
    """Few-step sampling from ``noise``: the one sampler entry point of pyflowmap.

    ``c``: the condition of each sample (class labels ``[B]``, the null class for
    unconditional, or a tensor ``[B, ...]``) for a conditional model; ``guidance``:
    classifier-free guidance at sampling, every network call made on the doubled batch
    [c; null] and combined as v_null + guidance (v_c - v_null) (None: the conditional model
    alone, which is already guided if it was trained with guidance); ``w``: the guidance scale
    given as an input to a network trained with a guidance range.

    For a :class:`~pyflowmap.FlowMap` (noise at t = 0, data at t = 1), over a time grid:

    * ``kind="flowmap"`` (default): compose jumps x <- X_{g_k, g_{k+1}}(x) (deterministic);
    * ``kind="consistency"``: at each grid time jump to the data end, x1 = X_{g_k, 1}(x), then
      re-noise onto the linear interpolant at the next grid time, x = (1 - g_{k+1}) eps +
      g_{k+1} x1 with fresh eps from ``base`` (default N(0, I)): multistep consistency
      sampling, the grid [0, t_mid, 1] being the ECT-style two-step sampler. (Partial
      re-noising, CTM's gamma < 1, needs a Markov forward kernel that the linear interpolant
      lacks: the noise implied by (x, x1) along the flow is not the interpolant's noise.)

    ``steps`` gives a uniform grid on [0, 1]; ``grid`` any increasing grid. Each jump is one
    network call plus the fused ``flowmap_step``. ``graph=True`` (CUDA) captures the whole loop
    in one CUDA graph on first use for this (model, shape, dtype, grid, kind, base) and replays
    it: same results as eager for ``flowmap``; for ``consistency`` the fresh noise comes from the
    default CUDA generator (seed it with ``torch.cuda.manual_seed``), so ``generator`` must be
    None.

    For an :class:`~pyflowmap.consistency.EDMConsistency` (``kind`` "consistency", its only
    sampler): x = f(sigma_max z, sigma_max), then for each re-noise level s_i, x = f(x + s_i n,
    s_i) with fresh Gaussian n from ``generator``. ``grid`` is the list of re-noise levels
    (sigmas in (sigma_min, sigma_max]); by default ``steps`` picks ECT's: none for one step,
    ``t_mid`` (default 0.821) for two, a rho = 7 grid from ``t_mid`` down to 0.02 beyond.

    For a :class:`~pyflowmap.trigflow.TrigFlowConsistency` (sCM; ``kind`` "consistency"): x =
    f(sigma_d z, pi/2), then for each re-noise time tau_i (TrigFlow time, data at 0), x =
    f(cos(tau_i) x + sin(tau_i) sigma_d n, tau_i). ``grid`` is the list of tau_i in (0, pi/2);
    by default none for one step, sCM's ``t_mid`` = 1.1 for two, and beyond the rho = 7 sigma
    grid from sigma_d tan(t_mid) down to 0.02, mapped to tau by tau = arctan(sigma / sigma_d).
    ``graph=True`` captures it like the flow-map consistency sampler (noise from the default
    CUDA generator).

    Returns ``[B, ...]``, or with ``return_trajectory`` (eager only) every state, stacked.
    """
    check_batch("noise", noise)
    c, w, guidance = _conditioning(model, noise, c, w, guidance)
    if isinstance(model, EDMConsistency):
        if kind not in (None, "consistency"):
            raise ValueError(f"an EDMConsistency model samples with kind='consistency' only, got {kind!r}")
        if graph:
            raise ValueError("graph=True captures flow-map sampling; EDM consistency sampling runs eagerly")
        return _edm_consistency(model, noise, steps, grid, 0.821 if t_mid is None else t_mid, generator,
                                return_trajectory, c, w, guidance)
    if isinstance(model, TrigFlowConsistency):
        if kind not in (None, "consistency"):
            raise ValueError(f"a TrigFlowConsistency model samples with kind='consistency' only, got {kind!r}")
        taus = _trigflow_levels(model, steps, grid, 1.1 if t_mid is None else t_mid, noise)
        if graph:
            if return_trajectory:
                raise ValueError("return_trajectory is not available with graph=True")
            loop = lambda x, taus_, base_, c_, w_: _trigflow_loop(model, x, taus_, None, None, c_, w_,  # noqa: E731
                                                                  guidance)
            return graph_sampler(model, loop, noise, taus, "trigflow", None, generator, c, w, guidance)(noise, c, w)
        traj = [] if return_trajectory else None
        x = _trigflow_loop(model, noise, taus, generator, traj, c, w, guidance)
        return torch.stack(traj) if traj is not None else x
    if t_mid is not None:
        raise ValueError("t_mid is the re-noise level of a consistency model's two-step sampler; a FlowMap takes "
                         "grid=[0, t_mid, 1] with kind='consistency'")
    kind = "flowmap" if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = _resolve_grid(steps, grid, noise)
    if graph:
        if return_trajectory:
            raise ValueError("return_trajectory is not available with graph=True")
        loop = lambda x, grid_, base_, c_, w_: _loop(model, x, grid_, kind, base_, None, None, c_, w_,  # noqa: E731
                                                     guidance)
        return graph_sampler(model, loop, noise, g, kind, base, generator, c, w, guidance)(noise, c, w)
    traj = [noise] if return_trajectory else None
    x = _loop(model, noise, g, kind, base, generator, traj, c, w, guidance)
    return torch.stack(traj) if traj is not None else x


def _conditioning(model, noise, c, w, guidance):
    """Checked (c, w as [B], guidance) of a sampler call."""
    if isinstance(model, (FlowMap, EDMConsistency)):
        cond_.check_condition("c", c, model, noise.shape[0])
    elif isinstance(model, TrigFlowConsistency):
        cond_.check_condition("c", c, model.net, noise.shape[0])
    if c is not None and c.device != noise.device:
        raise ValueError(f"c is on {c.device} but noise is on {noise.device}")
    guidance = cond_.check_guidance("guidance", guidance)
    if guidance is not None and c is None:
        raise ValueError("guidance needs the conditions c to guide towards")
    if w is not None:
        w = batch_time(w, noise)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("w (the guidance input) must be finite")
    return c, w, guidance


def _edm_consistency(model: EDMConsistency, noise, steps, levels, t_mid, generator, return_trajectory,
                     c=None, w=None, guidance=None):
    path = model.path
    levels = intermediate_sigmas(steps, t_mid) if levels is None else [float(s) for s in levels]
    if any(not (path.sigma_min < s <= path.sigma_max) for s in levels):
        raise ValueError(f"consistency sampling: re-noise levels must lie in ({path.sigma_min}, {path.sigma_max}]")
    # only what is set: an unconditional model (or a user's wrapper of one) keeps its old call
    kw = dict(boundary=True, **{k: v for k, v in (("c", c), ("w", w), ("guidance", guidance)) if v is not None})
    x = model(path.sigma_max * noise, path.sigma_max, **kw)
    traj = [x] if return_trajectory else None
    for s in levels:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x = model(x + s * z, s, **kw)
        if traj is not None:
            traj.append(x)
    return torch.stack(traj) if traj is not None else x


def _trigflow_levels(model: TrigFlowConsistency, steps, levels, t_mid, noise) -> torch.Tensor:
    """[pi/2, tau_1, ...]: the start and the re-noise times, as a tensor on ``noise``'s device."""
    path = model.path
    if levels is None:
        if not 0 < t_mid < HALF_PI:
            raise ValueError(f"t_mid (TrigFlow time) must lie in (0, pi/2), got {t_mid}")
        sigmas = intermediate_sigmas(steps, path.sigma_d * math.tan(t_mid))
        levels = [math.atan(s / path.sigma_d) for s in sigmas]
    else:
        levels = [float(t) for t in levels]
        if any(not (0 < t < HALF_PI) for t in levels):
            raise ValueError("TrigFlow consistency sampling: re-noise times must lie in (0, pi/2)")
    dtype = torch.promote_types(noise.dtype, torch.float32)
    return torch.tensor([HALF_PI, *levels], dtype=dtype, device=noise.device)


def _trigflow_loop(model: TrigFlowConsistency, noise, taus, generator, traj, c=None, w=None, guidance=None):
    """x = f(sigma_d z, pi/2), then x = f(cos(tau) x + sin(tau) sigma_d n, tau) per re-noise
    time: device tensors only, so a CUDA graph can capture it."""
    kw = {k: v for k, v in (("c", c), ("w", w), ("guidance", guidance)) if v is not None}
    sd = model.path.sigma_d
    with torch.no_grad():
        x = model(sd * noise, taus[0], **kw)
        if traj is not None:
            traj.append(x)
        for i in range(1, taus.shape[0]):
            tau = taus[i]
            z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x = model((torch.cos(tau) * x + torch.sin(tau) * sd * z).to(noise.dtype), tau, **kw)
            if traj is not None:
                traj.append(x)
    return x


@torch.no_grad()
def sample_ode(model, noise: torch.Tensor, steps: int | None = 8, method: str = "euler",
               grid: Sequence[float] | torch.Tensor | None = None, return_trajectory: bool = False,
               c: torch.Tensor | None = None, guidance: float | None = None, w=None):
    """Integrate dx/dt = b_t(x) from ``noise`` at t = 0 to t = 1.

    ``model`` is a :class:`FlowMap` (its diagonal velocity v_{t,t}) or any callable b(x, t)
    (``b(x, t, c=c)`` when conditioned). ``c``, ``guidance``, ``w``: as in :func:`sample`; with
    guidance each velocity call is one call on the doubled batch.
    ``method="euler"`` uses one velocity call per step, ``"heun"`` (2nd order) two. The Euler
    update is the fused ``flowmap_step`` (an Euler step is a flow-map jump with v = b_s).
    """
    flowmap_step = ops.flowmap_step.dispatch
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    check_batch("noise", noise)
    c, w, guidance = _conditioning(model, noise, c, w, guidance)
    b = _velocity(model, c, w, guidance)
    g = _resolve_grid(steps, grid, noise)
    x = noise
    traj = [x] if return_trajectory else None
    B = x.shape[0]
    for k in range(g.numel() - 1):
        s = g[k].to(x.dtype).expand(B)
        t = g[k + 1].to(x.dtype).expand(B)
        v = b(x, s)
        if method == "euler":
            x = flowmap_step(x, v, g[k], g[k + 1])
        else:
            x_pred = flowmap_step(x, v, g[k], g[k + 1])
            x = flowmap_step(x, 0.5 * (v + b(x_pred, t)), g[k], g[k + 1])
        if traj is not None:
            traj.append(x)
    return torch.stack(traj) if traj is not None else x


def _velocity(model, c, w, guidance):
    """b(x, t) of ``model`` given the condition, guided from one doubled call with ``guidance``."""
    if isinstance(model, FlowMap):
        return lambda x, t: model.velocity(x, t, c=c, w=w, guidance=guidance)
    b = as_velocity(model)
    if c is None:
        if w is not None:
            raise ValueError("w (the guidance input) is for pyflowmap FlowMaps")
        return b
    if guidance is None:
        return lambda x, t: b(x, t, c=c)
    # a bound method (flowmap.velocity, net.forward) declares its condition through its owner
    owner = getattr(model, "__self__", model)
    if cond_.is_conditional(owner) or hasattr(cond_._inner(owner), "null_condition"):
        null = cond_.null_condition(owner, c)
    elif c.is_floating_point():
        null = torch.zeros_like(c)
    else:
        raise TypeError("guidance with class labels needs the null class: give the velocity callable a "
                        "num_classes attribute (its null class) or a null_condition(c) method")

    def guided(x, t):
        cc, xx, tt = cond_.doubled(c, null, x, t)
        v_c, v_null = b(xx, tt, c=cc).chunk(2)
        return cond_.combine(v_c, v_null, guidance)

    return guided


SAMPLERS = ("map", "euler", "heun", "consistency")
_ALIASES = {"ode": "euler"}  # the image CLI's name for the Euler ODE


def sampler_name(sampler: str) -> str:
    """The canonical name of ``sampler`` (one of :data:`SAMPLERS`, or an alias of one)."""
    name = _ALIASES.get(sampler, sampler)
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return name


def draw(model, noise: torch.Tensor, sampler: str, steps: int, generator: torch.Generator | None = None,
         c: torch.Tensor | None = None, guidance: float | None = None, w=None):
    """Samples from ``noise`` with the sampler named ``sampler`` using ``steps`` network calls
    per sample (Heun: two per step): ``map`` (flow-map jumps), ``euler`` / ``heun`` (the ODE
    of the diagonal velocity; ``ode`` is ``euler``) or ``consistency`` (re-noising, with
    ``generator`` for the fresh noise); ``c``, ``guidance``, ``w`` as in :func:`sample`."""
    name = sampler_name(sampler)
    cond = dict(c=c, guidance=guidance, w=w)
    if name == "map":
        return sample(model, noise, steps=steps, **cond)
    if name in ("euler", "heun"):
        return sample_ode(model, noise, steps=steps, method=name, **cond)
    return sample(model, noise, steps=steps, kind="consistency", generator=generator, **cond)
