"""fp32 against bf16 autocast, dual against torch.func.jvp, side by side in one run (issue 18):
the LSD and MeanFlow steps of the paper's MLP (2D, width 512, depth 4) at batch 4096 with every
sample off the diagonal, and the LSD step of the MNIST-5k UNet (ch 32, 28 x 28) at batch 64.

    mkdir -p runs
    OMP_NUM_THREADS=2 python -m pytest benchmarks/test_bench_precision.py --benchmark-json runs/bench_precision.json \
        -q -p no:cacheprovider
    python benchmarks/report.py runs/bench_precision.json

One step = loss + backward (no optimizer). Variants ``<mode>-<precision>``: ``dual-fp32``,
``jvp-fp32``, ``dual-bf16`` and ``jvp-bf16`` (the step under ``torch.autocast(dtype=bf16)``).
Ratios are against ``dual-bf16``. bf16 speed depends on the CPU's bf16 units (AVX512-BF16 or
AMX); the machine line of the report names them. Compiled steps are not here yet: the
objectives' generator draws break Dynamo's graph (docs/precision.md).
"""

import contextlib

import pytest
import torch
from conftest import DEVICES
from harness import compare

import pyflowmap as pf


def _init(net):
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)  # the zero-initialized head: every layer does real work
    return net


def _variants(model, data, objective_name, device, **kw):
    def step(derivative, precision):
        obj = pf.make_objective(objective_name, derivative=derivative, **kw).to(device)
        g = torch.Generator(device=device)
        amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())

        def run():
            g.manual_seed(1)
            with amp:
                out = obj(model, data, generator=g)
            model.zero_grad(set_to_none=True)
            out.loss.backward()
        return run

    return {f"{d}-{p}": step(d, p) for p in ("bf16", "fp32") for d in ("dual", "jvp")}


@pytest.mark.skipif("cpu" not in DEVICES, reason="PYFLOWMAP_BENCH_DEVICES leaves out the CPU")
@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_mlp_precision_cpu(benchmark, objective):
    torch.manual_seed(0)
    model = pf.FlowMap(_init(pf.nn.FlowMapMLP(dim=2, hidden=512, depth=4)))
    data = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    times = pf.TimeSampler(diag_fraction=0.0)
    fns = _variants(model, data, objective, "cpu", times=times)
    benchmark.group = f"paper MLP batch 4096 off-diagonal: {objective} step, fp32 vs bf16 autocast (cpu)"
    compare(benchmark, fns, "cpu", baseline="dual-bf16", inner=1, rounds=7, batch=4096)


@pytest.mark.skipif("cpu" not in DEVICES, reason="PYFLOWMAP_BENCH_DEVICES leaves out the CPU")
def test_unet_precision_cpu(benchmark):
    torch.manual_seed(0)
    model = pf.FlowMap(_init(pf.nn.UNetFlowMap(1, ch=32, emb_dim=32, data_std=0.5)))
    data = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fns = _variants(model, data, "lsd", "cpu")
    benchmark.group = "UNet ch 32 28x28 batch 64: LSD step, fp32 vs bf16 autocast (cpu)"
    compare(benchmark, fns, "cpu", baseline="dual-bf16", inner=1, rounds=5, batch=64)
