"""The public Python API refuses bad arguments with an exception that names the argument:
times out of range or not finite, unordered pairs, empty or non-finite batches, bad configs."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyflowmap as pf
from pyflowmap.consistency import ECTSchedule
from pyflowmap.flowmap import FlowMap
from pyflowmap.nn.mlp import FlowMapMLP
from pyflowmap.objectives import make_objective
from pyflowmap.sampling import time_grid
from pyflowmap.times import TimeSampler, intermediate_time
from tests.helpers import GaussianFlowMap, mlp

BAD_TIMES = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]),
                      st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
                      st.floats(min_value=1.000001, allow_nan=False, allow_infinity=False))


@pytest.fixture(scope="module")
def fm():
    torch.manual_seed(0)
    return FlowMap(FlowMapMLP(dim=2, hidden=8, depth=1, emb_dim=4)).eval()


@given(bad=BAD_TIMES, where=st.sampled_from(["s", "t"]))
def test_jump_refuses_times_outside_the_unit_interval(fm, bad, where):
    x = torch.randn(3, 2)
    s, t = (bad, 1.0) if where == "s" else (0.0, bad)
    with pytest.raises((ValueError, TypeError), match=rf"\b{where}\b"):
        fm.jump(x, s, t)


@given(bad=BAD_TIMES, pos=st.integers(0, 2))
def test_sampler_grid_must_be_finite_increasing_and_in_range(fm, bad, pos):
    grid = [0.0, 0.5, 1.0]
    grid[pos] = bad
    with pytest.raises(ValueError, match="grid"):
        pf.sample(fm, torch.randn(4, 2), grid=grid)
    with pytest.raises(ValueError, match="grid"):
        pf.sample_ode(fm, torch.randn(4, 2), grid=grid)


@pytest.mark.parametrize("call, match", [
    (lambda fm: pf.sample(fm, torch.randn(4, 2), grid=[0.0, 0.7, 0.3]), "grid must be strictly increasing"),
    (lambda fm: pf.sample(fm, torch.randn(0, 2), steps=2), "noise is an empty batch"),
    (lambda fm: pf.sample(fm, torch.full((4, 2), math.nan), steps=2), "noise contains NaN"),
    (lambda fm: pf.sample(fm, torch.randn(4, 2), steps=0), "steps must be a positive integer"),
    (lambda fm: pf.sample(fm, torch.randn(4, 2), steps=True), "steps must be a positive integer"),
    (lambda fm: pf.sample(fm, torch.randn(4, 2), steps=2, kind="ddim"), "kind must be one of"),
    (lambda fm: pf.sample_ode(fm, torch.randn(4, 2), steps=2, method="rk4"), "method must be"),
    (lambda fm: time_grid(4, 0.8, 0.2), "need t0 < t1"),
    (lambda fm: time_grid(4, 0.0, 1.5), "t1 must lie in"),
    (lambda fm: fm.jump(torch.tensor([[math.nan, 0.0]]), 0.0, 1.0), r"\bx contains NaN"),
    (lambda fm: fm.jump(torch.zeros(3, 2), torch.tensor([0.1, math.nan, 0.2]), 1.0), r"\bs contains NaN"),
    (lambda fm: make_objective("lsd")(fm, torch.full((4, 2), math.inf)), "x1 .* contains NaN or inf"),
    (lambda fm: make_objective("lsd")(fm, torch.zeros(0, 2)), "empty batch"),
    (lambda fm: make_objective("lsd")(fm, torch.zeros(4, 2, dtype=torch.int64)), "x1 must be floating point"),
    (lambda fm: TimeSampler(t_min=-0.1), "t_min"),
    (lambda fm: TimeSampler(t_min=0.6, t_max=0.4), "t_min"),
    (lambda fm: TimeSampler(t_max=2.0), "t_max"),
    (lambda fm: ECTSchedule(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (lambda fm: intermediate_time(torch.zeros(3), torch.ones(3), torch.ones(2)), "share a shape"),
])
def test_bad_arguments_are_named(fm, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(fm)


def test_backward_jump_is_allowed():
    """s > t is the map run backwards (data towards noise), a legitimate use, not an error:
    X_{1,0}(y) = y - v_{1,0}(y), and for the exact flow map it inverts the forward jump."""
    net = mlp(dtype=torch.float32)  # a non-zero head: v != 0, so a wrong update shows
    learned = FlowMap(net).eval()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    y = learned.jump(x, 0.0, 1.0)
    assert (y - x).abs().max() > 1e-2
    back = learned.jump(y, 1.0, 0.0)
    ones, zeros = torch.ones(5), torch.zeros(5)
    torch.testing.assert_close(back, y - net(y, ones, zeros))
    exact = FlowMap(GaussianFlowMap([1.0, -2.0], [0.5, 3.0], 1.0))
    xd = x.double()
    yd = exact.jump(xd, 0.0, 1.0)
    torch.testing.assert_close(yd, exact.net.exact_map(xd, zeros.double(), ones.double()))
    torch.testing.assert_close(exact.jump(yd, 1.0, 0.0), xd)


def test_ect_refuses_negative_iteration_and_nan_data():
    from pyflowmap.consistency import EDMConsistency
    from pyflowmap.nn.unet import UNetFlowMap
    from pyflowmap.objectives import ECT

    model = EDMConsistency(UNetFlowMap(1, ch=8, emb_dim=8, attention=False))
    y = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="iteration"):
        ECT()(model, y, step=-1)
    with pytest.raises(ValueError, match="NaN"):
        ECT()(model, y * math.nan)
    with pytest.raises(TypeError, match="floating point"):
        ECT()(model, y.long())
