"""Conditioning and classifier-free guidance (issue 15): the exact class-conditional Gaussian
flow map zeroes every distillation residual given its labels, guidance targets are what the
docs say, label dropout has its rate and reaches the network as the null class, guided sampling
interpolates the conditional and the null sampler from one doubled call, the derivative modes
agree with conditions, DDP equals one process, bad conditions fail by name, and a conditional
2D run resumes bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyflowmap as pf
from pyflowmap import conditioning as cond_
from pyflowmap.nn import FlowMapMLP, UNetFlowMap

K = 3  # classes; the null class is K
MEANS = [[2.0, -1.0], [-1.5, 0.5], [0.25, 2.5]]
SIGMA = 0.6


# -- the exact conditional flow map ---------------------------------------------------------------

class ConditionalGaussianMap(nn.Module):
    """The exact flow map of the linear interpolant from x0 ~ N(0, I) to x1 | c ~ N(mu_c, sigma^2 I).

    I_t | c ~ N(t mu_c, r_t^2 I), r_t^2 = (1 - t)^2 + t^2 sigma^2, so X_{s,t}(x | c) = t mu_c +
    (r_t / r_s)(x - s mu_c), v_{s,t} = (X - x) / (t - s), and on the diagonal b_t(x | c) = mu_c +
    (r_t' / r_t)(x - t mu_c). The null class K gets the exact diagonal of the unconditional
    (equal-weight) mixture, sum_c p(c | x, t) b_t(x | c), and off the diagonal its Euler jump
    v_{s,t} = b_s (a known function, not a flow map).

    Tangents (``supports_tangents``) are analytic for the class rows (independent of
    torch.func), torch.func.jvp for the null rows. ``map_means`` (default: ``means``) are the
    means of the off-diagonal map: a wrong one for a class breaks that class's map while its
    diagonal stays exact. ``guidance_input``: accepts (and records) ``w``; every call is logged
    in ``calls``.
    """

    supports_tangents = True

    def __init__(self, means=MEANS, sigma=SIGMA, bad_class=None, guidance_input=False):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(means, dtype=torch.float64))
        shift = torch.zeros_like(self.mu)
        scale = torch.zeros(self.mu.shape[0], dtype=torch.float64)
        if bad_class is not None:
            shift[bad_class] = torch.tensor([0.7, -0.4], dtype=torch.float64)
            scale[bad_class] = 0.3
        self.register_buffer("mu_map", self.mu + shift)
        self.register_buffer("bad_scale", scale)
        self.sig2 = float(sigma) ** 2
        self.num_classes = self.mu.shape[0]
        self.guidance_input = guidance_input
        self.calls = []

    def r(self, t):
        return torch.sqrt((1 - t) ** 2 + t**2 * self.sig2)

    def dr(self, t):
        return (-(1 - t) + t * self.sig2) / self.r(t)

    def class_velocity(self, x, t, mu):
        t = t[:, None]
        return mu + self.dr(t) / self.r(t) * (x - t * mu)

    def null_velocity(self, x, t):
        """The exact diagonal of the mixture: the posterior-weighted class velocities."""
        tt = t[:, None, None]
        centre = tt * self.mu[None]  # [B, K, D]
        logp = -((x[:, None] - centre) ** 2).sum(-1) / (2 * self.r(t)[:, None] ** 2)
        post = torch.softmax(logp, dim=1)[..., None]
        b = self.mu[None] + (self.dr(tt) / self.r(tt)) * (x[:, None] - centre)
        return (post * b).sum(1)

    def class_map(self, x, s, t, mu):
        s, t = s[:, None], t[:, None]
        return t * mu + self.r(t) / self.r(s) * (x - s * mu)

    def _velocity(self, x, s, t, c):
        is_null = (c == self.num_classes)[:, None]
        k = c.clamp(max=self.num_classes - 1)
        dt = (t - s)[:, None]
        diag = dt.abs() < 1e-12
        safe = torch.where(diag, torch.ones_like(dt), dt)
        v_off = (self.class_map(x, s, t, self.mu_map[k]) - x) / safe * (1 + self.bad_scale[k][:, None] * dt)
        v_cls = torch.where(diag, self.class_velocity(x, t, self.mu[k]), v_off)
        return torch.where(is_null, self.null_velocity(x, s), v_cls)

    def forward(self, x, s, t, c=None, w=None, tangents=None):
        if w is not None and not self.guidance_input:
            raise TypeError("w given to a network without guidance_input")
        if c is None:
            c = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        self.calls.append({"n": x.shape[0], "c": c.clone(), "w": None if w is None else w.clone(),
                           "tangents": tangents is not None})
        v = self._velocity(x, s, t, c)
        if tangents is None:
            return v
        x_dot, s_dot, t_dot = tangents
        x_dot = torch.zeros_like(x) if x_dot is None else x_dot
        s_dot = torch.zeros_like(s) if s_dot is None else torch.as_tensor(s_dot, dtype=s.dtype).expand_as(s)
        t_dot = torch.zeros_like(t) if t_dot is None else torch.as_tensor(t_dot, dtype=t.dtype).expand_as(t)
        # analytic tangent of the class rows' affine map
        k = c.clamp(max=self.num_classes - 1)
        mu = self.mu_map[k]
        s1, t1, sd, td = s[:, None], t[:, None], s_dot[:, None], t_dot[:, None]
        q = self.r(t1) / self.r(s1)
        dq = self.dr(t1) * td / self.r(s1) - self.r(t1) * self.dr(s1) * sd / self.r(s1) ** 2
        X = t1 * mu + q * (x - s1 * mu)
        dX = td * mu + dq * (x - s1 * mu) + q * (x_dot - sd * mu)
        dv_cls = (dX - x_dot) / (t1 - s1) - (X - x) * (td - sd) / (t1 - s1) ** 2
        a = self.bad_scale[k][:, None]
        dv_cls = dv_cls * (1 + a * (t1 - s1)) + (X - x) / (t1 - s1) * a * (td - sd)
        # the null rows' Euler velocity b_s: through torch.func
        _, dv_null = torch.func.jvp(lambda x_, s_: self.null_velocity(x_, s_), (x, s), (x_dot, s_dot))
        return v, torch.where((c == self.num_classes)[:, None], dv_null, dv_cls)


def labelled_data(n, seed=0, sigma=SIGMA, means=MEANS, null_rows=0):
    """(x1, c): x1 | c ~ N(mu_c, sigma^2 I), c uniform over the K classes (the last
    ``null_rows`` rows labelled with the null class K, data drawn from class 0)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.as_tensor(means, dtype=torch.float64)
    c = torch.randint(0, mu.shape[0], (n,), generator=g)
    x1 = mu[c] + sigma * torch.randn(n, mu.shape[1], generator=g, dtype=torch.float64)
    if null_rows:
        c[-null_rows:] = mu.shape[0]
    return x1, c


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


FD64 = pf.FiniteDifference(h=1e-4, dtype=torch.float64)
MODES = {"dual": "dual", "jvp": "jvp", "fd": FD64}
# MeanFlow's target uses the sample velocity dI_s = x1 - x0, not b_s(I_s): its residual is zero
# for the exact map only where the two coincide, i.e. for point masses (sigma = 0)
COND_OBJECTIVES = {
    "lsd": (lambda **kw: pf.objectives.LSD(**kw), SIGMA),
    "esd": (lambda **kw: pf.objectives.ESD(**kw), SIGMA),
    "esd-full-gradient": (lambda **kw: pf.objectives.ESD(spatial_stopgrad=False, **kw), SIGMA),
    "psd-u": (lambda **kw: pf.objectives.PSD(gamma="uniform", **kw), SIGMA),
    "psd-m": (lambda **kw: pf.objectives.PSD(gamma="midpoint", **kw), SIGMA),
    "meanflow": (lambda **kw: pf.objectives.MeanFlow(**kw), 0.0),
    "lmd": (lambda teacher, **kw: pf.objectives.LMD(teacher.velocity, **kw), SIGMA),
    "emd": (lambda teacher, **kw: pf.objectives.EMD(teacher.velocity, **kw), SIGMA),
    "pfmm": (lambda teacher, **kw: pf.objectives.PFMM(teacher, **kw), SIGMA),
}
TEACHER = ("lmd", "emd", "pfmm")


def conditional_objective(name, derivative, sigma, **kw):
    build, _ = COND_OBJECTIVES[name]
    common = dict(derivative=derivative, times=pf.TimeSampler(diag_fraction=0.25), **kw)
    if name in TEACHER:
        return build(pf.FlowMap(ConditionalGaussianMap(sigma=sigma)), **common)
    return build(**common)


def distill_rows(objective, flowmap, x1, c, seed=0):
    out = objective(flowmap, x1, generator=gen(seed), c=c)
    return out.per_sample[:out.n_diag], out.per_sample[out.n_diag:], out.n_diag


PROGRESSIVE = ("psd-u", "psd-m", "pfmm")  # no derivative: one mode is enough
ZERO_CASES = [(n, m) for n in COND_OBJECTIVES for m in (["dual"] if n in PROGRESSIVE else list(MODES))]


@pytest.mark.parametrize("name,mode", ZERO_CASES)
def test_exact_conditional_map_has_zero_distillation_residual(name, mode):
    """Given each row's label (p_uncond = 0, no guidance), the exact conditional map zeroes the
    distillation residual of every objective in every derivative mode (float64)."""
    sigma = COND_OBJECTIVES[name][1]
    x1, c = labelled_data(192, sigma=sigma)
    fm = pf.FlowMap(ConditionalGaussianMap(sigma=sigma))
    obj = conditional_objective(name, MODES[mode], sigma)
    _, res, n_diag = distill_rows(obj, fm, x1, c)
    assert res.numel() > 100
    tol = 1e-20 if mode != "fd" else 1e-12
    assert res.max().item() < tol, f"{name}/{mode}: max distillation residual {res.max().item():.3e}"
    # the condition reached every call, as the labels of those rows (none is the null class)
    calls = fm.net.calls
    assert calls and all(not (call["c"] == K).any() for call in calls)
    if name in ("lsd", "esd", "meanflow") and mode == "dual":
        tangent_calls = [call for call in calls if call["tangents"]]
        assert tangent_calls and all(torch.equal(call["c"], c[n_diag:]) for call in tangent_calls)


@pytest.mark.parametrize("name", list(COND_OBJECTIVES))
def test_wrong_mean_of_one_class_is_caught_on_that_class_only(name):
    """The off-diagonal map of class 1 is wrong (its diagonal stays exact): the rows of class 1
    get a clearly nonzero residual, the other classes' rows stay at zero, so each row was
    evaluated under its own label."""
    sigma = COND_OBJECTIVES[name][1]
    x1, c = labelled_data(192, sigma=sigma)
    fm = pf.FlowMap(ConditionalGaussianMap(sigma=sigma, bad_class=1))
    obj = conditional_objective(name, "dual", sigma)
    _, res, n_diag = distill_rows(obj, fm, x1, c)
    labels = c[n_diag:]
    assert res[labels == 1].mean().item() > 1e-3, f"{name}: perturbation went unnoticed"
    assert res[labels != 1].max().item() < 1e-20, f"{name}: rows of exact classes got a residual"


def test_wrong_labels_give_a_residual():
    """The same exact map given shuffled labels: the distillation residual of MeanFlow (which
    reads the data) is no longer zero; the condition is what makes the map exact."""
    x1, c = labelled_data(192, sigma=0.0)
    fm = pf.FlowMap(ConditionalGaussianMap(sigma=0.0))
    obj = conditional_objective("meanflow", "dual", 0.0)
    _, good, _ = distill_rows(obj, fm, x1, c)
    _, bad, _ = distill_rows(obj, fm, x1, (c + 1) % K)
    assert good.max().item() < 1e-20 and bad.mean().item() > 1e-2


def test_analytic_tangents_of_the_test_map_are_exact():
    """The exact map's hand-written tangents (used by the dual mode above) equal torch.func's,
    for class rows, the wrong class and the null rows."""
    net = ConditionalGaussianMap(bad_class=1)
    fm = pf.FlowMap(net)
    g = gen(4)
    n = 64
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    s = 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    t = s + 0.05 + 0.15 * torch.rand(n, generator=g, dtype=torch.float64)
    c = torch.randint(0, K + 1, (n,), generator=g)
    tangents = (torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64),
                torch.randn(n, generator=g, dtype=torch.float64))
    for output in ("map", "velocity"):
        a = pf.Dual().jvp(fm, x, s, t, *tangents, output=output, c=c)
        b = pf.JVP().jvp(fm, x, s, t, *tangents, output=output, c=c)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-10)


