"""Data-parallel scaling on CPU: one process against W gloo processes (torchrun) on the SAME
global batch, for the 2D demo run (DDP) and the MNIST-5k image run (DDP and FSDP2).

    python benchmarks/ddp_scaling.py [--steps 20] [--warmup 3] [--procs 1 2]

Each setting runs under ``torchrun --standalone``; every process gets cores / W threads, so a
row uses the whole machine (one process also runs with 1 thread, the per-core reference).
Rank 0 reports the median seconds of one optimizer step over ``--steps`` timed steps after
``--warmup``. Prints a markdown table; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "2d": "2D demo: LSD dual, MLP 4x256, batch 2048",
    "image": "MNIST-5k: LSD dual, UNet ch 32 (0.56 M), batch 64",
    "image-fsdp": "MNIST-5k as above, FSDP2",
}


def _trainer(run: str):
    if run == "2d":
        from pyflowmap.toy2d.config import TrainConfig
        from pyflowmap.toy2d.train import Trainer

        return Trainer(TrainConfig(objective="lsd", derivative="dual"), progress=False)
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer

    return ImageTrainer(ImageConfig(objective="lsd", derivative="dual", fsdp=run == "image-fsdp"), progress=False)


def worker(run: str, steps: int, warmup: int) -> None:
    import torch

    from pyflowmap import distributed

    distributed.init_from_env("cpu")
    trainer = _trainer(run)
    for _ in range(warmup):
        trainer.train_step()
    times = []
    for _ in range(steps):
        distributed.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        distributed.barrier()
        times.append(time.perf_counter() - t0)
    if distributed.is_main():
        world = 1 if trainer.shard is None else trainer.shard.world
        print("RESULT " + json.dumps({"run": run, "procs": world, "threads": torch.get_num_threads(),
                                      "step_s": statistics.median(times), "batch": trainer.cfg.batch}), flush=True)


def launch(run: str, procs: int, threads: int, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           __file__, "--worker", run, "--steps", str(steps), "--warmup", str(warmup)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{run} on {procs} processes failed:\n{r.stderr[-3000:]}")
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return 0
    cores = os.cpu_count() or 1
    rows, bases = [], {}
    for run in args.runs:
        settings = [(1, 1)] + [(w, max(1, cores // w)) for w in args.procs]
        for procs, threads in settings:
            if run == "image-fsdp" and procs == 1:
                continue  # FSDP2 over one process is the plain run
            res = launch(run, procs, threads, args.steps, args.warmup)
            family = run.split("-")[0]  # FSDP2 rows compare with the plain image run
            if procs == 1 and threads == 1:
                bases[family] = res["step_s"]
            res["speedup_vs_1x1"] = bases[family] / res["step_s"] if family in bases else float("nan")
            rows.append(res)
            print(f"{run:11s} {procs} proc x {threads} thr: {res['step_s'] * 1e3:8.1f} ms/step", flush=True)
    print("\n| run | processes x threads | ms / step (median) | vs 1 process x 1 thread |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {RUNS[r['run']]} | {r['procs']} x {r['threads']} | {r['step_s'] * 1e3:.1f} | "
              f"{r['speedup_vs_1x1']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
