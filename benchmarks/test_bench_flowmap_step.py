"""flowmap_step (the sampler update x + (t - s) v): fused op vs eager PyTorch, torch.compile,
the reference twin, and the memory floor (a device copy of the same bytes).

    python -m pytest benchmarks/test_bench_flowmap_step.py --benchmark-json runs/bench_step.json
    python benchmarks/report.py runs/bench_step.json
"""

import pytest
import torch

from pyflowmap import ops, reference

from conftest import bench

SHAPES = {
    "2d-64k": (65536, 2),             # the 2D sampler at evaluation size
    "mnist-1k": (1024, 1, 28, 28),    # a batch of digits
    "img-64x3x128": (64, 3, 128, 128),  # 3.1 M elements
    "img-64x3x256": (64, 3, 256, 256),  # 12.6 M elements: 150 MB moved in fp32, far past every cache
}


def eager(x, v, s, t):
    return x + (t - s).reshape(-1, *([1] * (x.dim() - 1))) * v


_compiled = {}


def compiled(x, v, s, t):
    key = (x.dim(), x.device.type, x.dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager, dynamic=False)
    return _compiled[key](x, v, s, t)


VARIANTS = {
    "fused": ops.flowmap_step,
    "eager": eager,
    "compile": compiled,
    "reference": reference.flowmap_step,
}


def inputs(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    s = torch.rand(shape[0], generator=g).to(device)
    t = (s + 0.25).to(device)
    return x, v, s, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS) + ["copy-floor", "clone-floor"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flowmap_step(benchmark, device, shape, variant, dtype):
    if device == "cpu" and dtype == torch.bfloat16 and variant == "compile":
        pytest.skip("inductor bf16 CPU codegen is not what users run")
    x, v, s, t = inputs(SHAPES[shape], device, dtype)
    n_bytes = 3 * x.numel() * x.element_size()  # read x, v; write out
    benchmark.group = f"flowmap_step {shape} {str(dtype).split('.')[-1]} {device}"
    if variant == "copy-floor":
        # a copy of 1.5x the tensor moves the same bytes (read + write) as the op's 3 streams
        src = torch.empty(int(1.5 * x.numel()), device=device, dtype=dtype)
        dst = torch.empty_like(src)
        bench(benchmark, lambda: dst.copy_(src), device, bytes=n_bytes)
        return
    if variant == "clone-floor":
        # the same bytes into a fresh allocation, as an out-of-place op pays for its output
        src = torch.empty(int(1.5 * x.numel()), device=device, dtype=dtype)
        bench(benchmark, lambda: src.clone(), device, bytes=n_bytes)
        return
    fn = VARIANTS[variant]
    bench(benchmark, lambda: fn(x, v, s, t), device, bytes=n_bytes)