# -- guidance in training: the targets ------------------------------------------------------------

P_UNCOND, W_TRAIN, W_RANGE = 0.3, 2.5, (1.0, 4.0)


def redraw(obj, x1, seed, name, p_uncond, w_range=None):
    """The objective's draws, in its documented order: x0, (s, t), the off-diagonal draws
    (PSD-U's split), then the dropout mask and the per-row guidance scales."""
    g = gen(seed)
    B = x1.shape[0]
    x0 = obj.base.sample(x1.shape, generator=g, dtype=x1.dtype)
    s, t, n = obj.times.sample(B, generator=g, dtype=x1.dtype)
    if name == "psd-u":
        torch.rand(B - n, generator=g, dtype=x1.dtype)
    drop = torch.rand(B, generator=g) < p_uncond
    w = None if w_range is None else w_range[0] + (w_range[1] - w_range[0]) * torch.rand(B, generator=g,
                                                                                         dtype=x1.dtype)
    return x0, s, t, n, drop, w


def exact_velocity(x, t, c):
    """v_{t,t}(x | c) of the exact map (the null class: the mixture's velocity)."""
    return ConditionalGaussianMap()(x, t, t, c=c)


@pytest.mark.parametrize("ranged", [False, True], ids=["guidance", "guidance_range"])
@pytest.mark.parametrize("name", ["fm", "lsd", "psd-u", "meanflow"])
def test_guided_diagonal_target(name, ranged):
    """Rows with a condition regress v_{t,t}(I_t | c) on w dI_t + (1 - w) v_{t,t}(I_t | null);
    dropped rows and rows labelled null keep dI_t. With guidance_range w is each row's draw,
    also fed to the network."""
    kw = dict(p_uncond=P_UNCOND, **({"guidance_range": W_RANGE} if ranged else {"guidance": W_TRAIN}))
    if name != "fm":
        kw["times"] = pf.TimeSampler(diag_fraction=0.5)
    obj = pf.make_objective(name, **kw)
    x1, c = labelled_data(400, seed=1, null_rows=30)
    net = ConditionalGaussianMap(guidance_input=ranged)
    out = obj(pf.FlowMap(net), x1, generator=gen(7), c=c)
    x0, s, t, n, drop, w = redraw(obj, x1, 7, name, P_UNCOND, W_RANGE if ranged else None)
    assert out.n_diag == n and 0 < drop.sum() < 400
    eff = torch.where(drop, torch.full_like(c, K), c)
    xt, td, dI = ((1 - t)[:, None] * x0 + t[:, None] * x1)[:n], t[:n], (x1 - x0)[:n]
    pred = exact_velocity(xt, td, eff[:n])
    v_null = exact_velocity(xt, td, torch.full_like(eff[:n], K))
    scale = (w[:n] if ranged else torch.full((n,), W_TRAIN, dtype=torch.float64))
    plain = (eff[:n] == K)
    scale = torch.where(plain, torch.ones_like(scale), scale)
    target = scale[:, None] * dI + (1 - scale[:, None]) * v_null
    torch.testing.assert_close(out.per_sample[:n], ((pred - target) ** 2).sum(1), rtol=1e-10, atol=1e-12)
    unguided = ((pred - dI) ** 2).sum(1)
    torch.testing.assert_close(out.per_sample[:n][plain], unguided[plain], rtol=1e-12, atol=1e-14)
    assert (out.per_sample[:n][~plain] - unguided[~plain]).abs().min() > 1e-8  # guidance moved every target
    first = net.calls[0]  # the student's diagonal call
    assert torch.equal(first["c"], eff[:n])
    if ranged:
        assert torch.equal(first["w"], w[:n])
        assert all(call["w"] is not None for call in net.calls)
    else:
        assert all(call["w"] is None for call in net.calls)
    null_calls = [call for call in net.calls if call["n"] == n and (call["c"] == K).all()]
    assert null_calls, "the null prediction was never asked for"


