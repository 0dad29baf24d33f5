"""What limits learning speed on the 2D checker at the demo's budget (issue 19): each variant of
the 2D trainer's recipe trains for the same wall time on this machine and is scored by the
checker KL of its EMA flow map at 1, 2, 4 and 8 jumps (and the Heun ODE of its diagonal at 8).

    python benchmarks/learning_speed.py --stage axes --budget 120               # one change at a time
    python benchmarks/learning_speed.py --stage combos --budget 120             # the helpful ones together
    python benchmarks/learning_speed.py --stage recipe --budget 240 --seeds 0 1 2
    python benchmarks/learning_speed.py --stage objectives --budget 120 --seeds 0
    python benchmarks/learning_speed.py --stage ablate --budget 120             # ESD's and PSD-M's
    python benchmarks/learning_speed.py --report runs/learning_speed.jsonl     # markdown tables

Equal wall time: every kind of step of a stage (variants that differ only in optimizer,
schedule, EMA or loss weighting share one) is first timed alone (10 warm-up steps, then the
median of three blocks of 20 steps), on a quiet machine, before any of them trains; each then
trains for ``budget / (seconds per step)`` steps, so a variant's schedule (warm-up, decay) knows
its length and a busy machine later slows the runs without changing what they compute. Results
are appended to a JSON-lines file, one run per line, so an interrupted study resumes where it
stopped (``--out``; runs already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.evaluate import evaluate
from pyflowmap.toy2d.train import Trainer
from pyflowmap.trigflow import TrigFlowConsistency

# the recipe the demo had before this study (RECIPES["paper"] in pyflowmap.toy2d.config once
# adopted): RAdam at 1e-3, sqrt decay after 1500 steps, EMA 0.999, MLP 4 x 256 on x / sigma_d,
# time embeddings at scale 100, batch 2048, diagonal fraction 0.75, the two part means summed
PAPER = dict(hidden=256, depth=4, batch=2048, lr=1e-3, optimizer="radam", lr_schedule="sqrt", lr_decay_after=1500,
             warmup=0, ema=0.999, ema_warmup=False, time_scale=100.0, emb_dim=64, fourier=0, diag_fraction=0.75,
             part_weighting="equal")

# stage "axes": one change at a time from PAPER, every axis issue 19 names
AXES = {
    "paper": {},
    "width 128": {"hidden": 128}, "width 512": {"hidden": 512},
    "depth 3": {"depth": 3}, "depth 6": {"depth": 6},
    "time scale 10": {"time_scale": 10.0}, "time scale 30": {"time_scale": 30.0},
    "time emb dim 16": {"emb_dim": 16},
    "fourier 64 x 0.5": {"fourier": 64, "fourier_scale": 0.5}, "fourier 64 x 1": {"fourier": 64, "fourier_scale": 1.0},
    "lr 3e-4": {"lr": 3e-4}, "lr 3e-3": {"lr": 3e-3},
    "warm-up 200": {"warmup": 200}, "cosine decay": {"lr_schedule": "cosine"}, "no decay": {"lr_schedule": "constant"},
    "adam": {"optimizer": "adam"}, "adamw": {"optimizer": "adamw"},
    "batch 512": {"batch": 512}, "batch 8192": {"batch": 8192},
    "diag 0.5": {"diag_fraction": 0.5}, "diag 0.9": {"diag_fraction": 0.9},
    "count weighting": {"part_weighting": "count"},
    "ema 0.99": {"ema": 0.99}, "ema warm-up": {"ema_warmup": True},
}


# stage "combos": the changes that helped alone, together: every one on Fourier features, the EMA
# warm-up and batch 512 (the largest single gains), then width 128, the paper code's count
# weighting, depth 3 and time scale 10 on top
_BASE = {**PAPER, "fourier": 64, "fourier_scale": 0.5, "ema_warmup": True, "batch": 512}
COMBOS = {
    "F+E+B512": _BASE,
    "+w128": {**_BASE, "hidden": 128},
    "+count": {**_BASE, "part_weighting": "count"},
    "+w128+count": {**_BASE, "hidden": 128, "part_weighting": "count"},
    "+w128+count+d3": {**_BASE, "hidden": 128, "part_weighting": "count", "depth": 3},
    "+w128+count+ts10": {**_BASE, "hidden": 128, "part_weighting": "count", "time_scale": 10.0},
}


def _fast() -> dict:
    """The recipe this study arrived at: TrainConfig's defaults as LSD resolves them (Fourier
    features on; stage "objectives" applies it unchanged to every objective, which is how ESD's
    exception was found)."""
    return {f: getattr(TrainConfig(), f) for f in PAPER}


def recipe_variants() -> dict:
    """Stage "recipe": the adopted recipe, the paper's, and the recipe with each of its changes
    from the paper's undone (which of them carries the gain)."""
    fast = _fast()
    out = {"fast": fast, "paper": dict(PAPER)}
    undo = {"fourier": ("fourier",), "ema": ("ema", "ema_warmup"), "batch": ("batch",), "width": ("hidden",),
            "lr": ("lr", "lr_schedule", "warmup", "lr_decay_after"), "time scale": ("time_scale",),
            "optimizer": ("optimizer",), "weighting": ("part_weighting",)}
    for name, keys in undo.items():
        if any(fast[k] != PAPER[k] for k in keys):
            out[f"fast, paper's {name}"] = {**fast, **{k: PAPER[k] for k in keys}}
    return out


OBJECTIVES = ("lsd", "esd", "psd-m", "psd-u", "meanflow", "shortcut", "fm", "sct")
# what decides the work of one step
COST_FIELDS = ("objective", "derivative", "hidden", "depth", "emb_dim", "fourier", "batch", "diag_fraction", "precision")


