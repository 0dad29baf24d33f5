"""The training loop every pyflowmap trainer shares: model, EMA and objective built in a fixed
hook order, data-parallel wrapping, learning-rate schedule, gradient clipping, the non-finite
step guard, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import warnings
import weakref
from pathlib import Path

import torch

from pyflowmap import distributed as dist_
from pyflowmap.training.checkpoint import atomic_write, load_checkpoint, save_checkpoint, save_weights
from pyflowmap.training.compiled import CompiledLoss
from pyflowmap.training.guard import NonFiniteGuard
from pyflowmap.training.parallel import Parallel
from pyflowmap.training.precision import Precision
from pyflowmap.training.rundir import RunLock, check_free_space
from pyflowmap.training.runlog import RunLog

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"


def _has_safetensors() -> bool:
    import importlib.util

    return importlib.util.find_spec("safetensors") is not None


class TrainerBase:
    """The loop, the guard and the state that every trainer shares.

    ``__init__`` builds a run from ``cfg`` (a :class:`~pyflowmap.training.LoopConfig`) in one
    fixed order of hooks, so no subclass can get it wrong:

    1. :meth:`prepare` (data and whatever the model is built from);
    2. ``torch.manual_seed(cfg.seed)``, then :meth:`build_model` and its EMA copy;
    3. :meth:`build_objective`;
    4. data-parallel wrapping under torchrun (DDP, or FSDP2 when ``cfg.fsdp``), before the
       optimizer exists, because FSDP2 replaces the parameters by their shards;
    5. :meth:`build_optimizer` over the model's and the objective's trainable parameters, a
       ``LambdaLR`` with :meth:`lr_factor`, and the training generator (seed ``cfg.seed + 1``).

    A subclass supplies those hooks, :meth:`next_batch` (this rank's rows of one global batch,
    all randomness from ``self.generator``) and the class attributes ``config_cls`` and
    ``format``. Every objective is called the same way, ``objective(model, x1,
    generator=..., step=..., shard=..., global_batch=...)``, and returns a
    :class:`~pyflowmap.objectives.LossOutput`.

    A step whose loss or gradient norm is not finite is skipped (no parameter, EMA or optimizer
    update) and counted; after ``max_bad_steps`` consecutive ones training stops with
    :class:`NonFiniteTraining`, and no checkpoint is ever written from a non-finite state.
    Under fp16 an overflowing gradient is the loss scale's business first: the step is
    skipped and the scale halved, and only an overflow at a scale below 1 counts as bad.

    ``cfg.precision`` (:class:`~pyflowmap.training.precision.Precision`) runs the loss under
    autocast with fp32 master weights; ``cfg.compile`` runs the objective's
    ``loss_from_draws`` as one compiled graph (:class:`~pyflowmap.training.compiled.CompiledLoss`),
    its draws made eagerly from ``self.generator`` by ``objective.draw``.

    Under torchrun every rank runs this same loop on its rows of each global batch
    (:mod:`pyflowmap.distributed`); the skip decision, the checkpoint's state and the logged
    scalars are agreed over ranks, and rank 0 alone writes.
    """

    config_cls: type = None
    format: str = ""
    resume_overrides = ("steps", "ckpt_every", "log_every", "device", "max_bad_steps")

    def __init__(self, cfg, out_dir: str | Path | None = None, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # the run directory is this run's alone for its whole life (rank 0 writes for all),
        # checked writable now rather than at the first save
        self._lock = RunLock(out_dir).acquire() if out_dir is not None and dist_.is_main() else None
        if self._lock is not None:
            weakref.finalize(self, self._lock.release)
        self.device = dist_.local_device(cfg.device)
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if self.device.type == "cuda" and (self.device.index or 0) >= gpus:
            raise ValueError(f"{type(cfg).__name__}.device is {cfg.device} but "
                             + (f"this machine has {gpus} CUDA device(s)" if gpus else
                                "no CUDA device is available; pass --device cpu"))
        self.progress = progress and dist_.is_main()
        self.precision = Precision(cfg.precision, self.device, warn=dist_.is_main())
        self.prepare()
        torch.manual_seed(cfg.seed)  # parameter initialization
        self.model = self.build_model().to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.objective = self.build_objective().to(self.device)
        # late-bound: subclasses and tests may replace loss_output on the instance
        self.parallel = Parallel(self.model, self.ema, self.objective, lambda: self.loss_output(), cfg.batch,
                                 cfg.seed, self.device, fsdp=getattr(cfg, "fsdp", False),
                                 mp_policy=self.precision.fsdp_policy(), compile_blocks=cfg.compile)
        self.compiled_loss = None  # eager: the objective's own call
        if cfg.compile and not self.parallel.compiles_blocks:  # FSDP2 compiles its blocks instead
            self.compiled_loss = CompiledLoss(self.objective, f"the {cfg.objective} ({cfg.derivative}) step",
                                        announce=self._announce)
        self.shard = self.parallel.shard
        self.precision.world = self.parallel.world
        self.params = [p for p in list(self.model.parameters()) + list(self.objective.parameters())
                       if p.requires_grad]
        self.optimizer = self.build_optimizer(self.params)
        # a plain lambda: LambdaLR then keeps the schedule out of the checkpoint (it is config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda n: self.lr_factor(n))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        if self._lock is not None:
            check_free_space(self.out_dir, self._checkpoint_bytes())
        self.saved: Path | None = None  # the checkpoint the last save() wrote (None: refused or never)
        self.step = 0
        self.guard = NonFiniteGuard(cfg.max_bad_steps)
        self.train_seconds = 0.0
        self.history: list[dict] = []

    def _announce(self, msg: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"[pyflowmap] {msg}")

    def close(self) -> None:
        """Release the run directory (also on garbage collection and at process exit)."""
        if self._lock is not None:
            self._lock.release()

    def _checkpoint_bytes(self) -> int:
        """About what one checkpoint takes: model, EMA and optimizer state (two moments), twice
        (the new file is written beside the old one), plus room for the small files."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 2 * 4 * params + 2**20

    def last_checkpoint(self) -> Path | None:
        """The checkpoint on disk in ``out_dir``, if there is one."""
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT
        return path if path is not None and path.is_file() else None

    # -- hooks --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load data and anything else the model and objective are built from."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_objective(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at optimizer step ``step``."""
        return 1.0

    def next_batch(self):
        """This rank's rows of the next global data batch: ``x1``, or ``(x1, c)`` for a
        conditional run (``c`` this rank's conditions of those rows)."""
        raise NotImplementedError

    def ema_decay(self) -> float:
        return self.cfg.ema

    def extra_state(self) -> dict:
        """Subclass state saved beside the common one (plain tensors and Python values)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def loss_output(self):
        """One batch's :class:`~pyflowmap.objectives.LossOutput` on this rank's rows, under the
        run's precision. Compiled: the objective's draws eager, its loss from them compiled,
        its report eager (the three stages of one call, :class:`~pyflowmap.objectives.ObjectiveBase`)."""
        batch = self.next_batch()
        x1, c = batch if isinstance(batch, tuple) else (batch, None)
        kw = {"generator": self.generator, "step": self.step, **({} if c is None else {"c": c}), **self.shard_args()}
        if self.compiled_loss is None:
            with self.precision.autocast():
                return self.objective(self.model, x1, **kw)
        draws = self.objective.draw(self.model, x1, **kw)
        with self.precision.autocast():
            out = self.compiled_loss(self.model, x1, draws)
        self.objective.report(out)
        return out

    @property
    def skipped(self) -> int:
        """Steps skipped so far because their loss or gradient norm was not finite."""
        return self.guard.skipped

    def shard_args(self) -> dict:
        """Keyword arguments that make an objective compute this rank's share of the loss."""
        return {} if self.shard is None else {"shard": self.shard, "global_batch": self.cfg.batch}

    def shard_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (all of it in a one-process run)."""
        return x if self.shard is None else x[self.shard.indices(x.shape[0], device=x.device)]

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step; returns the step's scalars, or None if it was skipped."""
        with contextlib.nullcontext() if self.compiled_loss is None else self.compiled_loss.step_context():
            return self._train_step()

    def _train_step(self) -> dict | None:
        loss, metrics, parts = self.parallel.loss()
        self.optimizer.zero_grad(set_to_none=True)
        # decided together: a rank that skipped backward alone would hang the others in DDP
        loss_ok = dist_.all_true(bool(torch.isfinite(loss)), self.device)
        finite = loss_ok
        gnorm = torch.tensor(float("nan"))
        scaler = self.precision.scaler
        if finite:
            if len(parts) > 1 and (self.step + 1) % self.cfg.log_every == 0:
                metrics = {**metrics, **self.part_grad_norms(parts)}
            self.precision.scaled(loss).backward()
            self.precision.unscale_(self.params)
            # gradients are already averaged over ranks, so every rank clips alike
            gnorm = dist_.full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            finite = bool(torch.isfinite(gnorm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.parallel.reshard()  # backward, which frees FSDP2's gathered weights, did not run
            if loss_ok and scaler is not None:
                scaler.update(overflow=True)
            # an fp16 overflow at a usable loss scale is the scaler's to handle, not a bad step
            if not (loss_ok and scaler is not None and scaler.scale >= 1.0):
                what = "gradient norm" if loss_ok else "loss" if self.shard is None else "loss (on some rank)"
                self.guard.skip(self.step, what, report=dist_.is_main(), checkpoint=self.last_checkpoint())
            self.step += 1
            self.scheduler.step()
            return None
        if scaler is not None:
            scaler.update(overflow=False)
            metrics = {**metrics, "loss_scale": torch.tensor(scaler.scale)}
        self.guard.passed()
        self.optimizer.step()
        self.scheduler.step()
        self.parallel.update_ema(self.ema, self.model, self.ema_decay())
        self.step += 1
        return {**metrics, "grad_norm": gnorm}

    def part_grad_norms(self, parts: dict) -> dict:
        """The gradient norm of each loss part alone (``grad_norm_<part>``), on logged steps of
        a one-process run: which part drives the update, and which one spikes before a
        divergence. One extra backward per part through the retained graph; no state changes."""
        params = [p for p in self.params if p.requires_grad]
        scale = self.precision.loss_factor()
        out = {}
        for name, term in parts.items():
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(self.precision.scaled(term), params, retain_graph=True, allow_unused=True)
            sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
            out[f"grad_norm_{name}"] = torch.stack(sq).sum().sqrt() / scale if sq else torch.zeros(())
        return out

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, steps: int | None = None, stop_after: int | None = None):
        """Train until ``steps`` (default ``cfg.steps``) total steps; ``stop_after`` ends early
        after that many steps of this call (used to test resume)."""
        total = self.cfg.steps if steps is None else steps
        self.model.train()  # dropout on, whatever a caller did to the model between fits
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not self.progress,
                   desc=f"{self.cfg.objective} ({self.cfg.derivative})", dynamic_ncols=True)
        # train_log.jsonl (+ TensorBoard events): rank 0 writes, from this step on
        log = RunLog(self.out_dir, start_step=self.step) if self.out_dir is not None and dist_.is_main() else None
        done = 0
        t0 = time.perf_counter()
        try:
            while self.step < total and (stop_after is None or done < stop_after):
                rec = self.train_step()
                done += 1
                bar.update(1)
                if rec is not None and (self.step % self.cfg.log_every == 0 or self.step == total):
                    rec = dist_.mean_over_ranks(rec)  # the global batch's loss
                    row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0]}
                    row.update({k: float(v) for k, v in rec.items()})
                    self.history.append(row)
                    if log is not None:
                        log.write({**row, "seconds": round(self.train_seconds + time.perf_counter() - t0, 3)})
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if self.out_dir is not None and self.step % self.cfg.ckpt_every == 0:
                    self.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.train_seconds += time.perf_counter() - t0
        if self.out_dir is not None:
            self.save()
        else:
            self.parallel.gather_ema(self.ema, self.model)  # save() gathered it already
        return self

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Whole tensors only (a collective under torchrun: every rank calls it together)."""
        self.parallel.gather_ema(self.ema, self.model)
        return {
            "format": self.format,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "model": self.parallel.whole_state(self.model),
            "ema": self.ema.state_dict(),
            "objective": self.parallel.whole_state(self.objective),
            "optimizer": self.parallel.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            # every rank's dropout stream (a collective: all ranks call state_dict together)
            "rank_rng": self.parallel.rng_states(),
            "history": self.history,
            **self.precision.state_dict(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != self.format:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {self.format!r}")
        self.parallel.load_whole_state(self.model, state["model"])
        self.ema.load_state_dict(state["ema"])
        self.parallel.scatter_ema(self.ema, self.model)
        self.parallel.load_whole_state(self.objective, state["objective"])
        self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        self.parallel.set_rng_state(state, self.cfg.seed + self.step)
        self.guard.skipped = state["skipped"]
        self.train_seconds = state["train_seconds"]
        self.history = list(state["history"])
        self.precision.load_state_dict(state)
        self.load_extra_state(state)

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` (and ``weights.safetensors``, the EMA weights, when safetensors
        is installed) atomically, unless the model or EMA holds a non-finite value.

        Under torchrun every rank must call it (it gathers state); rank 0 writes, and a failed
        write raises on every rank instead of leaving the others waiting."""
        if self.out_dir is None:
            raise ValueError("Trainer has no out_dir to save to")
        if not self.parallel.finite(self.model, self.ema):  # decided over all ranks
            kept = self.last_checkpoint()
            warnings.warn("non-finite parameters: checkpoint NOT written; "
                          + (f"the previous one, {kept}, is kept" if kept else "there is no earlier one"))
            self.saved = None
            return None
        state = self.state_dict()  # on every rank: it gathers the ranks' RNG states
        path, error = None, None
        if dist_.is_main():
            try:
                path = self._write(state)
            except Exception as e:  # reported to every rank below, re-raised here
                error = e
        # nobody reads or resumes before rank 0 has written, and nobody waits on a failed write
        if not dist_.all_true(error is None, self.device):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed to write the checkpoint in {self.out_dir}")
        self.saved = self.out_dir / CHECKPOINT
        return path

    def _write(self, state: dict) -> Path:
        path = save_checkpoint(state, self.out_dir / CHECKPOINT)
        if _has_safetensors():
            # the EMA weights alone, pickle-free, for sharing and serving (the full training
            # state needs optimizer and RNG objects and stays in checkpoint.pt)
            save_weights(self.ema.state_dict(), self.out_dir / WEIGHTS,
                         {"format": self.format, "step": self.step, "config": json.dumps(self.cfg.to_dict())})
        atomic_write(self.out_dir / "config.json",
                     lambda f: f.write(json.dumps(self.cfg.to_dict(), indent=2).encode()))
        return path

    @classmethod
    def resume(cls, out_dir: str | Path, progress: bool = True, **overrides):
        """Rebuild a trainer from ``out_dir/checkpoint.pt``; ``overrides`` may extend ``steps``
        or change logging, never the model or the objective (restating their stored values is
        allowed), nor move the run between CPU and CUDA (their generator states differ)."""
        return cls._resume(out_dir, progress, {}, overrides)

    @classmethod
    def _resume(cls, out_dir, progress: bool, init_kwargs: dict, overrides: dict):
        if not (Path(out_dir) / CHECKPOINT).exists():
            raise FileNotFoundError(f"no checkpoint at {Path(out_dir) / CHECKPOINT} to resume")
        # read under the directory's lock: no other writer may replace it between load and run
        with RunLock(out_dir) if dist_.is_main() else contextlib.nullcontext():
            return cls._resume_locked(out_dir, progress, init_kwargs, overrides)

    @classmethod
    def _resume_locked(cls, out_dir, progress: bool, init_kwargs: dict, overrides: dict):
        state = load_checkpoint(Path(out_dir) / CHECKPOINT)
        allowed = set(cls.resume_overrides)
        # restating a stored value is harmless (a command line repeated with --resume)
        # a field the checkpoint predates holds its default
        stored = {**{f.name: f.default for f in dataclasses.fields(cls.config_cls)
                     if f.default is not dataclasses.MISSING}, **state["config"]}
        bad = {k for k, v in overrides.items() if k not in allowed and stored.get(k, object()) != v}
        if bad:
            raise ValueError(f"cannot change {sorted(bad)} when resuming (allowed: {sorted(allowed)})")
        cfg = cls.config_cls.from_dict({**state["config"], **overrides})
        if torch.device(cfg.device).type != torch.device(state["config"]["device"]).type:
            raise ValueError(f"cannot resume a {state['config']['device']} run on {cfg.device}: the random "
                             "generator states differ, so it would not continue exactly")
        trainer = cls(cfg, out_dir=out_dir, progress=progress, **init_kwargs)
        trainer.load_state_dict(state)
        return trainer