def test_meanflow_uses_the_guided_velocity_in_target_and_tangent():
    obj = pf.objectives.MeanFlow(p_uncond=P_UNCOND, guidance=W_TRAIN, derivative="jvp",
                                 times=pf.TimeSampler(diag_fraction=0.25))
    x1, c = labelled_data(256, seed=2, null_rows=16)
    fm = pf.FlowMap(ConditionalGaussianMap())
    out = obj(fm, x1, generator=gen(3), c=c)
    x0, s, t, n, drop, _ = redraw(obj, x1, 3, "meanflow", P_UNCOND)
    eff = torch.where(drop, torch.full_like(c, K), c)[n:]
    x0, x1, s, t = x0[n:], x1[n:], s[n:], t[n:]
    xs = (1 - s)[:, None] * x0 + s[:, None] * x1
    scale = torch.where(eff == K, torch.ones_like(s), torch.full_like(s, W_TRAIN))[:, None]
    d_i = scale * (x1 - x0) + (1 - scale) * exact_velocity(xs, s, torch.full_like(eff, K))
    f = lambda x_, s_: fm.velocity_field(x_, s_, t, c=eff)  # noqa: E731
    v, dv = torch.func.jvp(f, (xs, s), (d_i, torch.ones_like(s)))
    target = d_i + (t - s)[:, None] * dv
    torch.testing.assert_close(out.per_sample[n:], ((v - target) ** 2).sum(1), rtol=1e-10, atol=1e-12)
    # the unguided construction gives another residual on the rows with a condition
    v0, dv0 = torch.func.jvp(f, (xs, s), (x1 - x0, torch.ones_like(s)))
    plain = ((v0 - (x1 - x0) - (t - s)[:, None] * dv0) ** 2).sum(1)
    assert (plain[eff != K] - out.per_sample[n:][eff != K]).abs().min() > 1e-8


