"""pyflowmap::flowmap_loss against its reference twin; gradients; opcheck; bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops, reference
from pyflowmap.losses import residual_loss
from tests.tolerance import assert_within_reference_error

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def loss_inputs(draw):
    batch = draw(st.sampled_from([1, 2, 3, 17]))
    inner = draw(st.lists(st.integers(1, 30), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = [batch] + inner
    pred = torch.randn(shape + [2], generator=g)[..., 0] if draw(st.booleans()) else torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g).to(dtype) if draw(st.booleans()) else None
    weight = torch.rand(batch, generator=g).to(acc(dtype)) if draw(st.booleans()) else None
    metric = draw(st.sampled_from(["l2sq", "pseudo_huber"]))
    c = draw(st.sampled_from([0.0, 0.03, 1.0])) if metric == "pseudo_huber" else 0.0
    return pred.to(dtype), target, weight, metric, c


@given(loss_inputs())
def test_matches_reference(args):
    pred, target, weight, metric, c = args
    loss, per = ops.flowmap_loss(pred, target, weight, metric, c)
    assert loss.shape == () and per.shape == (pred.shape[0],) and per.dtype == acc(pred.dtype)
    # both accumulate in float64 from the same (rounded) inputs, in different orders: they
    # agree to the output rounding (float32) or to summation-order rounding, which grows like
    # sqrt(row length) (float64)
    ref_loss, ref_per = reference.flowmap_loss(pred, target, weight, metric, c)
    inner = pred[0].numel()
    tol = (32 + 4 * inner**0.5) * torch.finfo(per.dtype).eps
    torch.testing.assert_close(per, ref_per, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)


@given(loss_inputs(), st.floats(-2, 2), st.integers(0, 100))
def test_gradient_matches_reference(args, g_loss, seed):
    pred, target, weight, metric, c = args
    if metric == "pseudo_huber" and c == 0.0:
        pred = pred + 0.5  # keep away from the kink of the plain L2 norm
    g_per = torch.randn(pred.shape[0], generator=torch.Generator().manual_seed(seed)).to(acc(pred.dtype))

    def grads(fn, p, tg, w):
        p = p.detach().requires_grad_()
        tg = None if tg is None else tg.detach().requires_grad_()
        w = None if w is None else w.detach().requires_grad_()
        loss, per = fn(p, tg, w, metric, c)
        inputs = [x for x in (p, tg, w) if x is not None]
        return torch.autograd.grad(g_loss * loss + (g_per * per).sum(), inputs)

    got = grads(ops.flowmap_loss, pred, target, weight)
    lowp = grads(reference.flowmap_loss, pred, target, weight)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    exact = grads(reference.flowmap_loss, up(pred), up(target), up(weight))
    for a, b, e in zip(got, lowp, exact):
        assert a.dtype == b.dtype
        assert_within_reference_error(a, b, e)


@pytest.mark.parametrize("metric,c", [("l2sq", 0.0), ("pseudo_huber", 0.5)])
def test_gradcheck_float64(metric, c):
    g = torch.Generator().manual_seed(0)
    p, t = (torch.randn(5, 3, 2, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    w = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t, w: ops.flowmap_loss(p, t, w, metric, c), (p, t, w))
    assert torch.autograd.gradcheck(lambda p: ops.flowmap_loss(p, None, None, metric, c), (p,))


def test_plain_l2_norm_has_zero_subgradient_at_zero_residual():
    p = torch.zeros(3, 4, requires_grad=True)
    loss, _ = ops.flowmap_loss(p, torch.zeros(3, 4), None, "pseudo_huber", 0.0)
    loss.backward()
    assert torch.equal(p.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 3, generator=g).to(dtype)
    t = torch.randn(4, 3, generator=g).to(dtype)
    w = torch.rand(4, generator=g).to(acc(dtype))
    grad = dtype != torch.bfloat16
    for args in [(p, t, w, "l2sq", 0.0), (p, None, None, "pseudo_huber", 0.1)]:
        args = tuple(a.clone().requires_grad_(grad) if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(torch.ops.pyflowmap.flowmap_loss.default, args)


def test_residual_loss_dispatches_and_accepts_scalar_zero():
    p = torch.randn(6, 2, dtype=torch.float16)  # no fused float16 kernel: the twin runs
    loss, per = residual_loss(p, 0.0)
    torch.testing.assert_close(per.double(), p.double().pow(2).sum(1), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="must be 0"):
        residual_loss(p, 1.0)


def test_bad_input():
    p = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="empty batch"):
        ops.flowmap_loss(torch.zeros(0, 3))
    with pytest.raises(RuntimeError, match="`target` shape"):
        ops.flowmap_loss(p, torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="`target` dtype"):
        ops.flowmap_loss(p, p.double())
    with pytest.raises(RuntimeError, match="`weight` must have shape"):
        ops.flowmap_loss(p, None, torch.ones(3))
    with pytest.raises(RuntimeError, match="`weight` must have dtype"):
        ops.flowmap_loss(p, None, torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="'l2sq' or 'pseudo_huber'"):
        ops.flowmap_loss(p, None, None, "l1")
    with pytest.raises(RuntimeError, match="`c` must be finite"):
        ops.flowmap_loss(p, None, None, "pseudo_huber", -1.0)


@given(loss_inputs(), st.sampled_from([1e-3, 0.25]), st.integers(0, 100))
def test_fd_loss_matches_reference_values_and_gradients(args, h, seed):
    plus, target, weight, metric, c = args
    g = torch.Generator().manual_seed(seed)
    minus = plus + h * torch.randn(plus.shape, generator=g).to(plus.dtype)
    inv = 1.0 / (2 * h)
    loss, per = ops.flowmap_fd_loss(plus, minus, target, weight, inv, metric, c)
    ref_loss, ref_per = reference.flowmap_fd_loss(plus, minus, target, weight, inv, metric, c)
    inner = plus[0].numel()
    tol = (32 + 4 * inner**0.5) * torch.finfo(per.dtype).eps
    torch.testing.assert_close(per, ref_per, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)


def test_fd_loss_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(0)
    p, m, t = (torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    w = torch.rand(4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, m, t, w: ops.flowmap_fd_loss(p, m, t, w, 0.7, "pseudo_huber", 0.3),
                                    (p, m, t, w))
    opcheck(torch.ops.pyflowmap.flowmap_fd_loss.default, (p, m, t, w, 0.7, "l2sq", 0.0))
    with pytest.raises(RuntimeError, match="`inv_2h` must be finite and positive"):
        ops.flowmap_fd_loss(p, m, None, None, 0.0)
    with pytest.raises(RuntimeError, match="`minus` shape"):
        ops.flowmap_fd_loss(p, m[:2], None, None, 1.0)


def test_bf16_central_difference_is_formed_in_float64():
    """bf16 evaluations f(t +- h): the difference inside the kernel loses nothing more."""
    g = torch.Generator().manual_seed(0)
    plus = torch.randn(8, 5, generator=g).bfloat16()
    minus = (plus.float() + 0.01).bfloat16()
    _, per = ops.flowmap_fd_loss(plus, minus, None, None, 50.0)
    exact = ((plus.double() - minus.double()) * 50.0).pow(2).sum(1)
    torch.testing.assert_close(per.double(), exact, rtol=1e-6, atol=0)
