"""The training loop every pyflowmap trainer shares: model, EMA and objective built in a fixed
hook order, data-parallel wrapping, learning-rate schedule, gradient clipping, the non-finite
step guard, atomic checkpoints and exact resume."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from pyflowmap import distributed as dist_
from pyflowmap.training.checkpoint import all_finite, atomic_write, load_checkpoint, save_checkpoint, save_weights

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"


def _has_safetensors() -> bool:
    import importlib.util

    return importlib.util.find_spec("safetensors") is not None


class NonFiniteTraining(RuntimeError):
    """Raised when too many consecutive steps produced a non-finite loss or gradient."""


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
        self.device = dist_.local_device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{type(cfg).__name__}.device is cuda but no CUDA device is available")
        self.prepare()
        torch.manual_seed(cfg.seed)  # parameter initialization
        self.model = self.build_model().to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.objective = self.build_objective().to(self.device)
        self._parallelize()
        self.params = [p for p in list(self.model.parameters()) + list(self.objective.parameters())
                       if p.requires_grad]
        self.optimizer = self.build_optimizer(self.params)
        # a plain lambda: LambdaLR then keeps the schedule out of the checkpoint (it is config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda n: self.lr_factor(n))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and dist_.is_main()
        self.step = 0
        self.bad_steps = 0
        self.skipped = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []

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

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global data batch."""
        raise NotImplementedError

    def ema_decay(self) -> float:
        return self.cfg.ema

    def extra_state(self) -> dict:
        """Subclass state saved beside the common one (plain tensors and Python values)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def loss_output(self):
        """One batch's :class:`~pyflowmap.objectives.LossOutput` on this rank's rows."""
        return self.objective(self.model, self.next_batch(), generator=self.generator, step=self.step,
                              **self.shard_args())

    def _parallelize(self) -> None:
        """Under torchrun: wrap the step in DDP, or in FSDP2 when ``cfg.fsdp``. A one-process
        run is left as it is."""
        self.shard = dist_.current_shard()
        self.parallel = None
        self._ema_shards = None
        if self.shard is None:
            return
        if self.cfg.batch % self.shard.world:
            raise ValueError(f"batch={self.cfg.batch} must be divisible by the {self.shard.world} processes "
                             "(each rank trains an equal share of the global batch)")
        # dropout is the only per-rank randomness; rank 0 keeps the one-process stream
        if self.shard.rank > 0:
            torch.manual_seed(dist_.rank_seed(self.cfg.seed, self.shard.rank))
        compute = lambda: self.loss_output()  # noqa: E731  (late-bound: subclasses and tests may replace it)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # collectives and NCCL use the current device
        if getattr(self.cfg, "fsdp", False):
            self.parallel = dist_.wrap_fsdp(self.model, self.objective, compute)
            # the EMA is updated shard by shard on the device; its whole copy lives in CPU memory,
            # assembled for saving and at the end of fit()
            self._ema_shards = [p.to_local().detach().clone() for p in self.model.parameters()]
            self.ema.to("cpu")
        else:
            self.parallel = dist_.wrap_ddp(self.model, self.objective, compute, self.device)

    def shard_args(self) -> dict:
        """Keyword arguments that make an objective compute this rank's share of the loss."""
        return {} if self.shard is None else {"shard": self.shard, "global_batch": self.cfg.batch}

    def shard_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (all of it in a one-process run)."""
        return x if self.shard is None else x[self.shard.indices(x.shape[0], device=x.device)]

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step; returns the step's scalars, or None if it was skipped."""
        cfg = self.cfg
        if self.parallel is not None:
            loss, metrics = self.parallel()  # one DDP / FSDP2 forward spans every network call of the step
        else:
            out = self.loss_output()
            loss, metrics = out.loss, out.metrics
        self.optimizer.zero_grad(set_to_none=True)
        # decided together: a rank that skipped backward alone would hang the others in DDP
        loss_ok = dist_.all_true(bool(torch.isfinite(loss)), self.device)
        finite = loss_ok
        gnorm = torch.tensor(float("nan"))
        if finite:
            loss.backward()
            # gradients are already averaged over ranks, so every rank clips alike
            gnorm = dist_.full(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
            finite = bool(torch.isfinite(gnorm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._reshard()  # FSDP2 frees the gathered root weights in backward, which did not run
            self.bad_steps += 1
            self.skipped += 1
            if dist_.is_main():
                import warnings

                what = "gradient norm" if loss_ok else "loss" if self.shard is None else "loss (on some rank)"
                warnings.warn(f"step {self.step}: non-finite {what}, step skipped ({self.skipped} skipped so far, "
                              f"{self.bad_steps} in a row; training stops at {cfg.max_bad_steps})", stacklevel=2)
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
        if self._ema_shards is not None:
            torch._foreach_lerp_(self._ema_shards, [p.detach().to_local() for p in self.model.parameters()], 1 - d)
        else:
            torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()], 1 - d)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    def _reshard(self) -> None:
        if self._ema_shards is not None:
            self.parallel.reshard()

    @torch.no_grad()
    def _gather_ema(self) -> None:
        """Under FSDP2: assemble the whole EMA (kept in CPU memory) from the ranks' shards, one
        parameter at a time (a collective)."""
        if self._ema_shards is None:
            return
        from torch.distributed.tensor import DTensor

        self._reshard()
        for (name, p), local in zip(self.model.named_parameters(), self._ema_shards):
            whole = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            self.ema.get_parameter(name).copy_(whole.full_tensor())

    def _whole_state(self, module) -> dict:
        """``module``'s state dict with whole tensors (under FSDP2 each shard is gathered and
        moved to CPU, one tensor at a time)."""
        sd = module.state_dict()
        return sd if self._ema_shards is None else {k: dist_.full(v).cpu() for k, v in sd.items()}

    @staticmethod
    def _load_whole_state(module, whole: dict) -> None:
        """Loads whole tensors into ``module``, sharding each like the parameter it replaces."""
        current = module.state_dict()
        module.load_state_dict({k: dist_.like(v, current[k]) if k in current else v for k, v in whole.items()})

    def _full_optimizer_state(self) -> dict:
        """The optimizer state with whole tensors: the same checkpoint whether or not FSDP2
        sharded it, so a run can resume with or without FSDP2 and on any number of ranks."""
        sd = self.optimizer.state_dict()
        if self._ema_shards is None:
            return sd
        # one tensor at a time to CPU: a save never holds the whole Adam state on the device
        sd["state"] = {i: {k: dist_.full(v).cpu() for k, v in st.items()} for i, st in sd["state"].items()}
        return sd

    def _load_optimizer_state(self, sd: dict) -> None:
        if self._ema_shards is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sd = {**sd, "state": {i: {k: dist_.like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() else v
                                      for k, v in st.items()} for i, st in sd["state"].items()}}
        self.optimizer.load_state_dict(sd)

    def _finite(self) -> bool:
        self._reshard()
        return dist_.all_true(all_finite(self.model) and all_finite(self.ema)
                              and all(bool(torch.isfinite(t).all()) for t in self._ema_shards or []), self.device)

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
        else:
            self._gather_ema()  # save() gathered it already
        return self

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Whole tensors only (a collective under torchrun: every rank calls it together)."""
        self._gather_ema()
        return {
            "format": self.format,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "model": self._whole_state(self.model),
            "ema": self.ema.state_dict(),
            "objective": self._whole_state(self.objective),
            "optimizer": self._full_optimizer_state(),
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
        self._load_whole_state(self.model, state["model"])
        self.ema.load_state_dict(state["ema"])
        if self._ema_shards is not None:
            ema = self.ema.state_dict()
            self._ema_shards = [dist_.like(ema[n], p).to_local().clone() for n, p in self.model.named_parameters()]
        self._load_whole_state(self.objective, state["objective"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        self._set_rank_rng(state)
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
        is installed) atomically, unless the model or EMA holds a non-finite value.

        Under torchrun every rank must call it (it gathers state); rank 0 writes, and a failed
        write raises on every rank instead of leaving the others waiting."""
        if self.out_dir is None:
            raise ValueError("Trainer has no out_dir to save to")
        if not self._finite():  # decided over all ranks
            import warnings

            warnings.warn("non-finite parameters: checkpoint NOT written, the previous one is kept")
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