def test_distillation_guides_its_frozen_teacher():
    """LMD under training guidance: the teacher's target is b_null + w (b_c - b_null) from one
    call on the doubled batch, on the diagonal and at X_{s,t}; dropped rows get b_null."""
    teacher = ConditionalGaussianMap()
    obj = pf.objectives.LMD(pf.FlowMap(teacher), p_uncond=P_UNCOND, guidance=W_TRAIN, derivative="jvp",
                            times=pf.TimeSampler(diag_fraction=0.5))
    student = pf.FlowMap(ConditionalGaussianMap())
    x1, c = labelled_data(200, seed=5)
    out = obj(student, x1, generator=gen(2), c=c)
    x0, s, t, n, drop, _ = redraw(obj, x1, 2, "lmd", P_UNCOND)
    eff = torch.where(drop, torch.full_like(c, K), c)
    null = torch.full_like(eff, K)

    def guided(x, tt, rows):
        b_c, b_null = exact_velocity(x, tt, eff[rows]), exact_velocity(x, tt, null[rows])
        w = torch.where(eff[rows] == K, 1.0, W_TRAIN)[:, None]
        return b_null + w * (b_c - b_null)

    d = slice(None, n)
    xt = (1 - t[d])[:, None] * x0[d] + t[d][:, None] * x1[d]
    want_fm = ((exact_velocity(xt, t[d], eff[d]) - guided(xt, t[d], d)) ** 2).sum(1)
    torch.testing.assert_close(out.per_sample[:n], want_fm, rtol=1e-10, atol=1e-12)
    o = slice(n, None)
    xs = (1 - s[o])[:, None] * x0[o] + s[o][:, None] * x1[o]
    X, dX = torch.func.jvp(lambda t_: student(xs, s[o], t_, c=eff[o]), (t[o],), (torch.ones_like(t[o]),))
    want = ((dX - guided(X, t[o], o)) ** 2).sum(1)
    torch.testing.assert_close(out.per_sample[n:], want, rtol=1e-10, atol=1e-12)
    assert want_fm[eff[d] != K].mean() > 1e-2 and want_fm[eff[d] == K].max() < 1e-24
    # every teacher call ran on the doubled batch [c; null]
    assert teacher.calls and all(call["n"] % 2 == 0 and (call["c"][call["n"] // 2:] == K).all()
                                 for call in teacher.calls)


def _edm_mlp(guidance_input=False, seed=0):
    torch.manual_seed(seed)
    net = FlowMapMLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=K, guidance_input=guidance_input).double()
    nn.init.normal_(net.head.weight, std=0.3)
    nn.init.normal_(net.cond_emb.table.weight, std=1.0)
    return pf.EDMConsistency(net)


def test_ect_pretrain_guided_denoiser_target():
    """ECT pretraining under guidance regresses f(x_t, t | c) on w y + (1 - w) sg(f(x_t, t | null))."""
    model = _edm_mlp()
    obj = pf.objectives.ECT(pretrain=True, p_uncond=P_UNCOND, guidance=W_TRAIN)
    y, c = labelled_data(128, seed=3)
    out = obj(model, y, generator=gen(1), c=c)
    g = gen(1)
    t = obj.schedule.sample_t(128, generator=g, dtype=torch.float64)
    eps = torch.randn(128, 2, generator=g, dtype=torch.float64)
    drop = torch.rand(128, generator=g) < P_UNCOND
    eff = torch.where(drop, torch.full_like(c, K), c)
    x_t = y + t[:, None] * eps
    with torch.no_grad():
        f_c, f_null = model(x_t, t, c=eff), model(x_t, t, c=torch.full_like(c, K))
    w = torch.where(drop, 1.0, W_TRAIN)[:, None]
    torch.testing.assert_close(out.per_sample, ((f_c - (w * y + (1 - w) * f_null)) ** 2).sum(1), rtol=1e-10,
                               atol=1e-12)
    assert (out.per_sample - ((f_c - y) ** 2).sum(1))[~drop].abs().min() > 1e-8


# -- label dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_label_dropout_rate_and_the_null_class_reaches_the_network(p):
    B = 20000
    obj = pf.objectives.FM(p_uncond=p)
    x1, c = labelled_data(B, seed=11)
    net = ConditionalGaussianMap()
    obj(pf.FlowMap(net), x1, generator=gen(5), c=c)
    (call,) = net.calls
    seen = call["c"]
    dropped = seen == K
    sd = (B * p * (1 - p)) ** 0.5
    assert abs(int(dropped.sum()) - B * p) < 5 * sd, f"{int(dropped.sum())} of {B} dropped at p = {p}"
    assert torch.equal(seen[~dropped], c[~dropped])  # kept rows keep their own label
    # the mask is the documented draw, and is independent of the label
    *_, drop, _ = redraw(obj, x1, 5, "fm", p)
    assert torch.equal(dropped, drop)
    for k in range(K):
        frac = dropped[c == k].double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / int((c == k).sum())) ** 0.5


