"""Image runs with the DiT (ImageConfig(model="dit"), ``image-train --model dit``) on the 8x8
digits: flow-map and ECT objectives, conditional runs, exact resume, load_run / image-eval
rebuilding the same network, configs from before the field, and hostile options. Tiny
networks (width 32, depth 1, 2 heads) and a few steps: the plumbing, not the quality."""

import json
import re

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from pyflowmap.cli import main  # noqa: E402
from pyflowmap.consistency import EDMConsistency  # noqa: E402
from pyflowmap.flowmap import FlowMap  # noqa: E402
from pyflowmap.images import metrics  # noqa: E402
from pyflowmap.images.classifier import DigitClassifier  # noqa: E402
from pyflowmap.images.config import ImageConfig, build_image_model  # noqa: E402
from pyflowmap.images.train import ImageTrainer, load_run  # noqa: E402
from pyflowmap.nn.dit import DiTFlowMap  # noqa: E402
from pyflowmap.nn.unet import UNetFlowMap  # noqa: E402
from pyflowmap.training import CHECKPOINT, load_checkpoint, save_checkpoint  # noqa: E402

DIT = dict(model="dit", width=32, depth=1, heads=2)
TINY = dict(dataset="digits", batch=8, lr=2e-3, warmup=2, log_every=1, ckpt_every=1000, **DIT)
CLI_TINY = ["--dataset", "digits", "--batch", "8", "--model", "dit", "--dit-preset", "cpu-small", "--patch", "2",
            "--depth", "1", "--width", "32", "--heads", "2", "--quiet"]


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dit_run_trains_resumes_exactly_and_loads(tmp_path):
    straight = ImageTrainer(ImageConfig(objective="lsd", steps=4, **TINY), out_dir=tmp_path / "a", progress=False)
    assert isinstance(straight.model, FlowMap) and isinstance(straight.model.net, DiTFlowMap)
    straight.fit()
    assert straight.skipped == 0
    ImageTrainer(ImageConfig(objective="lsd", steps=2, **TINY), out_dir=tmp_path / "b", progress=False).fit()
    resumed = ImageTrainer.resume(tmp_path / "b", progress=False, steps=4)
    assert resumed.step == 2 and isinstance(resumed.model.net, DiTFlowMap)
    resumed.fit()
    assert resumed.step == 4 and _same_weights(resumed.model, straight.model)
    assert _same_weights(resumed.ema, straight.ema)

    model, cfg, state = load_run(tmp_path / "a")
    net = model.net
    assert cfg.model == "dit" and isinstance(net, DiTFlowMap)
    assert (net.width, net.depth, net.heads, net.patch, net.image_size) == (32, 1, 2, 2, (8, 8))
    assert _same_weights(model, straight.ema)
    stored = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: stored[k] for k in ("model", "dit_preset", "patch", "depth", "width", "heads", "qk_norm",
                                   "pos_embed")} == dict(model="dit", dit_preset="cpu-small", patch=0, depth=1,
                                                         width=32, heads=2, qk_norm=False, pos_embed="sincos")
    with pytest.raises(ValueError, match="cannot change"):
        ImageTrainer.resume(tmp_path / "a", progress=False, width=64)


