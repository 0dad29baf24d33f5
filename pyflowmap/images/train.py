"""Training image flow maps and consistency models: one trainer for every objective (FM, LSD,
ESD, PSD-U/M, MeanFlow; ECT and its EDM pretraining; LMD, EMD, PFMM from an FM teacher run) on
the shared loop of :mod:`pyflowmap.training` (EMA, clipping, non-finite guard, atomic
checkpoints, exact resume), unconditional or class-conditional (with classifier-free guidance in
training or at sampling)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyflowmap.consistency import ECTSchedule
from pyflowmap.derivatives import make_mode
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.config import ImageConfig, build_image_model
from pyflowmap.images.data import Batches, load_dataset
from pyflowmap.interpolants import GaussianBase
from pyflowmap.objectives import DISTILLATION, make_objective
from pyflowmap.times import TimeSampler
from pyflowmap.training import CHECKPOINT, TrainerBase, load_checkpoint
from pyflowmap.training.checkpoint import digest
from pyflowmap.training.schedules import linear_warmup, ramped_ema_decay


def load_run(run_dir: str | Path, use_ema: bool = True, device="cpu"):
    """(model, cfg, state) of a finished or running image run, the EMA weights by default."""
    state = load_checkpoint(Path(run_dir) / CHECKPOINT)
    if state.get("format") != ImageTrainer.format:
        raise ValueError(f"{run_dir} is not an image run (format {state.get('format')!r})")
    cfg = ImageConfig.from_dict(state["config"])
    # checkpoints from before conditioning have no "num_classes": they are unconditional
    num_classes = state.get("num_classes")
    if cfg.conditional and num_classes is None:
        raise ValueError(f"{run_dir}: a conditional run whose checkpoint does not record num_classes")
    # a config from before the DiT has no "model": a unet run
    model = build_image_model(cfg, state["channels"], num_classes, size=tuple(state["size"]))
    try:
        model.load_state_dict(state["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir}: weights do not fit the model its config describes: {e}") from e
    return model.to(device).eval().requires_grad_(False), cfg, state


MAX_CLASSES = 100_000  # beyond: a label column that is not class indices


def _conditioning(cfg: ImageConfig, num_classes) -> tuple:
    """What a run's model is conditioned on: (num_classes or None, takes the guidance input)."""
    return (None, False) if not cfg.conditional else (None if num_classes is None else int(num_classes),
                                                      cfg.guidance_max > 0)


def _describe(cond: tuple) -> str:
    k, w = cond
    if k is None:
        return "unconditional"
    extra = "" if w is None else " with the guidance-scale input (guidance_max > 0)" if w else \
        " without the guidance-scale input"
    return f"conditional on {k} classes{extra}"


def check_labels(labels, images: torch.Tensor, where: str) -> torch.Tensor:
    """The class labels of a conditional run: int64 ``[N]`` in [0, K), K = max + 1."""
    if labels is None:
        raise ValueError(f"a conditional run needs class labels, but {where} has none (pass labels=)")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: labels must be a tensor [N={images.shape[0]}], got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise ValueError(f"{where}: labels must be integer class indices, got non-integer values")
    labels = labels.long().cpu()
    if labels.numel() == 0:
        raise ValueError(f"{where}: no labels")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        bad = int((labels < 0).sum())
        raise ValueError(f"a conditional run needs every image labelled with a class in [0, K): {where} has {bad} "
                         f"of {labels.numel()} images labelled {lo}" + (" (-1: no label)" if lo == -1 else "")
                         + "; label them (a tensor file's 'labels', an image folder's sub-folders) or train "
                           "without --conditional")
    if hi + 1 > MAX_CLASSES:
        raise ValueError(f"{where}: labels go up to {hi}, i.e. {hi + 1} classes (at most {MAX_CLASSES:,}); "
                         "labels must be class indices 0..K-1")
    return labels


