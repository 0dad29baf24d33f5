"""Reference twins of the dual (explicit-tangent) ops, in plain differentiable PyTorch.

Layout convention of every dual op: primal and tangent are STACKED along dim 0, ``xx = [x;
x_dot]`` of shape ``[2B, ...]`` (the first B rows primal, the last B the tangent). Linear maps
(matmul, conv, add) then act on both halves at once; only the non-linear ops below need to
know about the halves. Each returns the stacked ``[y; y_dot]``; reverse-mode autograd flows
through both halves, which is what LSD/ESD need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyflowmap._tensors import acc_dtype

ACTIVATIONS = ("gelu", "silu")


def split(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[x; x_dot]`` -> ``(x, x_dot)``."""
    if xx.shape[0] % 2:
        raise ValueError(f"a stacked dual tensor needs an even leading dim, got {tuple(xx.shape)}")
    half = xx.shape[0] // 2
    return xx[:half], xx[half:]


def stack(x: torch.Tensor, x_dot: torch.Tensor | None) -> torch.Tensor:
    """``[x; x_dot]`` with a zero tangent for ``None``."""
    return torch.cat([x, torch.zeros_like(x) if x_dot is None else x_dot.to(x.dtype)])


def check_normalized_shape(xx: torch.Tensor, normalized_shape) -> None:
    shape = tuple(normalized_shape)
    if tuple(xx.shape[xx.dim() - len(shape):]) != shape or xx.dim() < len(shape) + 1:
        raise ValueError(f"layer norm over {shape} needs an input ending in those dims, got {tuple(xx.shape)}")


def _norm_inputs(xx: torch.Tensor, *params):
    """(xx, params, out dtype) for a norm twin: 16-bit inputs are normalized in float32 and
    the result rounded once to their dtype, as the kernels do; under autocast the affine
    parameters are first cast to xx's dtype (the norms' "follow" policy, docs/precision.md)."""
    out = xx.dtype
    if torch.is_autocast_enabled(xx.device.type):
        params = tuple(None if p is None else p.to(out) for p in params)
    comp = acc_dtype(out)
    return xx.to(comp), tuple(None if p is None else p.to(comp) for p in params), out


def activation_derivatives(z: torch.Tensor, kind: str):
    """(a(z), a'(z), a''(z)) for ``kind`` in ``ACTIVATIONS`` (GELU is the exact erf form)."""
    if kind == "gelu":
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        return z * cdf, cdf + z * phi, phi * (2 - z * z)
    if kind == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1 + z * (1 - sig)), sig * (1 - sig) * (2 + z * (1 - 2 * sig))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def dual_act(zz: torch.Tensor, kind: str = "gelu") -> torch.Tensor:
    """``[a(z); a'(z) z_dot]``."""
    z, z_dot = split(zz)
    y, dy, _ = activation_derivatives(z.double() if z.dtype in (torch.float16, torch.bfloat16) else z, kind)
    return torch.cat([y.to(zz.dtype), (dy.to(zz.dtype) * z_dot)])


