"""The dual DiT flow map (pyflowmap.nn.dit): dual mode against torch.func.jvp of its primal
forward, objective gradients in both derivative modes, dropout, zero init, hostile inputs,
presets, a few training steps and guided sampling."""

import pytest
import torch

import pyflowmap as pf
from pyflowmap import nn as pnn
from pyflowmap.distributed import fsdp_blocks
from pyflowmap.nn.dit import DiTBlock, DiTFlowMap, dit_preset, sincos_2d
from pyflowmap.reference import math_attention
from tests.helpers import rand

F64 = torch.float64
K = 3  # classes of the conditional builds


@pytest.fixture
def math_sdpa(monkeypatch):
    """An independent jvp reference for attention: forward-AD through plain math attention
    instead of the layer's own jvp rule (which is the dual formula under test)."""
    from pyflowmap.nn import forward_ad

    monkeypatch.setattr(forward_ad.AttentionFn, "apply", staticmethod(lambda q, k, v, causal: math_attention(q, k, v, causal)))


def _plain_layer_norm(self, x):
    dims = tuple(range(-len(self.normalized_shape), 0))
    centered = x - x.mean(dims, keepdim=True)
    y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + self.eps)
    if self.weight is not None:
        y = y * self.weight
    return y + self.bias if self.bias is not None else y


@pytest.fixture
def math_layer_norm(monkeypatch):
    """An independent jvp reference for LayerNorm: forward-AD through plain ops instead of the
    layer's own jvp rule (forward_ad.LayerNormFn, which is the dual formula under test)."""
    monkeypatch.setattr(pnn.LayerNorm, "forward", _plain_layer_norm)


def test_native_layer_norm_is_why_layer_norm_has_its_own_jvp_rule():
    """The upstream hazard pf.nn.LayerNorm's primal jvp rule (forward_ad.LayerNormFn) fixes: the
    dual LayerNorm's gradients and those of torch.func.jvp over pf.nn.LayerNorm equal those of a
    plain-ops jvp; the native F.layer_norm's differ (skips once PyTorch fixes it)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=g, dtype=F64, requires_grad=True)
    x, xd, c1, c2 = (torch.randn(4, 6, generator=g, dtype=F64) for _ in range(4))
    ln = pnn.LayerNorm(6, elementwise_affine=False).double()

    def grad(norm):
        y, yd = torch.func.jvp(lambda z: norm(z @ w.T), (x,), (xd,))
        return torch.autograd.grad((y * c1).sum() + (yd * c2).sum(), w)[0]

    plain = grad(lambda z: _plain_layer_norm(ln, z))
    dual = pnn.LayerNorm(6, elementwise_affine=False).double().dual(torch.cat([x @ w.T, xd @ w.T]))
    want = torch.autograd.grad((dual[:4] * c1).sum() + (dual[4:] * c2).sum(), w)[0]
    torch.testing.assert_close(plain, want, rtol=1e-9, atol=1e-11)  # dual == plain-ops jvp
    torch.testing.assert_close(grad(ln), want, rtol=1e-9, atol=1e-11)  # pf.nn.LayerNorm under jvp
    native = lambda z: torch.nn.functional.layer_norm(z, (6,), eps=ln.eps)  # noqa: E731
    if (grad(native) - want).abs().max() < 1e-8:
        pytest.skip("reverse-over-forward of the native layer_norm is right now: LayerNormFn can go")


def perturb(net, std=0.2, seed=0):
    """Non-zero AdaLN and output layers (the zero init would make every block the identity and
    v = 0, which tests nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, pnn.Linear) and (m.weight.abs().max() == 0):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype) * std)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * std)
    return net


def tiny(cond=None, qk_norm=False, pos_embed="sincos", dropout=0.0, image_size=8, channels=2, depth=2, **kw):
    torch.manual_seed(0)
    extra = {"none": {}, "labels": {"num_classes": K}, "labels+w": {"num_classes": K, "guidance_input": True},
             "tensor": {"cond_shape": (4,)}}[cond or "none"]
    net = DiTFlowMap(image_size, channels, patch=2, width=16, depth=depth, heads=2, emb_dim=8, qk_norm=qk_norm,
                     pos_embed=pos_embed, dropout=dropout, **extra, **kw).double()
    return perturb(net)