class ImageTrainer(TrainerBase):
    """Trains an image model from an :class:`ImageConfig` on a packaged or user dataset.

    Adam with a linear warm-up, EMA whose decay ramps as min(ema, (1 + n) / (10 + n)) so short
    runs are not dominated by the initialization. ECT's stage counter is the step count (skipped
    non-finite steps included). All randomness (batches, noise, times, dropout via the saved
    CPU and CUDA RNG states) is checkpointed, so :meth:`resume` continues exactly on CPU; a run
    built from an in-memory ``data`` tensor resumes with ``resume(out_dir, data=...)``.

    A ``cfg.conditional`` run conditions on the dataset's labels (``labels`` beside ``data``
    for a tensor); K = the largest label + 1 is stored in the checkpoint (``num_classes``).
    """

    config_cls = ImageConfig
    format = "pyflowmap-image-v1"
    # checkpoints hold whole tensors, so a run may resume with or without FSDP2
    resume_overrides = TrainerBase.resume_overrides + ("fsdp",)

    def __init__(self, cfg: ImageConfig, out_dir: str | Path | None = None, progress: bool = True,
                 data: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        self._data, self._labels = data, labels
        self._init_model = None
        super().__init__(cfg, out_dir, progress)

    def _where(self) -> str:
        return self.cfg.dataset if self._data is None else "the data tensor passed in"

    def prepare(self) -> None:
        if self._data is None:
            images, labels = load_dataset(self.cfg.dataset, self.cfg.image_size)
        else:
            images, labels = self._data, self._labels
        self.data_digest = digest(images)
        self.teacher_digest = self.denoiser_digest = None
        self.num_classes = self.labels_digest = None
        if self.cfg.conditional:
            labels = check_labels(labels, images, self._where())
            self.num_classes = int(labels.max()) + 1
            self.labels_digest = digest(labels)
        self.batches = Batches(images, self.device, labels=labels if self.cfg.conditional else None)
        self.channels, self.size = images.shape[1], tuple(images.shape[2:])
        self.base = GaussianBase(1.0)

    def build_model(self):
        cfg = self.cfg
        model = build_image_model(cfg, self.channels, self.num_classes, size=self.size).to(self.device)
        if cfg.init:
            init, init_cfg, init_state = load_run(cfg.init, device=self.device)
            if init_cfg.time_scale != cfg.time_scale:
                raise ValueError(f"init run {cfg.init} embeds times at scale {init_cfg.time_scale:g}, this run at "
                                 f"{cfg.time_scale:g} (sct / scd default to 10, the others to 100): pass "
                                 f"--time-scale {init_cfg.time_scale:g} to start from it")
            if (init_cfg.architecture(tuple(init_state["size"])), init_state["channels"]) != \
                    (cfg.architecture(self.size), self.channels):
                what = "model/patch/depth/width/heads/qk_norm/pos_embed" if cfg.model == "dit" else \
                    "model/ch/emb_dim/attention"
                raise ValueError(f"init run {cfg.init} has a different model (kind/{what}/channels): it is a "
                                 f"{init_cfg.model!r} run, this one {cfg.model!r}")
            theirs, mine = _conditioning(init_cfg, init_state.get("num_classes")), _conditioning(cfg, self.num_classes)
            if theirs != mine:
                raise ValueError(f"init run {cfg.init} is {_describe(theirs)}, but this run is {_describe(mine)}: "
                                 "start from a run of the same conditioning")
            if cfg.objective == "ect" and cfg.guidance != 1:
                # its frozen EMA model is the denoiser whose null prediction guides the tuning
                if init_cfg.objective != "ect-pretrain" or init_cfg.p_uncond <= 0:
                    raise ValueError(f"guidance in ECT tuning takes the null prediction from the init run, so it "
                                     f"must be a conditional ect-pretrain run trained with p_uncond > 0; {cfg.init} "
                                     f"is {init_cfg.objective!r} with p_uncond={init_cfg.p_uncond}")
                self._init_model = init
            # the nets: an fm run starts a TrigFlow model (sCD from its teacher, as sCM does)
            model.net.load_state_dict(init.net.state_dict())
        return model

    def build_objective(self):
        cfg = self.cfg
        cond = cfg.conditioning()  # {} for an unconditional run
        if cfg.consistency:
            cond.pop("guidance_range", None)  # None: the config refuses guidance_max with ECT
            if cond.get("guidance") is not None and cfg.objective == "ect":
                cond["denoiser"] = self._init_model
                self.denoiser_digest = digest(self._init_model.state_dict())
            return make_objective(cfg.objective, schedule=ECTSchedule(stage_length=cfg.ect_stage),
                                  c=None if cfg.ect_c < 0 else cfg.ect_c, **cond)
        # float64 differences keep the truncation/rounding balance of the 2D runs
        kwargs = dict(base=self.base, times=TimeSampler(diag_fraction=cfg.diag_fraction),
                      derivative=make_mode(cfg.derivative, self.model, fd_dtype=torch.float64))
        if cfg.trigflow:
            cond.pop("guidance_range", None)  # None: the config refuses guidance_max with sCM
            teacher = self._teacher() if cfg.objective == "scd" else None
            return make_objective(cfg.objective, teacher=teacher, warmup_steps=cfg.scm_warmup,
                                  derivative=kwargs["derivative"], **cond)
        if cfg.objective in DISTILLATION:
            teacher = self._teacher()
            if cfg.objective in ("lmd", "emd"):
                kwargs["semigradient"] = cfg.semigradient
            return make_objective(cfg.objective, teacher=teacher, **kwargs, **cond)
        if cfg.objective == "shortcut":  # its own dyadic times, with this run's diagonal fraction
            kwargs.pop("times")
            kwargs["diag_fraction"] = cfg.diag_fraction
        return make_objective(cfg.objective, **kwargs, **cond)

    def _teacher(self) -> FlowMap:
        """The EMA flow map of the ``teacher`` fm run, checked against this run."""
        cfg = self.cfg
        teacher, tcfg, tstate = load_run(cfg.teacher, device=self.device)
        self.teacher_digest = digest(teacher.state_dict())
        if tcfg.objective != "fm" or tcfg.dataset != cfg.dataset:
            raise ValueError(f"teacher run {cfg.teacher} must be an fm run on {cfg.dataset!r}, "
                             f"got {tcfg.objective!r} on {tcfg.dataset!r}")
        t_classes = tstate.get("num_classes") if tcfg.conditional else None
        if t_classes != self.num_classes:
            raise ValueError(f"teacher run {cfg.teacher} is {_describe((t_classes, None))}, but this run is "
                             f"{_describe((self.num_classes, None))}: a distillation teacher must be "
                             "conditional (on the same classes) exactly when its student is")
        if cfg.conditional and (cfg.guidance != 1 or cfg.guidance_max > 0) and tcfg.p_uncond <= 0:
            raise ValueError(f"guidance in distillation uses the teacher's null prediction, but teacher run "
                             f"{cfg.teacher} was trained with p_uncond=0 (its null class never learned)")
        return teacher

    def build_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.cfg.lr)

    def lr_factor(self, step: int) -> float:
        return linear_warmup(step, self.cfg.warmup)

    def next_batch(self):
        # the global batch's indices are drawn on every rank; each loads only its own rows
        # (a conditional run: with their labels)
        return self.batches(self.cfg.batch, self.generator, shard=self.shard)

    def ema_decay(self) -> float:
        return ramped_ema_decay(self.cfg.ema, self.step)

    def extra_state(self) -> dict:
        # fingerprints of what the run was built from: a resume or an eval refuses other data
        # of the same shape, or a teacher run overwritten since
        return {"channels": self.channels, "size": list(self.size), "data_sha256": self.data_digest,
                "teacher_sha256": self.teacher_digest, "num_classes": self.num_classes,
                "labels_sha256": self.labels_digest, "denoiser_sha256": self.denoiser_digest}

    def load_extra_state(self, state: dict) -> None:
        if (state["channels"], list(state["size"])) != (self.channels, list(self.size)):
            raise ValueError(f"the checkpoint was trained on {state['channels']} x {state['size']} images, "
                             f"this data is {self.channels} x {list(self.size)}")
        where = self._where()
        if state.get("data_sha256") not in (None, self.data_digest):
            raise ValueError(f"{where} has changed since this run started (its content fingerprint differs); "
                             "resume with the same images, or start a new run")
        if state.get("num_classes") != self.num_classes:
            raise ValueError(f"the checkpoint's model is {_describe((state.get('num_classes'), None))}, but "
                             f"{where} now gives {_describe((self.num_classes, None))}")
        if state.get("labels_sha256") not in (None, self.labels_digest):
            raise ValueError(f"the labels of {where} have changed since this run started (their fingerprint "
                             "differs); resume with the same labels, or start a new run")
        if state.get("denoiser_sha256") not in (None, self.denoiser_digest):
            raise ValueError(f"the init run {self.cfg.init} has changed since this run started (the denoiser that "
                             "guides the tuning differs); restore it, or start a new run")
        if state.get("teacher_sha256") not in (None, self.teacher_digest):
            raise ValueError(f"the teacher run {self.cfg.teacher} has changed since this run started (its EMA "
                             "weights' fingerprint differs); restore it, or start a new distillation run")

    @classmethod
    def resume(cls, out_dir, progress: bool = True, data: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, **overrides):
        """Continue ``out_dir`` exactly; ``data`` (and ``labels``) for a run that was built from a
        tensor."""
        return cls._resume(out_dir, progress, {"data": data, "labels": labels}, overrides)


__all__ = ["ImageTrainer", "load_run"]
