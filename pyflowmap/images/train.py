"""Training image flow maps and consistency models: one trainer for every objective (FM, LSD,
ESD, PSD-U/M, MeanFlow; ECT and its EDM pretraining; LMD, EMD, PFMM from an FM teacher run) on
the shared loop of :mod:`pyflowmap.training` (EMA, clipping, non-finite guard, atomic
checkpoints, exact resume)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyflowmap.consistency import ECTSchedule
from pyflowmap.derivatives import make_mode
from pyflowmap.images.config import ImageConfig, build_image_model
from pyflowmap.images.data import Batches, load_dataset
from pyflowmap.interpolants import GaussianBase
from pyflowmap.objectives import DISTILLATION, make_objective
from pyflowmap.times import TimeSampler
from pyflowmap.training import CHECKPOINT, TrainerBase, load_checkpoint
from pyflowmap.training.checkpoint import digest


def load_run(run_dir: str | Path, use_ema: bool = True, device="cpu"):
    """(model, cfg, state) of a finished or running image run, the EMA weights by default."""
    state = load_checkpoint(Path(run_dir) / CHECKPOINT)
    if state.get("format") != ImageTrainer.format:
        raise ValueError(f"{run_dir} is not an image run (format {state.get('format')!r})")
    cfg = ImageConfig.from_dict(state["config"])
    model = build_image_model(cfg, state["channels"])
    try:
        model.load_state_dict(state["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir}: weights do not fit the model its config describes: {e}") from e
    return model.to(device).eval().requires_grad_(False), cfg, state


class ImageTrainer(TrainerBase):
    """Trains an image model from an :class:`ImageConfig` on a packaged or user dataset.

    Adam with a linear warm-up, EMA whose decay ramps as min(ema, (1 + n) / (10 + n)) so short
    runs are not dominated by the initialization. ECT's stage counter is the step count (skipped
    non-finite steps included). All randomness (batches, noise, times, dropout via the saved
    CPU and CUDA RNG states) is checkpointed, so :meth:`resume` continues exactly on CPU; a run
    built from an in-memory ``data`` tensor resumes with ``resume(out_dir, data=...)``.
    """

    config_cls = ImageConfig
    format = "pyflowmap-image-v1"
    # checkpoints hold whole tensors, so a run may resume with or without FSDP2
    resume_overrides = TrainerBase.resume_overrides + ("fsdp",)

    def __init__(self, cfg: ImageConfig, out_dir: str | Path | None = None, progress: bool = True,
                 data: torch.Tensor | None = None):
        self._data = data
        super().__init__(cfg, out_dir, progress)

    def prepare(self) -> None:
        images = load_dataset(self.cfg.dataset, self.cfg.image_size)[0] if self._data is None else self._data
        self.data_digest = digest(images)
        self.teacher_digest = None
        self.batches = Batches(images, self.device)
        self.channels, self.size = images.shape[1], tuple(images.shape[2:])
        self.base = GaussianBase(1.0)

    def build_model(self):
        cfg = self.cfg
        model = build_image_model(cfg, self.channels).to(self.device)
        if cfg.init:
            init, init_cfg, init_state = load_run(cfg.init, device=self.device)
            if (init_cfg.consistency, init_cfg.ch, init_cfg.emb_dim, init_cfg.attention, init_state["channels"]) != \
                    (cfg.consistency, cfg.ch, cfg.emb_dim, cfg.attention, self.channels):
                raise ValueError(f"init run {cfg.init} has a different model (kind/ch/emb_dim/attention/channels)")
            model.load_state_dict(init.state_dict())
        return model

    def build_objective(self):
        cfg = self.cfg
        if cfg.consistency:
            return make_objective(cfg.objective, schedule=ECTSchedule(stage_length=cfg.ect_stage),
                                  c=None if cfg.ect_c < 0 else cfg.ect_c)
        # float64 differences keep the truncation/rounding balance of the 2D runs
        kwargs = dict(base=self.base, times=TimeSampler(diag_fraction=cfg.diag_fraction),
                      derivative=make_mode(cfg.derivative, self.model, fd_dtype=torch.float64))
        if cfg.objective in DISTILLATION:
            teacher, tcfg, _ = load_run(cfg.teacher, device=self.device)
            self.teacher_digest = digest(teacher.state_dict())
            if tcfg.objective != "fm" or tcfg.dataset != cfg.dataset:
                raise ValueError(f"teacher run {cfg.teacher} must be an fm run on {cfg.dataset!r}, "
                                 f"got {tcfg.objective!r} on {tcfg.dataset!r}")
            if cfg.objective in ("lmd", "emd"):
                kwargs["semigradient"] = cfg.semigradient
            return make_objective(cfg.objective, teacher=teacher, **kwargs)
        return make_objective(cfg.objective, **kwargs)

    def build_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.cfg.lr)

    def lr_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def next_batch(self) -> torch.Tensor:
        # the global batch's indices are drawn on every rank; each loads only its own rows
        return self.batches(self.cfg.batch, self.generator, shard=self.shard)

    def ema_decay(self) -> float:
        return min(self.cfg.ema, (1 + self.step) / (10 + self.step))

    def extra_state(self) -> dict:
        # fingerprints of what the run was built from: a resume or an eval refuses other data
        # of the same shape, or a teacher run overwritten since
        return {"channels": self.channels, "size": list(self.size), "data_sha256": self.data_digest,
                "teacher_sha256": self.teacher_digest}

    def load_extra_state(self, state: dict) -> None:
        if (state["channels"], list(state["size"])) != (self.channels, list(self.size)):
            raise ValueError(f"the checkpoint was trained on {state['channels']} x {state['size']} images, "
                             f"this data is {self.channels} x {list(self.size)}")
        where = self.cfg.dataset if self._data is None else "the data tensor passed in"
        if state.get("data_sha256") not in (None, self.data_digest):
            raise ValueError(f"{where} has changed since this run started (its content fingerprint differs); "
                             "resume with the same images, or start a new run")
        if state.get("teacher_sha256") not in (None, self.teacher_digest):
            raise ValueError(f"the teacher run {self.cfg.teacher} has changed since this run started (its EMA "
                             "weights' fingerprint differs); restore it, or start a new distillation run")

    @classmethod
    def resume(cls, out_dir, progress: bool = True, data: torch.Tensor | None = None, **overrides):
        """Continue ``out_dir`` exactly; ``data`` for a run that was built from a tensor."""
        return cls._resume(out_dir, progress, {"data": data}, overrides)


__all__ = ["ImageTrainer", "load_run"]
