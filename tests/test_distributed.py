"""Data-parallel training (gloo, CPU): W processes train the same run as one process on the
same global batch, for every objective and derivative mode, and torchrun drives the CLI."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from pyflowmap.distributed import Shard
from tests.ddp_jobs import (JOBS_2D, JOBS_FSDP, JOBS_HANDOFF, JOBS_IMAGE, JOBS_PRECISION, JOBS_RESUME, TINY_IMAGE, free_port,
                           job_name, run_jobs, worker)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 all-reduce sums the ranks' gradients in another order than one process's backward:
# a few ulps per step, through a handful of Adam steps
ATOL, RTOL = 2e-5, 2e-4


def _spawn(world, jobs, data_path="", teacher="", out=None, work_dir=""):
    mp.start_processes(worker, args=(world, free_port(), jobs, data_path, teacher, str(out), str(work_dir)),
                       nprocs=world, join=True, start_method="spawn")
    return torch.load(out)


def _assert_same(multi, single):
    assert multi.keys() == single.keys()
    for name in single:
        for part in ("model", "ema", "objective"):
            for k, v in single[name][part].items():
                torch.testing.assert_close(multi[name][part][k], v, atol=ATOL, rtol=RTOL,
                                           msg=lambda m, name=name, part=part, k=k: f"{name} {part}.{k}: {m}")
        assert multi[name]["losses"] == pytest.approx(single[name]["losses"], rel=1e-4, abs=1e-5), name
        # Adam and clipping hide a constant gradient factor from the weights: check its norm too
        assert multi[name]["grad_norms"] == pytest.approx(single[name]["grad_norms"], rel=1e-4, abs=1e-6), name
        # the comparison can fail: training moved the weights far beyond the tolerance
        moved = max((single[name]["model"][k] - v).abs().max().item() for k, v in single[name]["init"].items())
        assert moved > 100 * ATOL, f"{name}: training did not change the model"


def _single(jobs, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_jobs(jobs, **kw)
    finally:
        torch.set_num_threads(threads)


def test_shard_rows_split_the_batch_and_the_parts():
    sh = [Shard(r, 3) for r in range(3)]
    rows = torch.cat([s.indices(10) for s in sh]).sort().values
    assert rows.tolist() == list(range(10))
    assert [s.count(10) for s in sh] == [4, 3, 3]
    assert [s.count(10, start=7) for s in sh] == [1, 1, 1]
    with pytest.raises(ValueError, match="rank"):
        Shard(3, 3)


def test_ddp_two_processes_equal_one_process_2d(tmp_path):
    jobs = [("2d", obj, mode, extra) for obj, mode, extra in JOBS_2D]
    multi = _spawn(2, jobs, out=tmp_path / "multi.pt")
    _assert_same(multi, _single(jobs))


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    pytest.importorskip("sklearn")
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.data import load_dataset
    from pyflowmap.images.train import ImageTrainer

    root = tmp_path_factory.mktemp("ddp-images")
    data = load_dataset("digits")[0][:256].clone()
    torch.save(data, root / "data.pt")
    teacher = root / "teacher"
    ImageTrainer(ImageConfig(objective="fm", **{**TINY_IMAGE, "steps": 5}), out_dir=teacher, progress=False,
                 data=data).fit()
    return root, data, str(teacher)


def test_ddp_two_processes_equal_one_process_images(image_setup, tmp_path):
    root, data, teacher = image_setup
    jobs = [("image", obj, mode, extra) for obj, mode, extra in JOBS_IMAGE]
    multi = _spawn(2, jobs, data_path=str(root / "data.pt"), teacher=teacher, out=tmp_path / "multi.pt")
    _assert_same(multi, _single(jobs, data=data, teacher=teacher))


def test_fsdp2_two_processes_equal_one_process_images(image_setup, tmp_path):
    root, data, teacher = image_setup
    jobs = [("image", obj, mode, extra) for obj, mode, extra in JOBS_FSDP]
    multi = _spawn(2, jobs, data_path=str(root / "data.pt"), teacher=teacher, out=tmp_path / "multi.pt")
    _assert_same(multi, _single(jobs, data=data, teacher=teacher))


def test_resume_and_one_rank_nan_under_ddp_and_fsdp2(image_setup, tmp_path):
    """A 2-process run checkpointed at step 2 and resumed in new trainers (DDP and FSDP2) ends
    where one uninterrupted process ends; a NaN loss on rank 1 alone is skipped by both ranks,
    exactly as one process skips that step (FSDP2: the last step, with a checkpoint after it)."""
    root, data, teacher = image_setup
    jobs = [("image", obj, mode, extra) for obj, mode, extra in JOBS_RESUME]
    multi = _spawn(2, jobs, data_path=str(root / "data.pt"), teacher=teacher, out=tmp_path / "multi.pt",
                   work_dir=tmp_path / "runs")
    # one process poisons the same step on its only rank
    single_jobs = [(k, o, m, {**e, "_poison_rank": 0} if "_poison_rank" in e else e) for k, o, m, e in jobs]
    single = _single(single_jobs, data=data, teacher=teacher, work_dir=tmp_path / "one")
    for j, sj in zip(jobs, single_jobs):
        name = job_name(*j)
        if "_poison_rank" in j[3]:
            assert multi[name]["skipped"] == single[job_name(*sj)]["skipped"] == 1, name
        _assert_same({name: multi[name]}, {name: single[job_name(*sj)]})


def test_mixed_precision_and_compiled_steps_two_processes_equal_one(image_setup, tmp_path):
    """bf16 / fp16 autocast and compiled steps under DDP, and FSDP2 with its mixed-precision
    policy and its blockwise compilation: 2 processes train as one. fp16 overflows on the
    same steps (the loss scale is divided by W) and keeps the same scale. A 16-bit GEMM's
    rounding depends on the rows it is given and FSDP2 computes with bf16 weights where
    autocast casts per op, so 16-bit jobs are compared on their losses and gradient norms at
    16-bit accuracy; fp32 compiled jobs as the other jobs are."""
    root, data, teacher = image_setup
    jobs = [(kind, obj, mode, extra) for kind, obj, mode, extra in JOBS_PRECISION]
    multi = _spawn(2, jobs, data_path=str(root / "data.pt"), teacher=teacher, out=tmp_path / "multi.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 16-bit on this CPU: the speed warnings
        single = _single(jobs, data=data.float(), teacher=teacher)
    for job in jobs:
        name, extra = job_name(*job), job[3]
        m, s = multi[name], single[name]
        assert m["precision"] == s["precision"], name  # fp16: the same overflows, the same scale
        if extra.get("compile") and not extra.get("fsdp"):
            assert m["compiled"] and s["compiled"], name  # one graph each, no fallback
        if extra.get("precision", "fp32") == "fp32":
            _assert_same({name: m}, {name: s})
            continue
        assert m["losses"] == pytest.approx(s["losses"], rel=1e-3), name
        assert m["grad_norms"] == pytest.approx(s["grad_norms"], rel=2e-2), name
        moved = max((s["model"][k] - v).abs().max().item() for k, v in s["init"].items())
        assert moved > 1e-3, f"{name}: training did not change the model"


def test_fsdp2_checkpoint_resumes_in_one_process_without_fsdp(image_setup, tmp_path):
    """Checkpoints hold whole tensors: an FSDP2 run on 2 processes, stopped at step 2, continues
    in one plain process and ends where one uninterrupted process ends (EMD: a teacher inside
    the objective is sharded too)."""
    from pyflowmap.images.train import ImageTrainer

    root, data, teacher = image_setup
    jobs = [("image", obj, mode, extra) for obj, mode, extra in JOBS_HANDOFF]
    _spawn(2, jobs, data_path=str(root / "data.pt"), teacher=teacher, out=tmp_path / "multi.pt",
           work_dir=tmp_path / "runs")
    plain = [(k, o, m, {key: v for key, v in e.items() if not key.startswith("_")}) for k, o, m, e in jobs]
    single = _single(plain, data=data, teacher=teacher)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = ImageTrainer.resume(tmp_path / "runs" / job_name(*jobs[0]), progress=False,
                                      data=data.double(), fsdp=False)
        assert trainer.step == 2 and trainer.shard is None
        trainer.fit()
    finally:
        torch.set_default_dtype(default)
    from tests.ddp_jobs import result

    _assert_same({"x": {**result(trainer), "init": single[job_name(*plain[0])]["init"]}},
                 {"x": single[job_name(*plain[0])]})


def test_objective_shards_sum_to_the_global_loss():
    """Without processes: the ranks' scaled local losses average to the one-process loss, for
    every part split (the diagonal count not divisible by W included)."""
    from pyflowmap.flowmap import FlowMap
    from pyflowmap.nn.mlp import FlowMapMLP
    from pyflowmap.objectives import make_objective
    from pyflowmap.objectives.weighting import LearnedWeighting

    torch.manual_seed(0)
    fm = FlowMap(FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8)).double()
    x1 = torch.randn(13, 2, dtype=torch.float64)  # 9 diagonal + 4 off-diagonal samples
    for name in ("lsd", "psd-u", "meanflow"):
        obj = make_objective(name, weighting=LearnedWeighting(8, 16).double() if name == "lsd" else None)
        full = obj(fm, x1, generator=torch.Generator().manual_seed(3)).loss
        for world in (1, 2, 3, 4):
            parts = []
            for r in range(world):
                sh = Shard(r, world)
                out = obj(fm, x1[sh.indices(13)], generator=torch.Generator().manual_seed(3), shard=sh, global_batch=13)
                parts.append(out.loss)
            torch.testing.assert_close(torch.stack(parts).mean(), full, rtol=1e-12, atol=1e-12, msg=f"{name} W={world}")
    with pytest.raises(ValueError, match="owns 7 rows"):
        obj(fm, x1[:5], shard=Shard(0, 2), global_batch=13)
    with pytest.raises(ValueError, match="'distill' part has 4 of 13 samples, fewer than the 5"):
        obj(fm, x1[Shard(0, 5).indices(13)], shard=Shard(0, 5), global_batch=13)
    with pytest.raises(ValueError, match="global_batch"):
        obj(fm, x1, shard=Shard(0, 2))


def test_torchrun_cli_matches_one_process_and_resumes_on_another_world_size(tmp_path):
    """``torchrun --nproc-per-node 2 -m pyflowmap train``: rank 0 alone writes, the result
    equals a one-process run, and the 2-process checkpoint continues in one process."""
    args = ["train", "--objective", "lsd", "--derivative", "dual", "--hidden", "32", "--depth", "2",
            "--emb-dim", "8", "--batch", "16", "--steps", "6", "--ckpt-every", "3", "--log-every", "3",
            "--lr-decay-after", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "pyflowmap", *args, "--out", str(two)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 6 steps") == 1, r.stdout  # rank 0 alone reports
    r = subprocess.run([sys.executable, "-m", "pyflowmap", *args, "--out", str(one)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(two / "checkpoint.pt", weights_only=False), torch.load(one / "checkpoint.pt", weights_only=False)
    assert len(a["rank_rng"]) == 2 and len(b["rank_rng"]) == 1
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=ATOL, rtol=RTOL)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    # continue the 2-process run in one process: same data stream, so it still tracks the other
    r = subprocess.run([sys.executable, "-m", "pyflowmap", "train", "--resume", "--out", str(two), "--steps", "9",
                        "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pyflowmap", "train", "--resume", "--out", str(one), "--steps", "9",
                        "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(two / "checkpoint.pt", weights_only=False), torch.load(one / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 9
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=ATOL, rtol=RTOL)
