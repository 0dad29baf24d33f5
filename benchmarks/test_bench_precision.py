"""fp32 against bf16 autocast, dual against torch.func.jvp, eager against torch.compile, side by
side in one run (issue 18): the LSD and MeanFlow steps of the paper's MLP (2D, width 512, depth
4) at batch 4096 with every sample off the diagonal, and of the MNIST-5k UNet (ch 32, 28 x 28)
at batch 64.

    mkdir -p runs
    OMP_NUM_THREADS=2 python -m pytest benchmarks/test_bench_precision.py --benchmark-json runs/bench_precision.json \
        -q -p no:cacheprovider
    python benchmarks/report.py runs/bench_precision.json
    python benchmarks/peak_memory.py --precision      # peak step memory of the same variants

One step = the objective's draws, loss and backward (no optimizer), as a trainer runs it.
Variants ``<mode>-<precision>[-compiled]``: ``dual-fp32``, ``jvp-fp32``, ``dual-bf16`` and
``jvp-bf16`` (the step under ``torch.autocast(dtype=bf16)``), and the compiled steps
(``pyflowmap.training.compiled.CompiledLoss``: the loss and its backward as one graph,
compiled in the warm-up; a step it leaves eager, torch.func.jvp's among them, is left out
with its reason). Ratios
are against ``dual-bf16``, or ``dual-fp32`` on a CPU without bf16 units (AVX512-BF16 or AMX),
where PyTorch emulates bf16 GEMMs and convolutions (~80x slower than fp32 for a GEMM) and the
bf16 variants are left out; the machine line of the report names the units.
"""

import warnings

import pytest
import torch
from harness import compare

import pyflowmap as pf
from pyflowmap.training.compiled import CompiledLoss, CompileFallbackWarning
from pyflowmap.training.precision import Precision, cpu_has_bf16_units


def _init(net):
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)  # the zero-initialized head: every layer does real work
    return net


def make_step(model, data, objective_name, derivative, precision, compiled=False, **kw):
    """One training step's work (draws, loss, backward) as a zero-argument callable."""
    device = data.device
    obj = pf.make_objective(objective_name, derivative=derivative, **kw).to(device)
    g = torch.Generator(device=device)
    loss_fn = CompiledLoss(obj, f"{objective_name} ({derivative}, {precision})") if compiled else obj.loss_from_draws
    amp = Precision(precision, device, warn=False)

    def run():
        g.manual_seed(1)
        draws = obj.draw(model, data, generator=g)
        with amp.autocast():
            out = loss_fn(model, data, draws)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return loss_fn

    return run


def _variants(model, data, objective_name, device, **kw):
    """(variants, skipped, baseline): every mode x precision, eager and compiled. The compiled
    ones compile here, once, so a step that falls back is left out with its reason."""
    precisions = ["fp32"]
    skipped = {}
    if torch.device(device).type == "cuda" or cpu_has_bf16_units():
        precisions.insert(0, "bf16")
    else:
        for mode in ("dual", "jvp"):
            for tail in ("", "-compiled"):
                skipped[f"{mode}-bf16{tail}"] = "this CPU has no bf16 units: PyTorch emulates bf16 GEMMs"
    variants = {}
    for p in precisions:
        for d in ("dual", "jvp"):
            variants[f"{d}-{p}"] = make_step(model, data, objective_name, d, p, **kw)
            step = make_step(model, data, objective_name, d, p, compiled=True, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CompileFallbackWarning)
                loss_fn = step()
            if loss_fn.failed:
                skipped[f"{d}-{p}-compiled"] = loss_fn.failed
            else:
                variants[f"{d}-{p}-compiled"] = step
    return variants, skipped, f"dual-{precisions[0]}"


@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_mlp_precision(benchmark, device, objective):
    torch.manual_seed(0)
    model = pf.FlowMap(_init(pf.nn.FlowMapMLP(dim=2, hidden=512, depth=4))).to(device)
    data = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0)).to(device)
    times = pf.TimeSampler(diag_fraction=0.0)
    fns, skipped, baseline = _variants(model, data, objective, device, times=times)
    benchmark.group = f"paper MLP batch 4096 off-diagonal: {objective} step, fp32 vs bf16, eager vs compiled ({device})"
    compare(benchmark, fns, device, baseline=baseline, inner=1 if device == "cpu" else 10, rounds=7, batch=4096,
            skipped=skipped)


@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_unet_precision(benchmark, device, objective):
    batch = 64 if device == "cpu" else 256
    torch.manual_seed(0)
    model = pf.FlowMap(_init(pf.nn.UNetFlowMap(1, ch=32, emb_dim=32, data_std=0.5))).to(device)
    data = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    fns, skipped, baseline = _variants(model, data, objective, device)
    benchmark.group = f"UNet ch 32 28x28 batch {batch}: {objective} step, fp32 vs bf16, eager vs compiled ({device})"
    compare(benchmark, fns, device, baseline=baseline, inner=1 if device == "cpu" else 5, rounds=5, batch=batch,
            skipped=skipped)
