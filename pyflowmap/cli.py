"""Command line: ``python -m pyflowmap {demo,train,sample,eval,image-train,image-eval}`` (also
installed as ``pyflowmap``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from pyflowmap.conditioning import num_classes
from pyflowmap.sampling import draw
from pyflowmap.toy2d.config import RECIPES, TrainConfig
from pyflowmap.toy2d.evaluate import ALL_SAMPLERS, default_samplers, evaluate, format_table, load_model, starting_noise, to_json
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training import CHECKPOINT, NonFiniteTraining, atomic_write
from pyflowmap.training.rundir import RunLock
from pyflowmap.training.runlog import has_tensorboard, read_log

HELP = {
    "data": "2D dataset: checker, 8gaussians, moons, spiral",
    "objective": "fm, lsd, esd, psd-u, psd-m, meanflow, shortcut, sct, scd (scd: with --teacher, a 2D fm run)",
    "teacher": "scd: the run directory of a finished fm run on the same data",
    "scm_param": "sct / scd: the TrigFlow parameterization, linear (the net is a flow-matching velocity, so an fm "
                 "run can --init it) or trigflow (sCM's own)",
    "scm_warmup": "sct / scd: tangent warm-up steps (0: a tenth of --steps)",
    "time_scale": "frequency scale of the time embeddings (0: 10 for sct / scd, whose tangent differentiates "
                  "them, 100 otherwise)",
    "fourier": "random Fourier features of x / sigma_d fed to the MLP (-1: 64, none for esd; 0: none)",
    "fourier_scale": "their frequency scale, in cycles per sigma_d",
    "optimizer": "radam, adam or adamw",
    "lr_schedule": "sqrt (decay after --lr-decay-after), cosine (to 0 at --steps) or constant",
    "warmup": "linear learning-rate warm-up steps",
    "ema_warmup": "ramp the EMA decay as min(ema, (1 + n) / (10 + n))",
    "part_weighting": "equal (the flow-matching and distillation means summed) or count (the mean over all "
                      "samples, the paper's code)",
    "derivative": "how derivatives are taken: auto, jvp (torch.func), fd (central differences), dual",
    "steps": "total optimizer steps",
    "batch": "batch size",
    "seed": "seed of initialization and of the training stream",
    "precision": "the step's arithmetic: fp32, bf16 or fp16 (autocast with fp32 master weights and EMA; fp16 with "
                 "a dynamic loss scale; docs/precision.md)",
    "compile": "torch.compile the step (network, tangents, teacher, loss and backward) as one graph; falls back "
               "to eager with a warning where PyTorch cannot",
}
# image-train's own (the toy ``train`` has a --depth of its own)
IMAGE_HELP = {
    "objective": "fm, lsd, esd, psd-u, psd-m, meanflow, shortcut, lmd, emd, pfmm, ect, ect-pretrain, sct, scd "
                 "(lmd, emd, pfmm, scd: with --teacher, an fm run)",
    "model": "the network: unet (sized by --ch, --emb-dim, --attention) or dit (a Diffusion Transformer)",
    "dit_preset": "dit: the size, cpu-small, S/2, S/4, S/8, B/2, B/4, B/8, L/2, L/4, L/8",
    "patch": "dit: the patch side, dividing the image sides (0: the preset's)",
    "depth": "dit: transformer blocks (0: the preset's)",
    "width": "dit: token channels (0: the preset's)",
    "heads": "dit: attention heads, dividing --width (0: the preset's)",
    "qk_norm": "dit: RMSNorm of the queries and keys",
    "pos_embed": "dit: position embedding, sincos or learned",
}


def _add_config_args(p: argparse.ArgumentParser, defaults, helps=HELP):
    for f in fields(type(defaults)):
        # the field's own default (time_scale 0, fourier -1: the objective's), not the value it
        # resolved to for the default objective
        default = f.default if f.default is not MISSING else getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')} (default {default})")
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=None,
                           help=f"{helps.get(f.name, '')} (default {default})")


def _config_from(args, defaults):
    """The flags given (on top of ``--recipe``'s fields), the rest left to the config class: the
    defaults that depend on the objective (time scale, Fourier features, sCM's warm-up) are
    resolved for the objective asked for, not for the default one."""
    cls = type(defaults)
    values = dict(RECIPES[args.recipe]) if getattr(args, "recipe", None) else {}
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None})
    return cls.from_dict(values)


def _overrides(args, cls=TrainConfig) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def _run_eval(run_dir: Path, steps, samplers, n: int, seed: int, use_ema: bool, out_dir: Path | None = None,
              guidance: float | None = None) -> dict:
    from pyflowmap.toy2d.plots import plot_sample_grid

    model, base, cfg, state = load_model(run_dir, use_ema=use_ema)
    report = evaluate(model, base, cfg.data, steps=steps, samplers=samplers, n=n, seed=seed, guidance=guidance)
    out_dir = out_dir or run_dir
    summary = to_json(report)
    summary.update({"objective": cfg.objective, "derivative": cfg.derivative, "train_steps": state["step"],
                    "train_seconds": state["train_seconds"], "skipped_steps": state["skipped"], "ema": use_ema,
                    "config": cfg.to_dict()})
    atomic_write(out_dir / "metrics.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    png = plot_sample_grid(report["samples"], out_dir / "samples.png",
                           title=f"{cfg.objective.upper()} on {cfg.data}, {state['step']} steps ({'EMA' if use_ema else 'raw'})")
    print(f"\n{cfg.objective.upper()} on {cfg.data}: {state['step']} training steps in {state['train_seconds']:.0f} s")
    print(format_table(report))
    if report["conditional"]:
        print("\nconditional samples for balanced labels, "
              + ("no guidance at sampling" if guidance is None else f"guidance {guidance:g} at sampling") + ":")
        print(format_table(report, "accuracy"))
    print(f"\nwrote {out_dir / 'metrics.json'} and {png}")
    return summary


def _run_device(args, defaults, out: Path) -> str:
    if args.device is not None:
        return args.device
    if args.resume and (out / "config.json").is_file():
        try:
            stored = json.loads((out / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{out / 'config.json'} is not readable JSON ({e}); restore it or start over") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{out / 'config.json'} holds a {type(stored).__name__}, not a run config")
        return stored.get("device", defaults.device)
    return defaults.device


def _train(args, trainer_cls, defaults) -> int:
    from pyflowmap import distributed

    out = Path(args.out)
    # under torchrun (WORLD_SIZE > 1): join the group; every rank trains its share of each
    # global batch, rank 0 alone writes and prints
    distributed.init_from_env(_run_device(args, defaults, out))
    # the directory is this command's from before the "exists" check until it ends: two
    # commands on one --out cannot both pass the check (the trainer re-enters the same lock)
    with RunLock(out) if distributed.is_main() else contextlib.nullcontext():
        if args.resume:
            if getattr(args, "recipe", None):
                print("error: --recipe starts a run; a resumed run keeps the configuration in its checkpoint",
                      file=sys.stderr)
                return 2
            trainer = trainer_cls.resume(out, progress=not args.quiet, **_overrides(args, type(defaults)))
            if distributed.is_main():
                print(f"resuming {out / CHECKPOINT} at step {trainer.step} of {trainer.cfg.steps}")
        else:
            if (out / CHECKPOINT).exists() and not args.overwrite:
                print(f"error: {out / CHECKPOINT} exists; pass --resume to continue it or --overwrite", file=sys.stderr)
                return 2
            cfg = _config_from(args, defaults)
            _recipe_note(args, cfg)
            trainer = trainer_cls(cfg, out_dir=out, progress=not args.quiet)
        trainer.fit()
        trainer.close()
    if distributed.is_main():
        _plot_training(trainer, out)
        world = 1 if trainer.shard is None else trainer.shard.world
        print(f"trained {trainer.step} steps ({trainer.skipped} skipped) in {trainer.train_seconds:.1f} s"
              + (f" on {world} processes" if world > 1 else "")
              + (f"; checkpoint {trainer.saved}" if trainer.saved is not None else ""))
    distributed.shutdown()
    _require_final_save(trainer)
    return 0


def _recipe_note(args, cfg) -> None:
    """MeanFlow's 2D runs get worse with length under either recipe (docs/recipes.md); say so
    where it applies."""
    if isinstance(cfg, TrainConfig) and cfg.objective == "meanflow" and cfg.steps > 3000:
        print("note: 2D MeanFlow runs got worse after about 3000 steps in pyflowmap's study (docs/recipes.md); "
              f"this one trains {cfg.steps}", file=sys.stderr)


def _plot_training(trainer, out: Path) -> Path | None:
    """``training.png`` in the run directory: the loss of each part, gradient norms and learning
    rate over the run (skipped, with a note, without matplotlib)."""
    try:
        from pyflowmap.training.curves import plot_training
    except ImportError:  # pragma: no cover
        return None
    parts = getattr(trainer.objective, "parts", ())
    try:
        # the log on disk holds the whole run; the trainer's history only what this process trained
        rows = read_log(out) or trainer.history
        return plot_training(rows, out / "training.png", parts=parts,
                             title=f"{trainer.cfg.objective.upper()} ({trainer.cfg.derivative}), "
                                   f"{trainer.step} steps in {trainer.train_seconds:.0f} s")
    except ImportError:
        print("note: no training.png (pip install 'pyflowmap[plots]' for the loss curves)")
    except ValueError:
        pass  # nothing logged yet
    return None


def _require_final_save(trainer) -> None:
    """A run whose final save was refused fails the command (exit 1), naming what is on disk."""
    if trainer.saved is None:
        kept = trainer.last_checkpoint()
        raise NonFiniteTraining("the final checkpoint was NOT written (non-finite parameters); "
                                + (f"{kept} holds the last good state" if kept else "no checkpoint exists"))


def cmd_train(args) -> int:
    return _train(args, Trainer, TrainConfig())


def cmd_image_train(args) -> int:
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer

    return _train(args, ImageTrainer, ImageConfig())


def cmd_image_eval(args) -> int:
    import math

    from pyflowmap.images.evaluate import evaluate_model
    from pyflowmap.images.metrics import ImageEvaluator
    from pyflowmap.images.train import load_run

    _positive(args, "n", "steps")
    run = Path(args.ckpt)
    model, cfg, state = load_run(run, use_ema=not args.no_ema, device=args.device)
    scales = args.cfg_scale
    if scales is not None:
        if not cfg.conditional:
            raise ValueError(f"--cfg-scale guides a class-conditional run; {run} is unconditional")
        if any(not math.isfinite(g) or g < 0 for g in scales):
            raise ValueError(f"--cfg-scale values must be finite and >= 0, got {scales}")
    evaluator = ImageEvaluator(cfg.dataset, device=args.device)
    out = Path(args.out) if args.out else run
    rows = evaluate_model(model, evaluator, steps=args.steps, samplers=args.samplers, n=args.n, seed=args.seed,
                          device=args.device, grid_dir=out, name="samples",
                          guidance=tuple(scales) if scales is not None else (None,))
    summary = {"objective": cfg.objective, "dataset": cfg.dataset, "train_steps": state["step"],
               "train_seconds": state["train_seconds"], "skipped_steps": state["skipped"], "ema": not args.no_ema,
               "conditional": cfg.conditional, "num_classes": state.get("num_classes") if cfg.conditional else None,
               "classifier": evaluator.info, "cfd_floor": evaluator.floor, "rows": rows, "config": cfg.to_dict()}
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"{cfg.objective.upper()} on {cfg.dataset}, {state['step']} steps; classifier Frechet distance "
          f"(floor {evaluator.floor:.2f}, lower is better):")
    if cfg.conditional:
        how = "as the network's input" if rows and rows[0]["guidance_as"] == "input" else "classifier-free, at sampling"
        print(f"  class-conditional ({state.get('num_classes')} classes, balanced requested labels); cfg scale {how}, "
              "'-': the conditional model alone; accuracy: classifier argmax == requested label")
        for r in rows:
            g = "-" if r["guidance"] is None else f"{r['guidance']:g}"
            print(f"  {r['sampler']:12s} {r['steps']:3d} steps  cfg {g:>5s}  accuracy {r['accuracy']:.3f}  "
                  f"CFD {r['cfd']:8.2f}  label entropy {r['label_entropy']:.2f}")
    else:
        for r in rows:
            print(f"  {r['sampler']:12s} {r['steps']:3d} steps  CFD {r['cfd']:8.2f}  label entropy "
                  f"{r['label_entropy']:.2f}")
    print(f"wrote {out / 'metrics.json'} and samples-*.png")
    return 0


def cmd_eval(args) -> int:
    _positive(args, "n", "steps")
    _run_eval(Path(args.ckpt), args.steps, args.samplers, args.n, args.seed, not args.no_ema,
              Path(args.out) if args.out else None, guidance=args.cfg_scale)
    return 0


def _positive(args, *names) -> None:
    """Count arguments (``--n``, ``--steps``) must be >= 1; a list must hold only such values."""
    for name in names:
        value = getattr(args, name)
        if any(v < 1 for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{name} must be >= 1, got {value}")


def cmd_sample(args) -> int:
    _positive(args, "n", "steps")
    model, base, cfg, _ = load_model(Path(args.ckpt), use_ema=not args.no_ema)
    g = torch.Generator().manual_seed(args.seed)
    k = num_classes(model)
    if args.label is not None and (k is None or not 0 <= args.label <= k):
        raise ValueError(f"--label must be in [0, {k}] ({k} is the null class)" if k is not None
                         else "--label needs a conditional run (trained with --conditional)")
    labels = None if k is None else torch.full((args.n,), k if args.label is None else args.label)
    sampler = args.sampler or default_samplers(model)[0]
    if sampler not in default_samplers(model):
        raise ValueError(f"--sampler {sampler} does not fit this run; use {', '.join(default_samplers(model))}")
    x = draw(model, starting_noise(model, base, args.n, generator=g), sampler, args.steps, c=labels,
             guidance=args.cfg_scale)
    out = Path(args.out)
    if out.suffix == ".png":
        from pyflowmap.toy2d.plots import plot_sample_grid

        plot_sample_grid({(sampler, args.steps): x}, out)
    else:
        atomic_write(out, lambda f: torch.save(x, f))
    print(f"wrote {args.n} samples ({sampler}, {args.steps} steps) to {out}")
    return 0


def cmd_demo(args) -> int:
    """Train the default flow map on the checker, then sample with 1/2/4/8 steps and report."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: the demo runs in one process; under torchrun use `-m pyflowmap train` "
              "(then `eval` in one process)", file=sys.stderr)
        return 2
    out = Path(args.out)
    cfg = _config_from(args, TrainConfig())
    with RunLock(out):
        if (out / CHECKPOINT).exists() and not args.overwrite:
            if args.recipe:
                print(f"error: {out} holds a run, which keeps its configuration; pass --overwrite to start it over "
                      f"with --recipe {args.recipe}", file=sys.stderr)
                return 2
            trainer = Trainer.resume(out, progress=not args.quiet, **_overrides(args))
            if trainer.step < trainer.cfg.steps:
                print(f"continuing {out / CHECKPOINT} from step {trainer.step}")
        else:
            _recipe_note(args, cfg)
            trainer = Trainer(cfg, out_dir=out, progress=not args.quiet)
        fourier = f", {trainer.cfg.fourier} Fourier features" if trainer.cfg.fourier else ""
        print(f"pyflowmap demo: {trainer.cfg.objective.upper()} ({trainer.cfg.derivative} derivatives) on "
              f"{trainer.cfg.data}, MLP {trainer.cfg.depth}x{trainer.cfg.hidden}{fourier}, batch {trainer.cfg.batch}, "
              f"{trainer.cfg.steps} steps, {torch.get_num_threads()} threads")
        trainer.fit()
        trainer.close()
        _require_final_save(trainer)
        curves = _plot_training(trainer, out)
        t0 = time.perf_counter()
        _run_eval(out, args.eval_steps, None, args.n, args.seed_eval, True)
        print(f"trained in {trainer.train_seconds:.0f} s, evaluated in {time.perf_counter() - t0:.0f} s; "
              f"loss curves: {curves or '(no matplotlib)'}; metrics per logged step: {out / 'train_log.jsonl'}"
              + (f" and {out / 'tensorboard'} (tensorboard --logdir {out})" if has_tensorboard() else
                 " (pip install 'pyflowmap[track]' for TensorBoard event files)"))
    return 0


def _train_parser(sub, name: str, help: str, defaults, func, helps=HELP) -> None:
    p = sub.add_parser(name, help=help)
    _add_config_args(p, defaults, helps)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, config.json)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=func)


