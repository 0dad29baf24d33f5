"""Nothing lost, nothing silent: overflow reaches the guard, no checkpoint is reported that was
not written, one writer per run directory (real processes), corrupt files and changed inputs
refused on resume, errors a user can act on, no leftovers."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import pyflowmap as pf
from pyflowmap.toy2d import TrainConfig, Trainer
from pyflowmap.training import CHECKPOINT, NonFiniteTraining
from pyflowmap.training.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from pyflowmap.training.rundir import LOCK, RunDirectoryBusy, RunLock

TINY = dict(hidden=16, depth=1, emb_dim=8, batch=32, log_every=1, ckpt_every=5)
pytestmark = pytest.mark.filterwarnings("ignore:step .*non-finite:UserWarning",
                                        "ignore:non-finite parameters:UserWarning")
REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pyflowmap", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


# -- 1. overflow is inf in the kernel as in its twin -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_losses_overflow_to_inf_like_their_twins(dtype):
    x = torch.full((2, 2), 1e20).to(dtype)
    z = torch.zeros_like(x)
    for fused, twin, args in ((pf.ops.flowmap_loss, pf.reference.flowmap_loss, (x, z)),
                              (pf.ops.flowmap_fd_loss, pf.reference.flowmap_fd_loss, (x, -x, None, None, 1.0))):
        loss, per = fused(*args)
        want_loss, want_per = twin(*args)
        assert torch.isinf(loss) and torch.isinf(want_loss) and torch.equal(torch.isinf(per), torch.isinf(want_per))


def test_huge_learning_rate_is_skipped_by_the_guard_not_a_crash():
    trainer = Trainer(TrainConfig(steps=20, lr=1e20, **TINY), progress=False)
    trainer.fit()  # used to raise "value cannot be converted to type float without overflow"
    assert trainer.step == 20 and trainer.skipped >= 1


@pytest.mark.parametrize("objective", ["fm", "lsd", "psd-m"])
def test_huge_data_gives_inf_loss_not_an_exception(objective):
    fm = pf.FlowMap(pf.nn.FlowMapMLP(hidden=16, depth=1, emb_dim=8))
    out = pf.make_objective(objective)(fm, torch.randn(16, 2) * 1e20, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(out.loss)


# -- 2. every float option finite; no checkpoint reported that was not written -----------------
@pytest.mark.parametrize("field", ["lr", "grad_clip", "ema", "diag_fraction", "base_std", "fd_step"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_float_options_are_refused(field, bad):
    with pytest.raises(ValueError, match=f"{field} must be"):
        TrainConfig(**{field: bad})


def test_a_refused_final_save_is_reported_and_fails_the_command(tmp_path, monkeypatch, capsys):
    from pyflowmap import cli

    build = Trainer.build_model

    def poisoned(self):  # a NaN weight: every step is skipped and no state is ever finite
        model = build(self)
        torch.nn.init.constant_(model.net.head.weight, float("nan"))
        return model

    monkeypatch.setattr(Trainer, "build_model", poisoned)
    code = cli.main(["train", "--out", str(tmp_path / "x"), "--steps", "6", "--hidden", "8", "--depth", "1",
                     "--batch", "16", "--quiet", "--max-bad-steps", "50"])
    out = capsys.readouterr()
    assert code == 1, out
    assert "NOT written" in out.err and "no checkpoint exists" in out.err and "checkpoint" not in out.out
    assert not (tmp_path / "x" / CHECKPOINT).exists()


def test_stopping_on_non_finite_steps_says_whether_a_checkpoint_exists(tmp_path):
    trainer = Trainer(TrainConfig(steps=50, max_bad_steps=2, **TINY), out_dir=tmp_path, progress=False)
    trainer.loss_output = lambda: type("O", (), {"loss": torch.tensor(float("nan"), requires_grad=True),
                                                 "metrics": {}})()
    with pytest.raises(NonFiniteTraining, match="no checkpoint was written"):
        trainer.fit()


# -- 3. one writer per run directory -------------------------------------------------------------
def test_two_runs_on_one_directory_one_wins_the_other_is_told(tmp_path):
    out = tmp_path / "c"
    common = ["--out", str(out), "--steps", "300", "--hidden", "16", "--depth", "1", "--batch", "32", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "pyflowmap", "train", "--objective", obj, *common],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for obj in ("lsd", "psd-m")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "in use by another run" in loser[2] or "exists" in loser[2], loser
    winner = ("lsd", "psd-m")[[r[0] for r in results].index(0)]
    assert load_checkpoint(out)["config"]["objective"] == winner


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    code = ("import sys, time; from pyflowmap.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        r = cli("train", "--out", str(tmp_path), "--resume", "--steps", "3")
        assert r.returncode == 2 and "in use by another run" in r.stderr
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed holder
        holder.wait(timeout=30)
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with RunLock(tmp_path):
        a = Trainer(TrainConfig(steps=2, **TINY), out_dir=tmp_path, progress=False).fit()
        b = Trainer.resume(tmp_path, progress=False, steps=4).fit()
        assert b.step == 4
        a.close()
        b.close()


def test_stale_temp_files_of_dead_writers_are_removed_on_start(tmp_path):
    stale = tmp_path / f".{CHECKPOINT}.abc123.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a checkpoint")
    Trainer(TrainConfig(steps=1, **TINY), out_dir=tmp_path, progress=False).close()
    assert not stale.exists()


# -- 4. corrupt files and changed inputs are refused --------------------------------------------
def _zero_bytes_inside_a_tensor_record(path: Path, n: int = 64):
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + n] = bytes(n)
    path.write_bytes(bytes(raw))


def test_a_corrupted_checkpoint_is_refused_on_resume_and_eval(tmp_path):
    Trainer(TrainConfig(steps=5, **TINY), out_dir=tmp_path, progress=False).fit().close()
    load_checkpoint(tmp_path)  # intact
    _zero_bytes_inside_a_tensor_record(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer.resume(tmp_path, progress=False)
    r = cli("eval", "--ckpt", str(tmp_path), "--n", "64")
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_truncated_and_foreign_checkpoints_name_the_file(tmp_path):
    save_checkpoint({"a": torch.ones(100)}, tmp_path / "c.pt")
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="c.pt is not a readable pyflowmap checkpoint") as e:
        load_checkpoint(tmp_path / "c.pt")
    assert "weights_only=False" not in str(e.value)
    atomic_write(tmp_path / "list.pt", lambda f: torch.save([1, 2], f))
    with pytest.raises(CheckpointError, match="not a pyflowmap checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


images = pytest.importorskip("pyflowmap.images")


def _image_run(tmp_path, data, **kw):
    from pyflowmap.images import ImageConfig, ImageTrainer

    cfg = ImageConfig(dataset="digits", steps=2, ch=8, emb_dim=8, batch=8, attention=False, log_every=1,
                      ckpt_every=2, **kw)
    return ImageTrainer(cfg, out_dir=tmp_path, progress=False, data=data).fit()


def test_resume_refuses_other_data_of_the_same_shape(tmp_path):
    from pyflowmap.images import ImageTrainer

    data = torch.rand(16, 1, 8, 8) * 2 - 1
    _image_run(tmp_path, data).close()
    ImageTrainer.resume(tmp_path, progress=False, data=data.clone()).close()  # the same images: fine
    with pytest.raises(ValueError, match="has changed since this run started"):
        ImageTrainer.resume(tmp_path, progress=False, data=data.flip(0))


def test_a_relative_dataset_path_is_stored_absolute(tmp_path, monkeypatch):
    from pyflowmap.images import ImageConfig

    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "d.pt")
    monkeypatch.chdir(tmp_path)
    assert ImageConfig(dataset="d.pt").dataset == str(tmp_path / "d.pt")
    assert ImageConfig(dataset="digits").dataset == "digits"


def test_a_distillation_resume_refuses_an_overwritten_teacher(tmp_path):
    from pyflowmap.images import ImageTrainer

    data = torch.rand(16, 1, 8, 8) * 2 - 1
    _image_run(tmp_path / "fm", data, objective="fm").close()
    _image_run(tmp_path / "lmd", data, objective="lmd", teacher=str(tmp_path / "fm")).close()
    ImageTrainer.resume(tmp_path / "lmd", progress=False, data=data).close()
    _image_run(tmp_path / "fm2", data, objective="fm", seed=1).close()  # another teacher ...
    (tmp_path / "fm2" / CHECKPOINT).replace(tmp_path / "fm" / CHECKPOINT)  # ... written over the first
    with pytest.raises(ValueError, match="teacher run .* has changed"):
        ImageTrainer.resume(tmp_path / "lmd", progress=False, data=data)


# -- 5. errors a user can act on ---------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["train", "--out", "{tmp}/a", "--device", "bogus"], "device must be"),
    (["train", "--out", "{tmp}/a", "--steps", "0"], "steps must be >= 1"),
    (["sample", "--ckpt", "{tmp}/none", "--n", "-5", "--out", "{tmp}/x.pt"], "--n must be >= 1"),
    (["eval", "--ckpt", "{tmp}/none"], "no checkpoint at"),
    (["train", "--out", "{tmp}/file", "--steps", "2"], "is not a directory"),
    (["train", "--out", "{tmp}/ro/a", "--steps", "2"], "not writable"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, args, match):
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if os.geteuid() == 0 and "ro" in " ".join(args):
            pytest.skip("root writes into read-only directories")
        r = cli(*[a.format(tmp=tmp_path) for a in args])
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert match in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_cli_non_dict_config_json_and_fifo_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("[1, 2]")
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"")
    r = cli("train", "--out", str(tmp_path / "run"), "--resume")
    assert r.returncode == 2 and "not a run config" in r.stderr
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / CHECKPOINT)
    r = cli("eval", "--ckpt", str(tmp_path / "fifo"), timeout=60)  # used to block forever
    assert r.returncode == 2 and "not a regular file" in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "eval", "--ckpt", str(tmp_path / "none"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_wrong_typed_config_values_are_refused():
    with pytest.raises(ValueError, match="steps must be int"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "steps": "10"})
    with pytest.raises(ValueError, match="must be a dict"):
        TrainConfig.from_dict([1, 2])


# -- 7. small silent cases -----------------------------------------------------------------------
def test_a_network_output_of_the_wrong_shape_is_refused():
    class Scalar(torch.nn.Module):
        def forward(self, x, s, t):
            return x[:, :1] * 0

    obj = pf.make_objective("psd-m", times=pf.TimeSampler(diag_fraction=0.0))
    with pytest.raises(ValueError, match=r"returned \(8, 1\) for x of shape \(8, 2\)"):
        obj(pf.FlowMap(Scalar()), torch.randn(8, 2))  # used to train on a broadcast, loss ~0


def test_float_labels_are_refused_and_sixteen_bit_pngs_keep_their_range(tmp_path):
    torch.save({"images": torch.zeros(3, 1, 4, 4), "labels": torch.tensor([0.0, 1.5, 2.0])}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="non-integer labels"):
        images.load_tensor_file(tmp_path / "d.pt")
    PIL = pytest.importorskip("PIL.Image")
    import numpy as np

    (tmp_path / "png").mkdir()
    arr = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    PIL.fromarray(arr).save(tmp_path / "png" / "a.png")
    x, _ = images.load_image_folder(tmp_path / "png")
    assert x.shape == (1, 1, 2, 2)  # greyscale files give one channel
    torch.testing.assert_close(x[0, 0], torch.tensor(arr / 65535.0 * 2 - 1, dtype=torch.float32))
    (tmp_path / "png" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="b.png is not a readable image"):
        images.load_image_folder(tmp_path / "png")


def test_mixed_sizes_point_at_the_cli_flag(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    (tmp_path / "imgs").mkdir()
    PIL.new("L", (4, 4)).save(tmp_path / "imgs" / "a.png")
    PIL.new("L", (6, 6)).save(tmp_path / "imgs" / "b.png")
    with pytest.raises(ValueError, match="--image-size"):
        images.load_dataset(str(tmp_path / "imgs"))
    assert images.load_dataset(str(tmp_path / "imgs"), size=4)[0].shape == (2, 1, 4, 4)


def test_startup_refuses_a_directory_without_room(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ValueError, match="MiB free"):
        Trainer(TrainConfig(steps=1, **TINY), out_dir=tmp_path, progress=False)


def test_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    import errno

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the device while writing"):
        atomic_write(tmp_path / "c.pt", full)
    assert not list(tmp_path.glob(".*.tmp"))


def test_killed_run_resumes_after_its_lock_is_released_by_the_os(tmp_path):
    out = tmp_path / "k"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "pyflowmap", "train", "--out", str(out), "--steps", "100000",
                          "--hidden", "16", "--depth", "1", "--batch", "32", "--ckpt-every", "5", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / CHECKPOINT).exists()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    r = cli("train", "--out", str(out), "--resume", "--steps", str(load_checkpoint(out)["step"] + 2), "--quiet")
    assert r.returncode == 0, r.stderr


def test_an_unwritable_run_directory_fails_at_start_up(tmp_path, monkeypatch):
    """The subprocess variant above is skipped as root (root writes anywhere): here the write
    probe itself is refused, as a read-only mount or directory refuses it."""
    real = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(ValueError, match="is not writable"):
        Trainer(TrainConfig(steps=1, **TINY), out_dir=tmp_path / "ro", progress=False)
