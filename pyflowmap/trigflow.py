"""TrigFlow (Lu and Song 2024, sCM; docs/objectives.md section 17): the path
x_tau = cos(tau) y + sin(tau) z, z ~ N(0, sigma_d^2 I), tau in [0, pi/2] with the DATA at
tau = 0, its exact map to pyflowmap's linear interpolant (noise at t = 0, data at t = 1), and the
consistency model f(x, tau) = cos(tau) x - sin(tau) sigma_d F(x, tau) that sCT / sCD train
(:class:`pyflowmap.objectives.SCM`).

The two time axes, with base noise x0 = sigma_b eps of the linear interpolant
I_t = t y + (1 - t) x0 and k = sigma_d / sigma_b:

    sigma = sigma_d tan(tau)                    (EDM's noise level: x_tau / cos(tau) = y + sigma eps)
    t     = cos(tau) / (cos(tau) + k sin(tau))  (= sigma_b / (sigma_b + sigma))
    x_tau = (cos(tau) + k sin(tau)) I_t

and the velocities, u = dI_t/dt (pyflowmap's) and v = dx_tau/dtau (TrigFlow's), both
conditional expectations given the point:

    v = -sin(tau) (I + (1 - t) u) + k cos(tau) (I - t u)
    u = (cos(tau) x - sin(tau) v) - (sin(tau) x + cos(tau) v) / k

(from y = I + (1 - t) u = cos(tau) x - sin(tau) v and sigma_d eps = k (I - t u) =
sin(tau) x + cos(tau) v). So a velocity trained one way is sampled or distilled the other way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyflowmap import conditioning as cond_
from pyflowmap._tensors import batch_time, expand_time
from pyflowmap.flowmap import FlowMap

HALF_PI = math.pi / 2
PARAMETERIZATIONS = ("linear", "trigflow")


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """Times stay in float32 or wider whatever the data dtype (bf16 cos/sin and embeddings of
    bf16 times are visibly wrong)."""
    return torch.promote_types(dtype, torch.float32)


class TrigFlowPath:
    """The TrigFlow path and its exact map to the linear interpolant (module docstring).

    ``sigma_d``: the data's standard deviation (TrigFlow's noise scale); ``base_std``: the
    standard deviation sigma_b of the linear interpolant's base noise (pyflowmap's default 1)."""

    def __init__(self, sigma_d: float = 0.5, base_std: float = 1.0):
        for name, v in (("sigma_d", sigma_d), ("base_std", base_std)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TrigFlowPath: {name} must be a positive number, got {v!r}")
        self.sigma_d, self.base_std = float(sigma_d), float(base_std)
        self.k = self.sigma_d / self.base_std

    # the two time axes
    def tau_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """tau = arctan(sigma / sigma_d) (EDM's sigma to TrigFlow time)."""
        return torch.atan(sigma / self.sigma_d)

    def sigma_from_tau(self, tau: torch.Tensor) -> torch.Tensor:
        return self.sigma_d * torch.tan(tau)

    def linear_time(self, tau: torch.Tensor) -> torch.Tensor:
        """t(tau) = cos / (cos + k sin): tau = 0 (data) -> 1, tau = pi/2 (noise) -> 0."""
        c, s = torch.cos(tau), torch.sin(tau)
        return c / (c + self.k * s)

    def trig_time(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse: tau = atan2(1 - t, k t)."""
        return torch.atan2(1 - t, self.k * t)

    # points and velocities
    def scale(self, tau: torch.Tensor) -> torch.Tensor:
        """D(tau) = cos + k sin, with x_tau = D I_t."""
        return torch.cos(tau) + self.k * torch.sin(tau)

    def interpolate(self, y: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x_tau = cos(tau) y + sin(tau) sigma_d eps (``eps`` standard normal)."""
        c, s = expand_time(torch.cos(tau), y), expand_time(torch.sin(tau), y)
        return (c * y + s * (self.sigma_d * eps)).to(y.dtype)

    def velocity_target(self, y: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """dx_tau/dtau = cos(tau) sigma_d eps - sin(tau) y."""
        c, s = expand_time(torch.cos(tau), y), expand_time(torch.sin(tau), y)
        return (c * (self.sigma_d * eps) - s * y).to(y.dtype)

    def to_linear(self, x: torch.Tensor, tau: torch.Tensor):
        """(I_t, t) of the TrigFlow point ``x`` at ``tau``."""
        return (x / expand_time(self.scale(tau), x)).to(x.dtype), self.linear_time(tau)

    def from_linear(self, i: torch.Tensor, t: torch.Tensor):
        """(x_tau, tau) of the linear-interpolant point ``i`` at ``t``."""
        tau = self.trig_time(t)
        return (i * expand_time(self.scale(tau), i)).to(i.dtype), tau

    def velocity_from_linear(self, i: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = dx_tau/dtau from the linear velocity ``u`` at the linear point (``i``, ``t``)."""
        tau = self.trig_time(t)
        c, s, tb = (expand_time(v, i) for v in (torch.cos(tau), torch.sin(tau), t))
        return (-s * (i + (1 - tb) * u) + self.k * c * (i - tb * u)).to(i.dtype)

    def velocity_to_linear(self, x: torch.Tensor, v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u = dI_t/dt from the TrigFlow velocity ``v`` at the TrigFlow point (``x``, ``tau``)."""
        c, s = expand_time(torch.cos(tau), x), expand_time(torch.sin(tau), x)
        return ((c * x - s * v) - (s * x + c * v) / self.k).to(x.dtype)

    def trig_velocity(self, linear_velocity):
        """``(x, tau, **kw) -> v`` from a linear velocity ``(i, t, **kw) -> u`` (e.g. a
        :class:`~pyflowmap.FlowMap`'s ``velocity``): an FM model as a TrigFlow teacher."""
        def v(x, tau, **kw):
            i, t = self.to_linear(x, tau)
            return self.velocity_from_linear(i, linear_velocity(i, t, **kw), t)
        return v

    def linear_velocity(self, trig_velocity):
        """``(i, t, **kw) -> u`` from a TrigFlow velocity ``(x, tau, **kw) -> v``: a TrigFlow
        diffusion model for :func:`pyflowmap.sample_ode` or as a flow-map teacher."""
        def u(i, t, **kw):
            x, tau = self.from_linear(i, t)
            return self.velocity_to_linear(x, trig_velocity(x, tau, **kw), tau)
        return u

    def __repr__(self) -> str:
        return f"TrigFlowPath(sigma_d={self.sigma_d}, base_std={self.base_std})"


class TrigFlowConsistency(nn.Module):
    """sCM's consistency model f(x, tau) = cos(tau) x - sin(tau) sigma_d F(x, tau) around an image
    or vector network ``net(x, s, t)`` (pyflowmap's networks; it gets s = t, so its t - s
    embedding is constant, as in :class:`~pyflowmap.consistency.EDMConsistency`).

    sigma_d F(x, tau) = a(tau) x + b(tau) net(c_in(tau) x, e(tau), e(tau)), with

    * ``parameterization="trigflow"`` (sCM's own): a = 0, b = sigma_d, c_in = 1 / sigma_d, and the
      time input e = 2 tau / pi (TrigFlow time rescaled to [0, 1], the range pyflowmap's time
      embeddings are built for);
    * ``parameterization="linear"`` (default): the network is a linear-interpolant velocity
      u(I_t, t) at the linear point and time (I = x / D, e = t(tau)), and sigma_d F the TrigFlow
      velocity it implies: a = (k cos - sin) / D, b = -k / D. Then f = I_t + (1 - t) u, an Euler
      jump to the data end, so a flow-matching run's weights start the model at the denoiser
      E[y | x] (sCD initialised from its teacher, as in sCM).

    The times passed to the network stay in float32 or wider whatever the model dtype.
    """

    def __init__(self, net: nn.Module, path: TrigFlowPath | None = None, parameterization: str = "linear"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"TrigFlowConsistency: parameterization must be one of {PARAMETERIZATIONS}, "
                             f"got {parameterization!r}")
        self.flowmap = FlowMap(net)
        self.path = path if path is not None else TrigFlowPath()
        self.parameterization = parameterization

    @property
    def net(self) -> nn.Module:
        return self.flowmap.net

    @property
    def supports_tangents(self) -> bool:
        return self.flowmap.supports_tangents

    def coefficients(self, tau: torch.Tensor):
        """((a, b, c_in, e), (a', b', c_in', e')) at ``tau`` ``[B]``: the parameterization and
        its derivatives in tau (closed forms; docs/objectives.md section 17)."""
        tau = tau.to(_time_dtype(tau.dtype))
        if self.parameterization == "trigflow":
            sd, z, one = self.path.sigma_d, torch.zeros_like(tau), torch.ones_like(tau)
            return (z, sd * one, one / sd, tau / HALF_PI), (z, z, z, one / HALF_PI)
        k, c, s = self.path.k, torch.cos(tau), torch.sin(tau)
        d = c + k * s
        a, b, c_in, e = (k * c - s) / d, -k / d, 1 / d, c / d
        # D' = k cos - sin = a D and D'' = -D give a' = -1 - a^2, b' = -a b, c_in' = -a c_in, e' = b c_in
        return (a, b, c_in, e), (-1 - a * a, -a * b, -a * c_in, b * c_in)

    def velocity(self, x: torch.Tensor, tau, c=None, w=None) -> torch.Tensor:
        """sigma_d F(x, tau): the model's TrigFlow velocity estimate."""
        tau = batch_time(tau, x, dtype=_time_dtype(x.dtype))
        (a, b, c_in, e), _ = self.coefficients(tau)
        kw = {"c": c, "w": w}
        n = self.flowmap.velocity_field(expand_time(c_in, x).to(x.dtype) * x, e, e, **kw)
        return (expand_time(a, x) * x + expand_time(b, x) * n).to(x.dtype)

    def velocity_and_tangent(self, mode, x: torch.Tensor, tau: torch.Tensor, x_dot: torch.Tensor, c=None, w=None,
                             lazy: bool = False):
        """(sigma_d F, sigma_d dF/dtau along (x_dot, 1)) through a derivative ``mode`` of
        :mod:`pyflowmap.derivatives` (dual, jvp or fd); the first output keeps its graph."""
        (a, b, c_in, e), (da, db, dc_in, de) = self.coefficients(tau)
        ex = lambda v: expand_time(v, x).to(x.dtype)  # noqa: E731
        x_in = ex(c_in) * x
        x_in_dot = ex(dc_in) * x + ex(c_in) * x_dot
        n, n_dot = mode.jvp(self.flowmap, x_in, e, e, x_dot=x_in_dot, s_dot=de, t_dot=de, output="velocity",
                            c=c, w=w)
        if not isinstance(n_dot, torch.Tensor):
            n_dot = n_dot.materialize()
        v = ex(a) * x + ex(b) * n
        v_dot = ex(da) * x + ex(a) * x_dot + ex(db) * n + ex(b) * n_dot
        return v, v_dot

    def forward(self, x: torch.Tensor, tau, c=None, w=None, guidance: float | None = None) -> torch.Tensor:
        """f(x, tau | c) = cos(tau) x - sin(tau) sigma_d F; ``guidance``: classifier-free
        guidance of the output from one call on the doubled batch."""
        tau = batch_time(tau, x, dtype=_time_dtype(x.dtype))
        if guidance is not None:
            if c is None:
                raise ValueError("guidance needs a condition c to guide towards")
            w = None if w is None else batch_time(w, x)
            cc, xx, tt, ww = cond_.doubled(c, cond_.null_condition(self.net, c), x, tau, w)
            f_c, f_null = self(xx, tt, c=cc, w=ww).chunk(2)
            return cond_.combine(f_c, f_null, guidance)
        v = self.velocity(x, tau, c=c, w=w)
        return (expand_time(torch.cos(tau), x) * x - expand_time(torch.sin(tau), x) * v).to(x.dtype)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, parameterization={self.parameterization!r}"


def proposal_tau(n: int, path: TrigFlowPath, p_mean: float = -1.0, p_std: float = 1.4, generator=None,
                 device=None, dtype=torch.float32) -> torch.Tensor:
    """sCM's proposal: sigma = sigma_d tan(tau) log-normal, ln(sigma) ~ N(p_mean, p_std^2)."""
    z = torch.randn(n, generator=generator, device=device, dtype=_time_dtype(dtype))
    return path.tau_from_sigma(torch.exp(p_mean + p_std * z))
