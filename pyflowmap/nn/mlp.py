"""The 2D flow-map MLP of the paper's checkerboard experiments, tangent-carrying."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap.conditioning import Conditioned
from pyflowmap.nn.embeddings import FourierFeatures, SinusoidalEmbedding, make_step_embedding, time_tangents
from pyflowmap.nn.functional import split
from pyflowmap.nn.layers import Activation, Linear, Sequential, stack

ACTIVATIONS = ("gelu", "silu")


class FlowMapMLP(Conditioned, nn.Module):
    """v_{s,t}(x) = sigma_d * MLP([x / sigma_d, emb(s), emb(t - s)]).

    The paper's conditioning: positional embeddings of s and of the jump t - s, input and
    output scaled by the data std ``data_std`` (sigma_d). ``depth`` hidden layers of width
    ``hidden`` (the paper's checker model: 4 x 512, GELU). The output layer starts at zero, so
    an untrained map is the identity and its velocity zero.

    ``num_classes`` (class labels, null class ``num_classes``) or ``cond_shape`` (a tensor
    condition) make it conditional: ``net(x, s, t, c=c)`` appends an ``emb_dim`` embedding of
    ``c`` to the input (``c=None``: the null condition); ``guidance_input=True`` also embeds the
    guidance scale ``w`` ``[B]`` (:class:`pyflowmap.conditioning.ConditionEmbedding`).

    ``fourier_features`` > 0 appends that many random Fourier features of x / sigma_d
    (:class:`~pyflowmap.nn.embeddings.FourierFeatures`, ``fourier_scale`` cycles per sigma_d)
    to the input: the sharp edges of a 2D density are learned many times faster.

    Built from :mod:`pyflowmap.nn` dual layers: ``net(x, s, t, tangents=(x_dot, s_dot, t_dot))``
    returns ``(v, v_dot)`` in one ordinary forward over the stacked [primal; tangent] rows, so
    the ``dual`` derivative mode (picked by ``derivative="auto"``) needs no forward-mode AD.
    """

    supports_tangents = True

    def __init__(self, dim: int = 2, hidden: int = 512, depth: int = 4, emb_dim: int = 64,
                 activation: str = "gelu", data_std: float | torch.Tensor = 1.0, num_classes: int | None = None,
                 cond_shape=None, guidance_input: bool = False, step_embedding: str = "sinusoidal",
                 step_levels: int = 7, time_scale: float = 100.0, fourier_features: int = 0,
                 fourier_scale: float = 1.0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dim = dim
        self.emb_s = SinusoidalEmbedding(emb_dim, scale=time_scale)
        self.emb_dt = make_step_embedding(step_embedding, emb_dim, step_levels, time_scale)
        layers: list[nn.Module] = []
        conditional = self._init_condition(emb_dim, num_classes, cond_shape, guidance_input)
        self.fourier = FourierFeatures(dim, fourier_features, fourier_scale) if fourier_features else None
        width = dim + (3 if conditional else 2) * emb_dim + (self.fourier.dim if self.fourier is not None else 0)
        for _ in range(depth):
            layers += [Linear(width, hidden), Activation(activation)]
            width = hidden
        self.body = Sequential(*layers)
        self.head = Linear(hidden, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("data_std", torch.as_tensor(data_std, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, c=None, w=None, tangents=None):
        """``x`` ``[B, dim]``, ``s``, ``t`` ``[B]`` (``c``, ``w``: the condition and guidance
        scale of a conditional net) -> ``v`` ``[B, dim]``, or ``(v, v_dot)`` when ``tangents =
        (x_dot, s_dot, t_dot)`` is given (entries may be None = zero)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FlowMapMLP expects x of shape [B, {self.dim}], got {tuple(x.shape)}")
        sd = self.data_std.to(x.dtype)
        cond = self._condition(x, c, w)
        xs = x / sd
        if tangents is None:
            feats = [] if self.fourier is None else [self.fourier(xs)]
            h = torch.cat([xs, *feats, self.emb_s(s), self.emb_dt(t - s), *cond], dim=-1)
            return sd * self.head(self.body(h))
        x_dot, s_dot, t_dot = tangents
        s_dot, dt_dot = time_tangents(s, t, s_dot, t_dot)
        xs_dot = None if x_dot is None else x_dot / sd
        hh = torch.cat([
            stack(xs, xs_dot),
            *([] if self.fourier is None else [self.fourier.dual(xs, xs_dot)]),
            self.emb_s.dual(s, s_dot),
            self.emb_dt.dual(t - s, dt_dot),
            *[stack(e, None) for e in cond],  # a condition carries no tangent
        ], dim=-1)
        out = sd * self.head.dual(self.body.dual(hh))
        return split(out)
