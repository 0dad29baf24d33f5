"""The fused ops under torch.autocast (docs/precision.md): each op's dtype policy, fake kernels
that agree with the kernels (opcheck under autocast), fused against the twin under autocast
with the precision-tied tolerance, finite differences kept in fp32, time embeddings in fp32,
and a primal step that compiles without graph breaks. On every device of the test matrix:
bf16 on the CPU, bf16 and fp16 on CUDA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import pyflowmap as pf
from pyflowmap import ops
from tests.conftest import DEVICES
from tests.tolerance import assert_within_reference_error

BF16 = torch.bfloat16
# (device, 16-bit dtype) pairs: CPU autocast is bf16; CUDA runs both
CASES = [(d, low) for d in DEVICES for low in ((BF16,) if d == "cpu" else (BF16, torch.float16))]


def autocast(device="cpu", dtype=BF16):
    return torch.autocast(device, dtype=dtype)


def _randn(*shape, g, device="cpu"):
    return torch.randn(*shape, generator=g).to(device)


@pytest.mark.parametrize("device,low", CASES)
def test_policies_set_the_output_dtypes(device, low):
    g = torch.Generator().manual_seed(0)
    xx, w, b = _randn(6, 5, g=g, device=device), _randn(4, 5, g=g, device=device), _randn(4, g=g, device=device)
    q = _randn(4, 2, 3, 8, g=g, device=device)
    ones, zeros = (lambda n: torch.ones(n, device=device)), (lambda n: torch.zeros(n, device=device))  # noqa: E731
    with autocast(device, low):
        assert ops.dual_linear(xx, w, b).dtype == low  # "lower"
        assert ops.dual_attention(q, q, q).dtype == low
        h = ops.dual_linear(xx, w, b)
        assert ops.dual_layer_norm(h, (4,), ones(4), zeros(4)).dtype == low  # "follow"
        assert ops.dual_layer_norm(xx, (5,), ones(5), zeros(5)).dtype == torch.float32
        assert ops.dual_act(h).dtype == low  # falls through: its input's dtype
        loss, per = ops.flowmap_loss(h, _randn(6, 4, g=g, device=device))  # "fp32"
        assert loss.dtype == per.dtype == torch.float32
        x = _randn(6, 4, g=g, device=device)
        assert ops.flowmap_step(x, h, zeros(6), ones(6)).dtype == torch.float32  # "promote"
        # float64 is never cast
        assert ops.dual_linear(xx.double(), w.double(), b.double()).dtype == torch.float64


@pytest.mark.parametrize("device,low", CASES)
def test_opcheck_under_autocast(device, low):
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape, dtype=torch.float32: _randn(*shape, g=g, device=device).to(dtype).requires_grad_()  # noqa: E731
    xx, w, b = leaf(4, 6), leaf(5, 6), leaf(5)
    hb, nw, p = leaf(4, 6, dtype=low), leaf(6), leaf(4, 6, dtype=low)
    with autocast(device, low):
        opcheck(torch.ops.pyflowmap.dual_linear.default, (xx, w, b))
        opcheck(torch.ops.pyflowmap.dual_norm.default, (hb, nw, None, 6, 1, 1, True, 1e-5))
        q = [_randn(2, 2, 5, 8, g=g, device=device).requires_grad_() for _ in range(6)]
        opcheck(torch.ops.pyflowmap.dual_attention.default, (*q, False, 0.35))
        opcheck(torch.ops.pyflowmap.flowmap_loss.default, (p, _randn(4, 6, g=g, device=device), None, "l2sq", 0.0))
        opcheck(torch.ops.pyflowmap.flowmap_step.default,
                (_randn(4, 6, g=g, device=device), p.detach(), torch.zeros(4, device=device),
                 torch.ones(4, device=device)))


@pytest.mark.parametrize("device,low", CASES)
def test_backward_inside_autocast_equals_backward_outside(device, low):
    """The backward ops run with autocast off ("keep"): a backward called inside the autocast
    region (as opcheck and some training loops do) gives the gradients of one called outside.
    Before, the chunked attention backward's fp32 GEMMs were autocast to 16 bits (~3x the error)."""
    g = torch.Generator().manual_seed(0)
    leaves = [_randn(3, 2, 7, 8, g=g, device=device) for _ in range(6)]
    gouts = [_randn(3, 2, 7, 8, g=g, device=device) for _ in range(2)]

    def grads(inside):
        xs = [x.clone().requires_grad_() for x in leaves]
        with autocast(device, low):
            o, od = ops.jvp_attention(*xs)
            if inside:
                return torch.autograd.grad([o, od], xs, [gouts[0].to(o.dtype), gouts[1].to(od.dtype)])
        return torch.autograd.grad([o, od], xs, [gouts[0].to(o.dtype), gouts[1].to(od.dtype)])

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _grads(fn, leaves, gout):
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, [t for t in leaves if t.requires_grad], gout.to(y.dtype))]


@settings(deadline=None, max_examples=25)
@given(kind=st.sampled_from(["linear", "layer", "group", "rms"]), half=st.sampled_from([1, 2, 5]),
       d=st.integers(3, 17), seed=st.integers(0, 1000), noncontig=st.booleans(), case=st.sampled_from(CASES))
