"""The 2D trainer: flow maps on the toy distributions of :mod:`pyflowmap.toy2d.data`, on the
shared loop of :mod:`pyflowmap.training`."""

from __future__ import annotations

import math

import torch

from pyflowmap.toy2d.config import TrainConfig, build_base, build_model, build_objective, check_teacher, data_statistics
from pyflowmap.toy2d.data import sample_data, sample_labelled
from pyflowmap.training import TrainerBase
from pyflowmap.training.schedules import linear_warmup, ramped_ema_decay


class Trainer(TrainerBase):
    """Trains a 2D flow map from a :class:`TrainConfig`: its ``optimizer`` (RAdam, Adam or
    AdamW), a linear ``warmup``, then the ``lr_schedule`` (sqrt decay after ``lr_decay_after``
    steps, cosine to 0 at ``steps``, or constant), and an EMA whose decay ramps as
    min(ema, (1 + n) / (10 + n)) with ``ema_warmup``.

    All training randomness (data, base noise, times, PSD splits) comes from one
    ``torch.Generator`` whose state is checkpointed with model, EMA, optimizer, scheduler and
    step, so :meth:`resume` continues bit-for-bit (CPU).
    """

    config_cls = TrainConfig
    format = "pyflowmap-2d-v1"

    def prepare(self) -> None:
        self.data_std = data_statistics(self.cfg)
        self.base = build_base(self.cfg, self.data_std)

    def build_model(self):
        return build_model(self.cfg, self.data_std)

    def build_objective(self):
        teacher = None
        if self.cfg.objective == "scd":  # the EMA flow map of a finished 2D fm run
            from pyflowmap.toy2d.evaluate import load_model

            teacher, _, tcfg, _ = load_model(self.cfg.teacher, device=self.device)
            check_teacher(self.cfg, tcfg)
        return build_objective(self.cfg, self.model, self.base, teacher=teacher)

    def build_optimizer(self, params):
        cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.cfg.optimizer]
        return cls(params, lr=self.cfg.lr)

    def lr_factor(self, step: int) -> float:
        cfg = self.cfg
        warm = linear_warmup(step, cfg.warmup)
        if cfg.lr_schedule == "cosine":
            done = min(1.0, max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
            return warm * 0.5 * (1 + math.cos(math.pi * done))
        a = cfg.lr_decay_after
        if cfg.lr_schedule == "constant" or a <= 0 or step < a:
            return warm
        return warm * math.sqrt(a / max(step, 1))

    def ema_decay(self) -> float:
        return ramped_ema_decay(self.cfg.ema, self.step) if self.cfg.ema_warmup else self.cfg.ema

    def next_batch(self):
        # the global batch is drawn on every rank (cheap 2D sampling), each keeps its rows
        if self.cfg.conditional:
            x1, c = sample_labelled(self.cfg.data, self.cfg.batch, generator=self.generator, device=self.device)
            return self.shard_rows(x1), self.shard_rows(c)
        x1 = sample_data(self.cfg.data, self.cfg.batch, generator=self.generator, device=self.device)
        return self.shard_rows(x1)

    def extra_state(self) -> dict:
        return {"data_std": self.data_std}
