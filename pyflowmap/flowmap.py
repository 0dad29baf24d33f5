"""The flow-map parameterization X_{s,t}(x) = x + (t - s) v_{s,t}(x) around any velocity network."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap import conditioning as cond_
from pyflowmap import ops
from pyflowmap._tensors import batch_time, expand_time
from pyflowmap.validation import check_batch, check_time


class FlowMap(nn.Module):
    """Wraps a network ``net(x, s, t) -> v`` (``x`` ``[B, ...]``, ``s``, ``t`` ``[B]``).

    * ``flowmap(x, s, t)`` is the map X_{s,t}(x) = x + (t - s) v_{s,t}(x), so X_{s,s} = id;
    * ``flowmap.velocity(x, t)`` is the diagonal v_{t,t}(x), which the tangent condition makes
      the probability-flow velocity b_t(x).

    A network that carries tangents explicitly (``net.supports_tangents = True``) also accepts
    ``net(x, s, t, tangents=(x_dot, s_dot, t_dot))`` and returns ``(v, v_dot)``; any tangent may
    be ``None`` (zero). :meth:`tangent` then forms the map's tangent analytically, which is the
    ``dual`` derivative mode of :mod:`pyflowmap.derivatives`.

    A conditional network (:mod:`pyflowmap.conditioning`) takes ``net(x, s, t, c=c)`` (and
    ``w=w`` when it takes the guidance scale as an input); every method here passes ``c`` and
    ``w`` through, and leaves them out of the call when they are None, so unconditional
    networks need not know about them. ``guidance=`` on :meth:`velocity_field`,
    :meth:`velocity` and :meth:`jump` is classifier-free guidance from one network call on the
    doubled batch: v_null + guidance (v_c - v_null).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def supports_tangents(self) -> bool:
        return bool(getattr(self.net, "supports_tangents", False))

    def _v(self, x, s, t, c=None, w=None, **kw):
        """The network's output, which must be one velocity per coordinate of ``x``: a ``[B, 1]``
        output for ``[B, 2]`` data would broadcast silently in every formula below."""
        if c is not None:
            kw["c"] = c
        if w is not None:
            kw["w"] = batch_time(w, x)
        out = self.net(x, s, t, **kw)
        v = out[0] if isinstance(out, tuple) else out
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            raise ValueError(f"{type(self.net).__name__} returned "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} for x of shape "
                             f"{tuple(x.shape)}; a flow-map network returns v_(s,t)(x) shaped like x")
        return out

    def _guided(self, x, s, t, c, w, guidance):
        """v_{s,t}(x | c), or with ``guidance`` the guided v_null + guidance (v_c - v_null) from
        one call on the doubled batch (``c=None`` with guidance: the null condition alone)."""
        if guidance is None:
            return self._v(x, s, t, c=c, w=w)
        if c is None:
            raise ValueError("guidance needs a condition c to guide towards")
        w = None if w is None else batch_time(w, x)
        cc, xx, ss, tt, ww = cond_.doubled(c, cond_.null_condition(self.net, c), x, s, t, w)
        v_c, v_null = self._v(xx, ss, tt, c=cc, w=ww).chunk(2)
        return cond_.combine(v_c, v_null, guidance)

    def velocity_field(self, x: torch.Tensor, s, t, c=None, w=None, guidance=None) -> torch.Tensor:
        """v_{s,t}(x) (given ``c``; guided with ``guidance``)."""
        return self._guided(x, batch_time(s, x), batch_time(t, x), c, w, guidance)

    def forward(self, x: torch.Tensor, s, t, c=None, w=None) -> torch.Tensor:
        """X_{s,t}(x) = x + (t - s) v_{s,t}(x)."""
        s, t = batch_time(s, x), batch_time(t, x)
        return x + expand_time(t - s, x) * self._v(x, s, t, c=c, w=w)

    def velocity(self, x: torch.Tensor, t, c=None, w=None, guidance=None) -> torch.Tensor:
        """The diagonal v_{t,t}(x), i.e. the learned probability-flow velocity."""
        t = batch_time(t, x)
        return self._guided(x, t, t, c, w, guidance)

    def tangent(self, x, s, t, x_dot=None, s_dot=None, t_dot=None, output: str = "map", c=None, w=None):
        """(X, X_dot) (or (v, v_dot) with ``output="velocity"``) from a tangent-carrying net.

        X_dot = x_dot + (t_dot - s_dot) v + (t - s) v_dot.
        """
        if not self.supports_tangents:
            raise TypeError(
                f"{type(self.net).__name__} does not carry tangents (supports_tangents is not "
                "True); use derivative='jvp' or 'fd'"
            )
        s, t = batch_time(s, x), batch_time(t, x)
        v, v_dot = self._v(x, s, t, c=c, w=w, tangents=(x_dot, s_dot, t_dot))
        if output == "velocity":
            return v, v_dot
        dt = expand_time(t - s, x)
        out = x + dt * v
        out_dot = dt * v_dot
        if x_dot is not None:
            out_dot = out_dot + x_dot
        if s_dot is not None or t_dot is not None:
            ddt = (0 if t_dot is None else t_dot) - (0 if s_dot is None else s_dot)
            out_dot = out_dot + expand_time(torch.as_tensor(ddt, dtype=x.dtype, device=x.device), x) * v
        return out, out_dot

    @torch.no_grad()
    def jump(self, x: torch.Tensor, s, t, c=None, w=None, guidance=None) -> torch.Tensor:
        """X_{s,t}(x) for sampling: no graph, the update through the fused ``flowmap_step`` op.
        ``s`` and ``t`` lie in [0, 1] (noise at 0, data at 1); s > t runs the map backwards
        (data towards noise), which the flow-map identity X_{t,s} o X_{s,t} = id allows.
        ``c``, ``w``, ``guidance``: condition, guidance input and sampling-time guidance."""
        check_batch("x", x)
        check_time("s", s)
        check_time("t", t)
        cond_.check_condition("c", c, self, x.shape[0])
        return self._jump(x, s, t, c, w, cond_.check_guidance("guidance", guidance))

    def _jump(self, x, s, t, c=None, w=None, guidance=None):
        """:meth:`jump` without the host-side checks (the samplers' loop, CUDA-graph capture)."""
        s, t = batch_time(s, x), batch_time(t, x)
        return ops.flowmap_step.dispatch(x, self._guided(x, s, t, c, w, guidance), s, t)


def as_velocity(model):
    """A velocity b(x, t): a :class:`FlowMap` (its diagonal v_{t,t}) or any callable b(x, t)."""
    if isinstance(model, FlowMap):
        return model.velocity
    if callable(model):
        return model
    raise TypeError(f"expected a FlowMap or a velocity callable b(x, t), got {type(model).__name__}")
