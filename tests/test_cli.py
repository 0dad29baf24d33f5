"""The command line end to end on a tiny run: train, resume, eval (PNG + JSON), sample."""

import json

import torch

from pyflowmap.cli import main

TINY = ["--hidden", "16", "--depth", "1", "--emb-dim", "8", "--batch", "32", "--quiet"]


def test_train_resume_eval_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--objective", "psd-m", *TINY]) == 0
    assert (run / "checkpoint.pt").exists() and (run / "config.json").exists()
    # a second plain train refuses to clobber the run
    assert main(["train", "--out", str(run), "--steps", "4", *TINY]) == 2
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--quiet"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6

    assert main(["eval", "--ckpt", str(run), "--steps", "1", "2", "--n", "2000"]) == 0
    out = capsys.readouterr().out
    assert "flow map (jumps)" in out and "exact data (floor)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["results"]) == {"map", "euler", "heun"}
    assert metrics["results"]["map"]["2"]["kl"] > 0 and metrics["train_steps"] == 6
    assert (run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "50", "--out", str(tmp_path / "x.pt")]) == 0
    assert torch.load(tmp_path / "x.pt", weights_only=True).shape == (50, 2)


def test_conditional_2d_train_eval_sample(tmp_path, capsys):
    run = tmp_path / "cond"
    assert main(["train", "--out", str(run), "--steps", "3", "--data", "8gaussians", "--conditional",
                 "--guidance", "2", *TINY]) == 0
    assert main(["eval", "--ckpt", str(run), "--steps", "1", "--n", "512", "--samplers", "map",
                 "--cfg-scale", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "accuracy (higher is better)" in out and "guidance 1.5 at sampling" in out
    acc = json.loads((run / "metrics.json").read_text())["results"]["map"]["1"]["accuracy"]
    assert 0 <= acc <= 1
    x = tmp_path / "x.pt"
    assert main(["sample", "--ckpt", str(run), "--label", "3", "--cfg-scale", "2", "--n", "20", "--out", str(x)]) == 0
    assert torch.load(x, weights_only=True).shape == (20, 2)
    # bad input is exit 2 with a message: a label beyond the null class, a toy without labels,
    # guidance at sampling for an unconditional run
    assert main(["sample", "--ckpt", str(run), "--label", "9", "--out", str(x)]) == 2
    assert "--label must be in [0, 8]" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "s"), "--data", "spiral", "--conditional", *TINY]) == 2
    assert "labelled toy" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), "--steps", "1", *TINY]) == 0
    assert main(["eval", "--ckpt", str(plain), "--n", "64", "--cfg-scale", "2"]) == 2


def test_demo_runs_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--n", "1000", *TINY]) == 0
    out = capsys.readouterr().out
    assert "1 step" in out and "8 steps" in out


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--batch", "0", "--quiet"]) == 2


def test_image_train_resume_eval(tmp_path, capsys, monkeypatch):
    import pytest

    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    monkeypatch.setenv("PYFLOWMAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    common = ["--out", str(out), "--dataset", "digits", "--ch", "8", "--emb-dim", "8", "--batch", "8", "--quiet"]
    assert main(["image-train", "--objective", "psd-m", "--steps", "2", *common]) == 0
    assert main(["image-train", "--objective", "psd-m", "--steps", "2", *common]) == 2  # no silent overwrite
    assert main(["image-train", "--resume", "--steps", "3", *common]) == 0
    assert main(["image-eval", "--ckpt", str(out), "--steps", "1", "2", "--n", "40"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and [r["steps"] for r in metrics["rows"]] == [1, 2]
    assert (out / "samples-map-2step.png").is_file()
    assert "classifier Frechet distance" in capsys.readouterr().out
    assert main(["image-train", "--objective", "lmd", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "needs teacher" in capsys.readouterr().err


def test_sct_and_scd_2d_train_eval_sample(tmp_path, capsys):
    """sCM in the 2D CLI: a TrigFlow run evaluates and samples with the consistency sampler
    (N(0, I) noise), scd distills an fm run, a flow-map sampler on it is a clear error."""
    fm = tmp_path / "fm"
    assert main(["train", "--out", str(fm), "--steps", "3", "--objective", "fm", *TINY]) == 0
    for name, extra in (("sct", []), ("scd", ["--teacher", str(fm)])):
        run = tmp_path / name
        assert main(["train", "--out", str(run), "--steps", "3", "--objective", name, *extra, *TINY]) == 0
        assert main(["eval", "--ckpt", str(run), "--steps", "1", "2", "--n", "512"]) == 0
        assert "consistency (re-noising)" in capsys.readouterr().out
        assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "20", "--out", str(tmp_path / "x.pt")]) == 0
        assert main(["sample", "--ckpt", str(run), "--sampler", "map", "--out", str(tmp_path / "y.pt")]) == 2
        assert "does not fit" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "bad"), "--steps", "3", "--objective", "scd", *TINY]) == 2
    assert "teacher" in capsys.readouterr().err
