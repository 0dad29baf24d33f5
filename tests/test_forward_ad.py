"""torch.func.jvp over pyflowmap.nn models in primal mode runs the fused dual kernels through
autograd.Function jvp rules, including attention (which PyTorch's SDPA cannot do)."""

import pytest
import torch
import torch.nn.functional as F

import pyflowmap as pf
from pyflowmap.nn.forward_ad import ActivationFn, AttentionFn, LayerNormFn
from pyflowmap.reference import math_attention
from tests.helpers import rand

F64 = torch.float64


def test_sdpa_itself_has_no_forward_ad():
    q = rand(1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (q,))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_function_forward_and_reverse_ad(causal):
    q, k, v = (rand(2, 2, 5, 4, seed=i).requires_grad_() for i in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: AttentionFn.apply(a, b, c, causal), (q, k, v),
                                    check_forward_ad=True, check_backward_ad=True)
    dots = [rand(2, 2, 5, 4, seed=10 + i) for i in range(3)]
    got = torch.func.jvp(lambda a, b, c: AttentionFn.apply(a, b, c, causal), (q, k, v), tuple(dots))
    want = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, causal), (q, k, v), tuple(dots))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_activation_function_forward_and_reverse_ad(kind):
    z = (3 * rand(4, 5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ActivationFn.apply(x, kind), (z,), check_forward_ad=True)


def _plain_layer_norm(z, weight, bias, eps):
    c = z - z.mean(-1, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + bias


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_function_ad(affine):
    x = rand(3, 2, 5).requires_grad_()
    w, b = (rand(5, seed=1).requires_grad_(), rand(5, seed=2).requires_grad_()) if affine else (None, None)
    f = lambda *a: LayerNormFn.apply(a[0], (5,), *(a[1:] if affine else (None, None)), 1e-5)  # noqa: E731
    ins = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(f, ins, check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_reverse_through_the_tangent(affine):
    """The reason LayerNormFn exists: gradients of a loss on the jvp tangent equal those of a
    plain-ops LayerNorm (the native F.layer_norm's are wrong, see test_dit)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=F64, requires_grad=True)
    x, xd, c1, c2 = (torch.randn(4, 6, generator=g, dtype=F64) for _ in range(4))
    ln = pf.nn.LayerNorm(6, elementwise_affine=affine).double()
    params = [m] + list(ln.parameters())
    if affine:
        with torch.no_grad():
            ln.weight.normal_(generator=g), ln.bias.normal_(generator=g)

    def grads(norm):
        y, yd = torch.func.jvp(lambda z: norm(z @ m.T), (x,), (xd,))
        return y, yd, torch.autograd.grad((y * c1).sum() + (yd * c2).sum(), params)

    got = grads(ln)
    want = grads(lambda z: _plain_layer_norm(z, ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_layer_norm_tangent_of_the_parameters():
    x, xd = rand(4, 6), rand(4, 6, seed=1)
    w, b, wd, bd = (rand(6, seed=2 + i) for i in range(4))
    got = torch.func.jvp(lambda *a: LayerNormFn.apply(a[0], (6,), a[1], a[2], 1e-5), (x, w, b), (xd, wd, bd))
    want = torch.func.jvp(lambda *a: _plain_layer_norm(*a, 1e-5), (x, w, b), (xd, wd, bd))
    torch.testing.assert_close(got, want)


def test_jvp_over_a_unet_with_attention_and_reverse_through_the_tangent():
    torch.manual_seed(0)
    net = pf.nn.UNetFlowMap(ch=8, emb_dim=8, heads=2, groups=4).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    fm = pf.FlowMap(net)
    x, xd = rand(3, 1, 8, 8), rand(3, 1, 8, 8, seed=1)
    s, t = torch.full((3,), 0.2, dtype=F64), torch.full((3,), 0.7, dtype=F64)
    one = torch.ones(3, dtype=F64)
    a = pf.JVP().jvp(fm, x, s, t, xd, None, one)
    b = pf.Dual().jvp(fm, x, s, t, xd, None, one)
    torch.testing.assert_close(a[1], b[1])
    ga = torch.autograd.grad(a[1].square().sum(), list(fm.parameters()))
    gb = torch.autograd.grad(b[1].square().sum(), list(fm.parameters()))
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, rtol=1e-9, atol=1e-11)


def test_compiled_and_eager_tangents_agree():
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(hidden=16, depth=2, emb_dim=8).double()
    torch.nn.init.normal_(net.head.weight)
    fm = pf.FlowMap(net)
    x, s, t = rand(5, 2), torch.rand(5, dtype=F64), torch.rand(5, dtype=F64)

    def jvp_t(a, b, c):
        return torch.func.jvp(fm, (a, b, c), (torch.zeros_like(a), torch.zeros_like(b), torch.ones_like(c)))[1]

    def dual_t(a, b, c):
        return fm.tangent(a, b, c, None, None, torch.ones_like(c))[1]

    eager = jvp_t(x, s, t)
    torch.testing.assert_close(torch.compile(jvp_t)(x, s, t), eager)
    torch.testing.assert_close(torch.compile(dual_t)(x, s, t), eager)
    torch.testing.assert_close(dual_t(x, s, t), eager)
