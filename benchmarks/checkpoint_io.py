"""Checkpoint size, atomic write time and resume overhead of the 2D demo run and the MNIST-5k
image run, next to the time of one training step.

    python benchmarks/checkpoint_io.py [--repeats 5]

A checkpoint holds model, EMA, optimizer, scheduler, step, every RNG state, config and history;
the write is a temporary file + fsync + rename + directory fsync (`pyflowmap.training.checkpoint`).
Resume = load + rebuild the trainer + restore state. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training import CHECKPOINT


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, make, cls, repeats: int, root: Path) -> dict:
    out = root / name
    trainer = make(out)
    trainer.fit(steps=3)  # optimizer state exists, as in a real run
    step_s = _median(trainer.train_step, repeats)
    save_s = _median(trainer.save, repeats)
    size = (out / CHECKPOINT).stat().st_size
    resume_s = _median(lambda: cls.resume(out, progress=False), repeats)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"run": name, "params": params, "size_mb": size / 2**20, "save_ms": 1e3 * save_s,
            "resume_ms": 1e3 * resume_s, "step_ms": 1e3 * step_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(measure("2D demo (MLP 4x256, batch 2048)",
                            lambda out: Trainer(TrainConfig(), out_dir=out, progress=False), Trainer, args.repeats, root))
        try:
            from pyflowmap.images.config import ImageConfig
            from pyflowmap.images.train import ImageTrainer

            rows.append(measure("MNIST-5k image run (UNet ch 32, batch 64)",
                                lambda out: ImageTrainer(ImageConfig(), out_dir=out, progress=False), ImageTrainer,
                                args.repeats, root))
        except ImportError as e:
            print(f"(image run skipped: {e})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats}\n")
    print("| run | parameters | checkpoint | atomic write | resume | one train step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['params'] / 1e6:.2f} M | {r['size_mb']:.1f} MB | {r['save_ms']:.0f} ms | "
              f"{r['resume_ms']:.0f} ms | {r['step_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
