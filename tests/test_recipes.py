"""The 2D trainer's recipes (issue 19): the documented defaults are the code's, ``--recipe paper``
is one flag away, the optimizer / schedule / EMA / part-weighting options do what they say, and a
short run with the defaults learns, for every 2D objective."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

import pyflowmap as pf
from pyflowmap.cli import main
from pyflowmap.toy2d.config import RECIPES, TrainConfig
from pyflowmap.toy2d.evaluate import evaluate
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training.checkpoint import load_checkpoint
from pyflowmap.trigflow import TrigFlowConsistency
from tests.helpers import GaussianFlowMap

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
TINY = dict(hidden=32, depth=2, emb_dim=8, batch=64, fourier=4)


def documented() -> dict[str, tuple[str, str]]:
    """field -> (fast, paper) cells of the table in docs/recipes.md."""
    rows = {}
    text = DOC.read_text()
    table = text[text.index("<!-- the table is read by tests/test_recipes.py"):].split("\n\n")[0]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"[a-z_]+", cells[0]) and cells[0] != "field":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def parse(cell: str, like):
    if isinstance(like, bool):
        assert cell in ("True", "False"), cell
        return cell == "True"
    return type(like)(cell)


def test_the_documented_recipes_are_the_codes():
    table = documented()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(RECIPES["paper"]) <= set(table), "a field the paper recipe sets is missing from docs/recipes.md"
    assert RECIPES["fast"] == {}, "fast is TrainConfig's defaults"
    for name, (fast, paper) in table.items():
        assert name in defaults, f"docs/recipes.md names an unknown field {name!r}"
        assert parse(fast, defaults[name]) == defaults[name], f"fast {name}: doc {fast}, code {defaults[name]}"
        want = RECIPES["paper"].get(name, defaults[name])
        assert parse(paper, defaults[name]) == want, f"paper {name}: doc {paper}, code {want}"


def test_from_recipe_applies_the_recipe_then_the_overrides():
    cfg = TrainConfig.from_recipe("paper", steps=7, hidden=48)
    assert (cfg.steps, cfg.hidden, cfg.batch, cfg.fourier, cfg.ema_warmup) == (7, 48, 2048, 0, False)
    assert TrainConfig.from_recipe("fast") == TrainConfig()
    with pytest.raises(ValueError, match="unknown recipe 'fastest'.*fast, paper"):
        TrainConfig.from_recipe("fastest")


def test_cli_recipe_flag_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--recipe", "paper", "--steps", "2", "--hidden", "16", "--batch", "64",
            "--quiet"]
    assert main(args) == 0
    cfg = load_checkpoint(out)["config"]
    assert (cfg["hidden"], cfg["batch"], cfg["fourier"], cfg["ema_warmup"], cfg["steps"]) == (16, 64, 0, False, 2)
    assert (out / "train_log.jsonl").exists()
    assert main(["train", "--out", str(out), "--resume", "--recipe", "paper", "--quiet"]) == 2
    assert "keeps the configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown recipe before anything runs
        main(["train", "--out", str(tmp_path / "x"), "--recipe", "nope"])
    assert not (tmp_path / "x").exists()


def test_cli_resolves_the_objectives_own_defaults():
    """Flags not given stay unset, so the defaults that depend on the objective follow the one
    asked for (a regression: the CLI passed the default objective's resolved values along)."""
    from pyflowmap.cli import _config_from, build_parser

    def cfg(*flags):
        return _config_from(build_parser().parse_args(["train", "--out", "x", *flags]), TrainConfig())

    sct = cfg("--objective", "sct", "--steps", "300")
    assert (sct.time_scale, sct.scm_warmup, sct.fourier) == (10.0, 30, 64)
    assert cfg("--objective", "esd").fourier == 0 and cfg("--objective", "lsd").fourier == 64
    assert cfg("--objective", "esd", "--fourier", "16").fourier == 16
    assert cfg("--recipe", "paper", "--objective", "sct").time_scale == 10.0


@pytest.mark.parametrize("optimizer,cls", [("radam", torch.optim.RAdam), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW)])
def test_optimizer_choice(optimizer, cls):
    trainer = Trainer(TrainConfig(steps=2, optimizer=optimizer, lr=3e-3, **TINY), progress=False)
    assert type(trainer.optimizer) is cls and trainer.optimizer.param_groups[0]["lr"] == 3e-3
    trainer.fit()
    assert trainer.step == 2


