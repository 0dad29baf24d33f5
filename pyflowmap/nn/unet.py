"""A small tangent-carrying UNet flow map for 28x28 (MNIST) and 8x8 (sklearn digits) images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyflowmap.conditioning import Conditioned
from pyflowmap.nn import functional as DF
from pyflowmap.nn.attention import Attention
from pyflowmap.nn.embeddings import SinusoidalEmbedding, make_step_embedding, time_tangents
from pyflowmap.nn.layers import Activation, Conv2d, DualModule, GroupNorm, Linear, Sequential, modulate, stack


class ResBlock(DualModule):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> FiLM(cond) -> SiLU -> dropout -> conv, plus a skip.

    Dropout in dual mode draws ONE mask and applies it to both halves (the tangent of
    x -> m * x is m * x_dot). The mask comes from the global RNG, so two passes that restore
    the RNG state in between (ECT's x_t and x_r passes) share it.
    """

    fsdp_unit = True  # FSDP2 shards each block on its own (pyflowmap.distributed.wrap_fsdp)

    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.norm1, self.act1 = GroupNorm(min(groups, cin), cin), Activation("silu")
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.film = Linear(cond_dim, 2 * cout)
        self.norm2, self.act2 = GroupNorm(min(groups, cout), cout), Activation("silu")
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, c):
        h = self.conv1(self.act1(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.dropout(self.act2(modulate(self.norm2(h), scale, shift)), self.dropout, self.training))
        return h + (self.skip(x) if self.skip is not None else x)

    def dual(self, xx, cc):
        h = self.conv1.dual(self.act1.dual(self.norm1.dual(xx)))
        scale, shift = self.film.dual(cc)[:, :, None, None].chunk(2, dim=1)
        h = self.act2.dual(DF.dual_modulate(self.norm2.dual(h), scale, shift))
        if self.training and self.dropout > 0:
            half = h.shape[0] // 2
            mask = torch.bernoulli(torch.full_like(h[:half], 1 - self.dropout)) / (1 - self.dropout)
            h = h * torch.cat([mask, mask])
        h = self.conv2.dual(h)
        return h + (self.skip.dual(xx) if self.skip is not None else xx)


class AttnBlock(DualModule):
    """GroupNorm -> self-attention over the H*W tokens -> residual."""

    fsdp_unit = True  # FSDP2 shards each block on its own (pyflowmap.distributed.wrap_fsdp)

    def __init__(self, ch: int, heads: int = 4, groups: int = 8):
        super().__init__()
        self.norm = GroupNorm(min(groups, ch), ch)
        self.attn = Attention(ch, heads)

    @staticmethod
    def _tokens(x):
        return x.flatten(2).transpose(1, 2)

    def forward(self, x):
        return x + self.attn(self._tokens(self.norm(x))).transpose(1, 2).reshape(x.shape)

    def dual(self, xx):
        return xx + self.attn.dual(self._tokens(self.norm.dual(xx))).transpose(1, 2).reshape(xx.shape)


class UNetFlowMap(Conditioned, nn.Module):
    """v_{s,t}(x) for images ``[B, C, H, W]`` with H, W divisible by 4.

    Two resolutions (``ch``, ``2 ch``) with a residual block each, a middle of
    ResBlock-Attention-ResBlock at H/4, and the paper's conditioning: positional embeddings of s
    and t - s through an MLP into FiLM scale/shift in every block. v = sigma_d * F(x / sigma_d,
    s, t - s); the output conv starts at zero (untrained map = identity); ``dropout`` in every
    residual block (one mask shared by primal and tangent). ``num_classes`` / ``cond_shape``
    make it conditional: an ``emb_dim`` embedding of ``c`` (``c=None``: the null condition;
    with ``guidance_input`` plus one of ``w``) joins the time embeddings at the input of the
    conditioning MLP. Every layer has a
    dual mode, so ``net(x, s, t, tangents=...)`` returns ``(v, v_dot)``.
    """

    supports_tangents = True

    def __init__(self, channels: int = 1, ch: int = 32, emb_dim: int = 64, heads: int = 4,
                 groups: int = 8, attention: bool = True, data_std: float = 0.5, dropout: float = 0.0,
                 num_classes: int | None = None, cond_shape=None, guidance_input: bool = False,
                 step_embedding: str = "sinusoidal", step_levels: int = 7, time_scale: float = 100.0):
        super().__init__()
        cd = 4 * emb_dim
        self.channels = channels
        self.emb_s = SinusoidalEmbedding(emb_dim, scale=time_scale)
        self.emb_dt = make_step_embedding(step_embedding, emb_dim, step_levels, time_scale)
        conditional = self._init_condition(emb_dim, num_classes, cond_shape, guidance_input)
        self.cond = Sequential(Linear((3 if conditional else 2) * emb_dim, cd), Activation("silu"), Linear(cd, cd))
        self.inp = Conv2d(channels, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, cd, groups, dropout)
        self.pool1 = Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(ch, 2 * ch, cd, groups, dropout)
        self.pool2 = Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * ch, 2 * ch, cd, groups, dropout)
        self.mid_attn = AttnBlock(2 * ch, heads, groups) if attention else None
        self.mid2 = ResBlock(2 * ch, 2 * ch, cd, groups, dropout)
        self.up2 = ResBlock(4 * ch, 2 * ch, cd, groups, dropout)
        self.up1 = ResBlock(3 * ch, ch, cd, groups, dropout)
        self.out_norm, self.out_act = GroupNorm(min(groups, ch), ch), Activation("silu")
        self.out = Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("data_std", torch.tensor(float(data_std)))

    def _check(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"UNetFlowMap expects [B, {self.channels}, H, W] with H, W divisible by 4, "
                             f"got {tuple(x.shape)}")

    def _run(self, h, c, dual: bool):
        call = (lambda m, *a: m.dual(*a)) if dual else (lambda m, *a: m(*a))
        up = lambda z: F.interpolate(z, scale_factor=2, mode="nearest")  # noqa: E731 (linear: acts on both halves)
        h0 = call(self.inp, h)
        h1 = call(self.down1, h0, c)
        h2 = call(self.down2, call(self.pool1, h1), c)
        m = call(self.mid1, call(self.pool2, h2), c)
        if self.mid_attn is not None:
            m = call(self.mid_attn, m)
        m = call(self.mid2, m, c)
        u = call(self.up2, torch.cat([up(m), h2], 1), c)
        u = call(self.up1, torch.cat([up(u), h1], 1), c)
        return call(self.out, call(self.out_act, call(self.out_norm, u)))

    def forward(self, x, s, t, c=None, w=None, tangents=None):
        self._check(x)
        sd = self.data_std.to(x.dtype)
        cond = self._condition(x, c, w)
        if tangents is None:
            h = self.cond(torch.cat([self.emb_s(s), self.emb_dt(t - s), *cond], -1))
            return sd * self._run(x / sd, h, dual=False)
        x_dot, s_dot, t_dot = tangents
        s_dot, dt_dot = time_tangents(s, t, s_dot, t_dot)
        cc = self.cond.dual(torch.cat([self.emb_s.dual(s, s_dot), self.emb_dt.dual(t - s, dt_dot),
                                       *[stack(e, None) for e in cond]], -1))  # a condition carries no tangent
        out = sd * self._run(stack(x / sd, None if x_dot is None else x_dot / sd), cc, dual=True)
        return DF.split(out)