def dual_layer_norm(xx: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims with its tangent:
    xhat_dot = rstd (x_dot - mean(x_dot) - xhat mean(xhat x_dot)); y_dot = weight * xhat_dot."""
    check_normalized_shape(xx, normalized_shape)
    xx, (weight, bias), out = _norm_inputs(xx, weight, bias)
    x, x_dot = split(xx)
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    rstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    xhat = centered * rstd
    xhat_dot = rstd * (x_dot - x_dot.mean(dims, keepdim=True) - xhat * (xhat * x_dot).mean(dims, keepdim=True))
    if weight is not None:
        xhat, xhat_dot = xhat * weight, xhat_dot * weight
    if bias is not None:
        xhat = xhat + bias
    return torch.cat([xhat, xhat_dot]).to(out)


def dual_rms_norm(xx: torch.Tensor, weight=None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: y = x rstd, y_dot = rstd (x_dot - y mean(y x_dot))."""
    xx, (weight,), out = _norm_inputs(xx, weight)
    x, x_dot = split(xx)
    rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    y = x * rstd
    y_dot = rstd * (x_dot - y * (y * x_dot).mean(-1, keepdim=True))
    if weight is not None:
        y, y_dot = y * weight, y_dot * weight
    return torch.cat([y, y_dot]).to(out)


def dual_group_norm(xx: torch.Tensor, groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of ``[2B, C, ...]`` with its tangent (LayerNorm's formula per group)."""
    xx, (weight, bias), out = _norm_inputs(xx, weight, bias)
    x, x_dot = split(xx)
    n, c = x.shape[0], x.shape[1]
    if c % groups:
        raise ValueError(f"channels {c} not divisible by groups {groups}")
    shape = x.shape
    g = x.reshape(n, groups, math.prod(shape[1:]) // groups)
    gd = x_dot.reshape(g.shape)
    mean = g.mean(-1, keepdim=True)
    centered = g - mean
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    xhat = centered * rstd
    xhat_dot = rstd * (gd - gd.mean(-1, keepdim=True) - xhat * (xhat * gd).mean(-1, keepdim=True))
    xhat, xhat_dot = xhat.reshape(shape), xhat_dot.reshape(shape)
    if weight is not None:
        w = weight.reshape((1, c) + (1,) * (x.dim() - 2))
        xhat, xhat_dot = xhat * w, xhat_dot * w
    if bias is not None:
        xhat = xhat + bias.reshape((1, c) + (1,) * (x.dim() - 2))
    return torch.cat([xhat, xhat_dot]).to(out)


def dual_modulate(hh: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FiLM / AdaLN modulation y = h (1 + scale) + shift, all three stacked duals:
    y_dot = h_dot (1 + scale) + h scale_dot + shift_dot. ``scale``/``shift`` broadcast against h."""
    h, h_dot = split(hh)
    sc, sc_dot = split(scale)
    sh, sh_dot = split(shift)
    return torch.cat([h * (1 + sc) + sh, h_dot * (1 + sc) + h * sc_dot + sh_dot])


def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor | None = None,
                  k_dot: torch.Tensor | None = None, v_dot: torch.Tensor | None = None, causal: bool = False,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Math attention with its tangent on ``[B, H, N, D]``; absent tangents are zero. O(N^2) memory.

    S = c Q K^T, P = softmax(S), O = P V; S_dot = c (Q_dot K^T + Q K_dot^T),
    O_dot = (P * S_dot) V - mu O + P V_dot with mu = rowsum(P * S_dot). Causal masks are aligned
    bottom-right (key j visible to query i iff j <= i + Nk - Nq); a query that sees no key gets
    O = O_dot = 0 (not the NaN of a softmax over nothing).
    """
    c = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    kt = k.transpose(-1, -2)
    s = c * (q @ kt)
    s_dot = torch.zeros_like(s)
    if q_dot is not None:
        s_dot = s_dot + c * (q_dot @ kt)
    if k_dot is not None:
        s_dot = s_dot + c * (q @ k_dot.transpose(-1, -2))
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:
        visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    else:
        visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    blind = ~visible.any(-1, keepdim=True)  # rows that see no key
    # a finite fill for blind rows keeps softmax (and its gradient) free of NaN; P is zeroed below
    s = s.masked_fill(~visible, float("-inf")).masked_fill(blind, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(blind | ~visible, 0.0)
    o = p @ v
    ps = p * s_dot
    mu = ps.sum(-1, keepdim=True)
    o_dot = ps @ v - mu * o
    if v_dot is not None:
        o_dot = o_dot + p @ v_dot
    return o, o_dot


def math_attention(q, k, v, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V in plain ops: forward-AD capable, twice differentiable,
    O(N^2) memory. The independent oracle the attention twins are tested against (through
    torch.func.jvp) and the differentiable recompute of the primal attention's double backward."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def dual_attention(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, causal: bool = False,
                   scale: float | None = None) -> torch.Tensor:
    """:func:`jvp_attention` on stacked ``[2B, H, N, D]`` inputs ``[x; x_dot]`` -> ``[O; O_dot]``."""
    q, q_dot = split(qq)
    k, k_dot = split(kk)
    v, v_dot = split(vv)
    return torch.cat(jvp_attention(q, k, v, q_dot, k_dot, v_dot, causal, scale))


def dual_sinusoidal(t: torch.Tensor, t_dot: torch.Tensor | None, freqs: torch.Tensor) -> torch.Tensor:
    """[cos(w t), sin(w t)] and its tangent [-w sin(w t), w cos(w t)] t_dot, stacked ``[2B, dim]``;
    computed in float32 (float64 for float64 ``t``) and returned in ``t``'s dtype."""
    out = t.dtype
    t = t.to(acc_dtype(out))
    arg = t.unsqueeze(-1) * freqs.to(t.dtype)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if t_dot is None:
        return torch.cat([emb, torch.zeros_like(emb)]).to(out)
    w = freqs.to(t.dtype)
    d = torch.cat([-w * torch.sin(arg), w * torch.cos(arg)], dim=-1) * t_dot.to(t.dtype).unsqueeze(-1)
    return torch.cat([emb, d]).to(out)


def dual_fourier(x: torch.Tensor, x_dot: torch.Tensor | None, proj: torch.Tensor) -> torch.Tensor:
    """Fourier features [cos(x P), sin(x P)] of points ``x`` ``[B, d]`` (``proj`` ``[d, m]``)
    and their tangent [-sin(x P), cos(x P)] * (x_dot P), stacked ``[2B, 2m]``; computed in
    float32 (float64 for float64 ``x``) and returned in ``x``'s dtype."""
    out = x.dtype
    x = x.to(acc_dtype(out))
    p = x @ proj.to(x.dtype)
    emb = torch.cat([torch.cos(p), torch.sin(p)], dim=-1)
    if x_dot is None:
        return torch.cat([emb, torch.zeros_like(emb)]).to(out)
    pd = x_dot.to(x.dtype) @ proj.to(x.dtype)
    d = torch.cat([-torch.sin(p) * pd, torch.cos(p) * pd], dim=-1)
    return torch.cat([emb, d]).to(out)


def dual_linear(xx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One GEMM over the stacked rows (W read once); the bias lands on the primal half only."""
    if xx.dim() < 2:
        raise ValueError(f"dual_linear: `xx` must be [2B, ..., in], got shape {tuple(xx.shape)}")
    split(xx)  # checks the even leading dim
    y = F.linear(xx, weight)
    if bias is None:
        return y
    half = y.shape[0] // 2
    # under autocast the bias follows the GEMM's dtype (F.linear's own rule)
    return torch.cat([y[:half] + bias.to(y.dtype), y[half:]])


def dual_act_backward(grad: torch.Tensor, zz: torch.Tensor, kind: str = "gelu") -> torch.Tensor:
    """Gradient of a loss through :func:`dual_act`: with ``grad = [g_y; g_ydot]``,
    g_z = a'(z) g_y + a''(z) z_dot g_ydot and g_zdot = a'(z) g_ydot (stacked)."""
    z, z_dot = split(zz)
    g_y, g_ydot = split(grad)
    low = zz.dtype in (torch.float16, torch.bfloat16)  # computed in float64 there, like the forward
    up = (lambda t: t.double()) if low else (lambda t: t)  # noqa: E731
    _, d1, d2 = activation_derivatives(up(z), kind)
    return torch.cat([d1 * up(g_y) + d2 * up(z_dot) * up(g_ydot), d1 * up(g_ydot)]).to(zz.dtype)
