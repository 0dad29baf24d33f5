"""Dual (explicit-tangent) layers and models against torch.func.jvp of their primal forward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyflowmap as pf
from pyflowmap import nn as pnn
from pyflowmap.reference import dual as ref
from pyflowmap.reference import math_attention
from tests.helpers import rand

F64 = torch.float64


@pytest.fixture
def math_sdpa(monkeypatch):
    """An independent jvp reference for attention: forward-AD through plain math attention
    instead of the layer's own jvp rule (which is the dual formula under test)."""
    from pyflowmap.nn import forward_ad

    monkeypatch.setattr(forward_ad.AttentionFn, "apply", staticmethod(lambda q, k, v, causal: math_attention(q, k, v, causal)))


def check_layer(layer, x, seed=1, atol=1e-12):
    layer = layer.double()
    x_dot = rand(*x.shape, seed=seed)
    y, y_dot = torch.func.jvp(layer, (x,), (x_dot,))
    yy = layer.dual(torch.cat([x, x_dot]))
    got_y, got_dot = ref.split(yy)
    torch.testing.assert_close(got_y, y, atol=atol, rtol=1e-10)
    torch.testing.assert_close(got_dot, y_dot, atol=atol, rtol=1e-10)
    # reverse mode through both halves matches reverse mode through the jvp
    w1, w2 = rand(*y.shape, seed=seed + 1), rand(*y.shape, seed=seed + 2)
    params = list(layer.parameters())
    if params:
        ga = torch.autograd.grad((y * w1).sum() + (y_dot * w2).sum(), params, allow_unused=True)
        gb = torch.autograd.grad((got_y * w1).sum() + (got_dot * w2).sum(), params, allow_unused=True)
        for a, b in zip(ga, gb):
            if a is None:
                assert b is None or b.abs().max() == 0
            else:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


batch = st.sampled_from([0, 1, 2, 5])


@given(b=batch, din=st.integers(1, 9), dout=st.integers(1, 9), bias=st.booleans())
def test_linear(b, din, dout, bias):
    check_layer(pnn.Linear(din, dout, bias=bias), rand(b, din))


@given(b=batch, d=st.integers(1, 17), kind=st.sampled_from(["gelu", "silu"]), scale=st.sampled_from([0.5, 3.0]))
def test_activation(b, d, kind, scale):
    check_layer(pnn.Activation(kind), scale * rand(b, d))


@given(b=batch, d=st.integers(2, 12), affine=st.booleans())
def test_layer_norm(b, d, affine):
    layer = pnn.LayerNorm(d, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    check_layer(layer, rand(b, 3, d) * 2 + 1)


@given(b=batch, d=st.integers(1, 12), affine=st.booleans())
def test_rms_norm(b, d, affine):
    layer = pnn.RMSNorm(d, affine=affine)
    if affine:
        torch.nn.init.normal_(layer.weight)
    check_layer(layer, rand(b, 2, d) + 0.5)


@given(b=batch, groups=st.sampled_from([1, 2, 4]), hw=st.integers(1, 5))
def test_group_norm(b, groups, hw):
    layer = pnn.GroupNorm(groups, 8)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    check_layer(layer, rand(b, 8, hw, hw + 1) * 3)


@given(b=batch, stride=st.sampled_from([1, 2]), bias=st.booleans())
def test_conv2d(b, stride, bias):
    check_layer(pnn.Conv2d(3, 4, 3, stride=stride, padding=1, bias=bias), rand(b, 3, 7, 6))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_attention(math_sdpa, causal, n):
    torch.manual_seed(0)
    check_layer(pnn.Attention(8, heads=2, causal=causal), rand(3, n, 8))


def test_attention_primal_is_sdpa():
    torch.manual_seed(0)
    layer = pnn.Attention(8, heads=2).double()
    x = rand(2, 6, 8)
    q, k, v = layer._heads(layer.qkv(x))
    torch.testing.assert_close(layer(x), layer.proj(layer._merge(math_attention(q, k, v))))


def test_modulate_and_embedding():
    h, hd, sc, scd, sh, shd = (rand(4, 6, seed=i) for i in range(6))
    (y, yd) = torch.func.jvp(pnn.modulate, (h, sc, sh), (hd, scd, shd))
    yy = ref.dual_modulate(torch.cat([h, hd]), torch.cat([sc, scd]), torch.cat([sh, shd]))
    torch.testing.assert_close(torch.cat([y, yd]), yy)
    emb = pnn.SinusoidalEmbedding(16).double()
    t, td = torch.rand(5, dtype=F64), rand(5)
    e, ed = torch.func.jvp(emb, (t,), (td,))
    torch.testing.assert_close(emb.dual(t, td), torch.cat([e, ed]))
    torch.testing.assert_close(emb.dual(t, None), torch.cat([e, torch.zeros_like(e)]))


@given(b=batch, d=st.integers(1, 4), m=st.integers(1, 7), tangent=st.booleans())
def test_fourier_features(b, d, m, tangent):
    feats = pnn.FourierFeatures(d, m, scale=0.7, seed=3).double()
    x = rand(b, d)
    xd = rand(b, d, seed=1) if tangent else torch.zeros(b, d, dtype=F64)
    e, ed = torch.func.jvp(feats, (x,), (xd,))
    torch.testing.assert_close(feats.dual(x, xd if tangent else None), torch.cat([e, ed]), atol=1e-12, rtol=1e-10)
    assert e.shape == (b, 2 * m) and feats.dim == 2 * m
    # a float32 input is computed in float32 and stays float32; the features are seeded, not global
    assert feats(x.float()).dtype == torch.float32
    torch.testing.assert_close(pnn.FourierFeatures(d, m, scale=0.7, seed=3).proj, feats.proj.float())


def test_fourier_features_reject_bad_arguments():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="Fourier features"):
            pnn.FourierFeatures(2, bad)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            pnn.FourierFeatures(2, 4, scale=bad)


