"""The training loop shared by every pyflowmap trainer (EMA, gradient clipping, learning-rate
schedule, non-finite step guard, atomic checkpoints, exact resume) and the 2D trainer."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from pyflowmap import distributed as dist_
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
        self.shard = dist_.current_shard()
        self.progress = progress and dist_.is_main()
        self.ddp = None
        if self.shard is not None:
            if self.cfg.batch % self.shard.world:
                raise ValueError(f"batch={self.cfg.batch} must be divisible by the {self.shard.world} processes "
                                 "(each rank trains an equal share of the global batch)")
            # dropout is the only per-rank randomness; rank 0 keeps the one-process stream
            if self.shard.rank > 0:
                torch.manual_seed(dist_.rank_seed(self.cfg.seed, self.shard.rank))
            self.ddp = dist_.wrap_ddp(self.model, self.objective, self.loss_output, self.device)
        self.step = 0
        self.bad_steps = 0
        self.skipped = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []

    def loss_output(self):
        raise NotImplementedError

    def shard_args(self) -> dict:
        """Keyword arguments that make an objective compute this rank's share of the loss."""
        return {} if self.shard is None else {"shard": self.shard, "global_batch": self.cfg.batch}

    def shard_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (all of it in a one-process run)."""
        return x if self.shard is None else x[self.shard.indices(x.shape[0], device=x.device)]

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
        if self.ddp is not None:
            loss, metrics = self.ddp()  # one DDP forward spans every network call of the step
        else:
            out = self.loss_output()
            loss, metrics = out.loss, out.metrics
        self.optimizer.zero_grad(set_to_none=True)
        # decided together: a rank that skipped backward alone would hang the others in DDP
        finite = dist_.all_true(bool(torch.isfinite(loss)), self.device)
        gnorm = torch.tensor(float("nan"))
        if finite:
            loss.backward()
            # gradients are already averaged over ranks, so every rank clips alike
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
        return {**metrics, "grad_norm": gnorm}

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
                    rec = dist_.mean_over_ranks(rec)  # the global batch's loss
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
            # every rank's dropout stream (a collective: all ranks call state_dict together)
            "rank_rng": dist_.gather_objects(self._rank_rng()),
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
        self._set_rank_rng(state)
        self.step = state["step"]
        self.skipped = state["skipped"]
        self.train_seconds = state["train_seconds"]
        self.history = list(state["history"])
        self.load_extra_state(state)

    def _rank_rng(self):
        return (torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def _set_rank_rng(self, state: dict) -> None:
        ranks = state.get("rank_rng") or [(state["torch_rng"], state.get("cuda_rng"))]
        world = 1 if self.shard is None else self.shard.world
        r = 0 if self.shard is None else self.shard.rank
        if len(ranks) == world:
            cpu, cuda = ranks[r]
        elif r == 0:
            cpu, cuda = ranks[0]
        else:
            import warnings

            warnings.warn(f"checkpoint from {len(ranks)} processes resumed on {world}: rank {r} draws its "
                          "dropout masks from a fresh stream (data, noise and times continue exactly)")
            torch.manual_seed(dist_.rank_seed(self.cfg.seed + self.step, r))
            return
        torch.set_rng_state(cpu)
        if self.device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` (and ``weights.safetensors``, the EMA weights, when safetensors
        is installed) atomically, unless the model or EMA holds a non-finite value."""
        if self.out_dir is None:
            raise ValueError("Trainer has no out_dir to save to")
        if not (all_finite(self.model) and all_finite(self.ema)):  # identical on every rank
            import warnings

            warnings.warn("non-finite parameters: checkpoint NOT written, the previous one is kept")
            return None
        state = self.state_dict()  # on every rank: it gathers the ranks' RNG states
        if not dist_.is_main():
            dist_.barrier()
            return None
        path = save_checkpoint(state, self.out_dir / CHECKPOINT)
        if _has_safetensors():
            # the EMA weights alone, pickle-free, for sharing and serving (the full training
            # state needs optimizer and RNG objects and stays in checkpoint.pt)
            save_weights(self.ema.state_dict(), self.out_dir / WEIGHTS,
                         {"format": self.format, "step": self.step, "config": json.dumps(self.cfg.to_dict())})
        atomic_write(self.out_dir / "config.json",
                     lambda f: f.write(json.dumps(self.cfg.to_dict(), indent=2).encode()))
        dist_.barrier()  # nobody reads or resumes before rank 0 has written
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
        self.device = dist_.local_device(cfg.device)
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
        # the global batch is drawn on every rank (cheap 2D sampling), each keeps its rows
        x1 = sample_data(self.cfg.data, self.cfg.batch, generator=self.generator, device=self.device)
        return self.objective(self.model, self.shard_rows(x1), generator=self.generator, **self.shard_args())

    def extra_state(self) -> dict:
        return {"data_std": self.data_std}
