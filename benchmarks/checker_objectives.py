"""Train FM, LSD, ESD, PSD-U, PSD-M, shortcut, sCT and sCD on the 2D checker with the same
network and budget and tabulate the histogram KL at 1/2/4/8 steps with the training time of each.

    python benchmarks/checker_objectives.py --out runs/checker            # the CPU demo's recipe and budget
    python benchmarks/checker_objectives.py --out runs/checker-paper --recipe paper   # RESULTS.md section 1
    python benchmarks/checker_objectives.py --out runs/checker --steps 20000 --batch 8192 --hidden 512

FM is sampled by integrating its diagonal velocity (Euler and Heun); the flow-map objectives by
their own jumps (shortcut: K jumps of 1/K); sCT and sCD by the consistency sampler (re-noising at
tau_mid = 1.1 for two steps). sCD distills the FM run of the same sweep (trained first). Every run is a normal pyflowmap run directory (checkpoint, metrics.json,
samples.png), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyflowmap.toy2d.config import RECIPES, TrainConfig
from pyflowmap.toy2d.evaluate import evaluate
from pyflowmap.toy2d.plots import plot_sample_grid
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training import CHECKPOINT
from pyflowmap.training.checkpoint import atomic_write

OBJECTIVES = ["fm", "lsd", "esd", "psd-u", "psd-m", "shortcut", "sct", "scd"]
PAPER = {  # docs/objectives.md section 16: 4 x 512 MLP, batch 100k, 125k-150k steps (their KL estimator)
    "lsd": [0.086, 0.077, 0.071, 0.070],
    "esd": [0.098, 0.092, 0.083, 0.082],
    "psd-m": [0.146, 0.089, 0.081, 0.072],
    "psd-u": [0.111, 0.107, 0.075, 0.073],
}


def run_one(objective: str, args) -> dict:
    out = Path(args.out) / objective
    overrides = {k: getattr(args, k) for k in ("steps", "batch", "hidden", "depth", "seed", "derivative") if getattr(args, k) is not None}
    if (out / CHECKPOINT).exists():
        trainer = Trainer.resume(out, progress=not args.quiet,
                                 **{k: v for k, v in overrides.items() if k == "steps"})
    else:
        extra = {"teacher": str(Path(args.out) / "fm")} if objective == "scd" else {}
        cfg = TrainConfig.from_recipe(args.recipe, objective=objective, **overrides, **extra)
        trainer = Trainer(cfg, out_dir=out, progress=not args.quiet)
    trainer.fit()
    samplers = ("euler", "heun") if objective == "fm" else ("consistency",) if objective in ("sct", "scd") else ("map",)
    report = evaluate(trainer.ema, trainer.base, "checker", steps=(1, 2, 4, 8), samplers=samplers, n=args.n)
    plot_sample_grid(report["samples"], out / "samples.png", title=f"{objective.upper()}, {trainer.step} steps")
    row = {
        "objective": objective,
        "train_seconds": trainer.train_seconds,
        "seconds_per_step": trainer.train_seconds / max(trainer.step, 1),
        "steps": trainer.step,
        "floor": report["reference"]["kl"],
        "kl": {s: {str(k): v["kl"] for k, v in r.items()} for s, r in report["results"].items()},
        "config": trainer.cfg.to_dict(),
    }
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(row, indent=2).encode()))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| objective (sampler) | 1 step | 2 steps | 4 steps | 8 steps | train time | s/step | paper (1/2/4/8) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for sampler, kl in r["kl"].items():
            name = r["objective"].upper() + (f" ({sampler} ODE)" if sampler in ("euler", "heun") else
                                             " (consistency)" if sampler == "consistency" else "")
            paper = PAPER.get(r["objective"])
            lines.append(f"| {name} | " + " | ".join(f"{kl[k]:.3f}" for k in ("1", "2", "4", "8"))
                         + f" | {r['train_seconds']:.0f} s | {r['seconds_per_step'] * 1e3:.0f} ms | "
                         + ("/".join(f"{p:.3f}" for p in paper) if paper and sampler == "map" else "-") + " |")
    lines.append(f"| exact samples (estimator floor) | {rows[0]['floor']:.3f} | | | | | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/checker")
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    ap.add_argument("--recipe", default="fast", choices=sorted(RECIPES),
                    help="the 2D trainer's recipe (docs/recipes.md); section 1 of RESULTS.md used paper")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--derivative", choices=["auto", "jvp", "fd"])
    ap.add_argument("--n", type=int, default=65536, help="evaluation samples")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    objectives = list(args.objectives)
    if "scd" in objectives and "fm" not in objectives and not (Path(args.out) / "fm" / CHECKPOINT).exists():
        objectives.insert(0, "fm")  # the teacher
    objectives.sort(key=lambda o: o == "scd")  # after its teacher
    rows = [run_one(o, args) for o in objectives]
    table = markdown(rows)
    atomic_write(Path(args.out) / "table.md", lambda f: f.write((table + "\n").encode()))
    atomic_write(Path(args.out) / "results.json", lambda f: f.write(json.dumps(rows, indent=2).encode()))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
