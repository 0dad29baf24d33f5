"""Objectives: derivative modes agree, PSD identities, stop-gradient placement, properties."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyflowmap as pf
from pyflowmap.objectives import EMD, ESD, LMD, LSD, PSD
from tests.helpers import GaussianFlowMap, TinyDualNet, mlp

SELF = ["fm", "lsd", "esd", "psd-u", "psd-m"]
FD64 = pf.FiniteDifference(h=1e-5, dtype=torch.float64)


def batch(n=64, dim=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype) * 1.5 + 0.5


def run(objective, flowmap, x1, seed=0):
    return objective(flowmap, x1, generator=torch.Generator().manual_seed(seed))


def grads(flowmap, loss):
    params = [p for p in flowmap.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def assert_grads_close(ga, gb, rtol=1e-6, atol=1e-9):
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- derivative modes --------------------------------------------------------------------------

@pytest.mark.parametrize("name,spatial_stopgrad", [("lsd", None), ("esd", True), ("esd", False)])
def test_jvp_matches_finite_differences_float64(name, spatial_stopgrad):
    fm = pf.FlowMap(mlp())
    kw = {"spatial_stopgrad": spatial_stopgrad} if name == "esd" else {}
    times = pf.TimeSampler(diag_fraction=0.0)
    x1 = batch()
    a = run(pf.make_objective(name, derivative="jvp", times=times, **kw), fm, x1)
    b = run(pf.make_objective(name, derivative=FD64, times=times, **kw), fm, x1)
    torch.testing.assert_close(a.per_sample, b.per_sample, rtol=1e-6, atol=1e-9)
    assert_grads_close(grads(fm, a.loss), grads(fm, b.loss), rtol=1e-5, atol=1e-8)


def test_fd_in_float64_of_a_float32_model_is_accurate():
    fm32 = pf.FlowMap(mlp(dtype=torch.float32))
    fm64 = copy.deepcopy(fm32).double()
    x = batch(dtype=torch.float32)
    s, t = torch.full((64,), 0.2), torch.full((64,), 0.7)
    _, d32 = pf.FiniteDifference(dtype=torch.float64).jvp(fm32, x, s, t, t_dot=torch.ones(64))
    _, exact = pf.JVP().jvp(fm64, x.double(), s.double(), t.double(), t_dot=torch.ones(64, dtype=torch.float64))
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), exact, rtol=1e-5, atol=1e-5)
    # the gradient of an FD tangent reaches the float32 parameters
    g = torch.autograd.grad(d32.sum(), list(fm32.parameters()), allow_unused=True)
    assert any(gi is not None and gi.abs().sum() > 0 for gi in g)


def test_fd_in_bfloat16_would_be_noise_but_fp32_is_not():
    fm = pf.FlowMap(mlp(dtype=torch.float32)).to(torch.bfloat16)
    x = batch(dtype=torch.bfloat16)
    s, t = torch.full((64,), 0.2, dtype=torch.bfloat16), torch.full((64,), 0.7, dtype=torch.bfloat16)
    ones = torch.ones(64, dtype=torch.bfloat16)
    _, d = pf.FiniteDifference(dtype=torch.float32).jvp(fm, x, s, t, t_dot=ones)
    ref_fm = copy.deepcopy(fm).double()
    _, exact = pf.JVP().jvp(ref_fm, x.double(), s.double(), t.double(), t_dot=ones.double())
    err = (d.double() - exact).abs().max() / exact.abs().max()
    assert err < 0.05  # bf16 output rounding only


@pytest.mark.parametrize("name", ["lsd", "esd", "lmd", "emd"])
def test_dual_network_plugs_into_objectives(name):
    """A tangent-carrying network picked by derivative='auto' gives the jvp-mode loss and gradients."""
    fm = pf.FlowMap(TinyDualNet())
    teacher = pf.FlowMap(TinyDualNet(seed=1)).velocity if name in ("lmd", "emd") else None
    kw = {"teacher": teacher} if teacher else {}
    auto = pf.make_objective(name, derivative="auto", **kw)
    assert isinstance(auto.mode(fm), pf.Dual)
    x1 = batch()
    a = run(auto, fm, x1)
    b = run(pf.make_objective(name, derivative="jvp", **kw), fm, x1)
    torch.testing.assert_close(a.per_sample, b.per_sample, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(fm, a.loss), grads(fm, b.loss), rtol=1e-9, atol=1e-12)


def test_dual_mode_needs_a_dual_network():
    fm = pf.FlowMap(GaussianFlowMap([0.0, 0.0], [1.0, 1.0]))
    with pytest.raises(TypeError, match="tangent-carrying"):
        run(pf.objectives.LSD(derivative="dual"), fm, batch())


# -- PSD identities ----------------------------------------------------------------------------

@pytest.mark.parametrize("g", [0.0, 1.0])
def test_psd_with_g_0_or_1_is_an_identity(g):
    """g = 0 (u = t) and g = 1 (u = s, X_{s,s} = id) make the PSD residual vanish for ANY network."""
    fm = pf.FlowMap(mlp())
    obj = PSD(gamma=g, times=pf.TimeSampler(diag_fraction=0.0))
    out = run(obj, fm, batch())
    assert out.per_sample.max().item() < 1e-24


def test_psd_with_interior_g_is_not_an_identity():
    out = run(PSD(gamma=0.5, times=pf.TimeSampler(diag_fraction=0.0)), pf.FlowMap(mlp()), batch())
    assert out.per_sample.mean().item() > 1e-4


# -- stop-gradient placement -------------------------------------------------------------------

def _offdiag_inputs(obj, fm, x1, seed=0):
    """Re-draw the objective's randomness to rebuild its terms by hand."""
    g = torch.Generator().manual_seed(seed)
    x0 = obj.base.sample(x1.shape, generator=g, dtype=x1.dtype)
    s, t, n_diag = obj.times.sample(x1.shape[0], generator=g, dtype=x1.dtype)
    assert n_diag == 0
    return g, obj.interpolant.interpolate(x0, x1, s), s, t


