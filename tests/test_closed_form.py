"""The exact Gaussian flow map makes every distillation residual vanish; a perturbed one does not."""

import pytest
import torch

import pyflowmap as pf
from pyflowmap.objectives import EulerTeacher
from tests.helpers import GaussianFlowMap

MEAN = [1.5, -0.5, 0.25]
VAR = [0.3, 2.0, 1.0]
BASE_STD = 0.8


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(MEAN, dtype=torch.float64) + torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor(VAR, dtype=torch.float64).sqrt()


def exact(scale=1.0):
    return pf.FlowMap(GaussianFlowMap(MEAN, VAR, BASE_STD, scale=scale))


def distill_residual(objective, flowmap, seed=0):
    out = objective(flowmap, data(seed=seed), generator=torch.Generator().manual_seed(seed))
    return out.per_sample[out.n_diag:]


def objectives(derivative):
    teacher = exact()
    b = teacher.velocity
    base = pf.GaussianBase(BASE_STD)
    common = dict(base=base, derivative=derivative, times=pf.TimeSampler(diag_fraction=0.25))
    return {
        "lsd": pf.objectives.LSD(**common),
        "esd": pf.objectives.ESD(**common),
        "esd-full-gradient": pf.objectives.ESD(spatial_stopgrad=False, **common),
        "psd-u": pf.objectives.PSD(gamma="uniform", **common),
        "psd-m": pf.objectives.PSD(gamma="midpoint", **common),
        "lmd": pf.objectives.LMD(b, **common),
        "lmd-semigradient": pf.objectives.LMD(b, semigradient=True, **common),
        "emd": pf.objectives.EMD(b, **common),
        "emd-semigradient": pf.objectives.EMD(b, semigradient=True, **common),
        "pfmm": pf.objectives.PFMM(teacher, **common),
    }


DERIVATIVE_TOL = {"jvp": 1e-20, "fd": 1e-12}


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
@pytest.mark.parametrize("name", list(objectives("jvp")))
def test_exact_map_has_zero_residual(name, derivative):
    objective = objectives(pf.FiniteDifference(h=1e-4, dtype=torch.float64) if derivative == "fd" else derivative)[name]
    res = distill_residual(objective, exact())
    assert res.numel() > 100
    tol = 1e-20 if name.startswith("psd") or name == "pfmm" else DERIVATIVE_TOL[derivative]
    assert res.max().item() < tol, f"{name}: max residual {res.max().item():.3e}"


@pytest.mark.parametrize("name", list(objectives("jvp")))
def test_perturbed_map_has_nonzero_residual(name):
    objective = objectives("jvp")[name]
    res = distill_residual(objective, exact(scale=1.3))
    assert res.mean().item() > 1e-3, f"{name}: perturbation went unnoticed ({res.mean().item():.3e})"


def test_exact_velocity_is_the_conditional_expectation():
    # FM's minimizer: the diagonal of the exact map must beat a perturbed velocity on FM loss
    fm = pf.objectives.FM(base=pf.GaussianBase(BASE_STD))
    x1 = data(n=20000)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    good = fm(exact(), x1, generator=g()).loss.item()

    class Shifted(GaussianFlowMap):
        def velocity(self, x, t):
            return super().velocity(x, t) + 0.2

    bad = fm(pf.FlowMap(Shifted(MEAN, VAR, BASE_STD)), x1, generator=g()).loss.item()
    assert good < bad - 0.1


def test_euler_teacher_is_not_exact_but_its_residual_is_the_euler_gap():
    obj = pf.objectives.PFMM(exact().velocity, base=pf.GaussianBase(BASE_STD),
                             times=pf.TimeSampler(diag_fraction=0.0))
    assert isinstance(obj.teacher, EulerTeacher)
    res = distill_residual(obj, exact())
    assert res.mean().item() > 1e-4  # two Euler steps differ from the exact jump


def test_one_step_sampling_of_exact_map_transports_base_to_data():
    fm = exact()
    g = torch.Generator().manual_seed(0)
    z = BASE_STD * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    x = pf.sample(fm, z, steps=1)
    torch.testing.assert_close(x.mean(0), torch.tensor(MEAN, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor(VAR, dtype=torch.float64), atol=0.03, rtol=0.02)
    # composition over any grid equals the single jump (semigroup)
    torch.testing.assert_close(pf.sample(fm, z[:1000], grid=[0.0, 0.3, 0.35, 1.0]), x[:1000])
