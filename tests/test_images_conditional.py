"""Class-conditional image runs on the 8x8 digits: training with condition dropout and guidance
(flow-map objectives, ECT pretraining and guided tuning), label checks, exact resume, scoring on
requested labels and the command line. Tiny runs: the plumbing, not the quality."""

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from pyflowmap import conditioning  # noqa: E402
from pyflowmap.cli import main  # noqa: E402
from pyflowmap.images import metrics  # noqa: E402
from pyflowmap.images.classifier import DigitClassifier  # noqa: E402
from pyflowmap.images.config import ImageConfig, build_image_model  # noqa: E402
from pyflowmap.images.data import Batches, load_digits  # noqa: E402
from pyflowmap.images.evaluate import evaluate_model, generate  # noqa: E402
from pyflowmap.images.metrics import ImageEvaluator  # noqa: E402
from pyflowmap.images.train import ImageTrainer, load_run  # noqa: E402

TINY = dict(dataset="digits", ch=8, emb_dim=8, batch=8, lr=2e-3, warmup=2, log_every=1, ckpt_every=1000)
COND = dict(conditional=True, p_uncond=0.1)


def _classifier():
    # an untrained classifier: the metric's plumbing, without the seconds of training one
    torch.manual_seed(0)
    return DigitClassifier(1, 10, 8).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def evaluator():
    return ImageEvaluator("digits", classifier=_classifier())


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_batches_with_labels_draw_the_same_rows():
    x = torch.arange(20.0).view(20, 1, 1, 1).expand(20, 1, 4, 4).contiguous()
    y = torch.arange(20) + 100
    for batch in (5, 30):  # a permutation, and draws with replacement
        plain = Batches(x)(batch, torch.Generator().manual_seed(1))
        xs, ys = Batches(x, labels=y)(batch, torch.Generator().manual_seed(1))
        assert torch.equal(plain, xs) and torch.equal(ys, xs[:, 0, 0, 0].long() + 100)
    with pytest.raises(ValueError, match="integer tensor"):
        Batches(x, labels=y.float())


def test_conditional_flow_map_run_and_scores(evaluator, tmp_path):
    cfg = ImageConfig(objective="lsd", steps=3, guidance=2.0, **COND, **TINY)
    trainer = ImageTrainer(cfg, out_dir=tmp_path / "lsd", progress=False).fit()
    assert trainer.skipped == 0 and trainer.objective.guidance == 2.0 and trainer.objective.p_uncond == 0.1
    model, cfg2, state = load_run(tmp_path / "lsd")
    assert state["num_classes"] == 10 and conditioning.num_classes(model) == 10 and cfg2.guidance == 2.0
    rows = evaluate_model(model, evaluator, steps=(1, 2), n=30, guidance=(None, 2.0), grid_dir=tmp_path / "g",
                          name="s")
    assert [(r["steps"], r["guidance"]) for r in rows] == [(1, None), (2, None), (1, 2.0), (2, 2.0)]
    assert all(0 <= r["accuracy"] <= 1 and r["guidance_as"] == "sampling" and r["n"] == 30 for r in rows)
    from PIL import Image

    # one class per row: 10 rows of min(8, 30 // 10) = 3 digits (8 px + 1 px padding, scale 2)
    assert Image.open(tmp_path / "g" / "s-map-cfg2-1step.png").size == (2 * (3 * 9 + 1), 2 * (10 * 9 + 1))
    assert (tmp_path / "g" / "s-map-2step.png").is_file()
    # an unconditional model takes no guidance; the accuracy is the classifier's on the labels
    fm = build_image_model(ImageConfig(objective="fm", **TINY), 1).eval()
    with pytest.raises(ValueError, match="class-conditional model"):
        evaluate_model(fm, evaluator, steps=(1,), n=10, guidance=(2.0,))
    assert "accuracy" not in evaluate_model(fm, evaluator, steps=(1,), n=10)[0]
    x, y = load_digits()
    acc = float((evaluator.model(x[:300]).argmax(1) == y[:300]).float().mean())
    assert evaluator(x[:300], y[:300])["accuracy"] == pytest.approx(acc)
    with pytest.raises(ValueError, match="labels must lie in"):
        evaluator(x[:4], torch.tensor([0, 1, 2, 10]))
    # generate: the labels reach the network (the null class and a real one differ once trained)
    a = generate(model, "map", 1, 6, (1, 8, 8), labels=torch.arange(6))
    b = generate(model, "map", 1, 6, (1, 8, 8), labels=torch.full((6,), 10))
    assert a.shape == b.shape == (6, 1, 8, 8) and not torch.equal(a, b)


