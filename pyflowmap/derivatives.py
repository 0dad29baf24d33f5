"""How a directional derivative of the flow map is obtained: ``jvp``, ``fd`` or ``dual``.

Objectives say WHAT derivative they need; a mode says HOW. Every mode answers one question:

    mode.jvp(flowmap, x, s, t, x_dot=None, s_dot=None, t_dot=None, output="map")
        -> (X_{s,t}(x), d/de X_{s + e s_dot, t + e t_dot}(x + e x_dot) at e = 0)

(or the same for v_{s,t} with ``output="velocity"``), with ``c=`` and ``w=`` (the condition
and the guidance-scale input of a conditional network) passed to every network call; they
carry no tangent. Tangents left ``None`` are zero. The
tangent output stays differentiable in the network parameters in every mode, which is what
LSD and ESD backpropagate through.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch.func import functional_call

from pyflowmap._tensors import batch_time
from pyflowmap.flowmap import FlowMap


def _function(flowmap: FlowMap, output: str, c=None, w=None):
    """``f(x, s, t)``: the map or its velocity, the condition bound (it carries no tangent)."""
    if output not in ("map", "velocity"):
        raise ValueError(f"output must be 'map' or 'velocity', got {output!r}")
    f = flowmap if output == "map" else flowmap.velocity_field
    if c is None and w is None:
        return f
    return lambda x, s, t: f(x, s, t, c=c, w=w)


def _check_tangents(x, s, t, x_dot, s_dot, t_dot):
    if x_dot is not None and x_dot.shape != x.shape:
        raise ValueError(f"x_dot must have the shape of x {tuple(x.shape)}, got {tuple(x_dot.shape)}")
    for name, d in (("s_dot", s_dot), ("t_dot", t_dot)):
        if d is not None and torch.as_tensor(d).dim() not in (0, 1):
            raise ValueError(f"{name} must be a scalar or a [batch] tensor")


@dataclass
class CentralDifference:
    """A tangent (plus - minus) / 2h not formed yet: :func:`pyflowmap.losses.residual_loss`
    hands the pair to the fused central-difference loss, which forms the difference in
    float64 inside its single pass. Anything else calls :meth:`materialize`."""

    plus: torch.Tensor
    minus: torch.Tensor
    inv_2h: float
    dtype: torch.dtype

    @property
    def shape(self):
        return self.plus.shape

    def materialize(self) -> torch.Tensor:
        return ((self.plus - self.minus) * self.inv_2h).to(self.dtype)


class DerivativeMode(ABC):
    name = "mode"

    @abstractmethod
    def jvp(self, flowmap: FlowMap, x, s, t, x_dot=None, s_dot=None, t_dot=None, output="map", lazy=False,
            c=None, w=None):
        """(out, out_dot); see the module docstring. ``lazy=True`` lets a mode return the
        tangent in a deferred form a loss can fuse (finite differences: a
        :class:`CentralDifference`); callers that pass it must accept either."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class JVP(DerivativeMode):
    """Exact forward-mode derivative through ``torch.func.jvp``.

    Keeps reverse mode through the tangent. With ``fused=True`` (the default) every jvp runs
    under :func:`pyflowmap.nn.fused_jvp`, so a user's own transformer passes through
    ``F.scaled_dot_product_attention`` (no forward-AD rule of its own) in O(N) memory and gets
    correct LayerNorm gradients; ``fused=False`` leaves every op to PyTorch's own rules. Correct
    under DDP and FSDP2 when the whole step runs in one
    :class:`pyflowmap.distributed.LossModule` forward (it transforms the inner network, never the
    wrapper); ``dual`` is faster and also traces under torch.compile.
    """

    name = "jvp"

    def __init__(self, fused: bool = True):
        self.fused = bool(fused)

    def __repr__(self) -> str:
        return "JVP()" if self.fused else "JVP(fused=False)"

    def jvp(self, flowmap, x, s, t, x_dot=None, s_dot=None, t_dot=None, output="map", lazy=False, c=None, w=None):
        _check_tangents(x, s, t, x_dot, s_dot, t_dot)
        s, t = batch_time(s, x), batch_time(t, x)
        tangents = (
            torch.zeros_like(x) if x_dot is None else x_dot,
            torch.zeros_like(s) if s_dot is None else batch_time(s_dot, x),
            torch.zeros_like(t) if t_dot is None else batch_time(t_dot, x),
        )
        if not self.fused:
            return torch.func.jvp(_function(flowmap, output, c, w), (x, s, t), tangents)
        from pyflowmap.nn.jvp_mode import fused_jvp  # pyflowmap.nn builds on this module's package

        with fused_jvp():
            return torch.func.jvp(_function(flowmap, output, c, w), (x, s, t), tangents)


