"""Samplers: exact on the closed-form map, convergence orders of Euler and Heun, bad input."""

import pytest
import torch

import pyflowmap as pf
from tests.helpers import GaussianFlowMap, mlp

MEAN, VAR, BASE = [1.0, -2.0], [0.5, 3.0], 1.0


def exact():
    return pf.FlowMap(GaussianFlowMap(MEAN, VAR, BASE))


def noise(n=512, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_flowmap_sampler_matches_the_exact_jump_for_every_grid():
    fm, z = exact(), noise()
    target = fm.net.exact_map(z, torch.zeros(512, dtype=torch.float64), torch.ones(512, dtype=torch.float64))
    for steps in (1, 2, 3, 8):
        torch.testing.assert_close(pf.sample(fm, z, steps=steps), target)
    torch.testing.assert_close(pf.sample(fm, z, grid=[0.0, 0.1, 0.9, 1.0]), target)


def test_trajectory_has_one_state_per_grid_point():
    traj = pf.sample(exact(), noise(10), steps=4, return_trajectory=True)
    assert traj.shape == (5, 10, 2)
    torch.testing.assert_close(traj[0], noise(10))


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_at_their_order(method, order):
    fm, z = exact(), noise()
    target = fm.net.exact_map(z, torch.zeros(512, dtype=torch.float64), torch.ones(512, dtype=torch.float64))
    errs = [(pf.sample_ode(fm, z, steps=k, method=method) - target).abs().max().item() for k in (16, 32, 64)]
    rates = [errs[i] / errs[i + 1] for i in range(2)]
    for r in rates:  # halving the step divides the error by ~2^order
        assert 2 ** order * 0.8 < r < 2 ** order * 1.25, (errs, rates)


def test_ode_sampler_accepts_a_plain_velocity_callable():
    fm, z = exact(), noise(8)
    torch.testing.assert_close(pf.sample_ode(fm.velocity, z, steps=5), pf.sample_ode(fm, z, steps=5))


def test_time_grid():
    g = pf.time_grid(4)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="positive integer"):
        pf.time_grid(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_in_low_precision_runs_the_fused_update(dtype, monkeypatch):
    net = mlp(dtype=dtype)  # a non-zero head: every jump moves the state
    step = pf.ops.flowmap_step.dispatch
    calls = []

    def counted(*args):
        calls.append(args[0].dtype)
        return pf.ops.flowmap_step(*args)

    monkeypatch.setattr(step, "fused", counted)
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = pf.sample(pf.FlowMap(net), z, steps=3)
    assert x.dtype == dtype and x.shape == (7, 2)
    assert calls == [dtype] * 3  # one fused update per jump
    # the same three jumps composed by hand through the twin (times in float32, as the kernel)
    want, grid = z, pf.time_grid(3, dtype=torch.float64)
    for k in range(3):
        s, t = grid[k].to(dtype).expand(7), grid[k + 1].to(dtype).expand(7)
        want = pf.reference.flowmap_step(want, net(want, s, t), s, t)
    assert (want - z).abs().max() > 1e-2
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_bad_sampler_input():
    fm = exact()
    with pytest.raises(ValueError, match="strictly increasing"):
        pf.sample(fm, noise(4), grid=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        pf.sample(fm, noise(4), grid=[0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="at least two"):
        pf.sample(fm, noise(4), grid=[0.0])
    with pytest.raises(ValueError, match="batch"):
        pf.sample(fm, torch.zeros(3, dtype=torch.float64), steps=1)
    with pytest.raises(TypeError, match="floating-point"):
        pf.sample(fm, torch.zeros(3, 2, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="euler"):
        pf.sample_ode(fm, noise(4), steps=2, method="rk4")


def test_consistency_sampler_draws_the_right_distribution():
    fm, g = exact(), torch.Generator().manual_seed(0)
    z = BASE * torch.randn(100_000, 2, generator=g, dtype=torch.float64)
    for grid in ([0.0, 0.5, 1.0], [0.0, 0.4, 0.8, 1.0]):
        x = pf.sample(fm, z, grid=grid, kind="consistency", generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(x.mean(0), torch.tensor(MEAN, dtype=torch.float64), atol=0.03, rtol=0)
        torch.testing.assert_close(x.var(0), torch.tensor(VAR, dtype=torch.float64), atol=0.05, rtol=0.03)
    # one step is the plain jump to the data end
    torch.testing.assert_close(pf.sample(fm, z[:100], steps=1, kind="consistency"), pf.sample(fm, z[:100], steps=1))


def test_consistency_sampler_is_seeded():
    fm, z = exact(), noise(64)
    a = pf.sample(fm, z, steps=3, kind="consistency", generator=torch.Generator().manual_seed(5))
    b = pf.sample(fm, z, steps=3, kind="consistency", generator=torch.Generator().manual_seed(5))
    c = pf.sample(fm, z, steps=3, kind="consistency", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_graph_sampling_needs_cuda_and_rejects_generators():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pf.sample(exact(), noise(4), steps=2, graph=True)
    with pytest.raises(ValueError, match="kind must be one of"):
        pf.sample(exact(), noise(4), steps=2, kind="ddim")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("kind", ["flowmap", "consistency-one-step"])
def test_cuda_graph_sampling_equals_eager(kind):
    steps = 1 if kind == "consistency-one-step" else 4  # deterministic cases
    kind = kind.split("-")[0]
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(hidden=64, depth=3).cuda()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    fm = pf.FlowMap(net)
    for batch in (1, 1024):
        z = torch.randn(batch, 2, device="cuda")
        eager = pf.sample(fm, z, steps=steps, kind=kind)
        graphed = pf.sample(fm, z, steps=steps, kind=kind, graph=True)
        torch.testing.assert_close(graphed, eager)
        z2 = torch.randn(batch, 2, device="cuda")  # replay with new inputs
        torch.testing.assert_close(pf.sample(fm, z2, steps=steps, kind=kind, graph=True),
                                   pf.sample(fm, z2, steps=steps, kind=kind))


@CUDA
def test_cuda_graph_stochastic_consistency_sampling_is_reproducible():
    fm = pf.FlowMap(GaussianFlowMap(MEAN, VAR, BASE)).cuda()
    z = torch.randn(50_000, 2, device="cuda", dtype=torch.float64)
    torch.cuda.manual_seed(3)
    a = pf.sample(fm, z, steps=3, kind="consistency", graph=True)
    torch.cuda.manual_seed(3)
    b = pf.sample(fm, z, steps=3, kind="consistency", graph=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.mean(0).cpu(), torch.tensor(MEAN, dtype=torch.float64), atol=0.05, rtol=0)