@pytest.mark.parametrize("mode", ["dual", "jvp"])
def test_dropped_rows_reach_every_call_as_the_null_class(mode):
    """LSD: the diagonal call, the tangent call and the teacher call each get the dropped labels
    of their own rows."""
    obj = pf.objectives.LSD(p_uncond=0.4, derivative=mode, times=pf.TimeSampler(diag_fraction=0.4))
    x1, c = labelled_data(300, seed=9)
    net = ConditionalGaussianMap()
    obj(pf.FlowMap(net), x1, generator=gen(6), c=c)
    _, _, _, n, drop, _ = redraw(obj, x1, 6, "lsd", 0.4)
    eff = torch.where(drop, torch.full_like(c, K), c)
    diag, *off = net.calls  # the diagonal forward runs first
    assert len(off) == 2 and diag["n"] == n and all(call["n"] == 300 - n for call in off)
    assert torch.equal(diag["c"], eff[:n])
    assert all(torch.equal(call["c"], eff[n:]) for call in off)
    assert [call["tangents"] for call in off] == [mode == "dual", False]


# -- guidance at sampling --------------------------------------------------------------------------

def cond_mlp(guidance_input=False, cond_shape=None, seed=0, dim=2):
    """A small conditional FlowMapMLP (float64) whose output depends clearly on c and w."""
    torch.manual_seed(seed)
    net = FlowMapMLP(dim=dim, hidden=32, depth=2, emb_dim=8, num_classes=None if cond_shape else K,
                     cond_shape=cond_shape, guidance_input=guidance_input).double()
    nn.init.normal_(net.head.weight, std=0.3)
    nn.init.normal_(net.head.bias, std=0.1)
    if cond_shape is None:
        nn.init.normal_(net.cond_emb.table.weight, std=1.0)
    net.emb_s.freqs.div_(10)  # slower embeddings keep finite differences accurate
    net.emb_dt.freqs.div_(10)
    return net


def tiny_unet(guidance_input=False, seed=0, data_std=0.5):
    torch.manual_seed(seed)
    net = UNetFlowMap(channels=1, ch=8, emb_dim=8, heads=2, groups=4, data_std=data_std, num_classes=K,
                      guidance_input=guidance_input).double()
    nn.init.normal_(net.out.weight, std=0.3)
    nn.init.normal_(net.cond_emb.table.weight, std=1.0)
    net.emb_s.freqs.div_(10)
    net.emb_dt.freqs.div_(10)
    return net


class CallCounter:
    """Counts the forward calls of a module and records their batch sizes (a forward pre-hook)."""

    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))

    def reset(self):
        self.sizes.clear()


def _noise(n=48, shape=(2,), seed=0):
    return torch.randn(n, *shape, generator=gen(seed), dtype=torch.float64)


def _labels(n=48, seed=1):
    return torch.randint(0, K, (n,), generator=gen(seed))


SAMPLERS = {
    "map": lambda m, z, **kw: pf.sample(m, z, steps=3, **kw),
    "consistency": lambda m, z, **kw: pf.sample(m, z, steps=3, kind="consistency", generator=gen(3), **kw),
    "euler": lambda m, z, **kw: pf.sample_ode(m, z, steps=4, method="euler", **kw),
    "heun": lambda m, z, **kw: pf.sample_ode(m, z, steps=4, method="heun", **kw),
}
CALLS = {"map": 3, "consistency": 3, "euler": 4, "heun": 8}


