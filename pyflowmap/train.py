"""The training loop shared by every pyflowmap trainer (EMA, gradient clipping, learning-rate
schedule, non-finite step guard, atomic checkpoints, exact resume) and the 2D trainer."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from pyflowmap.checkpoint import all_finite, atomic_write, load_checkpoint, save_checkpoint, save_weights
from pyflowmap.config import TrainConfig, build_base, build_model, build_objective, data_statistics
from pyflowmap.data import sample_data

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"


def _has_safetensors() -> bool:
    import importlib.util

    return importlib.util.find_spec("safetensors") is not None


class NonFiniteTraining(RuntimeError):
    """Raised when too many consecutive steps produced a non-finite loss or gradient."""


def _lr_factor(decay_after: int):
    if decay_after <= 0:
        return lambda step: 1.0
    return lambda step: 1.0 if step < decay_after else math.sqrt(decay_after / max(step, 1))


class TrainerBase:
    """The loop, the guard and the state that every trainer shares.

    A subclass builds ``cfg``, ``model``, ``ema``, ``objective``, ``params``, ``optimizer``,
    ``scheduler`` and ``generator`` in its ``__init__``, then calls :meth:`_start`; it supplies
    :meth:`loss_output` (one batch's :class:`~pyflowmap.objectives.LossOutput`, all randomness
    from ``self.generator``) and the class attributes ``config_cls`` and ``format``.

    A step whose loss or gradient norm is not finite is skipped (no parameter, EMA or optimizer
    update) and counted; after ``max_bad_steps`` consecutive ones training stops with
    :class:`NonFiniteTraining`, and no checkpoint is ever written from a non-finite state.
    """

    config_cls: type = None
    format: str = ""
    resume_overrides = ("steps", "ckpt_every", "log_every", "device", "max_bad_steps")

    def _start(self, out_dir, progress: bool) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.step = 0
        self.bad_steps = 0
        self.skipped = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []

    def loss_output(self):
        raise NotImplementedError

    def ema_decay(self) -> float:
        return self.cfg.ema

    def extra_state(self) -> dict:
        """Subclass state saved beside the common one (plain tensors and Python values)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step; returns the step's scalars, or None if it was skipped."""
        cfg = self.cfg
        out = self.loss_output()
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(out.loss))
        gnorm = torch.tensor(float("nan"))
        if finite:
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            finite = bool(torch.isfinite(gnorm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise NonFiniteTraining(
                    f"{self.bad_steps} consecutive non-finite steps at step {self.step}; last good "
                    "checkpoint left untouched")
            self.step += 1
            self.scheduler.step()
            return None
        self.bad_steps = 0
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        return {**out.metrics, "grad_norm": gnorm}

    @torch.no_grad()
    def _update_ema(self):
        d = self.ema_decay()
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1 - d)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, steps: int | None = None, stop_after: int | None = None):
        """Train until ``steps`` (default ``cfg.steps``) total steps; ``stop_after`` ends early
        after that many steps of this call (used to test resume)."""
        total = self.cfg.steps if steps is None else steps
        self.model.train()  # dropout on, whatever a caller did to the model between fits
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not self.progress,
                   desc=f"{self.cfg.objective} ({self.cfg.derivative})", dynamic_ncols=True)
        done = 0
        t0 = time.perf_counter()
        try:
            while self.step < total and (stop_after is None or done < stop_after):
                rec = self.train_step()
                done += 1
                bar.update(1)
                if rec is not None and (self.step % self.cfg.log_every == 0 or self.step == total):
                    row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0]}
                    row.update({k: float(v) for k, v in rec.items()})
                    self.history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if self.out_dir is not None and self.step % self.cfg.ckpt_every == 0:
                    self.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save()
        finally:
            bar.close()
        self.train_seconds += time.perf_counter() - t0
        if self.out_dir is not None:
            self.save()
        return self

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": self.format,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": self.history,
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != self.format:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {self.format!r}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = state["step"]
        self.skipped = state["skipped"]
        self.train_seconds = state["train_seconds"]
        self.history = list(state["history"])
        self.load_extra_state(state)

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` (and ``weights.safetensors``, the EMA weights, when safetensors
        is installed) atomically, unless the model or EMA holds a non-finite value."""
        if self.out_dir is None:
            raise ValueError("Trainer has no out_dir to save to")
        if not (all_finite(self.model) and all_finite(self.ema)):
            import warnings

            warnings.warn("non-finite parameters: checkpoint NOT written, the previous one is kept")
            return None
        path = save_checkpoint(self.state_dict(), self.out_dir / CHECKPOINT)
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
        state = load_checkpoint(Path(out_dir) / CHECKPOINT)
        allowed = set(cls.resume_overrides)
        # restating a stored value is harmless (a command line repeated with --resume)
        bad = {k for k, v in overrides.items() if k not in allowed and state["config"].get(k, object()) != v}
        if bad:
            raise ValueError(f"cannot change {sorted(bad)} when resuming (allowed: {sorted(allowed)})")
        cfg = cls.config_cls.from_dict({**state["config"], **overrides})
        if torch.device(cfg.device).type != torch.device(state["config"]["device"]).type:
            raise ValueError(f"cannot resume a {state['config']['device']} run on {cfg.device}: the random "
                             "generator states differ, so it would not continue exactly")
        trainer = cls(cfg, out_dir=out_dir, progress=progress, **init_kwargs)
        trainer.load_state_dict(state)
        return trainer


class Trainer(TrainerBase):
    """Trains a 2D flow map from a :class:`TrainConfig`.

    All training randomness (data, base noise, times, PSD splits) comes from one
    ``torch.Generator`` whose state is checkpointed with model, EMA, optimizer, scheduler and
    step, so :meth:`resume` continues bit-for-bit (CPU).
    """

    config_cls = TrainConfig
    format = "pyflowmap-2d-v1"

    def __init__(self, cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TrainConfig.device is cuda but no CUDA device is available")
        self.data_std = data_statistics(cfg)
        self.base = build_base(cfg, self.data_std)
        torch.manual_seed(cfg.seed)  # parameter initialization
        self.model = build_model(cfg, self.data_std).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.objective = build_objective(cfg, self.model, self.base).to(self.device)
        self.params = [p for p in list(self.model.parameters()) + list(self.objective.parameters())
                       if p.requires_grad]
        self.optimizer = torch.optim.RAdam(self.params, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg.lr_decay_after))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self._start(out_dir, progress)

    def loss_output(self):
        x1 = sample_data(self.cfg.data, self.cfg.batch, generator=self.generator, device=self.device)
        return self.objective(self.model, x1, generator=self.generator)

    def extra_state(self) -> dict:
        return {"data_std": self.data_std}
