"""sCT and sCD in the image trainer: short runs beat the untrained model on the classifier
Frechet distance, sCD starts from its fm teacher's weights (the denoiser), exact resume, the
tangent metrics in the history, configuration errors."""

import copy

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from pyflowmap.images.config import ImageConfig  # noqa: E402
from pyflowmap.images.evaluate import default_samplers, evaluate_model  # noqa: E402
from pyflowmap.images.train import ImageTrainer, load_run  # noqa: E402
from pyflowmap.trigflow import TrigFlowConsistency  # noqa: E402
from tests.helpers import DIGITS_TINY as TINY  # noqa: E402  (fixtures evaluator, fm_teacher: tests/conftest.py)


def _best_cfd(model, evaluator):
    return min(r["cfd"] for r in evaluate_model(model, evaluator, steps=(1, 2), n=400, seed=1))


@pytest.mark.parametrize("objective", ["sct", "scd"])
def test_short_training_improves_the_metric(objective, evaluator, fm_teacher, tmp_path):
    extra = dict(teacher=str(fm_teacher)) if objective == "scd" else {}
    trainer = ImageTrainer(ImageConfig(objective=objective, steps=150, **extra, **TINY), out_dir=tmp_path,
                           progress=False)
    assert isinstance(trainer.model, TrigFlowConsistency) and default_samplers(trainer.model) == ("consistency",)
    untrained = _best_cfd(copy.deepcopy(trainer.ema), evaluator)
    trainer.fit()
    assert trainer.skipped == 0
    assert all(h["tangent_explosion"] == 0 for h in trainer.history)
    assert {"tangent_norm", "tangent_warmup", "consistency"} <= set(trainer.history[-1])
    trained = _best_cfd(load_run(tmp_path)[0], evaluator)
    assert trained < 0.5 * untrained, (objective, untrained, trained)


def test_scd_starts_from_its_teacher_as_a_denoiser(fm_teacher, tmp_path):
    teacher = load_run(fm_teacher)[0]
    with pytest.raises(ValueError, match="--time-scale 100"):  # sCM's default 10 is not the teacher's embedding
        ImageTrainer(ImageConfig(objective="scd", steps=2, teacher=str(fm_teacher), init=str(fm_teacher), **TINY),
                     out_dir=tmp_path / "refused", progress=False)
    scd = ImageTrainer(ImageConfig(objective="scd", steps=2, teacher=str(fm_teacher), init=str(fm_teacher),
                                   time_scale=100.0, **TINY), out_dir=tmp_path, progress=False)
    for a, b in zip(scd.model.net.parameters(), teacher.net.parameters()):
        assert torch.equal(a, b)
    # the linear parameterization makes f = I_t + (1 - t) u: the teacher's denoiser E[y | x]
    x, tau = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 0.9, 1.4])
    i, t = scd.model.path.to_linear(x, tau)
    with torch.no_grad():
        torch.testing.assert_close(scd.model(x, tau), i + (1 - t).view(-1, 1, 1, 1) * teacher.velocity(i, t))


def test_resume_is_exact_with_dropout(tmp_path):
    cfg = ImageConfig(objective="sct", steps=6, dropout=0.2, **{**TINY, "ch": 8, "batch": 16, "log_every": 1})
    full = ImageTrainer(cfg, out_dir=tmp_path / "full", progress=False).fit()
    ImageTrainer(cfg, out_dir=tmp_path / "split", progress=False).fit(stop_after=3)
    resumed = ImageTrainer.resume(tmp_path / "split", progress=False).fit()
    assert resumed.step == full.step == 6 and full.cfg.scm_warmup == 1 and full.cfg.time_scale == 10
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.objective.state_dict().values(), resumed.objective.state_dict().values()):
        assert torch.equal(a, b)  # the learned weighting too
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("kw,match", [
    ({"objective": "scd"}, "needs teacher"),
    ({"objective": "sct", "teacher": "/tmp"}, "takes no teacher"),
    ({"objective": "sct", "scm_param": "edm"}, "scm_param"),
    ({"objective": "sct", "scm_warmup": -1}, "scm_warmup"),
    ({"objective": "sct", "time_scale": -1.0}, "time_scale"),
    ({"objective": "sct", "conditional": True, "p_uncond": 0.1, "guidance": 2.0}, "guidance"),
    ({"objective": "sct", "conditional": True, "p_uncond": 0.1, "guidance_max": 3.0}, "guidance_max"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageConfig(**{**TINY, **kw})