@pytest.mark.parametrize("guidance_input", [False, True], ids=["labels", "labels+w"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guided_sampling_interpolates_conditional_and_null(sampler, guidance_input):
    net = cond_mlp(guidance_input=guidance_input)
    fm = pf.FlowMap(net)
    run = SAMPLERS[sampler]
    z, c = _noise(), _labels()
    null = torch.full_like(c, K)
    extra = {"w": 2.0} if guidance_input else {}
    counter = CallCounter(net)
    cond = run(fm, z, c=c, **extra)
    assert counter.sizes == [48] * CALLS[sampler]
    counter.reset()
    uncond = run(fm, z, c=null, **extra)
    guided = {}
    for w in (0.0, 1.0, 2.0):
        counter.reset()
        guided[w] = run(fm, z, c=c, guidance=w, **extra)
        # one network call on the doubled batch [c; null] per velocity
        assert counter.sizes == [96] * CALLS[sampler], f"w={w}: calls {counter.sizes}"
    torch.testing.assert_close(guided[1.0], cond, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(guided[0.0], uncond, rtol=1e-12, atol=1e-12)
    assert (guided[2.0] - cond).abs().max() > 1e-2 and (cond - uncond).abs().max() > 1e-2
    if sampler == "map":  # one jump by hand: x + v_null + 2 (v_c - v_null)
        s, t = torch.zeros(48, dtype=torch.float64), torch.ones(48, dtype=torch.float64)
        kw = {"w": torch.full((48,), 2.0, dtype=torch.float64)} if guidance_input else {}
        v_c, v_null = net(z, s, t, c=c, **kw), net(z, s, t, c=null, **kw)
        one = pf.sample(fm, z, steps=1, c=c, guidance=2.0, **extra)
        torch.testing.assert_close(one, z + v_null + 2.0 * (v_c - v_null), rtol=1e-12, atol=1e-12)


def test_guided_sampling_of_a_callable_velocity():
    """sample_ode with a plain conditional callable b(x, t, c=): guided from one doubled call,
    its null being zeros for a tensor condition."""
    net = cond_mlp(cond_shape=(3,))
    calls = []

    def b(x, t, c):
        calls.append(x.shape[0])
        return net(x, t, t, c=c)

    z = _noise()
    c = torch.randn(48, 3, generator=gen(2), dtype=torch.float64)
    cond = pf.sample_ode(b, z, steps=3, c=c)
    uncond = pf.sample_ode(b, z, steps=3, c=torch.zeros_like(c))
    calls.clear()
    g1 = pf.sample_ode(b, z, steps=3, c=c, guidance=1.0)
    assert calls == [96] * 3
    torch.testing.assert_close(g1, cond, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pf.sample_ode(b, z, steps=3, c=c, guidance=0.0), uncond, rtol=1e-12, atol=1e-12)


def test_guided_edm_consistency_sampling():
    """Two-step EDM consistency sampling (the first call at sigma_max, one re-noised call)."""
    steps = 2
    net = tiny_unet(data_std=1.0)
    model = pf.EDMConsistency(net)
    z, c = _noise(6, (1, 8, 8)), _labels(6)
    counter = CallCounter(net)
    run = lambda **kw: pf.sample(model, z, steps=steps, generator=gen(4), **kw)  # noqa: E731
    cond, uncond = run(c=c), run(c=torch.full_like(c, K))
    counter.reset()
    g1, g0, g3 = run(c=c, guidance=1.0), run(c=c, guidance=0.0), run(c=c, guidance=3.0)
    assert counter.sizes == [12] * (3 * steps)
    torch.testing.assert_close(g1, cond, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(g0, uncond, rtol=1e-11, atol=1e-11)
    assert (g3 - cond).abs().max() > 1e-3 and (cond - uncond).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_guided_sampling_matches_eager_and_replays_new_labels():
    fm = pf.FlowMap(cond_mlp(guidance_input=True).float().cuda())
    z = _noise().float().cuda()
    for seed in (1, 2):  # new labels and w replay the captured graph
        c = _labels(seed=seed).cuda()
        w = torch.full((48,), 1.5 + seed, device="cuda")
        eager = pf.sample(fm, z, steps=3, c=c, w=w, guidance=2.0)
        graph = pf.sample(fm, z, steps=3, c=c, w=w, guidance=2.0, graph=True)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


# -- derivative modes agree with conditions ---------------------------------------------------------

_NETS = {}


def _net(kind):
    """One network per kind, built once (hypothesis draws many examples)."""
    if kind not in _NETS:
        _NETS[kind] = {
            "mlp-labels-w": lambda: cond_mlp(guidance_input=True),
            "mlp-tensor-w": lambda: cond_mlp(guidance_input=True, cond_shape=(2, 2)),
            "unet-labels-w": lambda: tiny_unet(guidance_input=True),
            "exact": lambda: ConditionalGaussianMap(bad_class=2, guidance_input=True),
        }[kind]()
    return _NETS[kind]


def _inputs(kind, n, g):
    shape = (1, 8, 8) if kind.startswith("unet") else (2,)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    if kind == "mlp-tensor-w":
        c = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
        other = c + 1.0
    else:
        c = torch.randint(0, K + 1, (n,), generator=g)
        other = (c + 1) % (K + 1)
    w = 1 + 3 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, c, other, w


FD_AGREE = pf.FiniteDifference(h=1e-5, dtype=torch.float64)


def _check_modes_agree(kind, n, output, which, seed):
    net = _net(kind)
    fm = pf.FlowMap(net)
    g = gen(seed)
    x, c, other, w = _inputs(kind, n, g)
    s = 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    t = s + 0.05 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
    tangents = (torch.randn(x.shape, generator=g, dtype=torch.float64) if "x" in which else None,
                torch.randn(n, generator=g, dtype=torch.float64) if "s" in which else None,
                torch.randn(n, generator=g, dtype=torch.float64) if "t" in which else None)
    kw = dict(output=output, c=c, w=w)
    dual = pf.Dual().jvp(fm, x, s, t, *tangents, **kw)
    jvp = pf.JVP().jvp(fm, x, s, t, *tangents, **kw)
    fd = FD_AGREE.jvp(fm, x, s, t, *tangents, **kw)
    torch.testing.assert_close(dual[0], jvp[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dual[1], jvp[1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fd[0], jvp[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fd[1], jvp[1], rtol=1e-6, atol=1e-7)
    # the condition and w are not ignored by the tangent path
    if kind != "exact":
        other_c = pf.Dual().jvp(fm, x, s, t, *tangents, output=output, c=other, w=w)[1]
        other_w = pf.Dual().jvp(fm, x, s, t, *tangents, output=output, c=c, w=w + 1)[1]
        assert (other_c - dual[1]).abs().max() > 1e-8 and (other_w - dual[1]).abs().max() > 1e-8


@given(kind=st.sampled_from(["mlp-labels-w", "mlp-tensor-w", "exact"]), n=st.integers(1, 8),
       output=st.sampled_from(["map", "velocity"]), which=st.sets(st.sampled_from(["x", "s", "t"]), min_size=1),
       seed=st.integers(0, 10_000))
def test_derivative_modes_agree_with_conditions_and_w(kind, n, output, which, seed):
    """dual == jvp == fd (float64) for every tangent direction and output, given labels or a
    tensor condition and the guidance input w, on the MLP and on the exact test map."""
    _check_modes_agree(kind, n, output, which, seed)


@pytest.mark.parametrize("output", ["map", "velocity"])
def test_derivative_modes_agree_on_a_conditional_unet(output):
    """The same on a tiny class-conditional UNetFlowMap with attention and the w input (one
    draw per output: a UNet JVP costs seconds on 2 cores)."""
    _check_modes_agree("unet-labels-w", 3, output, {"x", "s", "t"}, seed=1 if output == "map" else 2)


# -- bad conditions fail by name ------------------------------------------------------------------

def _unconditional():
    from tests.helpers import mlp

    return pf.FlowMap(mlp())


BAD = {
    # name: (model kind, c(n), exception, message)
    "label above the null class": ("labels", lambda n: torch.full((n,), K + 1), ValueError,
                                   r"c: class labels must lie in \[0, 3\] \(3 is the null class\), got labels "
                                   r"in \[4, 4\]"),
    "negative label": ("labels", lambda n: torch.full((n,), -1), ValueError, r"c: class labels must lie in \[0, 3\]"),
    "wrong batch size": ("labels", lambda n: torch.zeros(n - 1, dtype=torch.long), ValueError,
                         r"c must have one entry per example \(batch 8\), got shape \(7,\)"),
    "0-d labels": ("labels", lambda n: torch.tensor(1), ValueError, r"c must have one entry per example"),
    "labels [B, 1]": ("labels", lambda n: torch.zeros(n, 1, dtype=torch.long), ValueError,
                      r"c: class labels must be \[B\]"),
    "float labels for a class model": ("labels", lambda n: torch.zeros(n, dtype=torch.float64), TypeError,
                                       r"c: FlowMapMLP is a class-conditional model \(num_classes=3\) and takes "
                                       r"integer labels"),
    "int labels for a tensor-condition model": ("tensor", lambda n: torch.zeros(n, dtype=torch.long), TypeError,
                                                r"c: FlowMapMLP takes a tensor condition of shape \[B, 3\], got "
                                                r"integer labels"),
    "tensor condition of the wrong shape": ("tensor", lambda n: torch.zeros(n, 2, dtype=torch.float64), ValueError,
                                            r"c must be \[B, 3\], got \(8, 2\)"),
    "NaN tensor condition": ("tensor", lambda n: torch.full((n, 3), float("nan"), dtype=torch.float64), ValueError,
                             r"c contains NaN or inf"),
    "bool labels": ("labels", lambda n: torch.zeros(n, dtype=torch.bool), TypeError,
                    r"c must be integer class labels or a floating condition, got torch.bool"),
    "c for an unconditional model": ("none", lambda n: torch.zeros(n, dtype=torch.long), TypeError,
                                     r"c was given but FlowMapMLP is not conditional"),
    "a list": ("labels", lambda n: [0] * n, TypeError, r"c must be a tensor"),
}


def _model(kind):
    return {"labels": lambda: pf.FlowMap(cond_mlp()), "tensor": lambda: pf.FlowMap(cond_mlp(cond_shape=(3,))),
            "none": _unconditional}[kind]()


ENTRY_POINTS = {
    "lsd": lambda m, x, c: pf.objectives.LSD()(m, x, c=c),
    "psd-m with dropout": lambda m, x, c: pf.objectives.PSD(gamma="midpoint", p_uncond=0.2)(m, x, c=c),
    "lmd": lambda m, x, c: pf.objectives.LMD(copy.deepcopy(m), guidance=2.0, p_uncond=0.2)(m, x, c=c),
    "sample": lambda m, x, c: pf.sample(m, x, steps=2, c=c),
    "sample guided": lambda m, x, c: pf.sample(m, x, steps=2, c=c, guidance=2.0),
    "consistency": lambda m, x, c: pf.sample(m, x, steps=2, kind="consistency", c=c),
    "sample_ode heun": lambda m, x, c: pf.sample_ode(m, x, steps=2, method="heun", c=c),
    "jump": lambda m, x, c: m.jump(x, 0.0, 1.0, c=c),
}


@pytest.mark.parametrize("via", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_conditions_fail_by_name(case, via):
    kind, make_c, exc, msg = BAD[case]
    model = _model(kind)
    x = _noise(8)
    with pytest.raises(exc, match=msg):
        ENTRY_POINTS[via](model, x, make_c(8))


@pytest.mark.parametrize("ect", [False, True], ids=["edm-sample", "ect"])
def test_bad_labels_of_an_edm_consistency_model(ect):
    model = _edm_mlp()
    x = _noise(8)
    for c, msg in ((torch.full((8,), K + 1), r"c: class labels must lie in \[0, 3\]"),
                   (torch.zeros(8), r"takes integer labels"), (torch.zeros(5, dtype=torch.long), "one entry per")):
        with pytest.raises((ValueError, TypeError), match=msg):
            pf.objectives.ECT(pretrain=True)(model, x, c=c) if ect else pf.sample(model, x, c=c)


def test_guidance_and_dropout_without_conditions_fail_by_name():
    fm = pf.FlowMap(cond_mlp())
    x, c = _noise(8), _labels(8)
    for run in (lambda: pf.sample(fm, x, guidance=2.0), lambda: pf.sample_ode(fm, x, guidance=2.0),
                lambda: pf.sample(fm, x, kind="consistency", guidance=2.0),
                lambda: pf.sample(_edm_mlp(), x, guidance=2.0)):
        with pytest.raises(ValueError, match="guidance needs the conditions c"):
            run()
    for run in (lambda: fm.jump(x, 0.0, 1.0, guidance=2.0), lambda: fm.velocity(x, 0.5, guidance=2.0)):
        with pytest.raises(ValueError, match="guidance needs a condition c"):
            run()
    for obj in (pf.objectives.FM(p_uncond=0.1, guidance=2.0), pf.objectives.LSD(p_uncond=0.1)):
        with pytest.raises(ValueError, match="condition dropout and guidance need the batch's conditions c"):
            obj(fm, x)
    with pytest.raises(ValueError, match="guidance in training needs p_uncond > 0"):
        pf.objectives.FM(guidance=2.0)
    with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\)"):
        pf.objectives.LSD(p_uncond=1.0)
    with pytest.raises(ValueError, match="not both"):
        pf.objectives.LSD(p_uncond=0.1, guidance=2.0, guidance_range=(1.0, 2.0))
    with pytest.raises(TypeError, match="guidance_range feeds w to the network, but it does not take w"):
        pf.objectives.FM(p_uncond=0.1, guidance_range=(1.0, 3.0))(fm, x, c=c)
    with pytest.raises(ValueError, match="ECT: guidance in consistency tuning needs denoiser="):
        pf.objectives.ECT(p_uncond=0.1, guidance=2.0)
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            pf.sample(fm, x, c=c, guidance=bad)
    with pytest.raises(ValueError, match=r"w \(the guidance input\) must be finite"):
        pf.sample(pf.FlowMap(cond_mlp(guidance_input=True)), x, c=c, w=float("nan"))
    with pytest.raises(TypeError, match="does not take the guidance scale w"):
        pf.sample(fm, x, c=c, w=2.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_labels_of_any_integer_dtype_equal_int64_labels(dtype):
    """check_condition accepts every integer dtype, so the network must too (nn.Embedding takes
    only int32 / int64 indices: uint8 labels used to fail inside it)."""
    fm = pf.FlowMap(cond_mlp())
    x, c = _noise(8), _labels(8)
    c[0] = K  # the null class too
    torch.testing.assert_close(pf.sample(fm, x, steps=2, c=c.to(dtype), guidance=2.0),
                               pf.sample(fm, x, steps=2, c=c, guidance=2.0), rtol=0, atol=0)
    obj = pf.objectives.LSD(p_uncond=0.3, guidance=2.0)
    a = obj(fm, x, generator=gen(1), c=c.to(dtype)).per_sample
    torch.testing.assert_close(a, obj(fm, x, generator=gen(1), c=c).per_sample, rtol=0, atol=0)


def test_guided_ode_of_a_bound_velocity_uses_the_null_class():
    fm = pf.FlowMap(cond_mlp())
    z, c = _noise(), _labels()
    null = pf.sample_ode(fm, z, steps=3, c=torch.full_like(c, K))
    torch.testing.assert_close(pf.sample_ode(fm.velocity, z, steps=3, c=c, guidance=0.0), null, rtol=1e-12,
                               atol=1e-12)


def test_guided_ode_of_a_callable_without_a_null_class_is_refused():
    def b(x, t, c=None):
        return -x

    with pytest.raises(TypeError, match="needs the null class"):
        pf.sample_ode(b, _noise(), steps=2, c=_labels(), guidance=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conditions_on_another_device_fail_by_name():
    fm = pf.FlowMap(cond_mlp())
    x, c = _noise(8), _labels(8).cuda()
    with pytest.raises(ValueError, match="c is on cuda:0 but the data batch is on cpu"):
        pf.objectives.LSD()(fm, x, c=c)
    with pytest.raises(ValueError, match="c is on cuda:0 but noise is on cpu"):
        pf.sample(fm, x, c=c)
    with pytest.raises(ValueError, match="c is on cuda:0 but noise is on cpu"):
        pf.sample_ode(fm, x, c=c, guidance=2.0)


# -- data parallel: two processes equal one ---------------------------------------------------------

def _gloo():
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _assert_runs_equal(multi, single, atol, rtol):
    assert multi.keys() == single.keys()
    for name in single:
        for part in ("model", "ema", "objective"):
            for k, v in single[name][part].items():
                torch.testing.assert_close(multi[name][part][k], v, atol=atol, rtol=rtol,
                                           msg=lambda m, name=name, k=k: f"{name} {k}: {m}")
        assert multi[name]["losses"] == pytest.approx(single[name]["losses"], rel=1e-4, abs=1e-6), name
        assert multi[name]["grad_norms"] == pytest.approx(single[name]["grad_norms"], rel=1e-4, abs=1e-6), name
        moved = max((single[name]["model"][k] - v).abs().max().item() for k, v in single[name]["init"].items())
        assert moved > 100 * atol, f"{name}: training did not change the model"


@pytest.mark.skipif(not _gloo(), reason="torch.distributed with gloo is not available")
def test_ddp_with_label_dropout_and_guidance_equals_one_process(tmp_path):
    """Two gloo processes, each with its rows (and labels) of the global batch, train the
    conditional MLP exactly as one process: the dropout mask and the guidance scales are drawn
    over the global batch, so every row gets the same null label and w on either side."""
    from tests.ddp_jobs import JOBS_COND, cond_worker, free_port, run_cond_jobs

    out = tmp_path / "multi.pt"
    mp.start_processes(cond_worker, args=(2, free_port(), JOBS_COND, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_cond_jobs(JOBS_COND)
    finally:
        torch.set_num_threads(threads)
    # float64 throughout: only the order of the gradient sums differs
    _assert_runs_equal(torch.load(out), single, atol=1e-10, rtol=1e-8)


@pytest.mark.skipif(not _gloo(), reason="torch.distributed with gloo is not available")
def test_ddp_conditional_2d_trainer_equals_one_process(tmp_path):
    """The 2D trainer's labelled 8-Gaussians run (labels sharded with their rows by
    next_batch) on two gloo processes ends where one process ends."""
    from tests.ddp_jobs import JOBS_COND_2D
    from tests.test_distributed import _assert_same, _single, _spawn

    jobs = [("2d", obj, mode, extra) for obj, mode, extra in JOBS_COND_2D]
    multi = _spawn(2, jobs, out=tmp_path / "multi.pt")
    _assert_same(multi, _single(jobs))


# -- resume of a conditional 2D run ---------------------------------------------------------------

TINY_2D = dict(hidden=32, depth=2, emb_dim=8, batch=64, log_every=1, ckpt_every=5)
CONDITIONAL_RUNS = {
    "lsd-guided": dict(objective="lsd", p_uncond=0.2, guidance=2.0),
    "meanflow-w-input": dict(objective="meanflow", p_uncond=0.2, guidance_max=3.0),
    "psd-u-dropout": dict(objective="psd-u", p_uncond=0.3),
}


@pytest.mark.parametrize("run", list(CONDITIONAL_RUNS))
def test_conditional_2d_run_resumes_exactly(tmp_path, run):
    from pyflowmap.toy2d.config import TrainConfig
    from pyflowmap.toy2d.train import Trainer

    cfg = TrainConfig(data="8gaussians", conditional=True, steps=12, **TINY_2D, **CONDITIONAL_RUNS[run])
    full = Trainer(cfg, out_dir=tmp_path / "full", progress=False).fit()
    assert cond_.num_classes(full.model) == 8
    assert cond_.takes_guidance(full.model) == ("guidance_max" in CONDITIONAL_RUNS[run])
    first = Trainer(cfg, out_dir=tmp_path / "split", progress=False).fit(stop_after=7)
    assert first.step == 7 and (tmp_path / "split" / "checkpoint.pt").exists()
    del first
    resumed = Trainer.resume(tmp_path / "split", progress=False).fit()
    assert resumed.step == 12 and cond_.num_classes(resumed.model) == 8
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    # the labels reached training: the class embedding table moved (every row of a class that
    # was drawn, the null row through the dropped labels)
    table = full.model.net.cond_emb.table.weight
    fresh = Trainer(cfg, progress=False).model.net.cond_emb.table.weight
    assert ((table - fresh).abs().amax(1) > 0).all()
