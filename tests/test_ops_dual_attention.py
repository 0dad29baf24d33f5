"""pyflowmap::dual_attention (attention + JVP in one streaming pass, backward through O and
O_dot) against the math twin, and the twin against torch.func.jvp over math attention.

On CUDA with float16 / bfloat16 and head dim 64 or 128 these cases run the flash-style kernels;
everywhere else the chunked path (keys in blocks of 128, so N > 128 crosses block borders).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import _dispatch, ops, reference
from pyflowmap.reference import math_attention
from tests.conftest import DEVICES
from tests.tolerance import assert_within_reference_error

LOW = (torch.float16, torch.bfloat16)


def _inputs(b, h, nq, nk, d, dtype, device, has, noncontig, g):
    """q, k, v and the tangents (None where absent); non-contiguous ones are [B, N, H, D]
    storage viewed as [B, H, N, D], the layout a fused qkv projection produces."""
    def make(n):
        if noncontig:
            t = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
        else:
            t = torch.randn(b, h, n, d, generator=g)
        return t.to(device=device, dtype=dtype)

    q, k, v = make(nq), make(nk), make(nk)
    dots = [make(n) if present else None for n, present in zip((nq, nk, nk), has)]
    return [q, k, v, *dots]


def _run(fn, args, dtype, gouts, causal):
    """Outputs and the gradients of <g, O> + <g_dot, O_dot> w.r.t. every present input, in `dtype`."""
    xs = [a if a is None else a.detach().to(dtype).requires_grad_() for a in args]
    o, o_dot = fn(*xs, causal=causal)
    loss = (o * gouts[0].to(dtype)).sum()
    if gouts[1] is not None:
        loss = loss + (o_dot * gouts[1].to(dtype)).sum()
    present = [x for x in xs if x is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(present, grads)]
    return [o, o_dot, *grads]


@pytest.mark.parametrize("device", DEVICES)
@given(b=st.sampled_from([0, 1, 2]), h=st.sampled_from([1, 3]), nq=st.sampled_from([0, 1, 7, 65, 130]),
       nk=st.sampled_from([0, 1, 9, 64, 129, 200]), d=st.sampled_from([1, 5, 16, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       causal=st.booleans(), has=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       with_gd=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 1000))
def test_matches_reference(device, b, h, nq, nk, d, dtype, causal, has, with_gd, noncontig, seed):
    if device == "cpu" and d > 16 and nq * nk > 2000:
        d = 16  # keeps the CPU suite fast; CUDA runs the kernel's head dims at full size
    g = torch.Generator().manual_seed(seed)
    args = _inputs(b, h, nq, nk, d, dtype, device, has, noncontig, g)
    gouts = [torch.randn(b, h, nq, d, generator=g).to(device), torch.randn(b, h, nq, d, generator=g).to(device)
             if with_gd else None]
    got = _run(ops.jvp_attention, args, dtype, gouts, causal)
    # the precision rule: the same-precision twin's error against the float64 truth sets the bar
    low = _run(reference.jvp_attention, args, dtype, gouts, causal)
    exact = _run(reference.jvp_attention, args, torch.float64, gouts, causal)
    for a, lo, ex in zip(got, low, exact):
        assert a.dtype == dtype and a.shape == ex.shape
        assert torch.isfinite(a).all()
        # float32/64: 64 ulps for summation order (reductions over both N and D, and the
        # cancellation in dS = P (dP - D), which the twin's softmax backward can get exactly 0
        # for a single visible key); 16-bit: the twin's own error dominates, 4 ulps of rounding
        assert_within_reference_error(a.cpu(), lo.cpu(), ex.cpu(), ulps=4.0 if dtype in LOW else 64.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(6, 6), (4, 9)])
def test_twin_is_torch_func_jvp_of_math_attention(causal, nq, nk):
    """The definition: O_dot is the forward-mode derivative, and reverse mode through (O, O_dot)
    equals reverse mode through torch.func.jvp (float64)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    dots = [torch.randn_like(t) for t in (q, k, v)]
    xs = [t.clone().requires_grad_() for t in (q, k, v, *dots)]
    o, o_dot = torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, causal), tuple(xs[:3]), tuple(xs[3:]))
    ro, ro_dot = reference.jvp_attention(*xs, causal=causal)
    torch.testing.assert_close(ro, o)
    torch.testing.assert_close(ro_dot, o_dot)
    go, god = torch.randn_like(o), torch.randn_like(o)
    want = torch.autograd.grad((o * go).sum() + (o_dot * god).sum(), xs)
    got = torch.autograd.grad((ro * go).sum() + (ro_dot * god).sum(), xs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("has", [(True, True, True), (True, False, False), (False, True, True)])
def test_gradcheck_float64(device, causal, has):
    g = torch.Generator().manual_seed(2)
    args = [a if a is None else a.requires_grad_() for a in _inputs(1, 2, 5, 7, 3, torch.float64, device, has,
                                                                      False, g)]

    def f(*xs):
        return ops.jvp_attention(*xs, causal=causal)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("device", DEVICES)
def test_primal_only_backward_is_plain_attention_backward(device):
    """A loss on O alone (tangent under stop-gradient, as in MeanFlow): the q/k/v gradients are
    those of attention itself and the tangents get exact zeros."""
    g = torch.Generator().manual_seed(3)
    args = [a.requires_grad_() for a in _inputs(2, 2, 33, 40, 8, torch.float64, device, (True,) * 3, False, g)]
    o, _ = ops.jvp_attention(*args, causal=True)
    go = torch.randn_like(o)
    got = torch.autograd.grad((o * go).sum(), args)
    q, k, v = (a.detach().requires_grad_() for a in args[:3])
    want = torch.autograd.grad((math_attention(q, k, v, True) * go).sum(), (q, k, v))
    for a, e in zip(got[:3], want):
        torch.testing.assert_close(a, e)
    for t in got[3:]:
        assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_blind_rows_are_zero(device):
    """Causal cross-attention with more queries than keys: the first Nq - Nk queries see no key."""
    g = torch.Generator().manual_seed(4)
    args = [a.requires_grad_() for a in _inputs(1, 1, 6, 2, 4, torch.float32, device, (True,) * 3, False, g)]
    o, o_dot = ops.jvp_attention(*args, causal=True)
    assert torch.count_nonzero(o[..., :4, :]) == 0 and torch.count_nonzero(o_dot[..., :4, :]) == 0
    assert o[..., 4:, :].abs().sum() > 0
    grads = torch.autograd.grad(o.sum() + o_dot.sum(), args)
    assert all(torch.isfinite(gr).all() for gr in grads)
    _, _, lse, mu = torch.ops.pyflowmap.dual_attention(*args, True, 0.5)
    assert torch.isneginf(lse[..., :4]).all() and torch.isfinite(lse[..., 4:]).all() and (mu[..., :4] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(5)
    for has in [(True, True, True), (False, True, False)]:
        args = [a if a is None else a.requires_grad_() for a in _inputs(1, 2, 5, 9, 8, torch.float32, device, has,
                                                                          True, g)]
        opcheck(torch.ops.pyflowmap.dual_attention.default, (*args, True, 0.3))
        opcheck(torch.ops.pyflowmap.dual_attention.default, (*args, False, 0.3))


def test_compile_matches_eager():
    g = torch.Generator().manual_seed(6)
    args = _inputs(2, 2, 9, 9, 8, torch.float32, "cpu", (True, True, False), False, g)
    f = torch.compile(lambda *xs: [t * 2 for t in ops.jvp_attention(*xs, causal=True)], fullgraph=True)
    for a, e in zip(f(*args), ops.jvp_attention(*args, causal=True)):
        torch.testing.assert_close(a, e * 2)


def test_dual_layers_use_the_op():
    x = torch.randn(4, 2, 3, 8)
    assert ops.dual_attention.dispatch.pick(x) is ops.dual_attention
    with _dispatch.reference_ops():
        assert ops.dual_attention.dispatch.pick(x) is reference.dual_attention


def test_chunked_path_memory_is_linear_in_n():
    """Math attention at N = 4096 allocates N x N probabilities and tangents (64 MB each in
    float32); the chunked path's largest single allocation is an N x 128 tile (2 MB)."""
    from torch.profiler import ProfilerActivity, profile

    n, d = 4096, 16
    q, k, v, q_dot, k_dot, v_dot = (torch.randn(1, 1, n, d) for _ in range(6))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.jvp_attention(q, k, v, q_dot, k_dot, v_dot)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= n * 128 * 4, f"largest allocation {largest} bytes is more than one N x 128 tile"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.jvp_attention(q, k, v, q_dot, k_dot, v_dot)
    assert max(e.cpu_memory_usage for e in prof.events()) >= n * n * 4  # the check can fail


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    q = torch.randn(1, 2, 4, 8, device=device)
    op = torch.ops.pyflowmap.dual_attention
    with pytest.raises(RuntimeError, match="`q` must be \\[batch, heads, Nq, D\\]"):
        op(q[0], q, q, None, None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`k` must be"):
        op(q, q[:, :1], q, None, None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`v` must have the shape of `k`"):
        op(q, q, q[..., :3, :], None, None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`k_dot` must match `q` in dtype"):
        op(q, q, q, None, q.double(), None, False, 1.0)
    with pytest.raises(RuntimeError, match="`q_dot` must have shape"):
        op(q, q, q, q[..., :3, :], None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`q` must be float32"):
        op(q.int(), q.int(), q.int(), None, None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`scale` must be finite"):
        op(q, q, q, None, None, None, False, float("nan"))
    o, od, lse, mu = op(q, q, q, None, None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="`lse` must be the forward's row statistic"):
        torch.ops.pyflowmap.dual_attention_backward(o, None, q, q, q, None, None, None, o, od, lse[0], mu, False, 1.0)
    with pytest.raises(ValueError, match="stacked"):
        ops.dual_attention(q[:1], q, q)