REF_OPS = {
    "act-gelu": (lambda xx: ref.dual_act(xx, "gelu"), (6, 5)),
    "act-silu": (lambda xx: ref.dual_act(xx, "silu"), (6, 5)),
    "layer_norm": (lambda xx: ref.dual_layer_norm(xx, (5,)), (6, 5)),
    "rms_norm": (lambda xx: ref.dual_rms_norm(xx), (6, 5)),
    "group_norm": (lambda xx: ref.dual_group_norm(xx, 2), (4, 4, 3)),
}


@pytest.mark.parametrize("name", list(REF_OPS))
def test_reference_ops_gradcheck(name):
    fn, shape = REF_OPS[name]
    xx = rand(*shape).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xx,))  # covers the gradient of the tangent half too


def test_reference_fourier_gradcheck():
    x, xd, proj = rand(5, 2).requires_grad_(), rand(5, 2, seed=1).requires_grad_(), rand(2, 3, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(ref.dual_fourier, (x, xd, proj))


def test_reference_attention_gradcheck():
    qq, kk, vv = (rand(2, 2, 3, 4, seed=i).requires_grad_() for i in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: ref.dual_attention(q, k, v, causal=True), (qq, kk, vv))


def test_split_rejects_odd_stacks():
    with pytest.raises(ValueError, match="even leading dim"):
        ref.split(torch.zeros(3, 2))


# -- whole models --------------------------------------------------------------------------------

def mlp_model():
    torch.manual_seed(0)
    net = pnn.FlowMapMLP(hidden=32, depth=3, emb_dim=8).double()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return net


def mlp_fourier_model():
    torch.manual_seed(0)
    net = pnn.FlowMapMLP(hidden=32, depth=3, emb_dim=8, fourier_features=5, fourier_scale=0.5).double()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return net


def unet_model():
    torch.manual_seed(0)
    net = pnn.UNetFlowMap(ch=8, emb_dim=8, heads=2, groups=4).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    return net


@pytest.mark.parametrize("make,shape", [(mlp_model, (6, 2)), (mlp_fourier_model, (5, 2)), (unet_model, (3, 1, 8, 8))],
                         ids=["mlp", "mlp-fourier", "unet"])
def test_model_dual_matches_jvp(math_sdpa, make, shape):
    fm = pf.FlowMap(make())
    x, xd = rand(*shape), rand(*shape, seed=1)
    b = shape[0]
    s, t = torch.rand(b, dtype=F64) * 0.5, 0.5 + torch.rand(b, dtype=F64) * 0.5
    for tangents in [(xd, None, None), (None, torch.ones(b, dtype=F64), None), (None, None, torch.ones(b, dtype=F64)),
                     (xd, rand(b, seed=2), rand(b, seed=3))]:
        a = pf.JVP().jvp(fm, x, s, t, *tangents)
        d = pf.Dual().jvp(fm, x, s, t, *tangents)
        torch.testing.assert_close(d[0], a[0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(d[1], a[1], atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("make,shape", [(mlp_model, (16, 2)), (mlp_fourier_model, (16, 2)), (unet_model, (4, 1, 8, 8))],
                         ids=["mlp", "mlp-fourier", "unet"])
@pytest.mark.parametrize("objective", ["lsd", "esd"])
def test_lsd_esd_gradients_match_jvp_mode(math_sdpa, make, shape, objective):
    fm = pf.FlowMap(make())
    x1 = rand(*shape)
    losses = {}
    for mode in ("jvp", "dual"):
        obj = pf.make_objective(objective, derivative=mode, times=pf.TimeSampler(diag_fraction=0.25))
        out = obj(fm, x1, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(out.loss, list(fm.parameters()))
        losses[mode] = (out.loss.detach(), grads)
    torch.testing.assert_close(losses["dual"][0], losses["jvp"][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(losses["dual"][1], losses["jvp"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_auto_mode_picks_dual_for_pyflowmap_models():
    assert isinstance(pf.resolve_mode("auto", pf.FlowMap(mlp_model())), pf.Dual)
    assert isinstance(pf.resolve_mode("auto", pf.FlowMap(unet_model())), pf.Dual)


def test_reference_ops_switch():
    net = mlp_model()
    x, s, t = rand(4, 2), torch.rand(4, dtype=F64), torch.rand(4, dtype=F64)
    a = net(x, s, t, tangents=(None, None, torch.ones(4, dtype=F64)))
    with pnn.reference_ops():
        b = net(x, s, t, tangents=(None, None, torch.ones(4, dtype=F64)))
    torch.testing.assert_close(a[1], b[1])


def test_unet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 4"):
        unet_model()(rand(2, 1, 6, 6), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
