"""sCT, sCD and shortcut training steps on the image UNet, side by side in one run with the FM
step (issue 17's targets: dual at least 1.3x faster than torch.func.jvp, and no slower than 1.6x
an FM step).

    mkdir -p runs
    OMP_NUM_THREADS=2 python -m pytest benchmarks/test_bench_scm.py --benchmark-json runs/bench_scm.json \
        -q -p no:cacheprovider
    python benchmarks/report.py runs/bench_scm.json

One step = loss + backward (no optimizer) of the MNIST-5k CPU setting's UNet (ch 32, emb 32,
28 x 28, attention at 7 x 7), batch 64, the output layer set to N(0, 0.02) so that every layer
does real work. Variants: ``fm``; ``sct-dual`` / ``sct-jvp`` / ``sct-fd`` (sCT per derivative
mode); ``scd-dual`` / ``scd-jvp`` (sCD from an FM teacher of the same size); ``shortcut``
(three network calls per self-consistency sample, a quarter of the batch). The ratios are
against ``sct-dual``. CUDA (``PYFLOWMAP_BENCH_DEVICES=cuda``): the same at ch 64, batch 256.
"""

import pytest
import torch
from conftest import DEVICES
from harness import compare

import pyflowmap as pf


def _unet(ch, seed, **kw):
    torch.manual_seed(seed)
    net = pf.nn.UNetFlowMap(1, ch=ch, emb_dim=ch, data_std=0.5, **kw)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


def _group(benchmark, device, ch, batch):
    y = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    teacher = pf.FlowMap(_unet(ch, 1).to(device))
    models = {
        "fm": pf.FlowMap(_unet(ch, 0).to(device)),
        "trig": pf.TrigFlowConsistency(_unet(ch, 0).to(device)),
        "shortcut": pf.FlowMap(_unet(ch, 0, step_embedding="dyadic").to(device)),
    }
    objectives = {
        "fm": ("fm", pf.make_objective("fm")),
        "sct-dual": ("trig", pf.make_objective("sct", derivative="dual")),
        "sct-jvp": ("trig", pf.make_objective("sct", derivative="jvp")),
        "sct-fd": ("trig", pf.make_objective("sct", derivative="fd")),
        "scd-dual": ("trig", pf.make_objective("scd", teacher=teacher, derivative="dual")),
        "scd-jvp": ("trig", pf.make_objective("scd", teacher=teacher, derivative="jvp")),
        "shortcut": ("shortcut", pf.make_objective("shortcut")),
    }
    for _, obj in objectives.values():
        obj.to(device)

    def step(model_key, obj):
        model, g = models[model_key], torch.Generator(device=device)

        def run():
            g.manual_seed(1)
            out = obj(model, y, generator=g, step=10_000)
            model.zero_grad(set_to_none=True)
            out.loss.backward()
        return run

    fns = {name: step(key, obj) for name, (key, obj) in objectives.items()}
    benchmark.group = f"UNet ch {ch} 28x28 batch {batch}: sCT / sCD / shortcut step vs FM ({device})"
    cuda = torch.device(device).type == "cuda"
    compare(benchmark, fns, device, baseline="sct-dual", inner=3 if cuda else 1, rounds=10 if cuda else 5,
            batch=batch, ch=ch)


@pytest.mark.skipif("cpu" not in DEVICES, reason="PYFLOWMAP_BENCH_DEVICES leaves out the CPU")
def test_scm_shortcut_steps_cpu(benchmark):
    _group(benchmark, "cpu", 32, 64)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
def test_scm_shortcut_steps_cuda(benchmark):
    _group(benchmark, "cuda", 64, 256)
