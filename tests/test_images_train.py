"""Image training: every objective learns on the 8x8 digits (short runs beat the untrained model
on the classifier Frechet distance), derivative modes agree on image objectives, exact resume,
the non-finite guard, configuration errors, PNG grids and the sampler plumbing."""

import copy

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from pyflowmap.derivatives import FiniteDifference  # noqa: E402
from pyflowmap.flowmap import FlowMap  # noqa: E402
from pyflowmap.images.config import ImageConfig, build_image_model
from pyflowmap.images.evaluate import evaluate_model, generate, save_image_grid  # noqa: E402
from pyflowmap.images.train import ImageTrainer, load_run  # noqa: E402
from pyflowmap.nn.unet import UNetFlowMap  # noqa: E402
from pyflowmap.objectives import make_objective  # noqa: E402
from pyflowmap.times import TimeSampler  # noqa: E402
from tests.helpers import DIGITS_TINY  # noqa: E402

TINY = DIGITS_TINY  # the fixtures evaluator and fm_teacher are in tests/conftest.py


def _best_cfd(model, evaluator, sampler=None):
    rows = evaluate_model(model, evaluator, steps=(1, 2, 4), samplers=sampler, n=400, seed=1)
    return min(r["cfd"] for r in rows)


OBJECTIVES = ["fm", "lsd", "esd", "psd-u", "psd-m", "meanflow", "shortcut", "ect", "lmd", "emd", "pfmm"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_short_training_improves_the_metric(objective, evaluator, fm_teacher, tmp_path):
    extra = dict(teacher=str(fm_teacher), semigradient=objective == "emd") if objective in ("lmd", "emd", "pfmm") else {}
    trainer = ImageTrainer(ImageConfig(objective=objective, steps=150, **extra, **TINY), out_dir=tmp_path,
                           progress=False)
    sampler = ("ode",) if objective == "fm" else None
    untrained = _best_cfd(copy.deepcopy(trainer.ema), evaluator, sampler)
    trainer.fit()
    assert trainer.skipped == 0
    trained = _best_cfd(load_run(tmp_path)[0], evaluator, sampler)
    # untrained: noise (flow maps start at the identity) scores ~200 (~600 for ECT); real
    # digits 1.5. A short run must at least halve it.
    assert trained < 0.5 * untrained, (objective, untrained, trained)


def test_ect_tuning_starts_from_the_pretrained_run(evaluator, tmp_path):
    pre = ImageTrainer(ImageConfig(objective="ect-pretrain", steps=100, **TINY), out_dir=tmp_path / "pre",
                       progress=False).fit()
    tuned = ImageTrainer(ImageConfig(objective="ect", steps=60, init=str(tmp_path / "pre"), **TINY),
                         out_dir=tmp_path / "ect", progress=False)
    for a, b in zip(tuned.model.parameters(), pre.ema.parameters()):
        assert torch.equal(a, b)  # tuning starts at the pretrained EMA weights
    start = _best_cfd(copy.deepcopy(tuned.ema), evaluator)
    tuned.fit()
    assert _best_cfd(load_run(tmp_path / "ect")[0], evaluator) < 1.2 * start  # tuning keeps (or improves) quality
    with pytest.raises(ValueError, match="different model"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, init=str(tmp_path / "pre"), **{**TINY, "ch": 8}))


# -- derivative modes on image objectives ------------------------------------------------------
def _random_unet(seed):
    torch.manual_seed(seed)
    net = UNetFlowMap(1, ch=8, emb_dim=8, groups=4).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the zero-initialized output would make v = 0
    return FlowMap(net)


@pytest.mark.parametrize("name", ["lsd", "esd", "meanflow", "lmd", "emd"])
def test_derivative_modes_agree_on_images(name):
    student, teacher = _random_unet(0), _random_unet(1)
    x1 = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1
    results = {}
    for mode in ("dual", "jvp", FiniteDifference(dtype=torch.float64)):
        kw = dict(derivative=mode, times=TimeSampler(diag_fraction=0.25))
        if name in ("lmd", "emd"):
            kw.update(teacher=teacher, semigradient=name == "emd")
        obj = make_objective(name, **kw)
        student.zero_grad()
        out = obj(student, x1, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        results[str(mode)] = (out.loss.detach(), [p.grad.clone() for p in student.parameters()])
    (ld, gd), (lj, gj), (lf, gf) = results.values()
    torch.testing.assert_close(lj, ld, rtol=1e-10, atol=1e-12)
    for a, b in zip(gj, gd):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # central differences in float64 with h = eps^(1/3): error O(h^2) ~ 1e-10 relative
    torch.testing.assert_close(lf, ld, rtol=1e-6, atol=1e-8)
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- the loop ----------------------------------------------------------------------------------
def test_resume_is_exact_with_dropout(tmp_path):
    cfg = ImageConfig(objective="lsd", steps=6, dropout=0.2, **{**TINY, "ch": 8, "batch": 16, "log_every": 1})
    full = ImageTrainer(cfg, out_dir=tmp_path / "full", progress=False).fit()
    ImageTrainer(cfg, out_dir=tmp_path / "split", progress=False).fit(stop_after=3)
    resumed = ImageTrainer.resume(tmp_path / "split", progress=False).fit()
    assert resumed.step == full.step == 6
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    with pytest.raises(ValueError, match="cannot change"):
        ImageTrainer.resume(tmp_path / "split", ch=32)


def test_non_finite_step_is_skipped_and_never_saved(tmp_path, monkeypatch):
    trainer = ImageTrainer(ImageConfig(objective="fm", steps=4, max_bad_steps=2, **{**TINY, "ch": 8, "batch": 8}),
                           out_dir=tmp_path, progress=False)
    trainer.fit(steps=2)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    before = copy.deepcopy(trainer.model.state_dict())
    real = trainer.loss_output

    def poisoned():
        out = real()
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "loss_output", poisoned)
    with pytest.warns(UserWarning, match="non-finite loss, step skipped"):
        trainer.train_step()
    assert trainer.skipped == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k])
    from pyflowmap.training import NonFiniteTraining

    with pytest.raises(NonFiniteTraining), pytest.warns(UserWarning, match="2 in a row"):
        trainer.fit()
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="needs teacher"):
        ImageConfig(objective="lmd")
    with pytest.raises(ValueError, match="takes no teacher"):
        ImageConfig(objective="lsd", teacher="x")
    with pytest.raises(ValueError, match="objective must be one of"):
        ImageConfig(objective="cd")
    with pytest.raises(ValueError, match="dropout"):
        ImageConfig(dropout=1.0)
    ImageTrainer(ImageConfig(objective="lsd", steps=1, **{**TINY, "ch": 8, "batch": 4}), out_dir=tmp_path / "lsd",
                 progress=False).fit()
    with pytest.raises(ValueError, match="must be an fm run"):
        ImageTrainer(ImageConfig(objective="lmd", teacher=str(tmp_path / "lsd"), steps=1, **TINY))
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nothing")


