"""Nothing is lost: a training process killed with SIGKILL mid-run resumes from its last
checkpoint and ends bit-identical (CPU) to a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pyflowmap.training.checkpoint import load_checkpoint

KILL_AT = 27  # between the checkpoints at 20 and 30: seven steps of work are lost and redone

# The child trains, and at step KILL_AT sends itself SIGKILL from inside the step: no atexit,
# no finally, no flush, exactly what an OOM killer or a pre-empted node does.
CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    kind, out, root = sys.argv[1:4]
    sys.path.insert(0, root)
    from tests.test_reliability import _trainer
    trainer, _ = _trainer(kind, out)
    step = trainer.train_step
    def dying_step():
        if trainer.step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return step()
    trainer.train_step = dying_step
    trainer.fit()
""")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(kind, out):
    if kind == "2d":
        from pyflowmap.toy2d.config import TrainConfig
        from pyflowmap.toy2d.train import Trainer

        cfg = TrainConfig(objective="lsd", steps=40, hidden=32, depth=2, emb_dim=8, batch=64, log_every=1,
                          ckpt_every=10)
        return Trainer(cfg, out_dir=out, progress=False), Trainer
    pytest.importorskip("sklearn")
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer

    cfg = ImageConfig(objective="lsd", dataset="digits", steps=40, ch=8, emb_dim=8, batch=8, dropout=0.1,
                      log_every=1, ckpt_every=10)
    return ImageTrainer(cfg, out_dir=out, progress=False), ImageTrainer


@pytest.mark.parametrize("kind", ["2d", "image"])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(kind, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's setting: same reduction order, bit-identical results
    try:
        full, cls = _trainer(kind, tmp_path / "full")
        full.fit()

        code = CHILD.format(kill_at=KILL_AT)
        proc = subprocess.run([sys.executable, "-c", code, kind, str(tmp_path / "killed"), ROOT], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        state = load_checkpoint(tmp_path / "killed")
        assert state["step"] == 20  # the last checkpoint before the kill, intact
        assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]

        resumed = cls.resume(tmp_path / "killed", progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    assert resumed.step == full.step == 40
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_safetensors_weights_beside_the_checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    import json

    from pyflowmap.training import WEIGHTS
    from pyflowmap.training.checkpoint import load_weights, save_weights

    trainer, _ = _trainer("2d", tmp_path)
    trainer.fit(steps=12)
    weights, meta = load_weights(tmp_path / WEIGHTS)
    ema = trainer.ema.state_dict()
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    assert meta["step"] == "12" and json.loads(meta["config"])["objective"] == "lsd"
    fresh, _ = _trainer("2d", tmp_path / "other")
    fresh.model.load_state_dict(weights)  # a plain state dict: loads into the model class
    # no pickle: a non-tensor value cannot be smuggled in
    with pytest.raises(Exception):
        save_weights({"x": "not a tensor"}, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")