def test_guidance_as_a_network_input(evaluator, tmp_path):
    cfg = ImageConfig(objective="meanflow", steps=2, guidance_max=3.0, **COND, **TINY)
    trainer = ImageTrainer(cfg, progress=False).fit()
    assert conditioning.takes_guidance(trainer.ema) and trainer.objective.guidance_range == (1.0, 3.0)
    rows = evaluate_model(trainer.ema, evaluator, steps=(1,), n=20, guidance=(None, 2.0))
    assert [r["guidance_as"] for r in rows] == ["input", "input"]
    with pytest.raises(ValueError, match="guidance_max .* is for flow-map objectives"):
        ImageConfig(objective="ect-pretrain", guidance_max=3.0, **COND, **TINY)


def test_ect_pretrain_then_guided_tuning(evaluator, tmp_path):
    ImageTrainer(ImageConfig(objective="ect-pretrain", steps=3, guidance=2.0, **COND, **TINY), out_dir=tmp_path / "pre",
                 progress=False).fit()
    pre = load_run(tmp_path / "pre")[0]
    with pytest.raises(ValueError, match="needs init"):
        ImageConfig(objective="ect", guidance=2.0, **COND, **TINY)
    tuned_cfg = ImageConfig(objective="ect", steps=4, guidance=2.0, init=str(tmp_path / "pre"), **COND, **TINY)
    full = ImageTrainer(tuned_cfg, out_dir=tmp_path / "full", progress=False)
    assert _same_weights(full.model, pre)  # tuning starts at the pretrained EMA weights
    assert full.objective.denoiser is not None and _same_weights(full.objective.denoiser, pre)
    full.fit()
    assert full.skipped == 0
    # guided tuning resumes exactly (the frozen denoiser travels in the checkpoint)
    ImageTrainer(tuned_cfg, out_dir=tmp_path / "split", progress=False).fit(stop_after=2)
    resumed = ImageTrainer.resume(tmp_path / "split", progress=False).fit()
    assert _same_weights(full.model, resumed.model) and _same_weights(full.ema, resumed.ema)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    rows = evaluate_model(load_run(tmp_path / "full")[0], evaluator, steps=(1, 2), n=20, guidance=(None, 1.5))
    assert len(rows) == 4 and rows[0]["sampler"] == "consistency" and "accuracy" in rows[0]
    # init from a run of another conditioning, or guided tuning from a run that is no denoiser
    ImageTrainer(ImageConfig(objective="ect-pretrain", steps=1, **TINY), out_dir=tmp_path / "plain",
                 progress=False).fit()
    with pytest.raises(ValueError, match="is unconditional, but this run is conditional on 10 classes"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, init=str(tmp_path / "plain"), **COND, **TINY))
    with pytest.raises(ValueError, match="is conditional on 10 classes.*but this run is unconditional"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, init=str(tmp_path / "pre"), **TINY))
    with pytest.raises(ValueError, match="must be a conditional ect-pretrain run"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, guidance=2.0, init=str(tmp_path / "full"), **COND, **TINY))


def test_labels_are_checked(tmp_path):
    x, y = load_digits()
    x, y = x[:40], y[:40]
    unlabelled = tmp_path / "unlabelled.pt"
    torch.save(x, unlabelled)
    with pytest.raises(ValueError, match=r"40 of 40 images labelled -1 \(-1: no label\)"):
        ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **{**TINY, "dataset": str(unlabelled)}))
    bad = tmp_path / "bad.pt"
    torch.save({"images": x, "labels": torch.where(torch.arange(40) == 3, -2, y)}, bad)
    with pytest.raises(ValueError, match="1 of 40 images labelled -2"):
        ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **{**TINY, "dataset": str(bad)}))
    with pytest.raises(ValueError, match="has none"):
        ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **TINY), data=x)
    with pytest.raises(ValueError, match="classes"):
        ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **TINY), data=x, labels=y * 10**6)
    with pytest.raises(ValueError, match="labels must be a tensor"):
        ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **TINY), data=x, labels=y[:5])
    # an unconditional run needs no labels; a conditional one takes K = max + 1
    ImageTrainer(ImageConfig(objective="fm", steps=1, **{**TINY, "dataset": str(unlabelled)}), progress=False).fit()
    t = ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **TINY), data=x, labels=y % 3, progress=False)
    assert t.num_classes == 3 and conditioning.num_classes(t.model) == 3


