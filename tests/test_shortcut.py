"""Shortcut models: the dyadic times, the step-size embedding, the paper's self-consistency
target written out against the objective's (and so PSD-M's), zero residual for the exact flow
map, K-step sampling, the trainers, hostile inputs."""

from __future__ import annotations

import pytest
import torch

import pyflowmap as pf
from pyflowmap.nn.embeddings import DyadicStepEmbedding, make_step_embedding
from pyflowmap.objectives import Shortcut
from pyflowmap.times import DyadicTimeSampler
from tests.helpers import GaussianFlowMap, rand

MEAN, VAR = [1.5, -0.5], [0.3, 2.0]


def test_dyadic_times_lie_on_the_grid():
    levels = 5
    s, t, n_diag = DyadicTimeSampler(diag_fraction=0.25, levels=levels).sample(
        40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert n_diag == 10_000 and torch.equal(s[:n_diag], t[:n_diag])
    d, so, to = t[n_diag:] - s[n_diag:], s[n_diag:], t[n_diag:]
    j = -torch.log2(d)
    assert torch.equal(j, j.round()) and int(j.min()) == 0 and int(j.max()) == levels - 1
    assert torch.equal(so / d, (so / d).round())  # the start is a multiple of the jump
    assert bool((so >= 0).all()) and bool((to <= 1).all())
    counts = torch.bincount(j.long(), minlength=levels).double() / d.numel()
    torch.testing.assert_close(counts, torch.full((levels,), 1 / levels, dtype=torch.float64), atol=0.01, rtol=0)
    # within a level the starts are uniform over the 2^j slots
    k = so[j == 3] / d[j == 3]
    assert set(k.long().tolist()) == set(range(8))


def test_step_embedding_levels_and_zero_tangent():
    emb = DyadicStepEmbedding(8, levels=7)
    d = torch.tensor([1.0, 0.5, 0.25, 1 / 128, 1 / 256, 0.0, 0.3, 0.7, 2.0])
    assert emb.level(d).tolist() == [0, 1, 2, 7, 7, 7, 2, 1, 0]  # d = 0 is the finest level, as 1/128
    torch.testing.assert_close(emb(torch.zeros(1)), emb(torch.full((1,), 1 / 128)))
    stacked = emb.dual(d, torch.ones_like(d))
    assert torch.equal(stacked[d.numel():], torch.zeros(d.numel(), 8))
    with pytest.raises(ValueError, match="step_embedding"):
        make_step_embedding("log", 8)
    with pytest.raises(ValueError, match="levels"):
        DyadicStepEmbedding(8, levels=0)


@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_networks_take_the_dyadic_step_embedding(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = pf.nn.FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8, step_embedding="dyadic"), torch.randn(3, 2)
    elif kind == "unet":
        net, x = pf.nn.UNetFlowMap(1, ch=8, emb_dim=8, groups=4, step_embedding="dyadic"), torch.randn(3, 1, 8, 8)
    else:
        net = pf.nn.DiTFlowMap(8, 1, patch=2, width=16, depth=1, heads=2, emb_dim=8, step_embedding="dyadic")
        x = torch.randn(3, 1, 8, 8)
    for p in net.parameters():  # a non-zero head, so the output depends on the embedding
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    s = torch.zeros(3)
    a, b = net(x, s, torch.full((3,), 0.26)), net(x, s, torch.full((3,), 0.24))
    torch.testing.assert_close(net.emb_dt(torch.full((3,), 0.26)), net.emb_dt(torch.full((3,), 0.24)))
    assert not torch.equal(net(x, s, torch.full((3,), 0.5)), a)
    # the dual forward's step tangent is zero: v_dot from t_dot alone is the emb_s-free part only
    v, v_dot = net(x, s, torch.full((3,), 0.25), tangents=(None, None, torch.ones(3)))
    assert torch.equal(v_dot, torch.zeros_like(v_dot))
    assert a.shape == b.shape == x.shape


def _mlp_flowmap(seed=0):
    torch.manual_seed(seed)
    net = pf.nn.FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8, step_embedding="dyadic").double()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return pf.FlowMap(net)