def stage(name: str) -> dict:
    if name == "axes":
        return {k: {**PAPER, **v} for k, v in AXES.items()}
    if name == "combos":
        return COMBOS
    if name == "recipe":
        return recipe_variants()
    if name == "objectives":
        # time scale 0: the objective's own (sCM's is 10, the rest 100 as in PAPER)
        return {f"{o} {r}": {**cfg, "objective": o, "time_scale": 0.0} for o in OBJECTIVES for r, cfg in
                (("paper", PAPER), ("fast", _fast()))}
    if name == "ablate":  # the fast recipe cost ESD's and PSD's 1-step maps and MeanFlow: which of its changes did it
        out = {}
        for o in ("esd", "psd-m", "meanflow"):
            fast = {**_fast(), "objective": o, "time_scale": 0.0}
            for k, fs in (("fourier", ("fourier",)), ("batch", ("batch",)), ("ema", ("ema_warmup",)), ("width", ("hidden",))):
                out[f"{o} fast, paper's {k}"] = {**fast, **{f: PAPER[f] for f in fs}}
        return out
    raise SystemExit(f"unknown stage {name!r}: axes, combos, recipe, objectives, ablate")


def seconds_per_step(overrides: dict) -> float:
    trainer = Trainer(TrainConfig(**{**overrides, "steps": 10**6}), progress=False)
    trainer.fit(steps=10)
    blocks = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.fit(steps=trainer.step + 20)
        blocks.append((time.perf_counter() - t0) / 20)
    return statistics.median(blocks)


def train_and_score(overrides: dict, steps: int, seed: int) -> dict:
    cfg = TrainConfig(**{**overrides, "steps": steps, "seed": seed, "ckpt_every": 10**9})
    trainer = Trainer(cfg, progress=False)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    # a TrigFlow model (sct) has its consistency sampler in the jump columns and no Heun ODE
    jumps = "consistency" if isinstance(trainer.ema, TrigFlowConsistency) else "map"
    samplers = (jumps,) if jumps == "consistency" else (jumps, "heun")
    rep = evaluate(trainer.ema, trainer.base, "checker", steps=(1, 2, 4, 8), samplers=samplers, n=65536, seed=0)
    kl = {f"map{k}": rep["results"][jumps][k]["kl"] for k in (1, 2, 4, 8)}
    kl["heun8"] = rep["results"]["heun"][8]["kl"] if "heun" in samplers else None
    return {"steps": steps, "train_seconds": round(seconds, 1), **kl, "floor": rep["reference"]["kl"]}


def run(stage_name: str, budget: float, seeds, out: Path, only=None) -> None:
    variants = stage(stage_name)
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["stage"], r["variant"], r["seed"], r["budget"]))
    todo = [(k, s) for k in variants for s in seeds if (stage_name, k, s, budget) not in done]
    if not todo:
        print("nothing to do")
        return
    # variants that differ only in optimizer, schedule, EMA or weighting do the same work per
    # step: they share one timing, so their step counts are equal, not equal up to timing noise
    cost = {k: json.dumps({f: variants[k].get(f) for f in COST_FIELDS}, sort_keys=True) for k, _ in todo}
    print(f"timing {len(set(cost.values()))} kinds of step alone (quiet machine, please)", flush=True)
    first = {}
    for k, c in cost.items():
        first.setdefault(c, k)
    timed = {c: seconds_per_step(variants[k]) for c, k in first.items()}
    sps = {k: timed[c] for k, c in cost.items()}
    for k, s in todo:
        steps = max(100, int(budget / sps[k]))
        row = {"stage": stage_name, "variant": k, "seed": s, "budget": budget, "s_per_step": round(sps[k], 5),
               "config": variants[k], **train_and_score(variants[k], steps, s)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({x: row[x] for x in row if x != "config"}), flush=True)


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = []
    for st in dict.fromkeys(r["stage"] for r in rows):
        for budget in dict.fromkeys(r["budget"] for r in rows if r["stage"] == st):
            sel = [r for r in rows if r["stage"] == st and r["budget"] == budget]
            out.append(f"\nstage {st}, {budget:g} s of training per run (KL, lower is better; mean over seeds, "
                       "range in brackets)\n")
            out.append("| variant | seeds | steps | s/step | train s | 1 jump | 2 jumps | 4 jumps | 8 jumps | Heun 8 |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for v in dict.fromkeys(r["variant"] for r in sel):
                rs = [r for r in sel if r["variant"] == v]

                def cell(key, rs=rs):
                    xs = [r[key] for r in rs if r[key] is not None]
                    if not xs:
                        return "-"
                    m = statistics.mean(xs)
                    return f"{m:.3f}" + (f" [{min(xs):.3f}-{max(xs):.3f}]" if len(xs) > 1 else "")

                # the step count comes from the timing on a quiet machine; train s is the wall time
                # the runs then took (a busy machine, logging steps, a drifting CPU)
                secs = statistics.median(r["train_seconds"] for r in rs)
                out.append(f"| {v} | {len(rs)} | {rs[0]['steps']} | {1000 * rs[0]['s_per_step']:.1f} ms | {secs:.0f} | "
                           + " | ".join(cell(k) for k in ("map1", "map2", "map4", "map8", "heun8")) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="axes", help="axes | combos | recipe | objectives | ablate")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--out", default="runs/learning_speed.jsonl")
    p.add_argument("--report", default=None, help="print the tables of this JSON-lines file and exit")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    if args.report:
        print(report(Path(args.report)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run(args.stage, args.budget, args.seeds, out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