def test_conditional_resume_is_exact(tmp_path):
    x, y = load_digits()
    x, y = x[:64], y[:64]
    cfg = ImageConfig(objective="lsd", steps=4, guidance=2.0, dropout=0.1, **COND, **TINY)
    full = ImageTrainer(cfg, out_dir=tmp_path / "full", progress=False, data=x, labels=y).fit()
    ImageTrainer(cfg, out_dir=tmp_path / "split", progress=False, data=x, labels=y).fit(stop_after=2)
    resumed = ImageTrainer.resume(tmp_path / "split", progress=False, data=x, labels=y).fit()
    assert resumed.step == full.step == 4
    assert _same_weights(full.model, resumed.model) and _same_weights(full.ema, resumed.ema)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    with pytest.raises(ValueError, match="labels of the data tensor passed in have changed"):
        ImageTrainer.resume(tmp_path / "split", data=x, labels=y.flip(0))
    with pytest.raises(ValueError, match="cannot change"):
        ImageTrainer.resume(tmp_path / "split", data=x, labels=y, guidance=3.0)


def test_distillation_teacher_must_match_the_conditioning(tmp_path):
    ImageTrainer(ImageConfig(objective="fm", steps=1, **TINY), out_dir=tmp_path / "fm", progress=False).fit()
    ImageTrainer(ImageConfig(objective="fm", steps=1, **COND, **TINY), out_dir=tmp_path / "cfm", progress=False).fit()
    with pytest.raises(ValueError, match="teacher must be conditional .* exactly when its student is"):
        ImageTrainer(ImageConfig(objective="lmd", steps=1, teacher=str(tmp_path / "fm"), **COND, **TINY))
    with pytest.raises(ValueError, match="teacher must be conditional .* exactly when its student is"):
        ImageTrainer(ImageConfig(objective="pfmm", steps=1, teacher=str(tmp_path / "cfm"), **TINY))
    t = ImageTrainer(ImageConfig(objective="emd", steps=1, teacher=str(tmp_path / "cfm"), guidance=2.0, **COND, **TINY),
                     progress=False).fit()
    assert t.skipped == 0


def test_cli_conditional_train_and_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "cached_classifier", lambda dataset: (_classifier(), {"dataset": dataset}))
    out = tmp_path / "run"
    common = ["--out", str(out), "--dataset", "digits", "--ch", "8", "--emb-dim", "8", "--batch", "8", "--quiet"]
    assert main(["image-train", "--objective", "psd-m", "--steps", "2", "--conditional", "--p-uncond", "0.1",
                 "--guidance", "2", *common]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["conditional"], cfg["p_uncond"], cfg["guidance"]) == (True, 0.1, 2.0)
    assert main(["image-train", "--resume", "--steps", "3", "--conditional", "--guidance", "2", *common]) == 0
    assert main(["image-eval", "--ckpt", str(out), "--steps", "1", "2", "--n", "20", "--cfg-scale", "1", "2"]) == 0
    metrics_json = json.loads((out / "metrics.json").read_text())
    assert metrics_json["train_steps"] == 3 and metrics_json["num_classes"] == 10
    assert [(r["guidance"], r["steps"]) for r in metrics_json["rows"]] == [(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 2)]
    assert all("accuracy" in r for r in metrics_json["rows"])
    assert (out / "samples-map-cfg2-2step.png").is_file()
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "cfg     2" in printed
    # --cfg-scale on an unconditional run, guidance without --conditional: exit 2, named
    plain = tmp_path / "plain"
    assert main(["image-train", "--objective", "fm", "--steps", "1", *common[2:], "--out", str(plain)]) == 0
    assert main(["image-eval", "--ckpt", str(plain), "--steps", "1", "--n", "10", "--cfg-scale", "2"]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["image-train", "--objective", "fm", "--steps", "1", "--guidance", "2", *common[2:], "--out",
                 str(tmp_path / "x")]) == 2
    assert "add --conditional" in capsys.readouterr().err