def _add_recipe_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from a named recipe, then apply the other flags: fast (the default: what "
                        "benchmarks/learning_speed.py found at the demo's budget) or paper (the paper's "
                        "optimizer, schedule, EMA and network at demo size); docs/recipes.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyflowmap", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="train on the checkerboard, sample with 1/2/4/8 steps, print the table")
    _add_config_args(p, TrainConfig())
    _add_recipe_arg(p)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--n", type=int, default=65536, help="evaluation samples (default 65536)")
    p.add_argument("--seed-eval", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start over even if the run directory has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    _train_parser(sub, "train", "train a 2D flow map", TrainConfig(), cmd_train)
    _add_recipe_arg(sub.choices["train"])

    p = sub.add_parser("eval", help="metrics table, metrics.json and samples.png of a run")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint file")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--samplers", nargs="+", default=None, choices=ALL_SAMPLERS,
                   help="default: map euler heun (a flow map), consistency (an sct / scd run)")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="conditional runs: classifier-free guidance at sampling (default: none)")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="draw samples from a run (.pt tensor or .png)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--sampler", default=None, choices=ALL_SAMPLERS,
                   help="default: map (a flow map), consistency (an sct / scd run)")
    p.add_argument("--label", type=int, default=None,
                   help="conditional runs: the class to sample (default: the null class, unconditional)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="conditional runs: classifier-free guidance at sampling (default: none)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)

    from pyflowmap.images.config import ImageConfig

    _train_parser(sub, "image-train", "train an image flow map or consistency model (needs [images])", ImageConfig(),
                  cmd_image_train, {**HELP, **IMAGE_HELP})

    from pyflowmap.sampling import SAMPLERS as IMAGE_SAMPLERS

    p = sub.add_parser("image-eval", help="classifier Frechet distance table, metrics.json and PNG grids of an image run")
    p.add_argument("--ckpt", required=True, help="run directory")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--samplers", nargs="+", default=None, choices=IMAGE_SAMPLERS + ("ode",),
                   help="default: consistency for ECT runs, map (flow-map jumps) otherwise; euler / heun: the ODE "
                        "of v_{t,t} (ode is euler)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--cfg-scale", type=float, nargs="+", default=None,
                   help="conditional runs: classifier-free guidance scales to sample at (1: none; a run trained with "
                        "--guidance-max takes it as the network's input); default: the conditional model alone")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.set_defaults(func=cmd_image_eval)
    for p in sub.choices.values():  # `pyflowmap train --debug ...` works too (SUPPRESS keeps the top-level value)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


# what a user can act on: bad input (exit 2) and failures of the run itself (exit 1); anything
# else is a bug, reported in one line too, with the traceback behind --debug
BAD_INPUT = (ValueError, TypeError, ImportError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
RUN_FAILED = (NonFiniteTraining, OSError)  # OSErrors other than the missing-path ones above: a full disk, ...


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        code = 2 if isinstance(exc, BAD_INPUT) else 1
        what = "" if isinstance(exc, BAD_INPUT + RUN_FAILED) else f"internal error ({type(exc).__name__}): "
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {what}{msg}" + ("" if code == 2 else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return code