def test_lsd_gradient_flows_only_through_the_tangent():
    fm = pf.FlowMap(mlp())
    obj = LSD(times=pf.TimeSampler(diag_fraction=0.0), derivative="jvp")
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)

    _, xs, s, t = _offdiag_inputs(obj, fm, x1)
    X, dXdt = torch.func.jvp(fm, (xs, s, t), (torch.zeros_like(xs), torch.zeros_like(s), torch.ones_like(t)))
    teacher = fm.velocity(X.detach(), t).detach()
    want = grads(fm, ((dXdt - teacher) ** 2).sum(1).mean())
    assert_grads_close(got, want)
    # the counterfactual (gradient also through the teacher) is measurably different
    wrong = grads(fm, ((dXdt - fm.velocity(X, t)) ** 2).sum(1).mean())
    assert max((a - b).abs().max().item() for a, b in zip(got, wrong)) > 1e-6


def test_esd_full_stopgrad_gradient_flows_only_through_d_ds():
    fm = pf.FlowMap(mlp())
    obj = ESD(times=pf.TimeSampler(diag_fraction=0.0), derivative="jvp")
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)

    _, xs, s, t = _offdiag_inputs(obj, fm, x1)
    w = fm.velocity(xs, s).detach()
    z = torch.zeros_like(s)
    _, dXds = torch.func.jvp(fm, (xs, s, t), (torch.zeros_like(xs), torch.ones_like(s), z))
    _, spatial = torch.func.jvp(fm, (xs, s, t), (w, z, z))
    want = grads(fm, ((dXds + spatial.detach()) ** 2).sum(1).mean())
    assert_grads_close(got, want)
    wrong = grads(fm, ((dXds + spatial) ** 2).sum(1).mean())
    assert max((a - b).abs().max().item() for a, b in zip(got, wrong)) > 1e-6


