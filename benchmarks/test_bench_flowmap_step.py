"""flowmap_step (the sampler update x + (t - s) v): fused op vs eager PyTorch, torch.compile,
the reference twin, and the memory floor (a device copy of the same bytes).

    python -m pytest benchmarks/test_bench_flowmap_step.py --benchmark-json runs/bench_step.json
    python benchmarks/report.py runs/bench_step.json

One test per (shape, dtype, device): its variants interleaved round by round (benchmarks/harness.py).
"""

import pytest
import torch
from conftest import clone_floor, copy_floor
from harness import compare

from pyflowmap import ops, reference

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
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flowmap_step(benchmark, device, shape, dtype):
    x, v, s, t = inputs(SHAPES[shape], device, dtype)
    n_bytes = 3 * x.numel() * x.element_size()  # read x, v; write out
    benchmark.group = f"flowmap_step {shape} {str(dtype).split('.')[-1]} {device}"
    skipped = {}
    fns = {name: (lambda fn=fn: fn(x, v, s, t)) for name, fn in VARIANTS.items()}
    if device == "cpu" and dtype == torch.bfloat16:
        del fns["compile"]
        skipped["compile"] = "inductor bf16 CPU codegen is not what users run"
    # a copy of 1.5x the tensor moves the same bytes (read + write) as the op's 3 streams;
    # the clone pays for a fresh output as the out-of-place op does
    fns["copy-floor"] = copy_floor(1.5 * x.numel(), device, dtype)
    fns["clone-floor"] = clone_floor(1.5 * x.numel(), device, dtype)
    compare(benchmark, fns, device, bytes=n_bytes, skipped=skipped)
