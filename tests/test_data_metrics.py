"""2D data and metrics: the checker's exact geometry, the KL estimator, two-sample distances."""

import math

import pytest
import torch

from pyflowmap.toy2d import data, metrics


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_checker_matches_its_definition_and_density():
    x = data.checker(200_000, generator=gen())
    assert x.shape == (200_000, 2)
    assert (x >= -4).all() and (x < 4).all()
    assert (data.checker_density(x) > 0).all()  # every sample on a light square
    # each of the 8 light squares gets 1/8 of the mass
    cell = (torch.floor(x[:, 0] / 2) + 2) * 4 + (torch.floor(x[:, 1] / 2) + 2)
    counts = torch.bincount(cell.long(), minlength=16).float() / x.shape[0]
    light = counts[counts > 0]
    assert light.numel() == 8
    torch.testing.assert_close(light, torch.full((8,), 1 / 8), atol=0.005, rtol=0)
    # the density integrates to one over [-4, 4]^2 (midpoint rule on a fine grid)
    c = (torch.arange(400) + 0.5) / 50 - 4
    grid = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    assert math.isclose(float(data.checker_density(grid).sum() * (8 / 400) ** 2), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_datasets_are_seeded_and_bounded(name):
    a = data.sample_data(name, 1000, generator=gen(3))
    b = data.sample_data(name, 1000, generator=gen(3))
    assert torch.equal(a, b) and a.shape == (1000, 2)
    assert torch.isfinite(a).all() and a.abs().max() < 6
    assert data.sample_data(name, 0).shape == (0, 2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.sample_data("mnist", 10)


def test_checker_kl_floor_and_sensitivity():
    floor = metrics.checker_kl_floor(65536)
    assert 0 < floor < 0.01  # about (512 - 1) / (2 * 65536)
    gauss = torch.randn(65536, 2, generator=gen(1)) * 2.3
    assert metrics.checker_kl(gauss) > 0.5
    # moving 10% of the mass onto dark squares costs at least -log(0.9)
    x = data.checker(65536, generator=gen(2))
    x[:6554, 1] += 2.0  # shift up one square: light -> dark (and some outside)
    assert metrics.checker_kl(x) > floor - math.log(0.9) - 1e-3


def test_checker_kl_rejects_bad_samples():
    with pytest.raises(ValueError, match="NaN"):
        metrics.checker_kl(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="shape"):
        metrics.checker_kl(torch.zeros(5))
    with pytest.raises(ValueError, match="at least one"):
        metrics.checker_kl(torch.zeros(0, 2))


def test_energy_distance_and_mmd():
    a = data.sample_data("moons", 3000, generator=gen(0))
    b = data.sample_data("moons", 3000, generator=gen(1))
    c = data.sample_data("spiral", 3000, generator=gen(2))
    same_e, diff_e = metrics.energy_distance(a, b), metrics.energy_distance(a, c)
    same_m, diff_m = metrics.mmd(a, b), metrics.mmd(a, c)
    assert abs(same_e) < 0.01 and diff_e > 0.1
    assert abs(same_m) < 0.005 and diff_m > 0.05
    # a shift by delta changes the energy distance by about 2 |delta| for small delta... and grows
    assert metrics.energy_distance(a, a + 0.5) > metrics.energy_distance(a, a + 0.1) > 0
