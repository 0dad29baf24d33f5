"""Every objective on MNIST-5k with the same network and budget: the classifier Frechet
distance (CFD, lower is better) at 1/2/4/8 sampling steps and the seconds per training step.

    python benchmarks/images_experiment.py                    # CPU setting, under an hour on 2 cores
    python benchmarks/images_experiment.py --setting gpu      # a lent GPU
    python benchmarks/images_experiment.py --methods lsd ect --steps 200 --out runs/quick

Each method trains in ``<out>/<method>/`` (an existing checkpoint is resumed, so an interrupted
experiment continues where it stopped) and is scored with its EMA weights. FM is sampled by
the Euler ODE of its velocity (1/2/4/8/50 steps: 50 is the multi-step reference), the
flow-map objectives by their own jumps, ECT by the consistency sampler (2 steps: re-noise to
t_mid = 0.821). ``ect-tuned`` spends half the budget on EDM denoising pretraining and half on
consistency tuning from it, so its total matches the others; ``--distillation`` adds LMD, EMD
(semigradient) and PFMM distilled from the finished FM run for the same number of steps (the
teacher's own budget comes on top). Writes ``results.json``, ``results.md`` and PNG sample
grids per method and step count.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pyflowmap.images.config import ImageConfig
from pyflowmap.images.evaluate import evaluate_model
from pyflowmap.images.metrics import ImageEvaluator
from pyflowmap.images.train import ImageTrainer, load_run
from pyflowmap.training import CHECKPOINT
from pyflowmap.training.checkpoint import atomic_write

METHODS = ("fm", "lsd", "esd", "psd-u", "psd-m", "meanflow", "ect", "ect-tuned")
DISTILLED = ("lmd", "emd", "pfmm")
SETTINGS = {
    # 2 CPU cores: about 0.5 s per step at this size, all eight methods in under an hour
    "cpu": dict(model=dict(ch=32, emb_dim=32, batch=64, lr=1e-3, warmup=50, device="cpu"), steps=600, n_eval=2000),
    "gpu": dict(model=dict(ch=64, emb_dim=64, batch=256, lr=5e-4, warmup=500, device="cuda"), steps=20000,
                n_eval=5000),
}


def train(out: Path, cfg: ImageConfig, progress: bool) -> ImageTrainer:
    if (out / CHECKPOINT).is_file():
        # every setting restated: resuming refuses a run made with another model, data or device
        stated = {k: v for k, v in cfg.to_dict().items() if k != "ect_stage"}
        trainer = ImageTrainer.resume(out, progress=progress, **stated)
    else:
        trainer = ImageTrainer(cfg, out_dir=out, progress=progress)
    return trainer.fit()


def run_method(method: str, root: Path, base: dict, steps: int, progress: bool) -> tuple[Path, float, int]:
    """Train ``method``; returns (run dir, training seconds, optimizer steps)."""
    if method == "ect-tuned":
        half = max(1, steps // 2)
        pre = train(root / "ect-pretrain", ImageConfig(objective="ect-pretrain", steps=half, **base), progress)
        tuned = train(root / method, ImageConfig(objective="ect", steps=steps - half, init=str(root / "ect-pretrain"),
                                                 **base), progress)
        return root / method, pre.train_seconds + tuned.train_seconds, pre.step + tuned.step
    extra = {}
    if method in DISTILLED:
        extra = dict(teacher=str(root / "fm"), semigradient=method == "emd")
    t = train(root / method, ImageConfig(objective=method, steps=steps, **extra, **base), progress)
    return root / method, t.train_seconds, t.step


def table(rows: list[dict], steps: list[int], floor: float) -> str:
    head = "| method | sampler | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " | s / train step |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for r in rows:
        cells = [f"{r['cfd'][str(k)]:.2f}" if str(k) in r["cfd"] else "" for k in steps]
        lines.append(f"| {r['method']} | {r['sampler']} | " + " | ".join(cells) + f" | {r['seconds_per_step']:.3f} |")
    lines.append("| (real data, two halves) | | " + " | ".join([f"{floor:.2f}"] + [""] * (len(steps) - 1)) + " | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--out", default="runs/images")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + DISTILLED)
    p.add_argument("--distillation", action="store_true", help="also LMD, EMD, PFMM from the FM run")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the setting's)")
    p.add_argument("--n-eval", type=int, default=None, help="samples per score (default: the setting's)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    setting = SETTINGS[args.setting]
    steps = args.steps or setting["steps"]
    n_eval = args.n_eval or setting["n_eval"]
    base = dict(setting["model"], dataset=args.dataset)
    methods = list(dict.fromkeys(args.methods + (list(DISTILLED) if args.distillation else [])))
    if any(m in DISTILLED for m in methods) and "fm" not in methods and not (Path(args.out) / "fm" / CHECKPOINT).is_file():
        methods.insert(0, "fm")  # the teacher
    methods.sort(key=lambda m: m in DISTILLED)  # teachers first
    root = Path(args.out)
    device = base["device"]
    evaluator = ImageEvaluator(args.dataset, device=device)
    print(f"classifier: held-out accuracy {evaluator.info.get('test_accuracy', float('nan')):.3f}; "
          f"CFD floor (two halves of the real data) {evaluator.floor:.2f}", flush=True)

    rows, t_start = [], time.perf_counter()
    for method in methods:
        run, secs, n_steps = run_method(method, root, base, steps, not args.quiet)
        model, cfg, _ = load_run(run, device=device)
        samplers = ("ode",) if method == "fm" else None
        eval_steps = (1, 2, 4, 8, 50) if method == "fm" else (1, 2, 4, 8)
        scores = evaluate_model(model, evaluator, steps=eval_steps, samplers=samplers, n=n_eval, device=device,
                                grid_dir=root / "grids", name=method)
        row = {"method": method, "sampler": scores[0]["sampler"], "train_steps": n_steps, "train_seconds": secs,
               "seconds_per_step": secs / max(1, n_steps), "derivative": cfg.derivative,
               "cfd": {str(s["steps"]): s["cfd"] for s in scores},
               "label_entropy": {str(s["steps"]): s["label_entropy"] for s in scores},
               "confidence": {str(s["steps"]): s["confidence"] for s in scores}}
        rows.append(row)
        print(f"{method:10s} " + "  ".join(f"{k}:{v:.2f}" for k, v in row["cfd"].items())
              + f"   {row['seconds_per_step']:.3f} s/step", flush=True)
        result = {"setting": args.setting, "dataset": args.dataset, "steps_per_method": steps, "n_eval": n_eval,
                  "model": base, "classifier": evaluator.info, "cfd_floor": evaluator.floor,
                  "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                  "wall_seconds": time.perf_counter() - t_start, "rows": rows}
        atomic_write(root / "results.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
        md = table(rows, [1, 2, 4, 8, 50], evaluator.floor)
        atomic_write(root / "results.md", lambda f: f.write((md + "\n").encode()))
    print(table(rows, [1, 2, 4, 8, 50], evaluator.floor))
    print(f"wall {time.perf_counter() - t_start:.0f} s; results in {root}/results.md, grids in {root}/grids/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
