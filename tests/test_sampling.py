"""Samplers: exact on the closed-form map, convergence orders of Euler and Heun, bad input."""

import pytest
import torch

import pyflowmap as pf
from tests.helpers import GaussianFlowMap

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
def test_sampling_in_low_precision_runs_the_fused_update(dtype):
    net = pf.nn.FlowMapMLP(hidden=16, depth=1).to(dtype)
    x = pf.sample(pf.FlowMap(net), torch.randn(7, 2, dtype=dtype), steps=3)
    assert x.dtype == dtype and x.shape == (7, 2)


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
