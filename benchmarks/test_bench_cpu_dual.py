"""CPU: the explicit-tangent (dual) path against torch.func.jvp on stock layers, eager PyTorch
and torch.compile, side by side in one run.

    python -m pytest benchmarks/test_bench_cpu_dual.py --benchmark-json runs/bench_dual.json
    python benchmarks/report.py runs/bench_dual.json --baseline fused
"""

import pytest
import torch
import torch.nn.functional as F

import pyflowmap as pf
from pyflowmap import ops, reference
from pyflowmap.data import sample_data

from conftest import bench
from models import PlainMLP, paper_mlp, train_step

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


@pytest.mark.parametrize("eta", [0.75, 0.0], ids=["eta0.75", "eta0"])
@pytest.mark.parametrize("variant", ["fused", "jvp", "reference", "fm-step"])
def test_lsd_step(benchmark, variant, eta):
    """One LSD training step (forward, tangent, backward, RAdam) of the 4 x 512 MLP at batch 4096."""
    if variant == "fm-step" and eta == 0.0:
        pytest.skip("the FM step has no off-diagonal part")
    benchmark.group = f"LSD step 4x512 MLP, batch {B}, diag fraction {eta} (cpu)"
    step = lsd_step("dual" if variant in ("fused", "reference") else variant, eta)
    with pf.nn.reference_ops(variant == "reference"):
        bench(benchmark, step, "cpu", inner=1)


@pytest.mark.parametrize("variant", ["fused", "jvp", "two-primal", "one-primal"])
def test_dual_forward(benchmark, variant):
    """Forward with the tangent in t, no grad: dual vs torch.func.jvp vs two primal forwards."""
    net = paper_mlp()
    plain = PlainMLP(net)
    x = sample_data("checker", B, generator=torch.Generator().manual_seed(0))
    s, t = torch.rand(B) * 0.5, 0.5 + torch.rand(B) * 0.5
    one = torch.ones(B)
    fns = {
        "fused": lambda: net(x, s, t, tangents=(None, None, one)),
        "jvp": lambda: torch.func.jvp(plain, (x, s, t), (torch.zeros_like(x), torch.zeros_like(s), one)),
        "two-primal": lambda: (net(x, s, t), net(x, s, t)),
        "one-primal": lambda: net(x, s, t),
    }
    benchmark.group = f"MLP 4x512 forward + tangent, batch {B}, no grad (cpu)"
    with torch.no_grad():
        bench(benchmark, fns[variant], "cpu", inner=3)


def _eager_loss(p, t):
    return (p - t).pow(2).reshape(p.shape[0], -1).sum(1).mean()


_compiled = {}


@pytest.mark.parametrize("shape", [(4096, 784), (65536, 2)], ids=["4096x784", "65536x2"])
@pytest.mark.parametrize("variant", ["fused", "eager", "compile", "reference", "copy-floor"])
def test_loss_fwd_bwd(benchmark, shape, variant):
    """The FM/LSD squared-residual loss, forward + backward w.r.t. pred."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=g).requires_grad_()
    target = torch.randn(shape, generator=g)
    n_bytes = 5 * pred.numel() * 4  # fwd reads pred, target; bwd reads both, writes the grad
    benchmark.group = f"flow-map loss fwd+bwd {shape[0]}x{shape[1]} fp32 (cpu)"
    if variant == "copy-floor":
        src, dst = torch.empty(int(2.5 * pred.numel())), torch.empty(int(2.5 * pred.numel()))
        bench(benchmark, lambda: dst.copy_(src), "cpu", bytes=n_bytes)
        return
    if variant == "compile":
        fn = _compiled.setdefault(shape, torch.compile(_eager_loss))
    else:
        fn = {"fused": lambda p, t: ops.flowmap_loss(p, t)[0], "eager": _eager_loss,
              "reference": lambda p, t: reference.flowmap_loss(p, t)[0]}[variant]
    bench(benchmark, lambda: torch.autograd.grad(fn(pred, target), pred), "cpu", bytes=n_bytes)


@pytest.mark.parametrize("variant", ["fused", "reference", "plain-gelu-x2", "copy-floor"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dual_gelu(benchmark, variant, direction):
    """Dual GELU on stacked [8192, 512] (two halves of 4096 x 512)."""
    g = torch.Generator().manual_seed(0)
    zz, grad = torch.randn(8192, 512, generator=g), torch.randn(8192, 512, generator=g)
    benchmark.group = f"dual GELU {direction} 2x4096x512 fp32 (cpu)"
    n = zz.numel()
    if variant == "copy-floor":
        k = 2 if direction == "forward" else 3  # streams of the fused op: in+out (+grad)
        src, dst = torch.empty(k * n // 2), torch.empty(k * n // 2)
        return bench(benchmark, lambda: dst.copy_(src), "cpu", bytes=k * n * 4)
    if direction == "forward":
        fn = {"fused": lambda: ops.dual_act(zz), "reference": lambda: reference.dual_act(zz),
              "plain-gelu-x2": lambda: (F.gelu(zz), F.gelu(zz))}[variant]
    else:
        fn = {"fused": lambda: torch.ops.pyflowmap.dual_act_backward(grad, zz, "gelu"),
              "reference": lambda: reference.dual_act_backward(grad, zz),
              "plain-gelu-x2": lambda: (torch.ops.aten.gelu_backward(grad, zz),) * 2}[variant]
    bench(benchmark, fn, "cpu", bytes=(2 if direction == "forward" else 3) * n * 4)


@pytest.mark.parametrize("variant", ["fused", "reference", "plain-layer-norm-x2"])
def test_dual_layer_norm_fwd_bwd(benchmark, variant):
    """Dual LayerNorm with affine on stacked [8192, 512], forward + backward through both halves."""
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(8192, 512, generator=g).requires_grad_()
    w, b = (torch.randn(512, generator=g).requires_grad_() for _ in range(2))
    gout = torch.randn(8192, 512, generator=g)
    benchmark.group = "dual LayerNorm fwd+bwd 2x4096x512 fp32 (cpu)"
    if variant == "plain-layer-norm-x2":  # what two ordinary LayerNorms cost
        fn = lambda: torch.autograd.grad(F.layer_norm(xx, (512,), w, b), (xx, w, b), gout)  # noqa: E731
    else:
        op = ops.dual_layer_norm if variant == "fused" else reference.dual_layer_norm
        fn = lambda: torch.autograd.grad(op(xx, (512,), w, b), (xx, w, b), gout)  # noqa: E731
    bench(benchmark, fn, "cpu")