def default_fd_step(dtype: torch.dtype) -> float:
    """eps^(1/3): balances the O(h^2) truncation and O(eps/h) rounding error of a central difference."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


class _OutputView(torch.nn.Module):
    """Exposes ``flowmap`` or ``flowmap.velocity_field`` as forward() for functional_call."""

    def __init__(self, flowmap: FlowMap, output: str):
        super().__init__()
        self.flowmap = flowmap
        self.output = output

    def forward(self, x, s, t, c=None, w=None):
        return _function(self.flowmap, self.output, c, w)(x, s, t)


class FiniteDifference(DerivativeMode):
    """Central difference (f(p + h d) - f(p - h d)) / 2h, computed in ``dtype`` whatever the model's.

    When ``dtype`` differs from the parameters' dtype the network is evaluated with parameters
    cast (differentiably) to ``dtype``, so a bf16 model still gets an fp32/fp64 difference (in
    bf16 the difference of two nearby outputs would be noise). The primal output is evaluated
    in the model's own dtype. Times are shifted by ±h s_dot and ±h t_dot, so t + h may leave
    [0, 1] by h; networks are evaluated there as they are.

    Under ``torch.autocast`` the two shifted evaluations run with autocast off: a bf16 GEMM's
    rounding (~4e-3 relative) divided by 2h would swamp the derivative. The primal output
    keeps autocast, so only the difference costs fp32 compute (docs/precision.md).
    """

    name = "fd"

    def __init__(self, h: float | None = None, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"finite differences run in float32 or float64, got {dtype}")
        if h is not None and not (h > 0 and h < 1):
            raise ValueError(f"finite-difference step h must be in (0, 1), got {h}")
        self.dtype = dtype
        self.h = h if h is not None else default_fd_step(dtype)

    def __repr__(self) -> str:
        return f"FiniteDifference(h={self.h:g}, dtype={self.dtype})"

    def _evaluator(self, flowmap: FlowMap, output: str, c=None, w=None):
        """``f(x, s, t)`` running the network with its floating tensors in ``self.dtype`` (a
        floating condition and ``w`` too; class labels stay integers)."""
        tensors = dict(flowmap.named_parameters())
        tensors.update(flowmap.named_buffers())
        if all(not v.is_floating_point() or v.dtype == self.dtype for v in tensors.values()):
            return _function(flowmap, output, c, w)
        view = _OutputView(flowmap, output)
        cast = {"flowmap." + k: (v.to(self.dtype) if v.is_floating_point() else v)
                for k, v in tensors.items()}
        c = c.to(self.dtype) if isinstance(c, torch.Tensor) and c.is_floating_point() else c
        w = w.to(self.dtype) if isinstance(w, torch.Tensor) else w
        return lambda x, s, t: functional_call(view, cast, (x, s, t), {"c": c, "w": w})

    def jvp(self, flowmap, x, s, t, x_dot=None, s_dot=None, t_dot=None, output="map", lazy=False, c=None, w=None):
        _check_tangents(x, s, t, x_dot, s_dot, t_dot)
        s, t = batch_time(s, x), batch_time(t, x)
        out = _function(flowmap, output, c, w)(x, s, t)
        f = self._evaluator(flowmap, output, c, w)
        h, d = self.h, self.dtype

        def shifted(sign):
            xs = x.to(d) if x_dot is None else x.to(d) + sign * h * x_dot.to(d)
            ss = s.to(d) if s_dot is None else s.to(d) + sign * h * batch_time(s_dot, x).to(d)
            ts = t.to(d) if t_dot is None else t.to(d) + sign * h * batch_time(t_dot, x).to(d)
            with torch.autocast(x.device.type, enabled=False):
                return f(xs, ss, ts).to(d)

        diff = CentralDifference(shifted(1.0), shifted(-1.0), 1.0 / (2 * h), out.dtype)
        return out, (diff if lazy else diff.materialize())


class Dual(DerivativeMode):
    """Explicit tangents: the network returns (v, v_dot) in its ordinary forward.

    Exact like ``jvp`` but made of plain autograd ops, so it works with fused kernels, DDP,
    FSDP and torch.compile. Needs a tangent-carrying network (``supports_tangents``).
    """

    name = "dual"

    def jvp(self, flowmap, x, s, t, x_dot=None, s_dot=None, t_dot=None, output="map", lazy=False, c=None, w=None):
        _check_tangents(x, s, t, x_dot, s_dot, t_dot)
        if output not in ("map", "velocity"):
            raise ValueError(f"output must be 'map' or 'velocity', got {output!r}")
        return flowmap.tangent(x, s, t, x_dot, s_dot, t_dot, output=output, c=c, w=w)


MODES = {"jvp": JVP, "fd": FiniteDifference, "dual": Dual}


def resolve_mode(mode: str | DerivativeMode, flowmap: FlowMap | None = None) -> DerivativeMode:
    """``"auto"`` picks ``dual`` for tangent-carrying networks and ``jvp`` otherwise."""
    if isinstance(mode, DerivativeMode):
        return mode
    if mode == "auto":
        return Dual() if flowmap is not None and flowmap.supports_tangents else JVP()
    if mode == "dual" and flowmap is not None and not flowmap.supports_tangents:
        raise TypeError(
            f"derivative='dual' needs a tangent-carrying network; {type(flowmap.net).__name__} "
            "is not one (use 'jvp' or 'fd')"
        )
    try:
        return MODES[mode]()
    except KeyError:
        raise ValueError(f"unknown derivative mode {mode!r}; choose from auto, {', '.join(MODES)}") from None


def make_mode(name: str, flowmap: FlowMap | None = None, fd_step: float | None = None,
              fd_dtype: torch.dtype = torch.float32) -> DerivativeMode:
    """A mode from a run config's name: ``"fd"`` is :class:`FiniteDifference` with step
    ``fd_step`` (None: eps^(1/3) of ``fd_dtype``) evaluated in ``fd_dtype``; every other name
    goes through :func:`resolve_mode`."""
    if name == "fd":
        return FiniteDifference(h=fd_step, dtype=fd_dtype)
    return resolve_mode(name, flowmap)
