"""CPU: the explicit-tangent (dual) path against torch.func.jvp on stock layers, eager PyTorch
and torch.compile, side by side in one run.

    python -m pytest benchmarks/test_bench_cpu_dual.py --benchmark-json runs/bench_dual.json
    python benchmarks/report.py runs/bench_dual.json

Each test is one comparison group, its variants interleaved round by round (benchmarks/harness.py).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_floor
from harness import compare
from models import PlainMLP, paper_mlp, train_step

import pyflowmap as pf
from pyflowmap import ops, reference
from pyflowmap.toy2d.data import sample_data

B = 4096  # the measurement batch (the paper trains at 100k)


def lsd_step(variant, eta):
    net = paper_mlp()
    if variant == "jvp":  # (a) torch.func.jvp + autograd on stock nn.Linear/nn.GELU
        fm, derivative = pf.FlowMap(PlainMLP(net)), "jvp"
    else:  # (b) pyflowmap dual: explicit tangents through the fused ops
        fm, derivative = pf.FlowMap(net), "dual"
    name = "fm" if variant == "fm-step" else "lsd"
    kw = {} if name == "fm" else {"times": pf.TimeSampler(diag_fraction=eta)}
    objective = pf.make_objective(name, derivative=derivative, **kw)
    x1 = sample_data("checker", B, generator=torch.Generator().manual_seed(0))
    return train_step(objective, fm, x1, torch.Generator())


def _with_reference_ops(fn):
    """``fn`` run through the pure-PyTorch twins (process-wide switch, set per call)."""

    def run():
        with pf.nn.reference_ops(True):
            return fn()

    return run


@pytest.mark.parametrize("eta", [0.75, 0.0], ids=["eta0.75", "eta0"])
def test_lsd_step(benchmark, eta):
    """One LSD training step (forward, tangent, backward, RAdam) of the 4 x 512 MLP at batch 4096:
    fused dual vs torch.func.jvp vs the reference twins (and the FM step at diag fraction 0.75)."""
    benchmark.group = f"LSD step 4x512 MLP, batch {B}, diag fraction {eta} (cpu)"
    variants = {"fused": lsd_step("dual", eta), "jvp": lsd_step("jvp", eta),
                "reference": _with_reference_ops(lsd_step("dual", eta))}
    if eta > 0:  # the FM step has no off-diagonal part
        variants["fm-step"] = lsd_step("fm-step", eta)
    compare(benchmark, variants, "cpu", inner=1)


def test_dual_forward(benchmark):
    """Forward with the tangent in t, no grad: dual vs torch.func.jvp vs two primal forwards."""
    net = paper_mlp()
    plain = PlainMLP(net)
    x = sample_data("checker", B, generator=torch.Generator().manual_seed(0))
    s, t = torch.rand(B) * 0.5, 0.5 + torch.rand(B) * 0.5
    one = torch.ones(B)
    fns = {
        "two-primal": lambda: (net(x, s, t), net(x, s, t)),
        "fused": lambda: net(x, s, t, tangents=(None, None, one)),
        "jvp": lambda: torch.func.jvp(plain, (x, s, t), (torch.zeros_like(x), torch.zeros_like(s), one)),
        "one-primal": lambda: net(x, s, t),
    }
    benchmark.group = f"MLP 4x512 forward + tangent, batch {B}, no grad (cpu)"
    with torch.no_grad():
        compare(benchmark, fns, "cpu", baseline="two-primal", inner=3)


def _eager_loss(p, t):
    return (p - t).pow(2).reshape(p.shape[0], -1).sum(1).mean()


_compiled = {}


@pytest.mark.parametrize("shape", [(4096, 784), (65536, 2)], ids=["4096x784", "65536x2"])
def test_loss_fwd_bwd(benchmark, shape):
    """The FM/LSD squared-residual loss, forward + backward w.r.t. pred: fused vs eager,
    torch.compile, the reference twin and a copy of the same bytes."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=g).requires_grad_()
    target = torch.randn(shape, generator=g)
    n_bytes = 5 * pred.numel() * 4  # fwd reads pred, target; bwd reads both, writes the grad
    benchmark.group = f"flow-map loss fwd+bwd {shape[0]}x{shape[1]} fp32 (cpu)"
    losses = {"fused": lambda p, t: ops.flowmap_loss(p, t)[0], "eager": _eager_loss,
              "compile": _compiled.setdefault(shape, torch.compile(_eager_loss)),
              "reference": lambda p, t: reference.flowmap_loss(p, t)[0]}
    fns = {k: (lambda f=f: torch.autograd.grad(f(pred, target), pred)) for k, f in losses.items()}
    fns["copy-floor"] = copy_floor(2.5 * pred.numel())
    compare(benchmark, fns, "cpu", bytes=n_bytes)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dual_gelu(benchmark, direction):
    """Dual GELU on stacked [8192, 512] (two halves of 4096 x 512)."""
    g = torch.Generator().manual_seed(0)
    zz, grad = torch.randn(8192, 512, generator=g), torch.randn(8192, 512, generator=g)
    benchmark.group = f"dual GELU {direction} 2x4096x512 fp32 (cpu)"
    n = zz.numel()
    k = 2 if direction == "forward" else 3  # streams of the fused op: in+out (+grad)
    if direction == "forward":
        fns = {"fused": lambda: ops.dual_act(zz), "reference": lambda: reference.dual_act(zz),
               "plain-gelu-x2": lambda: (F.gelu(zz), F.gelu(zz))}
    else:
        fns = {"fused": lambda: torch.ops.pyflowmap.dual_act_backward(grad, zz, "gelu"),
               "reference": lambda: reference.dual_act_backward(grad, zz),
               "plain-gelu-x2": lambda: (torch.ops.aten.gelu_backward(grad, zz),) * 2}
    fns["copy-floor"] = copy_floor(k * n // 2)
    compare(benchmark, fns, "cpu", bytes=k * n * 4)


def test_dual_layer_norm_fwd_bwd(benchmark):
    """Dual LayerNorm with affine on stacked [8192, 512], forward + backward through both halves."""
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(8192, 512, generator=g).requires_grad_()
    w, b = (torch.randn(512, generator=g).requires_grad_() for _ in range(2))
    gout = torch.randn(8192, 512, generator=g)
    benchmark.group = "dual LayerNorm fwd+bwd 2x4096x512 fp32 (cpu)"
    norms = {"fused": ops.dual_layer_norm, "reference": reference.dual_layer_norm,
             "plain-layer-norm-x2": F.layer_norm}  # what two ordinary LayerNorms cost
    fns = {k: (lambda op=op: torch.autograd.grad(op(xx, (512,), w, b), (xx, w, b), gout)) for k, op in norms.items()}
    compare(benchmark, fns, "cpu")