def condition(cond, b):
    if cond in ("labels", "labels+w"):
        return {"c": torch.tensor([0, 1, K, 2, 1][:b])}  # K: the null class
    if cond == "tensor":
        return {"c": rand(b, 4, seed=9)}
    return {}


def times(b):
    s = torch.rand(b, dtype=F64, generator=torch.Generator().manual_seed(5)) * 0.5
    return s, s + 0.2 + 0.3 * torch.rand(b, dtype=F64, generator=torch.Generator().manual_seed(6))


# -- dual mode == torch.func.jvp of the primal forward ---------------------------------------------

@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("cond", ["none", "labels", "labels+w", "tensor"])
def test_dual_matches_jvp(math_sdpa, cond, qk_norm, pos_embed):
    net = tiny(cond, qk_norm, pos_embed)
    b = 3
    x, xd = rand(b, 2, 8, 8), rand(b, 2, 8, 8, seed=1)
    s, t = times(b)
    kw = condition(cond, b)
    if cond == "labels+w":
        kw["w"] = torch.tensor([1.0, 2.5, 4.0], dtype=F64)
    zero = torch.zeros(b, dtype=F64)
    for x_dot, s_dot, t_dot in [(xd, None, None), (None, rand(b, seed=2), None), (None, None, rand(b, seed=3)),
                                (xd, rand(b, seed=2), rand(b, seed=3))]:
        v, v_dot = net(x, s, t, tangents=(x_dot, s_dot, t_dot), **kw)
        want, want_dot = torch.func.jvp(lambda x_, s_, t_: net(x_, s_, t_, **kw), (x, s, t),
                                        (torch.zeros_like(x) if x_dot is None else x_dot,
                                         zero if s_dot is None else s_dot, zero if t_dot is None else t_dot))
        assert want_dot.abs().max() > 1e-3  # a non-trivial tangent
        torch.testing.assert_close(v, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(v_dot, want_dot, atol=1e-11, rtol=1e-9)
    # through the flow map: the map's tangent in both modes
    fm = pf.FlowMap(net)
    a = pf.JVP().jvp(fm, x, s, t, xd, rand(b, seed=2), rand(b, seed=3), **kw)
    d = pf.Dual().jvp(fm, x, s, t, xd, rand(b, seed=2), rand(b, seed=3), **kw)
    torch.testing.assert_close(d[0], a[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(d[1], a[1], atol=1e-11, rtol=1e-9)


def test_dual_matches_jvp_non_square_patch4(math_sdpa):
    torch.manual_seed(0)
    net = perturb(DiTFlowMap((8, 12), 1, patch=4, width=24, depth=1, heads=3, emb_dim=6, qk_norm=True).double())
    x, xd = rand(2, 1, 8, 12), rand(2, 1, 8, 12, seed=1)
    s, t = times(2)
    v, v_dot = net(x, s, t, tangents=(xd, None, rand(2, seed=3)))
    want, want_dot = torch.func.jvp(lambda x_, t_: net(x_, s, t_), (x, t), (xd, rand(2, seed=3)))
    torch.testing.assert_close(v, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(v_dot, want_dot, atol=1e-11, rtol=1e-9)


def test_reference_ops_agree_with_fused():
    net = tiny("labels", qk_norm=True)
    x, xd = rand(2, 2, 8, 8), rand(2, 2, 8, 8, seed=1)
    s, t = times(2)
    a = net(x, s, t, c=torch.tensor([0, 2]), tangents=(xd, None, torch.ones(2, dtype=F64)))
    with pnn.reference_ops():
        b = net(x, s, t, c=torch.tensor([0, 2]), tangents=(xd, None, torch.ones(2, dtype=F64)))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# -- objective gradients: derivative="dual" == "jvp" --------------------------------------------

@pytest.mark.parametrize("objective,cond", [("lsd", "none"), ("esd", "none"), ("meanflow", "none"),
                                            ("lsd", "labels")])
def test_objective_gradients_dual_match_jvp(math_sdpa, math_layer_norm, objective, cond):
    fm = pf.FlowMap(tiny(cond, qk_norm=True))
    x1 = rand(4, 2, 8, 8)
    kw = {"c": torch.tensor([0, 1, 2, 1])} if cond == "labels" else {}
    extra = {"p_uncond": 0.5} if cond == "labels" else {}
    losses = {}
    for mode in ("jvp", "dual"):
        obj = pf.make_objective(objective, derivative=mode, times=pf.TimeSampler(diag_fraction=0.25), **extra)
        out = obj(fm, x1, generator=torch.Generator().manual_seed(0), **kw)
        grads = torch.autograd.grad(out.loss, list(fm.parameters()), allow_unused=True)
        losses[mode] = (out.loss.detach(), grads)
    torch.testing.assert_close(losses["dual"][0], losses["jvp"][0], rtol=1e-10, atol=1e-12)
    assert float(losses["dual"][0]) > 0
    for a, b in zip(losses["dual"][1], losses["jvp"][1]):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_jvp_mode_gradients_over_the_layers_own_rules():
    """derivative="jvp" as a user runs it (no patched reference): the layers' own jvp rules give
    the dual mode's gradients, LayerNorm included (the native one's would be wrong)."""
    fm = pf.FlowMap(tiny("none"))
    x1 = rand(3, 2, 8, 8)
    out = {}
    for mode in ("jvp", "dual"):
        obj = pf.make_objective("lsd", derivative=mode, times=pf.TimeSampler(diag_fraction=0.0))
        loss = obj(fm, x1, generator=torch.Generator().manual_seed(0)).loss
        out[mode] = torch.autograd.grad(loss, list(fm.parameters()), allow_unused=True)
    for a, b in zip(out["dual"], out["jvp"]):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_auto_mode_picks_dual():
    assert isinstance(pf.resolve_mode("auto", pf.FlowMap(tiny())), pf.Dual)


# -- dropout: one mask for both halves -------------------------------------------------------------

def test_dropout_one_mask_for_primal_and_tangent(math_sdpa):
    net = tiny(dropout=0.5).train()
    x, xd = rand(3, 2, 8, 8), rand(3, 2, 8, 8, seed=1)
    s, t = times(3)
    td = rand(3, seed=3)
    torch.manual_seed(11)
    v, v_dot = net(x, s, t, tangents=(xd, None, td))
    torch.manual_seed(11)
    want, want_dot = torch.func.jvp(lambda x_, t_: net(x_, s, t_), (x, t), (xd, td))
    torch.testing.assert_close(v, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(v_dot, want_dot, atol=1e-11, rtol=1e-9)
    torch.manual_seed(11)
    torch.testing.assert_close(net(x, s, t), v, atol=1e-12, rtol=1e-10)  # the primal pass draws the same mask
    torch.manual_seed(12)
    assert (net(x, s, t) - v).abs().max() > 1e-6  # another mask: dropout is on
    net.eval()
    assert (net(x, s, t) - v).abs().max() > 1e-6
    torch.testing.assert_close(net(x, s, t), net(x, s, t))  # no dropout in eval


# -- zero init, presets, hostile inputs --------------------------------------------------------------

@pytest.mark.parametrize("cond", ["none", "labels"])
def test_untrained_map_is_the_identity(cond):
    torch.manual_seed(0)
    net = DiTFlowMap(8, 2, width=16, depth=2, heads=2, emb_dim=8, qk_norm=True, pos_embed="learned",
                     **({"num_classes": K} if cond == "labels" else {})).double()
    x = rand(3, 2, 8, 8)
    s, t = times(3)
    kw = condition(cond, 3)
    v, v_dot = net(x, s, t, tangents=(rand(3, 2, 8, 8, seed=1), rand(3, seed=2), rand(3, seed=3)), **kw)
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(x)) and torch.equal(v_dot, torch.zeros_like(x))
    assert torch.equal(net(x, s, t, **kw), torch.zeros_like(x))
    torch.testing.assert_close(pf.FlowMap(net)(x, s, t, **kw), x, rtol=0, atol=0)


def test_blocks_are_fsdp_units_and_positions_carry_no_grad_of_their_own():
    net = tiny(depth=3)
    assert [type(m) for m in fsdp_blocks(net)] == [DiTBlock] * 3
    assert "pos_embed" not in dict(net.named_parameters())  # sincos: a fixed buffer
    assert "pos_embed" in dict(tiny(pos_embed="learned").named_parameters())
    pe = sincos_2d(16, 3, 5)
    assert pe.shape == (15, 16) and torch.allclose(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4,
                                                                         dtype=F64))


def test_presets():
    small = dit_preset("cpu-small", 28, 1)
    assert (small.width, small.depth, small.heads, small.patch, small.grid) == (128, 4, 4, 4, (7, 7))
    assert dit_preset("cpu-small", 32, 3).grid == (8, 8)
    assert dit_preset("cpu-small", 8, 1).patch == 2  # the 8x8 digits: 16 tokens
    x = torch.randn(2, 1, 28, 28)
    assert small(x, torch.zeros(2), torch.ones(2)).shape == x.shape
    with torch.device("meta"):  # the large sizes: shapes only, no memory
        s2, b2 = dit_preset("S/2", 32, 3), dit_preset("B/2", 32, 3, num_classes=10)
    assert (s2.width, s2.depth, s2.heads, s2.patch) == (384, 12, 6, 2)
    assert (b2.width, b2.depth, b2.heads, b2.patch, b2.num_classes) == (768, 12, 12, 2, 10)
    assert dit_preset("cpu-small", 28, 1, depth=2, qk_norm=True).depth == 2  # keyword overrides
    with pytest.raises(ValueError, match="name"):
        dit_preset("XL/2", 32, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=9, patch=2), "image_size"),
    (dict(image_size=(8, 10), patch=4), "image_size"),
    (dict(image_size=(8, 8, 8)), "image_size"),
    (dict(image_size=0), "image_size"),
    (dict(width=18, heads=4), "width"),
    (dict(width=18, heads=3), "width"),  # sincos needs width % 4 == 0
    (dict(heads=0), "heads"),
    (dict(depth=0), "depth"),
    (dict(patch=1.5), "patch"),
    (dict(channels=0), "channels"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(dropout=1.0), "dropout"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(emb_dim=7), "emb_dim"),
    (dict(data_std=0.0), "data_std"),
    (dict(guidance_input=True), "guidance_input"),
])
def test_hostile_constructor_arguments(kwargs, match):
    args = dict(image_size=8, channels=1, width=16, heads=2, depth=1, emb_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DiTFlowMap(**args)


def test_hostile_forward_inputs():
    net = tiny()
    x, s, t = rand(2, 2, 8, 8), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    for bad in (rand(2, 1, 8, 8), rand(2, 2, 8, 6), rand(2, 2, 64), rand(2, 2, 4, 4)):
        with pytest.raises(ValueError, match="x of shape"):
            net(bad, s, t)
    with pytest.raises(ValueError, match="x_dot"):
        net(x, s, t, tangents=(rand(2, 2, 8, 4), None, None))
    with pytest.raises(ValueError, match="^s must"):
        net(x, torch.zeros(3, dtype=F64), t)
    with pytest.raises(ValueError, match="^t_dot must"):
        net(x, s, t, tangents=(None, None, torch.ones(5, dtype=F64)))
    with pytest.raises(ValueError, match="tangents"):
        net(x, s, t, tangents=(None, None))
    with pytest.raises(TypeError, match="unconditional"):
        net(x, s, t, c=torch.tensor([0, 1]))
    # scalars broadcast over the batch
    torch.testing.assert_close(net(x, 0.0, 1.0), net(x, s, t))


# -- training and guided sampling ------------------------------------------------------------------

@pytest.mark.parametrize("build", ["tiny", "cpu-small-28"])
def test_trains_a_few_lsd_steps_without_nan(build):
    torch.manual_seed(0)
    if build == "tiny":
        net = DiTFlowMap(8, 1, patch=2, width=32, depth=2, heads=2, emb_dim=16, qk_norm=True, dropout=0.1)
        shape = (16, 1, 8, 8)
    else:
        net, shape = dit_preset("cpu-small", 28, 1, pos_embed="learned"), (8, 1, 28, 28)
    fm = pf.FlowMap(net)
    obj = pf.make_objective("lsd")
    opt = torch.optim.Adam(fm.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in fm.parameters()]
    data = torch.randn(*shape)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        out = obj(fm, data, generator=gen)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in fm.parameters() if p.grad is not None)
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, fm.parameters()))
    assert any((b.abs().max() > 0) for b in (net.blocks[0].ada.weight, net.blocks[1].ada.weight))  # gates opened
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(pf.sample(fm, torch.randn(3, *shape[1:]), steps=2)).all()


