"""Classifier-free guidance at sampling (issue 15): one guided flow-map jump on a batch of B
against one network call on the doubled batch 2B, which it is built from, and against the
unguided conditional jump on B.

    python -m pytest benchmarks/test_bench_guidance.py --benchmark-json runs/bench_guidance.json
    python benchmarks/report.py runs/bench_guidance.json

Variants of a group (interleaved round by round, benchmarks/harness.py; no grad):

* ``net-2B`` (baseline): ``net(x2, s2, t2, c=[c; null])`` on prebuilt doubled inputs, the
  network cost a guided step cannot avoid;
* ``guided-jump``: ``FlowMap.jump(x, s, t, c=c, guidance=w)``, what a sampler's step does:
  the label check (one host sync), the doubled batch, the call, the lerp and the fused update;
* ``guided-jump-nocheck``: the same without the host-side checks (``FlowMap._jump``, the
  samplers' inner loop);
* ``cond-jump``: the unguided conditional jump on B (one network call on B);
* ``net-B``: one network call on B.

The issue's target: ``guided-jump`` <= 1.1x ``net-2B``.
"""

import pytest
import torch
from harness import compare

import pyflowmap as pf

W = 3.0  # the guidance scale


def _unet(device):
    """The image app's digits/MNIST model: UNet ch 32, emb 32, attention, 10 classes, 28 x 28, B = 64."""
    torch.manual_seed(0)
    net = pf.nn.UNetFlowMap(channels=1, ch=32, emb_dim=32, attention=True, num_classes=10).to(device)
    torch.nn.init.normal_(net.out.weight, std=0.01)
    return net, torch.randn(64, 1, 28, 28, device=device), 10


def _mlp(device):
    """The 2D paper MLP (4 x 512, GELU), class-conditional on the 8 Gaussians, B = 4096."""
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(dim=2, hidden=512, depth=4, num_classes=8).to(device)
    torch.nn.init.normal_(net.head.weight, std=0.01)
    return net, torch.randn(4096, 2, device=device), 8


MODELS = {"unet-28x28-ch32-b64": _unet, "mlp-2d-4x512-b4096": _mlp}


@pytest.mark.parametrize("model", list(MODELS))
def test_guided_step(benchmark, device, model):
    net, x, k = MODELS[model](device)
    net.eval()
    fm = pf.FlowMap(net)
    B = x.shape[0]
    c = torch.randint(0, k, (B,), generator=torch.Generator().manual_seed(1)).to(device)
    s, t = torch.tensor(0.25, device=device), torch.tensor(0.75, device=device)
    # the doubled inputs of the baseline, built once outside the timing
    x2, c2 = torch.cat([x, x]), torch.cat([c, torch.full_like(c, k)])
    s2, t2 = s.expand(2 * B), t.expand(2 * B)
    sb, tb = s.expand(B), t.expand(B)
    fns = {
        "net-2B": lambda: net(x2, s2, t2, c=c2),
        "guided-jump": lambda: fm.jump(x, s, t, c=c, guidance=W),
        "guided-jump-nocheck": lambda: fm._jump(x, s, t, c, None, W),
        "cond-jump": lambda: fm.jump(x, s, t, c=c),
        "net-B": lambda: net(x, sb, tb, c=c),
    }
    benchmark.group = f"guided jump, {model} ({device})"
    cuda = str(device).startswith("cuda")
    inner = (20 if cuda else 5) if model.startswith("mlp") else (10 if cuda else 1)
    with torch.no_grad():
        # guided == its definition from the doubled call (the figures time the right thing)
        v_c, v_null = net(x2, s2, t2, c=c2).chunk(2)
        torch.testing.assert_close(fns["guided-jump"](), x + 0.5 * (v_null + W * (v_c - v_null)),
                                   rtol=1e-4, atol=1e-4)
        compare(benchmark, fns, device, baseline="net-2B", inner=inner, batch=B, guidance=W)
