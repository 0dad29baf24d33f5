"""What a run shows of its training (issue 19): train_log.jsonl (one JSON row per logged step,
what the history holds), TensorBoard event files when tensorboard is installed, the loss-curve
PNG, and a resumed run that logs each step once."""

import json

import pytest

from pyflowmap.cli import main
from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training.runlog import LOG, TENSORBOARD, has_tensorboard, read_log

TINY = dict(hidden=32, depth=2, emb_dim=8, batch=64, log_every=2, ckpt_every=4)


def _rows(path):
    return [json.loads(line) for line in (path / LOG).read_text().splitlines()]


def test_log_rows_parse_and_match_the_history(tmp_path):
    trainer = Trainer(TrainConfig(steps=8, **TINY), out_dir=tmp_path, progress=False).fit()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8] == [h["step"] for h in trainer.history]
    for r, h in zip(rows, trainer.history):
        assert {k: r[k] for k in h} == h  # the same numbers, plus the seconds
        assert r["seconds"] > 0
    assert {"loss", "fm", "distill", "lr", "grad_norm"} <= set(rows[0])
    assert read_log(tmp_path) == rows


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed after logging steps it had not checkpointed logs them again on resume; the
    log keeps each step once, with the resumed run's numbers, and drops a torn last line."""
    first = Trainer(TrainConfig(steps=8, **TINY), out_dir=tmp_path, progress=False)
    first.fit(stop_after=4)  # checkpoint at step 4
    first.close()
    with open(tmp_path / LOG, "a") as f:  # logged after the checkpoint, then killed mid-line
        f.write(json.dumps({"step": 6, "loss": 999.0}) + "\n" + '{"step": 7, "lo')
    resumed = Trainer.resume(tmp_path, progress=False).fit()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[2]["loss"] == resumed.history[2]["loss"] != 999.0


@pytest.mark.skipif(not has_tensorboard(), reason="tensorboard is not installed (pyflowmap[track])")
def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(TrainConfig(steps=6, **TINY), out_dir=tmp_path, progress=False).fit()
    acc = EventAccumulator(str(tmp_path / TENSORBOARD))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/fm", "train/distill", "train/lr", "grad_norm/fm"} <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert losses == pytest.approx([h["loss"] for h in trainer.history], rel=1e-6)


def test_cli_train_writes_the_loss_curves(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "6", "--hidden", "32", "--depth", "2", "--emb-dim", "8",
                 "--batch", "64", "--log-every", "2", "--quiet"]) == 0
    png = out / "training.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_rows(out)) == 3
