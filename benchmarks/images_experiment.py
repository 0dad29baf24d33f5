"""Every objective on MNIST-5k with the same network and budget: the classifier Frechet
distance (CFD, lower is better) at 1/2/4/8 sampling steps and the seconds per training step.

    python benchmarks/images_experiment.py                    # CPU setting, about 75 minutes on 2 cores
    python benchmarks/images_experiment.py --setting gpu      # a lent GPU
    python benchmarks/images_experiment.py --methods lsd ect --steps 200 --out runs/quick
    python benchmarks/images_experiment.py --conditional      # class-conditional, with guidance
    python benchmarks/images_experiment.py --conditional --methods lsd --steps 20 --n-eval 200 --out runs/qc

Each method trains in ``<out>/<method>/`` (an existing checkpoint is resumed, so an interrupted
experiment continues where it stopped) and is scored with its EMA weights. FM is sampled by
the Euler ODE of its velocity (1/2/4/8/50 steps: 50 is the multi-step reference), the
flow-map objectives by their own jumps, ECT by the consistency sampler (2 steps: re-noise to
t_mid = 0.821). ``ect-tuned`` spends half the budget on EDM denoising pretraining and half on
consistency tuning from it, so its total matches the others; ``--distillation`` adds LMD, EMD
(semigradient), PFMM and sCD distilled from the finished FM run for the same number of steps (the teacher's own budget comes on top). ``sct`` is sCM's
continuous-time consistency training on TrigFlow, sampled like ECT (2 steps: re-noise to
tau_mid = 1.1). Writes ``results.json``, ``results.md`` and PNG sample
grids per method and step count.

``--model dit``: the same table with the DiT flow map (``--dit-preset``, default cpu-small:
width 128, depth 4, 4 heads, patch 4 on 28 x 28, 49 tokens) in place of the UNet, same batch,
learning rate and steps; runs in ``runs/images-dit`` by default.

``--conditional``: class-conditional MNIST-5k with the same network and budget per method (fm,
lsd, meanflow, psd-m, ect-tuned by default), each in two variants trained with condition
dropout p_uncond = 0.1: ``cfg-sample`` (no guidance in training; scored at sampling guidance
scale 1, the conditional model alone, and at ``--cfg`` W by classifier-free guidance, which
doubles each network call's batch) and ``cfg-train`` (trained with guidance W, ECT-tuned's
pretraining and tuning both; scored without sampling guidance). Requested labels are balanced
(sample i of class i mod 10); the tables give the accuracy on them (the classifier's argmax),
the CFD and the label entropy. Runs live in ``<out>/<variant>/<method>/``. With
``--distillation`` the students of ``cfg-train`` distill its guided FM teacher without
guidance of their own (the guidance is the teacher's).
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

METHODS = ("fm", "lsd", "esd", "psd-u", "psd-m", "meanflow", "shortcut", "ect", "ect-tuned", "sct")
DISTILLED = ("lmd", "emd", "pfmm", "scd")
COND_METHODS = ("fm", "lsd", "meanflow", "psd-m", "ect-tuned")  # the --conditional default
VARIANTS = ("cfg-sample", "cfg-train")
SETTINGS = {
    # 2 CPU cores: about 0.3-0.6 s per step at this size, all ten methods in about 75 minutes
    "cpu": dict(model=dict(ch=32, emb_dim=32, batch=64, lr=1e-3, warmup=50, device="cpu"), steps=600, n_eval=2000),
    "gpu": dict(model=dict(ch=64, emb_dim=64, batch=256, lr=5e-4, warmup=500, device="cuda"), steps=20000,
                n_eval=5000),
}


def train(out: Path, cfg: ImageConfig, progress: bool) -> ImageTrainer:
    if (out / CHECKPOINT).is_file():
        # every setting restated: resuming refuses a run made with another model, data or device;
        # a field the run's config predates (conditioning) is restated only if it is not the default
        try:
            stored = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            stored = None
        defaults = ImageConfig().to_dict()
        stated = {k: v for k, v in cfg.to_dict().items() if k != "ect_stage"
                  and (not isinstance(stored, dict) or k in stored or v != defaults[k])}
        trainer = ImageTrainer.resume(out, progress=progress, **stated)
    else:
        trainer = ImageTrainer(cfg, out_dir=out, progress=progress)
    return trainer.fit()


def run_method(method: str, root: Path, base: dict, steps: int, progress: bool) -> tuple[Path, float, int]:
    """Train ``method`` (``base``: every setting beside objective, steps and teacher/init,
    conditioning included); returns (run dir, training seconds, optimizer steps)."""
    if method == "ect-tuned":
        half = max(1, steps // 2)
        pre = train(root / "ect-pretrain", ImageConfig(objective="ect-pretrain", steps=half, **base), progress)
        tuned = train(root / method, ImageConfig(objective="ect", steps=steps - half, init=str(root / "ect-pretrain"),
                                                 **base), progress)
        return root / method, pre.train_seconds + tuned.train_seconds, pre.step + tuned.step
    extra = {}
    if method in DISTILLED:
        extra = dict(teacher=str(root / "fm"), semigradient=method == "emd")
        # scd trains from scratch at sCM's time scale 10: started from the teacher's weights it
        # must keep their scale 100, and then reached CFD 277 at 1 step against 28 (RESULTS 12)
        if base.get("guidance", 1.0) != 1:  # cfg-train: the teacher is guided already; distill it as it is
            extra["guidance"] = 1.0
    t = train(root / method, ImageConfig(**{**base, **extra, "objective": method, "steps": steps}), progress)
    return root / method, t.train_seconds, t.step


def table(rows: list[dict], steps: list[int], floor: float) -> str:
    head = "| method | sampler | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " | s / train step |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for r in rows:
        cells = [f"{r['cfd'][str(k)]:.2f}" if str(k) in r["cfd"] else "" for k in steps]
        lines.append(f"| {r['method']} | {r['sampler']} | " + " | ".join(cells) + f" | {r['seconds_per_step']:.3f} |")
    lines.append("| (real data, two halves) | | " + " | ".join([f"{floor:.2f}"] + [""] * (len(steps) - 1)) + " | |")
    return "\n".join(lines)


def cond_table(rows: list[dict], steps: list[int], metric: str, fmt: str = "{:.3f}") -> str:
    head = "| method | variant | train w | sample cfg | sampler | " + \
        " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " | s / train step |"
    lines = [head, "|" + "---|" * (len(steps) + 6)]
    for r in rows:
        cells = [fmt.format(r[metric][str(k)]) if str(k) in r[metric] else "" for k in steps]
        lines.append(f"| {r['method']} | {r['variant']} | {r['train_guidance']:g} | {r['cfg']:g} | {r['sampler']} | "
                     + " | ".join(cells) + f" | {r['seconds_per_step']:.3f} |")
    return "\n".join(lines)


def cond_report(rows: list[dict], steps: list[int], floor: float, info: dict) -> str:
    parts = ["Class-conditional: balanced requested labels; train w: the guidance scale in training (1: none), "
             "sample cfg: classifier-free guidance at sampling (1: the conditional model alone).",
             f"Classifier held-out accuracy {info.get('test_accuracy', float('nan')):.3f} (the ceiling of the "
             "accuracy column); CFD floor (two halves of the real data) " + f"{floor:.2f}.", "",
             "Accuracy on the requested labels (higher is better):", "", cond_table(rows, steps, "accuracy"), "",
             "Classifier Frechet distance (lower is better):", "", cond_table(rows, steps, "cfd", "{:.2f}"), "",
             "Label entropy of the samples (nats; log 10 = 2.30 for balanced classes):", "",
             cond_table(rows, steps, "label_entropy", "{:.2f}")]
    return "\n".join(parts)


def _eval_row(method: str, scores: list[dict], n_steps: int, secs: float, run_cfg, **extra) -> dict:
    row = {"method": method, **extra, "sampler": scores[0]["sampler"], "train_steps": n_steps,
           "train_seconds": secs, "seconds_per_step": secs / max(1, n_steps), "derivative": run_cfg.derivative,
           "cfd": {str(s["steps"]): s["cfd"] for s in scores},
           "label_entropy": {str(s["steps"]): s["label_entropy"] for s in scores},
           "confidence": {str(s["steps"]): s["confidence"] for s in scores}}
    if "accuracy" in scores[0]:
        row["accuracy"] = {str(s["steps"]): s["accuracy"] for s in scores}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--out", default=None, help="default runs/images (runs/images-conditional with --conditional)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS + DISTILLED,
                   help=f"default: {' '.join(METHODS)} ({' '.join(COND_METHODS)} with --conditional)")
    p.add_argument("--distillation", action="store_true", help="also LMD, EMD, PFMM from the FM run")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the setting's)")
    p.add_argument("--n-eval", type=int, default=None, help="samples per score (default: the setting's)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--model", choices=("unet", "dit"), default="unet", help="the network (default unet)")
    p.add_argument("--dit-preset", default="cpu-small", help="--model dit: its size (default cpu-small)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional models, guided at sampling (cfg-sample) or in training (cfg-train)")
    p.add_argument("--cfg", type=float, default=2.0, help="--conditional: the guidance scale W (default 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="--conditional: which variants (default both)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.conditional and not (args.cfg >= 0 and args.cfg != 1 and args.cfg < float("inf")):
        p.error(f"--cfg must be a finite guidance scale >= 0 other than 1 (1 is no guidance), got {args.cfg}")
    if args.steps is not None and args.steps < 1 or args.n_eval is not None and args.n_eval < 2:
        p.error("--steps must be >= 1 and --n-eval >= 2")

    setting = SETTINGS[args.setting]
    steps = args.steps or setting["steps"]
    n_eval = args.n_eval or setting["n_eval"]
    base = dict(setting["model"], dataset=args.dataset)
    if args.model == "dit":
        base.update(model="dit", dit_preset=args.dit_preset)
    chosen = args.methods or list(COND_METHODS if args.conditional else METHODS)
    methods = list(dict.fromkeys(chosen + (list(DISTILLED) if args.distillation else [])))
    root = Path(args.out or ("runs/images-conditional" if args.conditional else "runs/images")
                + ("-dit" if args.model == "dit" and not args.out else ""))
    # (variant, its run directory, its conditioning settings); one unconditional "variant"
    if args.conditional:
        variants = [(v, root / v, dict(conditional=True, p_uncond=0.1, guidance=args.cfg if v == "cfg-train" else 1.0))
                    for v in args.variants]
    else:
        variants = [(None, root, {})]
    if any(m in DISTILLED for m in methods) and "fm" not in methods \
            and not all((vroot / "fm" / CHECKPOINT).is_file() for _, vroot, _ in variants):
        methods.insert(0, "fm")  # the teacher
    methods.sort(key=lambda m: m in DISTILLED)  # teachers first
    device = base["device"]
    evaluator = ImageEvaluator(args.dataset, device=device)
    print(f"classifier: held-out accuracy {evaluator.info.get('test_accuracy', float('nan')):.3f}; "
          f"CFD floor (two halves of the real data) {evaluator.floor:.2f}", flush=True)

    rows, t_start = [], time.perf_counter()
    for variant, vroot, cond in variants:
        for method in methods:
            run, secs, n_steps = run_method(method, vroot, {**base, **cond}, steps, not args.quiet)
            model, cfg, _ = load_run(run, device=device)
            samplers = ("ode",) if method == "fm" else None
            eval_steps = (1, 2, 4, 8, 50) if method == "fm" else (1, 2, 4, 8)
            tag = method if variant is None else f"{variant}-{method}"
            if variant is None:
                scores = evaluate_model(model, evaluator, steps=eval_steps, samplers=samplers, n=n_eval, device=device,
                                        grid_dir=root / "grids", name=tag)
                rows.append(_eval_row(method, scores, n_steps, secs, cfg))
                print(f"{method:10s} " + "  ".join(f"{k}:{v:.2f}" for k, v in rows[-1]["cfd"].items())
                      + f"   {rows[-1]['seconds_per_step']:.3f} s/step", flush=True)
            else:
                # the conditional model alone (cfg 1), and for cfg-sample also guided at sampling
                scales = (None, args.cfg) if variant == "cfg-sample" else (None,)
                scores = evaluate_model(model, evaluator, steps=eval_steps, samplers=samplers, n=n_eval, device=device,
                                        grid_dir=root / "grids", name=tag, guidance=scales)
                for g in scales:
                    mine = [s for s in scores if s["guidance"] == g]
                    rows.append(_eval_row(method, mine, n_steps, secs, cfg, variant=variant,
                                          train_guidance=cond["guidance"], cfg=1.0 if g is None else g))
                    r = rows[-1]
                    print(f"{tag:22s} cfg {r['cfg']:g}  " + "  ".join(
                        f"{k}: acc {r['accuracy'][k]:.2f} CFD {r['cfd'][k]:.2f}" for k in r["cfd"])
                        + f"   {r['seconds_per_step']:.3f} s/step", flush=True)
            result = {"setting": args.setting, "dataset": args.dataset, "steps_per_method": steps, "n_eval": n_eval,
                      "model": base, "classifier": evaluator.info, "cfd_floor": evaluator.floor,
                      "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                      "wall_seconds": time.perf_counter() - t_start, "rows": rows}
            if args.conditional:
                result.update(conditional=True, cfg=args.cfg, p_uncond=0.1, variants=[v for v, _, _ in variants])
            md = cond_report(rows, [1, 2, 4, 8, 50], evaluator.floor, evaluator.info) if args.conditional else \
                table(rows, [1, 2, 4, 8, 50], evaluator.floor)
            atomic_write(root / "results.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
            atomic_write(root / "results.md", lambda f: f.write((md + "\n").encode()))
    print(md)
    print(f"wall {time.perf_counter() - t_start:.0f} s; results in {root}/results.md, grids in {root}/grids/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
