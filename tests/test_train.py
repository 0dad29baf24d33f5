"""Trainer: exact resume, the non-finite guard, atomic checkpoints, and training that learns."""

import os

import pytest
import torch

from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training import NonFiniteTraining
from pyflowmap.training.checkpoint import load_checkpoint, save_checkpoint

TINY = dict(hidden=32, depth=2, emb_dim=8, batch=64, log_every=1, ckpt_every=5)


def params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("objective", ["lsd", "psd-u", "esd", "shortcut", "sct"])
def test_resume_is_exact(tmp_path, objective):
    cfg = TrainConfig(objective=objective, steps=12, **TINY)
    full = Trainer(cfg, out_dir=tmp_path / "full", progress=False).fit()

    first = Trainer(cfg, out_dir=tmp_path / "split", progress=False).fit(stop_after=7)
    assert first.step == 7 and (tmp_path / "split" / "checkpoint.pt").exists()
    del first
    resumed = Trainer.resume(tmp_path / "split", progress=False).fit()
    assert resumed.step == 12
    for a, b in zip(params(full), params(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_same_seed_same_run_and_other_seed_differs():
    cfg = TrainConfig(steps=5, **TINY)
    a = Trainer(cfg, progress=False).fit()
    b = Trainer(cfg, progress=False).fit()
    c = Trainer(TrainConfig(steps=5, seed=1, **TINY), progress=False).fit()
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert not all(torch.equal(x, y) for x, y in zip(params(a), params(c)))


def test_non_finite_step_is_skipped(tmp_path):
    trainer = Trainer(TrainConfig(steps=6, **TINY), out_dir=tmp_path, progress=False)
    real = trainer.objective.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.objective.forward = flaky
    trainer.fit(stop_after=2)
    before = params(trainer)
    opt_state = {k: v["step"].clone() for k, v in trainer.optimizer.state.items()}
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss, step skipped \(1 skipped so far"):
        assert trainer.train_step() is None  # the NaN step, reported
    assert trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params(trainer)))
    assert all(torch.equal(opt_state[k], v["step"]) for k, v in trainer.optimizer.state.items())
    trainer.fit()
    assert trainer.step == 6 and all(torch.isfinite(p).all() for p in params(trainer))
    assert load_checkpoint(tmp_path)["skipped"] == 1


def test_training_stops_after_too_many_bad_steps(tmp_path):
    trainer = Trainer(TrainConfig(steps=50, max_bad_steps=3, **TINY), out_dir=tmp_path, progress=False)
    trainer.fit(stop_after=5)
    good = load_checkpoint(tmp_path)
    real = trainer.objective.forward

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss + float("inf")
        return out

    trainer.objective.forward = broken
    with pytest.raises(NonFiniteTraining, match="consecutive non-finite"):
        trainer.fit()
    after = load_checkpoint(tmp_path)
    assert after["step"] == good["step"]


def test_non_finite_parameters_never_overwrite_a_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig(steps=3, **TINY), out_dir=tmp_path, progress=False).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.warns(UserWarning, match="NOT written"):
        assert trainer.save() is None
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary left behind


def test_resume_refuses_to_change_the_model(tmp_path):
    Trainer(TrainConfig(steps=2, **TINY), out_dir=tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="cannot change"):
        Trainer.resume(tmp_path, hidden=64)
    longer = Trainer.resume(tmp_path, progress=False, steps=4).fit()
    assert longer.step == 4


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="lmd")
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"bogus": 1})


def test_logged_steps_carry_each_parts_gradient_norm():
    """grad_norm_fm / grad_norm_distill: each part's gradient alone, on logged steps; the total
    (pre-clipping) norm obeys the triangle inequality with them, which fails if they are not
    the parts' own gradients."""
    cfg = TrainConfig(objective="lsd", steps=6, **{**TINY, "log_every": 2})
    trainer = Trainer(cfg, progress=False).fit()
    assert len(trainer.history) == 3
    for row in trainer.history:
        a, b, total = row["grad_norm_fm"], row["grad_norm_distill"], row["grad_norm"]
        assert a > 0 and b > 0
        assert abs(a - b) - 1e-6 <= total <= a + b + 1e-6