def test_dit_conditional_and_options(tmp_path):
    cfg = ImageConfig(objective="meanflow", steps=3, conditional=True, guidance_max=3.0, qk_norm=True,
                      pos_embed="learned", dropout=0.1, **TINY)
    t = ImageTrainer(cfg, out_dir=tmp_path / "c", progress=False)
    t.fit()
    assert t.skipped == 0
    model, _, state = load_run(tmp_path / "c")
    net = model.net
    assert net.num_classes == 10 == state["num_classes"] and net.guidance_input
    assert net.pos_embed_kind == "learned" and net.blocks[0].attn.q_norm is not None
    x = torch.randn(4, 1, 8, 8)
    out = model(x, torch.zeros(4), torch.ones(4), c=torch.arange(4), w=torch.full((4,), 2.0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_dit_ect_pretrain_then_tuning(tmp_path):
    pre = ImageTrainer(ImageConfig(objective="ect-pretrain", steps=2, **TINY), out_dir=tmp_path / "pre",
                       progress=False)
    assert isinstance(pre.model, EDMConsistency) and isinstance(pre.model.net, DiTFlowMap)
    assert float(pre.model.net.data_std) == 1.0
    pre.fit()
    tuned = ImageTrainer(ImageConfig(objective="ect", steps=2, init=str(tmp_path / "pre"), **TINY),
                         out_dir=tmp_path / "ect", progress=False)
    assert _same_weights(tuned.model, pre.ema)
    tuned.fit()
    assert tuned.skipped == 0 and isinstance(load_run(tmp_path / "ect")[0].net, DiTFlowMap)
    # an init run of another model (a UNet, or a DiT of another width) is refused
    ImageTrainer(ImageConfig(objective="ect-pretrain", steps=1, dataset="digits", ch=8, emb_dim=8, batch=8),
                 out_dir=tmp_path / "unet", progress=False).fit()
    with pytest.raises(ValueError, match="different model"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, init=str(tmp_path / "unet"), **TINY))
    with pytest.raises(ValueError, match="different model"):
        ImageTrainer(ImageConfig(objective="ect", steps=1, init=str(tmp_path / "pre"), **{**TINY, "width": 64}))


def test_cli_dit_train_resume_eval(tmp_path, capsys, monkeypatch):
    # an untrained classifier: the metric's plumbing, without the seconds of training one
    torch.manual_seed(0)
    classifier = DigitClassifier(1, 10, 8).eval().requires_grad_(False)
    monkeypatch.setattr(metrics, "cached_classifier", lambda dataset: (classifier, {"dataset": dataset}))
    out = tmp_path / "run"
    assert main(["image-train", "--objective", "lsd", "--steps", "2", "--out", str(out), *CLI_TINY]) == 0
    assert main(["image-train", "--resume", "--steps", "3", "--out", str(out), *CLI_TINY]) == 0
    assert main(["image-train", "--resume", "--steps", "3", "--out", str(out), "--width", "64"]) == 2
    assert "cannot change ['width']" in capsys.readouterr().err
    model, cfg, state = load_run(out)
    assert state["step"] == 3 and isinstance(model.net, DiTFlowMap) and model.net.width == 32
    assert main(["image-eval", "--ckpt", str(out), "--steps", "1", "--n", "40"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["model"] == "dit"
    cond = tmp_path / "cond"
    assert main(["image-train", "--objective", "fm", "--steps", "2", "--conditional", "--out", str(cond),
                 *CLI_TINY]) == 0
    assert load_run(cond)[0].net.num_classes == 10


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit"], "model must be one of"),
    (["--model", "dit", "--dit-preset", "XL/2"], "dit_preset must be one of"),
    (["--model", "dit", "--width", "30", "--heads", "4"], "heads 4 must divide width 30"),
    (["--model", "dit", "--heads", "3"], "heads 3 must divide width 128"),
    (["--model", "dit", "--width", "-8"], "width must be in"),
    (["--model", "dit", "--width", "6", "--heads", "2"], "divisible by 4 for pos_embed='sincos'"),
    (["--model", "dit", "--pos-embed", "rope"], "pos_embed must be one of"),
    (["--model", "dit", "--patch", "3"], "patch .3. must divide the 8x8 images"),
    (["--model", "dit", "--patch", "16"], "patch .16. must divide the 8x8 images"),
    (["--patch", "2"], "need model='dit'"),
    (["--dit-preset", "S/2"], "need model='dit'"),
    (["--qk-norm"], "need model='dit'"),
])
def test_hostile_dit_options_exit_2(argv, message, tmp_path, capsys):
    code = main(["image-train", "--objective", "fm", "--steps", "1", "--dataset", "digits", "--batch", "8",
                 "--quiet", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(message, err), err
    assert not (tmp_path / "x" / CHECKPOINT).exists()


def test_hostile_dit_config_from_python():
    with pytest.raises(ValueError, match="must be int"):
        ImageConfig(**{**DIT, "width": 32.0})
    with pytest.raises(ValueError, match="must be str"):
        ImageConfig(model=None)
    with pytest.raises(ValueError, match="patch 3 must divide image_size 32"):
        ImageConfig(model="dit", patch=3, image_size=32)
    with pytest.raises(ValueError, match="patch 8 must divide image_size 12"):
        ImageConfig(model="dit", dit_preset="S/8", image_size=12)
    with pytest.raises(ValueError, match="the patch of dit_preset 'S/8' .8. must divide the 8x12 images"):
        build_image_model(ImageConfig(model="dit", dit_preset="S/8", depth=1), 1, size=(8, 12))
    with pytest.raises(ValueError, match="needs the image size"):
        build_image_model(ImageConfig(**DIT), 1)
    net = build_image_model(ImageConfig(**DIT, image_size=16), 3).net
    assert (net.patch, net.image_size, net.channels) == (4, (16, 16), 3)  # cpu-small: patch 4 from 16 px
    net = build_image_model(ImageConfig(model="dit", dit_preset="S/4", depth=1), 1, size=(8, 12)).net
    assert (net.width, net.heads, net.depth, net.patch, net.grid) == (384, 6, 1, 4, (2, 3))


def test_configs_from_before_the_model_field_are_unet_runs(tmp_path):
    out = tmp_path / "old"
    ImageTrainer(ImageConfig(objective="fm", steps=1, dataset="digits", ch=8, emb_dim=8, batch=8, log_every=1),
                 out_dir=out, progress=False).fit()
    state = load_checkpoint(out / CHECKPOINT)
    for key in ("model", "dit_preset", "patch", "depth", "width", "heads", "qk_norm", "pos_embed"):
        del state["config"][key]
    save_checkpoint(state, out / CHECKPOINT)
    model, cfg, _ = load_run(out)
    assert cfg.model == "unet" and isinstance(model.net, UNetFlowMap)
    resumed = ImageTrainer.resume(out, progress=False, steps=2, model="unet")  # restating the default: allowed
    resumed.fit()
    assert resumed.step == 2 and isinstance(resumed.model.net, UNetFlowMap)