def test_esd_without_spatial_stopgrad_differentiates_both_terms():
    fm = pf.FlowMap(mlp())
    obj = ESD(spatial_stopgrad=False, times=pf.TimeSampler(diag_fraction=0.0), derivative="jvp")
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)
    _, xs, s, t = _offdiag_inputs(obj, fm, x1)
    w = fm.velocity(xs, s).detach()  # v_{s,s} stays a stop-gradient teacher
    z = torch.zeros_like(s)
    _, dXds = torch.func.jvp(fm, (xs, s, t), (torch.zeros_like(xs), torch.ones_like(s), z))
    _, spatial = torch.func.jvp(fm, (xs, s, t), (w, z, z))
    assert_grads_close(got, grads(fm, ((dXds + spatial) ** 2).sum(1).mean()))


def test_psd_gradient_flows_only_through_the_student_jump():
    fm = pf.FlowMap(mlp())
    obj = PSD(gamma="uniform", times=pf.TimeSampler(diag_fraction=0.0))
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)
    g, xs, s, t = _offdiag_inputs(obj, fm, x1)
    gam = torch.rand(s.shape[0], generator=g, dtype=s.dtype)
    u = gam * s + (1 - gam) * t
    v_su = fm.velocity_field(xs, s, u)
    v_ut = fm.velocity_field(xs + (u - s)[:, None] * v_su, u, t)
    target = ((1 - gam)[:, None] * v_su + gam[:, None] * v_ut)
    pred = fm.velocity_field(xs, s, t)
    assert_grads_close(got, grads(fm, ((pred - target.detach()) ** 2).sum(1).mean()))
    wrong = grads(fm, ((pred - target) ** 2).sum(1).mean())
    assert max((a - b).abs().max().item() for a, b in zip(got, wrong)) > 1e-6


@pytest.mark.parametrize("semigradient", [False, True])
def test_lmd_gradient_through_teacher_input_unless_semigradient(semigradient):
    fm = pf.FlowMap(mlp())
    teacher_fm = pf.FlowMap(mlp(seed=5))
    obj = LMD(teacher_fm, semigradient=semigradient, times=pf.TimeSampler(diag_fraction=0.0), derivative="jvp")
    assert not any(p.requires_grad for p in teacher_fm.parameters())
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)
    _, xs, s, t = _offdiag_inputs(obj, fm, x1)
    X, dXdt = torch.func.jvp(fm, (xs, s, t), (torch.zeros_like(xs), torch.zeros_like(s), torch.ones_like(t)))
    target = teacher_fm.velocity(X.detach() if semigradient else X, t)
    assert_grads_close(got, grads(fm, ((dXdt - target) ** 2).sum(1).mean()))
    assert all(p.grad is None for p in teacher_fm.parameters())


@pytest.mark.parametrize("semigradient", [False, True])
def test_emd_semigradient_stops_the_spatial_term(semigradient):
    fm = pf.FlowMap(mlp())
    b = GaussianFlowMap([0.5, -0.5], [1.0, 2.0]).velocity
    obj = EMD(b, semigradient=semigradient, times=pf.TimeSampler(diag_fraction=0.0), derivative="jvp")
    x1 = batch()
    got = grads(fm, run(obj, fm, x1).loss)
    _, xs, s, t = _offdiag_inputs(obj, fm, x1)
    w = b(xs, s)
    z = torch.zeros_like(s)
    _, dXds = torch.func.jvp(fm, (xs, s, t), (torch.zeros_like(xs), torch.ones_like(s), z))
    _, spatial = torch.func.jvp(fm, (xs, s, t), (w, z, z))
    spatial = spatial.detach() if semigradient else spatial
    assert_grads_close(got, grads(fm, ((dXds + spatial) ** 2).sum(1).mean()))


def test_distillation_diagonal_regresses_on_the_teacher():
    fm = pf.FlowMap(mlp())
    b = GaussianFlowMap([0.5, -0.5], [1.0, 2.0]).velocity
    obj = LMD(b, times=pf.TimeSampler(diag_fraction=1.0))
    x1 = batch()
    out = run(obj, fm, x1)
    g = torch.Generator().manual_seed(0)
    x0 = obj.base.sample(x1.shape, generator=g, dtype=x1.dtype)
    _, t, _ = obj.times.sample(x1.shape[0], generator=g, dtype=x1.dtype)
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    torch.testing.assert_close(out.per_sample, ((fm.velocity(xt, t) - b(xt, t)) ** 2).sum(1))


