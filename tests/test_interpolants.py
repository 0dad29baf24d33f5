import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyflowmap as pf
from pyflowmap.interpolants import make_interpolant


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_endpoints_and_derivative(name):
    it = make_interpolant(name)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(it.interpolate(x0, x1, torch.zeros(6, dtype=torch.float64)), x0)
    torch.testing.assert_close(it.interpolate(x0, x1, torch.ones(6, dtype=torch.float64)), x1)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = (it.interpolate(x0, x1, t + h) - it.interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(it.velocity_target(x0, x1, t), fd, rtol=1e-7, atol=1e-8)


@given(st.floats(0, 1))
def test_trig_preserves_variance(t):
    a, b = pf.TrigInterpolant().coefficients(torch.tensor(t, dtype=torch.float64))
    assert math.isclose(float(a**2 + b**2), 1.0, rel_tol=1e-12)


def test_edm_preconditioning_hand_values():
    path = pf.EDMSigmaPath(sigma_data=0.5, sigma_min=0.002)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = path.precondition(sigma)
    # sigma = 0.5 = sigma_data: c_skip = 1/2, c_out = 0.25 / sqrt(0.5), c_in = 1 / sqrt(0.5)
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # the evaluation boundary: f(x, sigma_min) = x exactly
    c_skip, c_out, _, _ = path.precondition(torch.tensor(0.002, dtype=torch.float64), boundary=True)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    x, eps = torch.ones(2, 3), torch.full((2, 3), 2.0)
    torch.testing.assert_close(path.interpolate(eps, x, torch.tensor([0.0, 1.0])), torch.tensor([[1.0] * 3, [3.0] * 3]))


def test_gaussian_base():
    data = torch.randn(10000, 2) * torch.tensor([0.5, 3.0])
    base = pf.GaussianBase.adaptive(data)
    z = base.sample((20000, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 3.0]), rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="positive"):
        pf.GaussianBase(std=-1.0)
    with pytest.raises(ValueError, match="two data samples"):
        pf.GaussianBase.adaptive(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="unknown interpolant"):
        make_interpolant("cubic")
    with pytest.raises(ValueError, match="sigma_min"):
        pf.EDMSigmaPath(sigma_min=1.0, sigma_max=0.5)
