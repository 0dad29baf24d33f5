"""pyflowmap::dual_norm (LayerNorm / RMSNorm / GroupNorm) against the reference twins."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops, reference
from tests.tolerance import assert_within_reference_error

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _case(kind, half, d, affine, g):
    """(fused_fn, reference_fn, stacked input, params) for one norm configuration."""
    if kind == "layer":
        xx = torch.randn(2 * half, 3, d, generator=g) * 2 + 1
        params = [torch.randn(d, generator=g), torch.randn(d, generator=g)] if affine else [None, None]
        return (lambda x, w, b: ops.dual_layer_norm(x, (d,), w, b),
                lambda x, w, b: reference.dual_layer_norm(x, (d,), w, b), xx, params)
    if kind == "rms":
        xx = torch.randn(2 * half, 2, d, generator=g) + 0.5
        params = [torch.randn(d, generator=g)] if affine else [None]
        return (lambda x, w: ops.dual_rms_norm(x, w), lambda x, w: reference.dual_rms_norm(x, w), xx, params)
    groups = 2
    xx = torch.randn(2 * half, 2 * groups, 3, d, generator=g) * 3
    params = [torch.randn(2 * groups, generator=g), torch.randn(2 * groups, generator=g)] if affine else [None, None]
    return (lambda x, w, b: ops.dual_group_norm(x, groups, w, b),
            lambda x, w, b: reference.dual_group_norm(x, groups, w, b), xx, params)


@given(kind=st.sampled_from(["layer", "rms", "group"]), half=st.sampled_from([1, 2, 5]), d=st.integers(3, 19),
       affine=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000), noncontig=st.booleans())
def test_forward_and_backward_match_reference(kind, half, d, affine, dtype, seed, noncontig):
    # d >= 3: normalizing 1 or 2 features is degenerate (xhat = 0 or +-1, gradients that are
    # pure cancellation), where every implementation's error is set by conditioning, not dtype.
    g = torch.Generator().manual_seed(seed)
    fused, ref, xx, params = _case(kind, half, d, affine, g)
    if noncontig:
        xx = torch.stack([xx, xx], -1)[..., 0]
    xx, params = xx.to(dtype), [p if p is None else p.to(dtype) for p in params]
    gout = torch.randn(xx.shape, generator=g).to(dtype)

    def run(fn, dt):
        x = xx.to(dt).requires_grad_()
        ps = [p if p is None else p.to(dt).requires_grad_() for p in params]
        y = fn(x, *ps)
        grads = torch.autograd.grad(y, [x] + [p for p in ps if p is not None], gout.to(dt))
        return [y, *grads]

    got, low, exact = run(fused, dtype), run(ref, dtype), run(ref, torch.float64)
    for a, b, e in zip(got, low, exact):
        assert a.dtype == dtype
        assert_within_reference_error(a, b, e)


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(0)
    fused, _, xx, params = _case(kind, 2, 4, True, g)
    args = [xx.double().requires_grad_()] + [p.double().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fused, tuple(args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(4, 6, generator=g, dtype=dtype).requires_grad_()
    w, b = (torch.randn(6, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    opcheck(torch.ops.pyflowmap.dual_norm.default, (xx, w, b, 6, 1, 1, True, 1e-5))
    opcheck(torch.ops.pyflowmap.dual_norm.default, (xx, None, None, 6, 1, 1, False, 1e-6))
    xg = torch.randn(4, 4, 5, generator=g, dtype=dtype).requires_grad_()
    opcheck(torch.ops.pyflowmap.dual_norm.default, (xg, w[:4].detach().requires_grad_(), None, 10, 2, 5, True, 1e-5))


def test_layers_use_the_fused_op_and_fall_back_for_float16_on_cpu():
    pick = ops.dual_layer_norm.dispatch.pick
    assert pick(torch.zeros(2, 2)) is ops.dual_layer_norm
    assert pick(torch.zeros(2, 2, dtype=torch.bfloat16)) is ops.dual_layer_norm
    assert pick(torch.zeros(2, 2, dtype=torch.float16)) is reference.dual_layer_norm


def test_bad_input():
    with pytest.raises(RuntimeError, match="even leading dim"):
        ops.dual_layer_norm(torch.zeros(3, 4), (4,))
    with pytest.raises(RuntimeError, match="affine parameters must have 4"):
        ops.dual_layer_norm(torch.zeros(2, 4), (4,), torch.ones(3))
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        ops.dual_rms_norm(torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="`weight`.*dtype|dtype.*`weight`"):
        ops.dual_layer_norm(torch.zeros(2, 4, dtype=torch.bfloat16), (4,), torch.ones(4))  # outside autocast
    with pytest.raises(ValueError, match="not divisible"):
        ops.dual_group_norm(torch.zeros(2, 6, 2), 4)
    with pytest.raises(RuntimeError, match="takes no bias"):
        torch.ops.pyflowmap.dual_norm(torch.zeros(2, 4), None, torch.zeros(4), 4, 1, 1, False, 1e-6)