def test_learned_weighting_reweights_and_learns():
    fm = pf.FlowMap(mlp())
    w = pf.objectives.LearnedWeighting(emb_dim=8, hidden=16)
    torch.nn.init.normal_(w.mlp[-1].weight, std=0.5)
    obj = pf.objectives.LSD(weighting=w)
    out = run(obj, fm, batch())
    g = torch.Generator().manual_seed(0)
    obj.base.sample((64, 2), generator=g, dtype=torch.float64)
    s, t, n = obj.times.sample(64, generator=g, dtype=torch.float64)
    wv = w(s.float(), t.float()).double()
    per = out.per_sample
    want = (torch.exp(-wv[:n]) * per[:n] + wv[:n]).mean() + (torch.exp(-wv[n:]) * per[n:] + wv[n:]).mean()
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in w.parameters())


# -- properties and bad input --------------------------------------------------------------------

@given(n=st.integers(1, 40), dim=st.integers(1, 5), eta=st.sampled_from([0.0, 0.3, 0.75, 1.0]),
       name=st.sampled_from(SELF), derivative=st.sampled_from(["jvp", "fd"]), seed=st.integers(0, 1000))
def test_losses_are_finite_and_shaped(n, dim, eta, name, derivative, seed):
    fm = pf.FlowMap(mlp(dim=dim, hidden=8, depth=1))
    obj = pf.make_objective(name, derivative=derivative, times=pf.TimeSampler(diag_fraction=eta))
    out = run(obj, fm, batch(n, dim, seed=seed), seed=seed)
    assert out.per_sample.shape == (n,)
    assert torch.isfinite(out.loss) and (out.per_sample >= 0).all()
    expected_diag = n if name == "fm" else obj.times.n_diagonal(n)
    assert out.n_diag == expected_diag
    out.loss.backward()


@given(n=st.integers(0, 50), eta=st.floats(0, 1), dist=st.sampled_from(["uniform", "logit_normal"]))
def test_time_sampler_properties(n, eta, dist):
    ts = pf.TimeSampler(diag_fraction=eta, distribution=dist)
    s, t, nd = ts.sample(n, generator=torch.Generator().manual_seed(0))
    assert s.shape == t.shape == (n,)
    assert (s[:nd] == t[:nd]).all() and (s[nd:] <= t[nd:]).all()
    assert ((s >= 0) & (t <= 1)).all()
    assert nd == ts.n_diagonal(n)


def test_bad_inputs():
    fm = pf.FlowMap(mlp())
    obj = pf.objectives.LSD()
    with pytest.raises(ValueError, match="empty batch"):
        obj(fm, torch.zeros(0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one feature dim"):
        obj(fm, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        obj(fm, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher"):
        pf.make_objective("lmd")
    with pytest.raises(ValueError, match="takes no teacher"):
        pf.make_objective("lsd", teacher=lambda x, t: x)
    with pytest.raises(ValueError, match="unknown objective"):
        pf.make_objective("nope")
    with pytest.raises(ValueError, match="unknown derivative"):
        run(pf.objectives.LSD(derivative="magic"), fm, batch())
    with pytest.raises(ValueError, match="PSD gamma"):
        PSD(gamma=1.5)
    with pytest.raises(ValueError, match="diag_fraction"):
        pf.TimeSampler(diag_fraction=2.0)
    with pytest.raises(ValueError, match="finite-difference step"):
        pf.FiniteDifference(h=0.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        pf.FiniteDifference(dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["lsd", "esd"])
def test_fd_mode_fused_loss_equals_materialized(name):
    """The FD mode hands (plus, minus) to the fused central-difference loss; the reference path
    forms the tangent first. Same loss, same gradients."""
    fm = pf.FlowMap(mlp(dtype=torch.float32))
    x1 = batch(dtype=torch.float32)
    results = []
    for ref in (False, True):
        with pf.nn.reference_ops(ref):
            out = run(pf.make_objective(name, derivative=pf.FiniteDifference(dtype=torch.float64)), fm, x1)
            results.append((out.loss.detach(), grads(fm, out.loss)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
