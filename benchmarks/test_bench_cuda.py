"""GPU: fused losses, the dual path and graph-captured sampling, side by side in one run
(skipped without a CUDA build and device).

    python -m pytest benchmarks/test_bench_cuda.py --benchmark-json runs/bench_cuda.json
    python benchmarks/report.py runs/bench_cuda.json

Each test is one comparison group, its variants interleaved round by round (benchmarks/harness.py).
"""

import pytest
import torch
from conftest import DEVICES, copy_floor
from harness import compare
from models import PlainMLP, paper_mlp, train_step

import pyflowmap as pf
from pyflowmap import ops
from pyflowmap.toy2d.data import sample_data

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
DEV = "cuda"


def _eager_loss(p, t):
    return (p - t).pow(2).reshape(p.shape[0], -1).sum(1).mean()


_compiled = {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_fwd_bwd(benchmark, dtype):
    """(a) the flow-map loss forward + backward at 65536 x 784 (200 MB per fp32 stream):
    fused vs eager vs torch.compile vs a copy of the same bytes."""
    pred = torch.randn(65536, 784, device=DEV, dtype=dtype).requires_grad_()
    target = torch.randn(65536, 784, device=DEV, dtype=dtype)
    n_bytes = 5 * pred.numel() * pred.element_size()  # fwd reads 2 streams; bwd reads 2, writes 1
    benchmark.group = f"flow-map loss fwd+bwd 65536x784 {str(dtype).split('.')[-1]} (cuda)"
    losses = {"fused": lambda p, t: ops.flowmap_loss(p, t)[0], "eager": _eager_loss,
              "compile": _compiled.setdefault(dtype, torch.compile(_eager_loss))}
    fns = {k: (lambda f=f: torch.autograd.grad(f(pred, target), pred)) for k, f in losses.items()}
    fns["copy-floor"] = copy_floor(2.5 * pred.numel(), DEV, dtype)
    compare(benchmark, fns, DEV, bytes=n_bytes)


def _mlp(batch):
    net = paper_mlp().to(DEV)
    x = sample_data("checker", batch, generator=torch.Generator().manual_seed(0)).to(DEV)
    s, t = torch.rand(batch, device=DEV) * 0.5, 0.5 + torch.rand(batch, device=DEV) * 0.5
    return net, x, s, t


def _unet(batch):
    torch.manual_seed(0)
    net = pf.nn.UNetFlowMap(ch=64, emb_dim=64).to(DEV)
    torch.nn.init.normal_(net.out.weight, std=0.01)
    x = torch.randn(batch, 1, 28, 28, device=DEV)
    s, t = torch.rand(batch, device=DEV) * 0.5, 0.5 + torch.rand(batch, device=DEV) * 0.5
    return net, x, s, t


@pytest.mark.parametrize("model", ["mlp-100k", "unet-256"])
def test_forward_tangent(benchmark, model):
    """(b) forward + tangent in t, no grad: dual vs two primal forwards vs torch.func.jvp."""
    net, x, s, t = _mlp(100_000) if model == "mlp-100k" else _unet(256)
    fwd = PlainMLP(net).to(DEV) if model == "mlp-100k" else net  # jvp on stock layers where they exist
    one = torch.ones_like(t)
    fns = {
        "two-primal": lambda: (net(x, s, t), net(x, s, t)),
        "fused": lambda: net(x, s, t, tangents=(None, None, one)),
        "jvp": lambda: torch.func.jvp(fwd, (x, s, t), (torch.zeros_like(x), torch.zeros_like(s), one)),
    }
    benchmark.group = f"forward + tangent, {model} (cuda)"
    with torch.no_grad():
        compare(benchmark, fns, DEV, baseline="two-primal", inner=10)


def _lsd_step(model, variant):
    """One LSD step with all samples off-diagonal, on its own freshly built network."""
    if model == "mlp-100k":
        net, _, _, _ = _mlp(8)
        x1 = sample_data("checker", 100_000, generator=torch.Generator().manual_seed(0)).to(DEV)
        fm = pf.FlowMap(PlainMLP(net).to(DEV) if variant == "jvp" else net)
    else:
        net, x1, _, _ = _unet(128)
        fm = pf.FlowMap(net)  # primal mode: torch.func.jvp runs its forward-AD rules
    objective = pf.make_objective("lsd", derivative="jvp" if variant == "jvp" else "dual",
                                  times=pf.TimeSampler(diag_fraction=0.0))
    return train_step(objective, fm, x1, torch.Generator(device=DEV))


@pytest.mark.parametrize("model", ["mlp-100k", "unet-128"])
def test_lsd_step(benchmark, model):
    """(c) one LSD training step, all samples off-diagonal: dual fused vs torch.func.jvp."""
    benchmark.group = f"LSD step, {model}, all off-diagonal (cuda)"
    compare(benchmark, {v: _lsd_step(model, v) for v in ("fused", "jvp")}, DEV, inner=3)


@pytest.mark.parametrize("batch", [1, 1024])
def test_sampling_8_steps(benchmark, batch):
    """(d) 8-step flow-map sampling: the whole loop in one CUDA graph vs eager; per-step
    overhead = (loop time - 8 network forwards) / 8, from 'one-forward'."""
    net, x, s, t = _mlp(batch)
    fm = pf.FlowMap(net)
    with torch.no_grad():
        fns = {
            "graph": lambda: pf.sample(fm, x, steps=8, graph=True),
            "eager": lambda: pf.sample(fm, x, steps=8),
            "one-forward": lambda: net(x, s, t),
        }
        benchmark.group = f"8-step sampling, batch {batch} (cuda)"
        compare(benchmark, fns, DEV, baseline="graph", inner=50)
