"""pyflowmap::dual_act (+ backward) against the reference twin; gradients; opcheck; bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops
from pyflowmap.reference import dual as ref
from tests.conftest import DEVICES
from tests.tolerance import assert_within_reference_error

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
KINDS = ["gelu", "silu"]


@st.composite
def stacked(draw):
    half = draw(st.sampled_from([0, 1, 2, 3, 17]))
    inner = draw(st.lists(st.integers(1, 40), min_size=0, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = [2 * half] + inner
    if draw(st.booleans()):  # non-contiguous: every other element of a wider buffer
        zz = (scale * torch.randn(shape + [2], generator=g))[..., 0]
    else:
        zz = scale * torch.randn(shape, generator=g)
    return zz.to(dtype)


@given(stacked(), st.sampled_from(KINDS), st.sampled_from(DEVICES))
def test_forward_matches_reference(zz, kind, device):
    out = ops.dual_act(zz.to(device), kind).cpu()
    assert out.shape == zz.shape and out.dtype == zz.dtype
    exact = ref.dual_act(zz.double(), kind)
    assert_within_reference_error(out, ref.dual_act(zz, kind), exact)


@given(stacked(), st.sampled_from(KINDS), st.integers(0, 1000), st.sampled_from(DEVICES))
def test_backward_matches_reference(zz, kind, seed, device):
    g = torch.randn(zz.shape, generator=torch.Generator().manual_seed(seed)).to(zz.dtype)
    out = torch.ops.pyflowmap.dual_act_backward(g.to(device), zz.to(device), kind).cpu()
    exact = ref.dual_act_backward(g.double(), zz.double(), kind)
    low = ref.dual_act_backward(g.float() if zz.dtype == torch.bfloat16 else g, zz.float() if zz.dtype == torch.bfloat16 else zz, kind)
    assert_within_reference_error(out, low.to(zz.dtype), exact)


def test_extreme_inputs_stay_finite_and_exact():
    z = torch.tensor([-1e4, -200.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 200.0, 1e4])
    zz = torch.cat([z, torch.ones_like(z)])
    for kind in KINDS:
        out = ops.dual_act(zz, kind)
        exact = ref.dual_act(zz.double(), kind)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-30)
    nan = ops.dual_act(torch.tensor([float("nan"), 1.0]), "gelu")
    assert torch.isnan(nan[0])


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64_both_halves(kind):
    zz = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.dual_act(x, kind), (zz,))
    assert torch.autograd.gradgradcheck(lambda x: ops.dual_act(x, kind), (zz,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(dtype, kind):
    zz = torch.randn(4, 3).to(dtype).requires_grad_(dtype != torch.bfloat16)
    opcheck(torch.ops.pyflowmap.dual_act.default, (zz, kind))
    g = torch.randn(4, 3).to(dtype)
    opcheck(torch.ops.pyflowmap.dual_act_backward.default, (g, zz.detach(), kind))


def test_compile_matches_eager():
    zz = torch.randn(8, 7)
    f = torch.compile(lambda x: ops.dual_act(x, "gelu") * 2, fullgraph=True)
    torch.testing.assert_close(f(zz), 2 * ops.dual_act(zz, "gelu"))


def test_bad_input():
    with pytest.raises(RuntimeError, match="even leading dim"):
        ops.dual_act(torch.zeros(3, 2), "gelu")
    with pytest.raises(RuntimeError, match="'gelu' or 'silu'"):
        ops.dual_act(torch.zeros(2, 2), "relu")
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        ops.dual_act(torch.zeros(2, 2, dtype=torch.float16), "gelu")
    with pytest.raises(RuntimeError, match="`grad` shape"):
        torch.ops.pyflowmap.dual_act_backward(torch.zeros(2, 3), torch.zeros(2, 2), "gelu")