def test_learning_rate_schedules():
    def factors(**kw):
        t = Trainer(TrainConfig(steps=100, **TINY, **kw), progress=False)
        return [t.lr_factor(s) for s in range(101)]

    sqrt = factors(lr_schedule="sqrt", lr_decay_after=25)
    assert sqrt[:25] == [1.0] * 25 and sqrt[100] == pytest.approx(0.5)
    assert factors(lr_schedule="constant") == [1.0] * 101
    cos = factors(lr_schedule="cosine", warmup=10)
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # linear warm-up
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.5) and cos[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    warm_sqrt = factors(lr_schedule="sqrt", lr_decay_after=25, warmup=5)
    assert warm_sqrt[2] == pytest.approx(0.6) and warm_sqrt[100] == pytest.approx(0.5)


def test_ema_warmup_ramps_then_holds_the_decay():
    t = Trainer(TrainConfig(steps=3, ema=0.999, ema_warmup=True, **TINY), progress=False)
    assert t.ema_decay() == pytest.approx(0.1)  # step 0: the EMA takes 90% of the new weights
    t.step = 90
    assert t.ema_decay() == pytest.approx(91 / 100)
    t.step = 10**6
    assert t.ema_decay() == 0.999
    assert Trainer(TrainConfig(steps=3, ema=0.999, ema_warmup=False, **TINY), progress=False).ema_decay() == 0.999


def test_bad_recipe_fields_are_refused():
    for kw, match in [(dict(optimizer="sgd"), "optimizer"), (dict(lr_schedule="step"), "lr_schedule"),
                      (dict(warmup=-1), "warmup"), (dict(fourier=-2), "fourier"), (dict(fourier_scale=0.0), "fourier_scale"),
                      (dict(part_weighting="mean"), "part_weighting"),
                      (dict(objective="sct", part_weighting="count"), "one consistency loss")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)


# -- the two part weightings, in closed form ---------------------------------------------------------

def _lsd(weighting, diag=0.25):
    return pf.objectives.LSD(base=pf.GaussianBase(0.8), times=pf.TimeSampler(diag_fraction=diag),
                             part_weighting=weighting)


def _data(n=200):
    g = torch.Generator().manual_seed(0)
    return torch.tensor([1.5, -0.5]) + torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_count_weighting_is_the_mean_over_all_samples(scale):
    fm = pf.FlowMap(GaussianFlowMap([1.5, -0.5], [1.0, 1.0], 0.8, scale=scale))
    x1 = _data()
    out = {w: _lsd(w)(fm, x1, generator=torch.Generator().manual_seed(1)) for w in ("equal", "count")}
    per, n = out["count"].per_sample, out["count"].n_diag
    assert 0 < n < x1.shape[0]
    torch.testing.assert_close(out["count"].per_sample, out["equal"].per_sample)  # same draws, same residuals
    torch.testing.assert_close(out["count"].loss, per.mean())
    torch.testing.assert_close(out["equal"].loss, per[:n].mean() + per[n:].mean())
    # the logged part means do not depend on the weighting; the loss terms do
    for key in ("fm", "distill"):
        torch.testing.assert_close(out["count"].metrics[key], out["equal"].metrics[key])
    distill = per[n:].mean()
    if scale == 1.0:  # the exact map: no distillation residual under either weighting
        assert distill < 1e-20
    else:
        assert distill > 1e-3
    with pytest.raises(ValueError, match="part_weighting"):
        _lsd("sum")


# -- a short run with the defaults learns, for every 2D objective ------------------------------------

OBJECTIVES = ["lsd", "esd", "psd-u", "psd-m", "meanflow", "shortcut", "fm", "sct", "scd"]


@pytest.fixture(scope="module")
def fm_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm_teacher")
    Trainer(TrainConfig(objective="fm", steps=300, ckpt_every=10**6), out_dir=out, progress=False).fit().close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_short_run_with_the_defaults_improves_the_checker_metric(objective, request):
    """300 steps of the default recipe (a few seconds): the EMA's 4-step samples must already be
    clearly closer to the checker than the untrained model's (which returns its input noise).
    MeanFlow and ESD (without Fourier features) start slowest (RESULTS.md section 15): 1500 steps."""
    teacher = str(request.getfixturevalue("fm_teacher")) if objective == "scd" else ""
    steps = 1500 if objective in ("meanflow", "esd") else 300
    trainer = Trainer(TrainConfig(objective=objective, steps=steps, teacher=teacher, ckpt_every=10**6), progress=False)
    sampler = ("consistency",) if isinstance(trainer.ema, TrigFlowConsistency) else ("map",)

    def kl():
        rep = evaluate(trainer.ema, trainer.base, "checker", steps=(4,), samplers=sampler, n=16384)
        return rep["results"][sampler[0]][4]["kl"]

    before = kl()
    trainer.fit()
    after = kl()
    assert math.isfinite(after) and after < before - 0.1, f"{objective}: 4-step KL {before:.3f} -> {after:.3f}"
