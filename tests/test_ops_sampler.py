"""pyflowmap::flowmap_step against its reference twin, its gradients, opcheck and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from pyflowmap import ops, reference
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tolerance(dtype):
    # The kernel computes in fp32 (fp64) and rounds once, exactly like the reference, so the
    # two agree to one rounding of the output dtype.
    return {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def time_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def step_inputs(draw):
    batch = draw(st.sampled_from([0, 1, 2, 3, 7, 33]))
    inner = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(DEVICES))
    per_sample = draw(st.booleans())
    non_contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = [batch] + inner
    if non_contiguous:  # a transposed / strided view of a larger buffer
        x = torch.randn(shape + [2], generator=g)[..., 0]
        v = torch.randn([2] + shape, generator=g)[1]
        if len(shape) >= 2:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        x = torch.randn(shape, generator=g)
        v = torch.randn(shape, generator=g)
    tshape = (batch,) if per_sample else ()
    s = torch.rand(tshape, generator=g, dtype=torch.float64)
    t = s + torch.rand(tshape, generator=g, dtype=torch.float64)
    td = time_dtype(dtype)
    return (x.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype),
            s.to(device=device, dtype=td), t.to(device=device, dtype=td))


@given(step_inputs())
def test_matches_reference(args):
    x, v, s, t = args
    out = ops.flowmap_step(x, v, s, t)
    ref = reference.flowmap_step(x, v, s, t)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), ref.double(), rtol=tolerance(x.dtype), atol=tolerance(x.dtype))


@given(step_inputs())
def test_reference_is_the_math(args):
    x, v, s, t = args
    exact = x.double() + (t.double() - s.double()).reshape((-1,) + (1,) * (x.dim() - 1) if s.dim() else ()) * v.double()
    tol = 2 * tolerance(x.dtype) * (1 + exact.abs().max().item() if exact.numel() else 1)
    torch.testing.assert_close(reference.flowmap_step(x, v, s, t).double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [True, False])
def test_gradcheck_float64(device, per_sample):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    shape = (3,) if per_sample else ()
    s = torch.rand(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.rand(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(ops.flowmap_step, (x, v, s, t))
    assert torch.autograd.gradgradcheck(ops.flowmap_step, (x, v, s, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [True, False])
def test_opcheck(device, dtype, per_sample):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(4, 3, generator=g).to(device=device, dtype=dtype)
    shape = (4,) if per_sample else ()
    td = time_dtype(dtype)
    s = torch.rand(shape, generator=g).to(device=device, dtype=td)
    t = torch.rand(shape, generator=g).to(device=device, dtype=td)
    requires = dtype in (torch.float32, torch.float64)
    args = [a.requires_grad_(requires) for a in (x, v, s, t)]
    opcheck(torch.ops.pyflowmap.flowmap_step.default, tuple(args))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device):
    x = torch.randn(8, 6, device=device)
    v = torch.randn(8, 6, device=device)
    s, t = torch.rand(8, device=device), torch.rand(8, device=device)
    f = torch.compile(lambda x, v, s, t: ops.flowmap_step(x, v, s, t) * 2.0, fullgraph=True)
    torch.testing.assert_close(f(x, v, s, t), 2.0 * ops.flowmap_step(x, v, s, t))


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_one_uses_the_parallel_path(device):
    # numel above the CPU grain with a single row: the flat split must not mix rows' times
    x = torch.randn(2, 300_001, device=device)
    v = torch.randn(2, 300_001, device=device)
    s = torch.tensor([0.1, 0.4], device=device)
    t = torch.tensor([0.9, 0.5], device=device)
    torch.testing.assert_close(ops.flowmap_step(x, v, s, t), reference.flowmap_step(x, v, s, t))


BAD = [
    ("shape", lambda x: (x, x[:2], 0.0, 1.0), "shape"),
    ("dtype mismatch", lambda x: (x, x.double(), 0.0, 1.0), "dtype"),
    ("integer state", lambda x: (x.int(), x.int(), 0.0, 1.0), "float32, float64"),
    ("scalar state", lambda x: (x[0, 0], x[0, 0], 0.0, 1.0), "batch dimension"),
]


@pytest.mark.parametrize("name,make,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, make, msg):
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=msg):
        ops.flowmap_step(*make(x))


def test_bad_time_arguments_name_the_argument():
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    op = torch.ops.pyflowmap.flowmap_step
    with pytest.raises(RuntimeError, match="`s` must have dtype"):
        op(x, v, torch.zeros((), dtype=torch.float64), torch.ones(()))
    with pytest.raises(RuntimeError, match="`t` must be a scalar tensor or have shape"):
        op(x, v, torch.zeros(()), torch.ones(3))
    with pytest.raises(RuntimeError, match="`s` must be a scalar tensor or have shape"):
        op(x, v, torch.zeros(4, 1), torch.ones(()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_odd_rows_take_the_scalar_path(device, dtype):
    # storage offset 1 breaks 16-byte alignment; inner = 13 is no multiple of any vector width
    buf = torch.randn(1 + 5 * 13, device=device).to(dtype)
    x = buf[1:].view(5, 13)
    v = torch.randn(5, 13, device=device).to(dtype)
    s = torch.rand(5, device=device, dtype=time_dtype(dtype))
    t = s + 0.5
    torch.testing.assert_close(ops.flowmap_step(x, v, s, t).double(), reference.flowmap_step(x, v, s, t).double(),
                               rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
def test_cuda_rejects_times_on_another_device():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="keep the time grid on the state's device"):
        torch.ops.pyflowmap.flowmap_step(x, x, torch.zeros(()), torch.ones((), device="cuda"))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
def test_cuda_graph_capture_replays_the_step():
    x = torch.randn(256, 37, device="cuda")
    v = torch.randn(256, 37, device="cuda")
    s = torch.rand(256, device="cuda")
    t = s + 0.3
    ops.flowmap_step(x, v, s, t)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.flowmap_step(x, v, s, t)
    x.copy_(torch.randn_like(x))
    t.fill_(0.9)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference.flowmap_step(x, v, s, t))
