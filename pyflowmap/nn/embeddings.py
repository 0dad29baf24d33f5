"""Time embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from pyflowmap._tensors import acc_dtype, batch_tangent


def time_tangents(s, t, s_dot, t_dot):
    """(s_dot, d(t - s)) as ``[B]`` tensors or None: the tangents of the embeddings of s and of
    the jump t - s that the flow-map networks condition on."""
    s_dot, t_dot = batch_tangent(s_dot, s), batch_tangent(t_dot, t)
    if s_dot is None and t_dot is None:
        return None, None
    return s_dot, (t_dot if t_dot is not None else 0) - (s_dot if s_dot is not None else 0)


class SinusoidalEmbedding(nn.Module):
    """Positional embedding [cos(w_k scale t), sin(w_k scale t)], w_k = max_period^(-k/half).

    Times in [0, 1] are scaled by ``scale``: the frequencies run from ``scale`` down to
    ``scale / max_period`` radians per unit time. The default 100 resolves jumps t - s of about
    0.01; the diffusion-step convention (1000) makes d/dt of the embedding large, which inflates
    the gradients of derivative-based objectives (LSD's gradient norm was ~5x larger with 1000
    in a 2D checker run, and it learned more slowly). sCM's tangent is the same story: its
    d/dtau runs through this embedding, and on Gaussian data sCT / sCD converge at scale 10 and
    not at 100 (``tests/test_scm.py``), which is why sCM runs default to 10.
    """

    def __init__(self, dim: int, scale: float = 100.0, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"time embedding scale must be a positive number, got {scale!r}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", (scale * freqs).float(), persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B]`` -> ``[B, dim]``, computed in float32 (float64 for a float64 ``t``) and
        returned in ``t``'s dtype: with scale 100 a bf16 argument would be off by up to ~0.4 rad."""
        tc = t.to(acc_dtype(t.dtype))
        arg = tc.unsqueeze(-1) * self.freqs.to(tc.dtype)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).to(t.dtype)

    def dual(self, t: torch.Tensor, t_dot: torch.Tensor | None) -> torch.Tensor:
        """Stacked ``[emb(t); d emb(t)/dt * t_dot]``, ``[2B, dim]`` (zero tangent for None)."""
        from pyflowmap.nn import functional as DF

        return DF.dual_sinusoidal(t, t_dot, self.freqs)


class FourierFeatures(nn.Module):
    """Random Fourier features of the points, [cos(x P), sin(x P)] with P = 2 pi ``scale`` N(0, 1)
    of shape ``[dim, features]`` (Tancik et al. 2020), drawn from a generator seeded with
    ``seed`` (not the global RNG) and kept as a buffer, so a checkpoint restores them exactly.

    An MLP on raw 2D coordinates learns the sharp edges of a density slowly (its spectral
    bias); these features give its first layer frequencies of ``scale`` cycles per unit of its
    input (the MLP feeds x / sigma_d). benchmarks/RESULTS.md section 15 measures the effect.
    """

    def __init__(self, dim: int, features: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"Fourier features must be a positive int, got {features!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"Fourier feature scale must be a positive number, got {scale!r}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", 2 * math.pi * scale * torch.randn(dim, features, generator=g))
        self.dim = 2 * features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, dim]`` -> ``[B, 2 features]``, computed in float32 (float64 for float64
        ``x``) and returned in ``x``'s dtype."""
        xc = x.to(acc_dtype(x.dtype))
        p = xc @ self.proj.to(xc.dtype)
        return torch.cat([torch.cos(p), torch.sin(p)], dim=-1).to(x.dtype)

    def dual(self, x: torch.Tensor, x_dot: torch.Tensor | None) -> torch.Tensor:
        """Stacked ``[features(x); d features(x) . x_dot]``, ``[2B, 2 features]``."""
        from pyflowmap.nn import functional as DF

        return DF.dual_fourier(x, x_dot, self.proj)


STEP_EMBEDDINGS = ("sinusoidal", "dyadic")


class DyadicStepEmbedding(nn.Module):
    """Shortcut models' step-size conditioning (Frans et al. 2024): the jump d = t - s as its
    level k = -log2(d) on the dyadic grid 1, 1/2, ..., 2^-levels (rounded to the nearest level;
    d below 2^-levels, flow matching's d = 0 included, is the finest level, as in the paper's
    code), embedded as the time k / levels. Piecewise constant in d, so its tangent is zero:
    for derivative-free objectives (shortcut, PSD)."""

    def __init__(self, dim: int, levels: int = 7):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 30:
            raise ValueError(f"dyadic step levels must be an int in [1, 30], got {levels!r}")
        self.levels = levels
        self.inner = SinusoidalEmbedding(dim)
        self.dim = dim

    def level(self, d: torch.Tensor) -> torch.Tensor:
        """k = round(-log2 d) clamped to [0, levels], as a float tensor like ``d``."""
        floor = 2.0 ** -(self.levels + 1)
        return torch.round(-torch.log2(d.clamp_min(floor))).clamp(0, self.levels)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return self.inner(self.level(d) / self.levels)

    def dual(self, d: torch.Tensor, d_dot: torch.Tensor | None) -> torch.Tensor:
        e = self.forward(d)
        return torch.cat([e, torch.zeros_like(e)])


def make_step_embedding(kind: str, dim: int, levels: int = 7, scale: float = 100.0) -> nn.Module:
    """The embedding of the jump t - s: ``"sinusoidal"`` (a smooth function of t - s, what the
    derivative-based objectives differentiate; ``scale`` as :class:`SinusoidalEmbedding`'s) or
    ``"dyadic"`` (:class:`DyadicStepEmbedding`)."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim, scale=scale)
    if kind == "dyadic":
        return DyadicStepEmbedding(dim, levels)
    raise ValueError(f"step_embedding must be one of {STEP_EMBEDDINGS}, got {kind!r}")
