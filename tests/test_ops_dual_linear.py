"""pyflowmap::dual_linear against its twin: values, gradients, opcheck, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops, reference


@given(half=st.sampled_from([0, 1, 3]), lead=st.lists(st.integers(1, 4), max_size=2), din=st.integers(1, 9),
       dout=st.integers(1, 9), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_matches_reference_values_and_gradients(half, lead, din, dout, bias, dtype):
    g = torch.Generator().manual_seed(half * 100 + din * 10 + dout)
    xx = torch.randn([2 * half] + lead + [din], generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(dout, din, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(dout, generator=g, dtype=dtype).requires_grad_() if bias else None
    out = ops.dual_linear(xx, w, b)
    ref = reference.dual_linear(xx, w, b)
    tol = 16 * torch.finfo(dtype).eps * max(1, din)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    inputs = [t for t in (xx, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad(out, inputs, gout), torch.autograd.grad(ref, inputs, gout)):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def test_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ops.dual_linear, (xx, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.dual_linear(x, w, None), (xx, w))
    opcheck(torch.ops.pyflowmap.dual_linear.default, (xx, w, b))
    opcheck(torch.ops.pyflowmap.dual_linear.default, (xx.float().detach(), w.float().detach(), None))


def test_bad_input():
    with pytest.raises(RuntimeError, match="even leading dim"):
        ops.dual_linear(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="features"):
        ops.dual_linear(torch.zeros(2, 3), torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="`bias` must have shape"):
        ops.dual_linear(torch.zeros(2, 2), torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.dual_linear(torch.zeros(2, 2), torch.zeros(4, 2, dtype=torch.float64))