def test_target_is_the_papers_two_half_steps_and_psd_m():
    """s(x, t, 2d) regresses on sg((s(x, t, d) + s(x', t + d, d)) / 2), x' = x + d s(x, t, d):
    PSD-M's midpoint target at the same dyadic (s, t)."""
    fm = _mlp_flowmap()
    obj = Shortcut(levels=4, diag_fraction=0.0)
    n = 64
    x0, x1 = rand(n, 2), rand(n, 2, seed=1)
    s, t, _ = obj.times.sample(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pred, target = obj.offdiag_terms(fm, x0, x1, s, t, draws=obj.draw_offdiag(n, None, "cpu", torch.float64))
    xs = (1 - s[:, None]) * x0 + s[:, None] * x1
    d = (t - s) / 2
    v = fm.net
    half = v(xs, s, s + d)
    by_hand = (half + v(xs + d[:, None] * half, s + d, t)) / 2
    torch.testing.assert_close(target, by_hand)
    torch.testing.assert_close(pred, v(xs, s, t))
    psd = pf.make_objective("psd-m")
    _, psd_target = psd.offdiag_terms(fm, x0, x1, s, t, draws=psd.draw_offdiag(n, None, "cpu", torch.float64))
    torch.testing.assert_close(psd_target, target)


def test_exact_flow_map_has_zero_residual_and_a_perturbed_one_does_not():
    x1 = torch.tensor(MEAN, dtype=torch.float64) + rand(512, 2, seed=3) * torch.tensor(VAR, dtype=torch.float64).sqrt()
    obj = Shortcut(levels=5, diag_fraction=0.25)
    exact = obj(pf.FlowMap(GaussianFlowMap(MEAN, VAR)), x1, generator=torch.Generator().manual_seed(0))
    assert float(exact.per_sample[exact.n_diag:].max()) < 1e-20
    bad = obj(pf.FlowMap(GaussianFlowMap(MEAN, VAR, scale=1.3)), x1, generator=torch.Generator().manual_seed(0))
    assert float(bad.per_sample[bad.n_diag:].mean()) > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_k_step_sampling_of_the_exact_map(steps):
    noise = rand(100_000, 2, seed=4)
    x = pf.sample(pf.FlowMap(GaussianFlowMap(MEAN, VAR)), noise, steps=steps)
    torch.testing.assert_close(x.mean(0), torch.tensor(MEAN, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor(VAR, dtype=torch.float64), atol=0.03, rtol=0)


def test_two_d_trainer_builds_the_dyadic_model_and_learns(tmp_path):
    from pyflowmap.toy2d.config import TrainConfig
    from pyflowmap.toy2d.evaluate import evaluate
    from pyflowmap.toy2d.train import Trainer

    cfg = TrainConfig(objective="shortcut", hidden=64, depth=3, emb_dim=16, batch=512, steps=400, lr=1e-2,
                      lr_decay_after=0, ema=0.0, log_every=100)
    trainer = Trainer(cfg, out_dir=tmp_path, progress=False)
    assert isinstance(trainer.model.net.emb_dt, DyadicStepEmbedding)
    before = evaluate(trainer.model, trainer.base, "checker", steps=(4,), samplers=("map",), n=16384)
    trainer.fit()
    after = evaluate(trainer.model, trainer.base, "checker", steps=(4,), samplers=("map",), n=16384)
    assert after["results"]["map"][4]["kl"] < before["results"]["map"][4]["kl"] - 0.1
    with pytest.raises(ValueError, match="time_distribution"):
        Trainer(TrainConfig(objective="shortcut", time_distribution="logit_normal", steps=1), progress=False)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="times="):
        Shortcut(times=pf.TimeSampler())
    with pytest.raises(ValueError, match="levels"):
        Shortcut(levels=0)
    with pytest.raises(ValueError, match="levels"):
        DyadicTimeSampler(levels=2.5)
    with pytest.raises(ValueError, match="t_min"):
        DyadicTimeSampler(t_min=0.1)
    with pytest.raises(ValueError, match="diag_fraction"):
        Shortcut(diag_fraction=1.5)