@pytest.mark.parametrize("guidance_input", [False, True], ids=["labels", "labels+w"])
def test_conditional_null_class_and_guided_sampling(guidance_input):
    net = tiny("labels+w" if guidance_input else "labels").eval()
    fm = pf.FlowMap(net)
    z = rand(4, 2, 8, 8, seed=4)
    c = torch.tensor([0, 1, 2, 1])
    extra = {"w": 2.0} if guidance_input else {}
    s, t = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    wkw = {"w": torch.full((4,), 2.0, dtype=F64)} if guidance_input else {}
    torch.testing.assert_close(net(z, s, t, **wkw), net(z, s, t, c=torch.full_like(c, K), **wkw))  # None = null
    with torch.no_grad():
        cond = pf.sample(fm, z, steps=2, c=c, **extra)
        uncond = pf.sample(fm, z, steps=2, c=torch.full_like(c, K), **extra)
        g1 = pf.sample(fm, z, steps=2, c=c, guidance=1.0, **extra)
        g0 = pf.sample(fm, z, steps=2, c=c, guidance=0.0, **extra)
        g3 = pf.sample(fm, z, steps=2, c=c, guidance=3.0, **extra)
        one = pf.sample(fm, z, steps=1, c=c, guidance=2.0, **extra)
        v_c, v_null = net(z, s, t, c=c, **wkw), net(z, s, t, c=torch.full_like(c, K), **wkw)
    assert torch.isfinite(g3).all() and g3.shape == z.shape
    torch.testing.assert_close(g1, cond, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(g0, uncond, rtol=1e-11, atol=1e-11)
    assert (cond - uncond).abs().max() > 1e-3 and (g3 - cond).abs().max() > 1e-3
    torch.testing.assert_close(one, z + v_null + 2.0 * (v_c - v_null), rtol=1e-11, atol=1e-11)


def test_float32_dual_within_reference_error():
    """The fused float32 dual pass against the float64 truth: within twice the error of the
    reference twins run in float32 (tests/tolerance.py)."""
    from tests.tolerance import assert_within_reference_error

    net64 = tiny("labels", qk_norm=True)
    x, xd = rand(3, 2, 8, 8), rand(3, 2, 8, 8, seed=1)
    s, t = times(3)
    c = torch.tensor([0, 1, K])
    args = lambda d: (x.to(d), s.to(d), t.to(d))  # noqa: E731
    tangents = lambda d: (xd.to(d), None, torch.ones(3, dtype=d))  # noqa: E731
    exact = net64(*args(F64), c=c, tangents=tangents(F64))
    net32 = net64.float()
    fused = net32(*args(torch.float32), c=c, tangents=tangents(torch.float32))
    with pnn.reference_ops():
        ref32 = net32(*args(torch.float32), c=c, tangents=tangents(torch.float32))
    for out, ref, want in zip(fused, ref32, exact):
        assert_within_reference_error(out, ref, want)