def test_fused_matches_twin_under_autocast(kind, half, d, seed, noncontig, case):
    device, low = case  # the autocast dtype of this case
    g = torch.Generator().manual_seed(seed)
    xx = _randn(2 * half, 4, d, g=g, device=device)
    if noncontig:
        xx = torch.stack([xx, xx], -1)[..., 0]
    if kind == "linear":
        args = [xx, _randn(7, d, g=g, device=device), _randn(7, g=g, device=device)]
        fused, twin = ops.dual_linear, ops.dual_linear.twin
    else:
        # norms see the bf16 output of an autocast GEMM and fp32 master weights
        args = [xx.to(low), _randn(4 if kind == "group" else d, g=g, device=device)]
        if kind != "rms":
            args.append(_randn(*args[1].shape, g=g, device=device))
        fn = {"layer": lambda x, *p: (x, (d,), *p), "group": lambda x, *p: (x, 2, *p), "rms": lambda x, *p: (x, *p)}[kind]
        name = {"layer": "dual_layer_norm", "group": "dual_group_norm", "rms": "dual_rms_norm"}[kind]
        op = getattr(ops, name)
        fused, twin = (lambda *a: op(*fn(*a))), (lambda *a: op.twin(*fn(*a)))
    leaves = [a.detach().requires_grad_() for a in args]
    with autocast(device, low):
        gout = _randn(*fused(*leaves).shape, g=g, device=device)
        got, ref = _grads(fused, leaves, gout), _grads(twin, leaves, gout)
    # the truth: the same function in float64 on the inputs the op computes from (autocast's casts)
    cast = [a.to(low).double() for a in args] if kind == "linear" else [args[0].double()] + [
        a.to(low).double() for a in args[1:]]
    exact = _grads(twin, [c.requires_grad_() for c in cast], gout.double())
    for a, b, e in zip(got, ref, exact):
        assert a.dtype == b.dtype
        assert_within_reference_error(a.to(low) if a.dtype == torch.float32 else a, b, e)


def test_finite_differences_stay_fp32_under_autocast():
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(dim=3, hidden=32, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the zero-initialized head
    fm, fd = pf.FlowMap(net), pf.FiniteDifference()
    x, s, t = torch.randn(8, 3), torch.rand(8) * 0.5, 0.5 + torch.rand(8) * 0.5
    _, plain = fd.jvp(fm, x, s, t, t_dot=torch.ones(8))
    with autocast():
        _, tangent = fd.jvp(fm, x, s, t, t_dot=torch.ones(8))
    # bit for bit: both shifted evaluations ran in fp32 (with bf16 GEMMs they differ by ~1e-2 / 2h)
    torch.testing.assert_close(tangent, plain, atol=0, rtol=0)


def test_time_embedding_is_computed_in_fp32():
    emb = pf.nn.embeddings.SinusoidalEmbedding(16, scale=100.0)
    t = torch.rand(64).to(BF16)
    got = emb(t)
    assert got.dtype == BF16
    torch.testing.assert_close(got, emb(t.float()).to(BF16), atol=0, rtol=0)
    dd = pf.reference.dual_sinusoidal(t, torch.ones_like(t), emb.freqs)
    torch.testing.assert_close(dd, pf.reference.dual_sinusoidal(t.float(), torch.ones(64), emb.freqs).to(BF16),
                               atol=0, rtol=0)


@pytest.mark.parametrize("model", ["mlp", "unet", "dit"])
def test_dual_and_jvp_agree_under_autocast(model):
    torch.manual_seed(0)
    if model == "mlp":
        net, x = pf.nn.FlowMapMLP(dim=2, hidden=32, depth=2), torch.randn(8, 2)
    elif model == "unet":
        net, x = pf.nn.UNetFlowMap(channels=1, ch=16), torch.randn(2, 1, 8, 8)
    else:
        from pyflowmap.nn.dit import dit_preset

        net, x = dit_preset("cpu-small", 8), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fm = pf.FlowMap(net)
    s, t = torch.full((x.shape[0],), 0.2), torch.full((x.shape[0],), 0.7)
    with autocast():
        out_d, tan_d = pf.Dual().jvp(fm, x, s, t, t_dot=torch.ones(x.shape[0]))
        out_j, tan_j = pf.JVP().jvp(fm, x, s, t, t_dot=torch.ones(x.shape[0]))
    _, tan_64 = pf.JVP().jvp(fm.double(), x.double(), s.double(), t.double(), t_dot=torch.ones(x.shape[0]).double())
    scale = tan_64.abs().max()
    # both bf16 paths within a few bf16 roundings per layer of the float64 tangent
    for tan in (tan_d, tan_j):
        assert (tan.double() - tan_64).abs().max() <= 0.1 * scale


def test_primal_step_compiles_without_graph_breaks():
    torch.manual_seed(0)
    from pyflowmap.nn.dit import dit_preset

    net = dit_preset("cpu-small", 8)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)

    def velocity(x, t):
        return net(x, t, t)

    explained = torch._dynamo.explain(velocity)(x, t)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
