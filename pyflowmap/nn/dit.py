"""A tangent-carrying Diffusion Transformer (DiT, Peebles & Xie 2023) flow map for images."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import nn

from pyflowmap.conditioning import Conditioned
from pyflowmap.nn import functional as DF
from pyflowmap.nn.attention import Attention
from pyflowmap.nn.embeddings import SinusoidalEmbedding, make_step_embedding, time_tangents
from pyflowmap.nn.forward_ad import attention
from pyflowmap.nn.layers import Activation, Conv2d, DualModule, LayerNorm, Linear, RMSNorm, Sequential, modulate, stack

POS_EMBEDS = ("sincos", "learned")


def dual_mul(aa: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """The product of two stacked duals (broadcasting): ``[a b; a_dot b + a b_dot]``."""
    a, a_dot = DF.split(aa)
    b, b_dot = DF.split(bb)
    return torch.cat([a * b, a_dot * b + a * b_dot])


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """An inverted-dropout mask shaped like ``like`` (the primal rows), from the global RNG.

    Primal and dual mode draw the same mask from the same RNG state (the same call on the same
    shape), so a dual pass reproduces the primal pass it is the tangent of."""
    keep = torch.full(like.shape, 1 - p, dtype=like.dtype, device=like.device)
    return torch.bernoulli(keep) / (1 - p)


def sincos_2d(width: int, gh: int, gw: int) -> torch.Tensor:
    """The fixed 2D sin-cos position embedding ``[gh * gw, width]`` (MAE / DiT): a quarter of
    the channels each for sin and cos of the row and of the column index."""
    d = width // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    ay, ax = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([torch.sin(ay), torch.cos(ay), torch.sin(ax), torch.cos(ax)], dim=1)


class DiTAttention(Attention):
    """:class:`pyflowmap.nn.Attention` with optional qk-norm: an RMSNorm (learned per-channel
    gain) over the head dim of every query and key, before the attention op, in both modes."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__(dim, heads)
        head_dim = dim // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None

    def forward(self, x):
        q, k, v = self._heads(self.qkv(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(self._merge(attention(q, k, v, self.causal)))

    def dual(self, xx):
        q, k, v = self._heads(self.qkv.dual(xx))  # [2B, H, N, D]: stacked along dim 0
        if self.q_norm is not None:
            q, k = self.q_norm.dual(q), self.k_norm.dual(k)
        return self.proj.dual(self._merge(DF.dual_attention(q, k, v, self.causal)))


class DiTBlock(DualModule):
    """AdaLN-Zero transformer block on tokens ``[B, N, width]``:

        x = x + g1 * Attn(modulate(LN(x), scale1, shift1))
        x = x + g2 * MLP(modulate(LN(x), scale2, shift2))

    with (shift, scale, gate) x 2 = Linear(SiLU(cond)) initialised at zero (so the block starts
    as the identity), LayerNorms without affine, a GELU MLP of ``mlp_ratio * width`` hidden
    units, dropout on that hidden layer (dual mode: one mask for both halves). ``forward`` /
    ``dual`` take the already activated ``SiLU(cond)`` ``[B, cond_dim]`` (shared by all blocks).
    """

    fsdp_unit = True  # FSDP2 shards each block on its own (pyflowmap.distributed.wrap_fsdp)

    def __init__(self, width: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(round(width * mlp_ratio)))
        self.dropout = dropout
        self.norm1 = LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(width, heads, qk_norm)
        self.norm2 = LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1, self.act, self.fc2 = Linear(width, hidden), Activation("gelu"), Linear(hidden, width)
        self.ada = Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sc1, sh1))
        h = self.act(self.fc1(modulate(self.norm2(x), sc2, sh2)))
        if self.training and self.dropout > 0:
            h = h * dropout_mask(h, self.dropout)
        return x + g2 * self.fc2(h)

    def dual(self, xx, cc):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada.dual(cc).unsqueeze(1).chunk(6, dim=-1)
        xx = xx + dual_mul(g1, self.attn.dual(DF.dual_modulate(self.norm1.dual(xx), sc1, sh1)))
        h = self.act.dual(self.fc1.dual(DF.dual_modulate(self.norm2.dual(xx), sc2, sh2)))
        if self.training and self.dropout > 0:
            mask = dropout_mask(h[: h.shape[0] // 2], self.dropout)
            h = h * torch.cat([mask, mask])  # the tangent of m * h is m * h_dot
        return xx + dual_mul(g2, self.fc2.dual(h))


class FinalLayer(DualModule):
    """LN (no affine) -> AdaLN (shift, scale from SiLU(cond), zero-init) -> Linear to the patch
    pixels (zero-init): the untrained map outputs exactly 0."""

    def __init__(self, width: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = Linear(cond_dim, 2 * width)
        self.linear = Linear(width, out_dim)
        for layer in (self.ada, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), scale, shift))

    def dual(self, xx, cc):
        shift, scale = self.ada.dual(cc).unsqueeze(1).chunk(2, dim=-1)
        return self.linear.dual(DF.dual_modulate(self.norm.dual(xx), scale, shift))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _image_size(image_size):
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or a pair (H, W), got {image_size!r}")
        return _positive_int("image_size", image_size[0]), _positive_int("image_size", image_size[1])
    n = _positive_int("image_size", image_size)
    return n, n


class DiTFlowMap(Conditioned, nn.Module):
    """v_{s,t}(x) for images ``[B, channels, H, W]`` with a Diffusion Transformer.

    ``patch x patch`` patches (a strided convolution) plus a position embedding (``"sincos"``:
    the fixed 2D sin-cos table; ``"learned"``: a parameter; positions carry no tangent) make
    ``(H / patch) (W / patch)`` tokens of ``width`` channels; ``depth`` AdaLN-Zero blocks
    (:class:`DiTBlock`: ``heads``-head attention, optional ``qk_norm``, a GELU MLP of
    ``mlp_ratio * width``, ``dropout`` with one mask for both halves) and a final AdaLN +
    linear layer map them back to patches. Conditioning as in :class:`UNetFlowMap`: the
    ``emb_dim`` sinusoidal embeddings of s and t - s (and of the condition, for a conditional
    net) through an MLP into a ``width`` vector that drives every AdaLN. v = sigma_d F(x /
    sigma_d, ...) with sigma_d = ``data_std``; the AdaLN and output layers start at zero, so an
    untrained map is the identity (v = 0).

    ``num_classes`` / ``cond_shape`` / ``guidance_input``: as in :class:`UNetFlowMap`
    (``c=None``: the null condition). Every layer has a dual mode, so ``net(x, s, t,
    tangents=(x_dot, s_dot, t_dot))`` returns ``(v, v_dot)`` in one pass over the stacked
    [primal; tangent] rows. :func:`dit_preset` builds the named sizes.

    ``derivative="dual"`` (what ``"auto"`` picks) is the fast path; ``"jvp"`` gives the same
    gradients through the layers' jvp rules (its LayerNorm rule works around PyTorch's wrong
    reverse mode through the native layer_norm tangent, docs/tangents.md section 10).
    """

    supports_tangents = True

    def __init__(self, image_size, channels: int = 1, patch: int = 2, width: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, qk_norm: bool = False, pos_embed: str = "sincos",
                 emb_dim: int = 128, dropout: float = 0.0, data_std: float = 0.5, num_classes: int | None = None,
                 cond_shape=None, guidance_input: bool = False, step_embedding: str = "sinusoidal",
                 step_levels: int = 7, time_scale: float = 100.0):
        super().__init__()
        h, w = _image_size(image_size)
        channels, patch = _positive_int("channels", channels), _positive_int("patch", patch)
        width, depth = _positive_int("width", width), _positive_int("depth", depth)
        heads = _positive_int("heads", heads)
        emb_dim = _positive_int("emb_dim", emb_dim)
        if h % patch or w % patch:
            raise ValueError(f"image_size {h}x{w} is not divisible by patch {patch}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if pos_embed == "sincos" and width % 4:
            raise ValueError(f"width {width} must be divisible by 4 for the sincos pos_embed")
        if emb_dim % 2:
            raise ValueError(f"emb_dim must be even, got {emb_dim}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, Real) or not mlp_ratio > 0 \
                or not math.isfinite(mlp_ratio):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(data_std, torch.Tensor) and data_std.numel() == 1:
            data_std = float(data_std)
        if isinstance(data_std, bool) or not isinstance(data_std, Real) or not data_std > 0 \
                or not math.isfinite(data_std):
            raise ValueError(f"data_std must be a positive number, got {data_std!r}")
        conditional = self._init_condition(emb_dim, num_classes, cond_shape, guidance_input)

        self.image_size, self.channels, self.patch = (h, w), channels, patch
        self.width, self.depth, self.heads = width, depth, heads
        self.grid = (h // patch, w // patch)
        tokens = self.grid[0] * self.grid[1]

        self.emb_s = SinusoidalEmbedding(emb_dim, scale=time_scale)
        self.emb_dt = make_step_embedding(step_embedding, emb_dim, step_levels, time_scale)
        self.cond = Sequential(Linear((3 if conditional else 2) * emb_dim, width), Activation("silu"),
                               Linear(width, width))
        self.cond_act = Activation("silu")  # SiLU(cond), shared by every AdaLN

        self.patch_embed = Conv2d(channels, width, patch, stride=patch)
        self.pos_embed_kind = pos_embed
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(width, *self.grid).float().unsqueeze(0), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, width, mlp_ratio, qk_norm, dropout) for _ in range(depth))
        self.final = FinalLayer(width, width, patch * patch * channels)
        self.register_buffer("data_std", torch.tensor(float(data_std)))

    # -- shapes ------------------------------------------------------------------------------------

    def _check(self, x):
        h, w = self.image_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, h, w):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DiTFlowMap expects x of shape [B, {self.channels}, {h}, {w}], got {got}")

    @staticmethod
    def _time(name, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            return t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
        return t

    def _tokens(self, img, dual: bool = False):
        """``[B, C, H, W]`` -> ``[B, N, width]`` (no position yet)."""
        y = self.patch_embed.dual(img) if dual else self.patch_embed(img)
        return y.flatten(2).transpose(1, 2)

    def _unpatchify(self, y):
        """``[B, N, p p C]`` -> ``[B, C, H, W]``."""
        (gh, gw), p, c = self.grid, self.patch, self.channels
        y = y.reshape(y.shape[0], gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(y.shape[0], c, gh * p, gw * p)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x, s, t, c=None, w=None, tangents=None):
        """``x`` ``[B, C, H, W]``, ``s``, ``t`` ``[B]`` (or scalars) -> ``v`` like ``x``, or
        ``(v, v_dot)`` when ``tangents = (x_dot, s_dot, t_dot)`` is given (entries may be None)."""
        self._check(x)
        s, t = self._time("s", s, x), self._time("t", t, x)
        sd = self.data_std.to(x.dtype)
        cond = self._condition(x, c, w)
        pos = self.pos_embed.to(x.dtype)
        if tangents is None:
            cvec = self.cond_act(self.cond(torch.cat([self.emb_s(s), self.emb_dt(t - s), *cond], -1)))
            h = self._tokens(x / sd) + pos
            for block in self.blocks:
                h = block(h, cvec)
            return sd * self._unpatchify(self.final(h, cvec))
        if not isinstance(tangents, (tuple, list)) or len(tangents) != 3:
            raise ValueError("tangents must be a triple (x_dot, s_dot, t_dot)")
        x_dot, s_dot, t_dot = tangents
        if x_dot is not None and (not isinstance(x_dot, torch.Tensor) or x_dot.shape != x.shape):
            got = tuple(x_dot.shape) if isinstance(x_dot, torch.Tensor) else type(x_dot).__name__
            raise ValueError(f"x_dot must have the shape of x {tuple(x.shape)}, got {got}")
        s_dot = None if s_dot is None else self._time("s_dot", s_dot, x)
        t_dot = None if t_dot is None else self._time("t_dot", t_dot, x)
        s_dot, dt_dot = time_tangents(s, t, s_dot, t_dot)
        cc = self.cond_act.dual(self.cond.dual(torch.cat([
            self.emb_s.dual(s, s_dot), self.emb_dt.dual(t - s, dt_dot),
            *[stack(e, None) for e in cond]], -1)))  # a condition carries no tangent
        hh = self._tokens(stack(x / sd, None if x_dot is None else x_dot / sd), dual=True)
        b = x.shape[0]
        hh = torch.cat([hh[:b] + pos, hh[b:]])  # positions carry no tangent
        for block in self.blocks:
            hh = block.dual(hh, cc)
        return DF.split(sd * self._unpatchify(self.final.dual(hh, cc)))


# name -> (width, depth, heads); the patch is the name's suffix (DiT's naming: S/2, B/4, ...)
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}
PRESETS = ("cpu-small", "S/2", "S/4", "S/8", "B/2", "B/4", "B/8", "L/2", "L/4", "L/8")


def preset_settings(name: str, image_size) -> dict:
    """The constructor keywords (patch, width, depth, heads, emb_dim) of preset ``name`` on
    images of ``image_size`` (cpu-small's patch depends on it); see :func:`dit_preset`."""
    if name == "cpu-small":
        h, w = _image_size(image_size)
        patch = 4 if h % 4 == 0 and w % 4 == 0 and min(h, w) >= 16 else 2
        return dict(patch=patch, width=128, depth=4, heads=4, emb_dim=128)
    if name in PRESETS:
        size, patch = name.split("/")
        width, depth, heads = DIT_SIZES[size]
        return dict(patch=int(patch), width=width, depth=depth, heads=heads, emb_dim=256)
    raise ValueError(f"name must be one of {PRESETS}, got {name!r}")


def dit_preset(name: str, image_size, channels: int = 1, **kw) -> DiTFlowMap:
    """A :class:`DiTFlowMap` of a named size; ``kw`` overrides any constructor argument.

    ``"cpu-small"``: width 128, depth 4, 4 heads, emb_dim 128, patch 4 when both sides are
    divisible by 4 and at least 16 (28x28: 49 tokens, 32x32: 64), else 2; sized to train on a
    couple of CPU cores. ``"S/2"`` (384 wide, 12 deep, 6 heads), ``"B/2"`` (768, 12, 12),
    ``"L/2"`` (1024, 24, 16), and the same sizes with patch 4 or 8 (``"S/4"``, ...), all with
    emb_dim 256 (DiT's frequency-embedding size).
    """
    cfg = preset_settings(name, image_size)
    cfg.update(kw)
    return DiTFlowMap(image_size, channels, **cfg)