# -- sampling and grids ------------------------------------------------------------------------
def test_generate_reuses_the_noise_and_checks_the_sampler():
    fm = build_image_model(ImageConfig(objective="fm", **TINY), 1).eval()
    # an untrained flow map is the identity: every step count returns the starting noise
    a = generate(fm, "map", 1, 10, (1, 8, 8), seed=5, chunk=3)
    b = generate(fm, "ode", 4, 10, (1, 8, 8), seed=5)
    assert torch.equal(a, b) and torch.equal(a, torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="does not fit"):
        generate(fm, "consistency", 1, 4, (1, 8, 8))
    cm = build_image_model(ImageConfig(objective="ect", **TINY), 1).eval()
    assert generate(cm, "consistency", 2, 4, (1, 8, 8)).shape == (4, 1, 8, 8)


def test_png_grid_layout_and_values(tmp_path):
    from PIL import Image

    x = torch.full((5, 1, 4, 4), -1.0)
    x[1] = 1.0
    path = save_image_grid(x, tmp_path / "g.png", nrow=3, scale=1, pad=1)
    img = torch.from_numpy(__import__("numpy").asarray(Image.open(path)).copy())
    assert img.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert img[1, 1] == 0 and img[1, 6] == 255 and img[0, 0] == 255  # black, white, padding
    assert img[6:10, 11:15].eq(255).all()  # the empty sixth cell stays padding
    with pytest.raises(ValueError, match="NaN"):
        save_image_grid(x * float("nan"), tmp_path / "n.png")
    with pytest.raises(ValueError, match="need"):
        save_image_grid(torch.zeros(0, 1, 4, 4), tmp_path / "e.png")


def test_review_regressions_schedule_data_device_paths(tmp_path, monkeypatch):
    # ECT's stage length is resolved once and survives an extended resume
    cfg = ImageConfig(objective="ect", steps=8, **{**TINY, "ch": 8, "batch": 4})
    assert cfg.ect_stage == 2
    ImageTrainer(cfg, out_dir=tmp_path / "ect", progress=False).fit()
    longer = ImageTrainer.resume(tmp_path / "ect", progress=False, steps=40)
    assert longer.cfg.ect_stage == 2 and longer.objective.schedule.stage_length == 2
    # moving between CPU and CUDA is refused (generator states differ)
    with pytest.raises(ValueError, match="cannot resume a cpu run on cuda"):
        ImageTrainer.resume(tmp_path / "ect", device="cuda")
    # a run built from a tensor resumes on that tensor, and refuses other image sizes
    data = torch.rand(20, 1, 8, 8) * 2 - 1
    small = ImageConfig(objective="fm", steps=2, **{**TINY, "ch": 8, "batch": 4})
    ImageTrainer(small, out_dir=tmp_path / "t", progress=False, data=data).fit()
    assert ImageTrainer.resume(tmp_path / "t", progress=False, data=data, steps=3).fit().step == 3
    with pytest.raises(ValueError, match="trained on 1 x \\[8, 8\\] images"):
        ImageTrainer.resume(tmp_path / "t", data=torch.zeros(4, 1, 12, 12))
    # relative teacher / init paths are stored absolute
    monkeypatch.chdir(tmp_path)
    assert ImageConfig(objective="ect", init="ect", **TINY).init == str(tmp_path / "ect")
    with pytest.raises(ValueError, match="dropout=0"):
        ImageConfig(objective="lsd", derivative="fd", dropout=0.1)
    with pytest.raises(ValueError, match="semigradient applies"):
        ImageConfig(objective="lsd", semigradient=True)


def test_consistency_noise_is_shared_across_step_counts():
    torch.manual_seed(0)
    cm = build_image_model(ImageConfig(objective="ect", **TINY), 1).eval()
    torch.nn.init.normal_(cm.net.out.weight, std=0.1)
    # with sigma_max = 80 the one-step output is c_skip z * 80 + c_out F: compare the inputs the
    # sampler starts from via a model that returns its input (boundary c_skip -> the noise)
    starts = []
    orig = cm.forward
    cm.forward = lambda x, sigma, boundary=False: starts.append(x.clone()) or orig(x, sigma, boundary)
    generate(cm, "consistency", 1, 7, (1, 8, 8), seed=3, chunk=3)
    one = torch.cat(starts[:3])
    starts.clear()
    generate(cm, "consistency", 2, 7, (1, 8, 8), seed=3, chunk=3)
    two = torch.cat(starts[0::2])  # each chunk: the sigma_max call, then the re-noised call
    assert torch.equal(one, two)
