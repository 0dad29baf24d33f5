"""The fused ops' CUDA kernels against the float64 CPU twins (needs a CUDA build and device).

The rule of docs/kernels.md section 8: a kernel in a low precision may be off from the float64 truth by at
most twice the error of the twin run in that precision (plus a few ulps). These tests also
run under compute-sanitizer (scripts/gpu_check.sh).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops, reference
from tests.conftest import DEVICES
from tests.tolerance import assert_within_reference_error

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@given(half=st.sampled_from([0, 1, 3, 257]), inner=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["gelu", "silu"]), seed=st.integers(0, 1000))
def test_dual_act(half, inner, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    zz = (3 * torch.randn(2 * half, inner, generator=g)).to(dtype)
    grad = torch.randn(2 * half, inner, generator=g).to(dtype)
    # the same-precision twin: in dtype for float32/64, through float32 for the 16-bit types
    low = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = ops.dual_act(zz.cuda(), kind).cpu()
    assert_within_reference_error(out, reference.dual_act(zz.to(low), kind).to(dtype),
                                  reference.dual_act(zz.double(), kind))
    gout = torch.ops.pyflowmap.dual_act_backward(grad.cuda(), zz.cuda(), kind).cpu()
    assert_within_reference_error(gout, reference.dual_act_backward(grad.to(low), zz.to(low), kind).to(dtype),
                                  reference.dual_act_backward(grad.double(), zz.double(), kind))


@given(batch=st.sampled_from([1, 3, 1000]), inner=st.sampled_from([1, 2, 3, 16, 17, 784, 3000]),
       dtype=st.sampled_from(DTYPES), metric=st.sampled_from(["l2sq", "pseudo_huber"]),
       with_target=st.booleans(), with_weight=st.booleans(), fd=st.booleans(), seed=st.integers(0, 1000))
def test_losses_forward_and_gradients(batch, inner, dtype, metric, with_target, with_weight, fd, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(batch, inner, generator=g).to(dtype)
    minus = (p.float() + 0.05 * torch.randn(batch, inner, generator=g)).to(dtype) if fd else None
    t = torch.randn(batch, inner, generator=g).to(dtype) if with_target else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(batch, generator=g).to(acc) if with_weight else None
    c = 0.1 if metric == "pseudo_huber" else 0.0
    inv = 10.0

    def run(device, dt, lib):
        args = [None if x is None else x.to(device=device, dtype=dt).requires_grad_() for x in (p, minus, t)]
        ww = None if w is None else w.to(device=device, dtype=torch.float64 if dt == torch.float64 else acc)
        if fd:
            loss, per = lib.flowmap_fd_loss(args[0], args[1], args[2], ww, inv, metric, c)
        else:
            loss, per = lib.flowmap_loss(args[0], args[2], ww, metric, c)
        grads = torch.autograd.grad(loss + per.sum(), [a for a in args if a is not None])
        return [loss.detach().cpu(), per.detach().cpu()] + [x.cpu() for x in grads]

    got = run("cuda", dtype, ops)
    low = run("cpu", dtype, reference)  # the twin upcasts internally; its grads round to dtype
    exact = run("cpu", torch.float64, reference)
    for a, b, e in zip(got, low, exact):
        assert_within_reference_error(a, b, e)  # tolerance floor in a's own dtype


@given(kind=st.sampled_from(["layer", "rms", "group"]), half=st.sampled_from([1, 5]), d=st.integers(3, 600),
       dtype=st.sampled_from(DTYPES), affine=st.booleans(), seed=st.integers(0, 1000))
def test_dual_norms(kind, half, d, dtype, affine, seed):
    from tests.test_ops_dual_norm import _case

    g = torch.Generator().manual_seed(seed)
    fused, ref, xx, params = _case(kind, half, d, affine, g)
    gout = torch.randn(xx.shape, generator=g)
    # round every input to dtype first, so the references see exactly what the kernel sees
    xx, gout = xx.to(dtype), gout.to(dtype)
    params = [p if p is None else p.to(dtype) for p in params]

    def run(fn, device, dt):
        x = xx.to(device=device, dtype=dt).requires_grad_()
        ps = [p if p is None else p.to(device=device, dtype=dt).requires_grad_() for p in params]
        y = fn(x, *ps)
        grads = torch.autograd.grad(y, [x] + [p for p in ps if p is not None], gout.to(device=device, dtype=dt))
        return [t.detach().cpu() for t in (y, *grads)]

    low_dt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    got = run(fused, "cuda", dtype)
    low = run(ref, "cpu", low_dt)
    exact = run(ref, "cpu", torch.float64)
    for a, b, e in zip(got, low, exact):
        assert_within_reference_error(a, b, e)  # tolerance floor in a's own dtype


def test_gradcheck_and_opcheck_on_cuda():
    g = torch.Generator().manual_seed(0)
    zz = torch.randn(4, 5, generator=g, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.dual_act(x, "gelu"), (zz,))
    assert torch.autograd.gradcheck(lambda x: ops.dual_layer_norm(x, (5,)), (zz,))
    p, t = (torch.randn(4, 3, generator=g, dtype=torch.float64).cuda().requires_grad_() for _ in range(2))
    w = torch.rand(4, generator=g, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t, w: ops.flowmap_loss(p, t, w, "pseudo_huber", 0.3), (p, t, w))
    opcheck(torch.ops.pyflowmap.dual_act.default, (zz, "silu"))
    opcheck(torch.ops.pyflowmap.flowmap_loss.default, (p, t, w, "l2sq", 0.0))
    opcheck(torch.ops.pyflowmap.flowmap_fd_loss.default, (p, t, None, w, 2.0, "l2sq", 0.0))
    opcheck(torch.ops.pyflowmap.dual_norm.default, (zz, None, None, 5, 1, 1, True, 1e-5))
    opcheck(torch.ops.pyflowmap.dual_linear.default, (zz.reshape(4, 5), torch.randn(3, 5, dtype=torch.float64, device="cuda"), None))


def test_cuda_losses_are_deterministic_and_graph_capturable():
    p = torch.randn(4096, 784, device="cuda")
    a = ops.flowmap_loss(p)[0]
    b = ops.flowmap_loss(p)[0]
    assert torch.equal(a, b)
    ops.flowmap_loss(p)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _ = ops.flowmap_loss(p)
    p.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, ops.flowmap_loss(p)[0])


def test_cuda_errors_are_clear():
    with pytest.raises(RuntimeError, match="even leading dim"):
        ops.dual_act(torch.zeros(3, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="`target` is on"):
        ops.flowmap_loss(torch.zeros(2, 2, device="cuda"), torch.zeros(2, 2))
