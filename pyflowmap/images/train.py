"""Training image flow maps and consistency models: one config, one trainer for every objective
(FM, LSD, ESD, PSD-U/M, MeanFlow; ECT and its EDM pretraining; LMD, EMD, PFMM from an FM
teacher run), with the shared loop of :mod:`pyflowmap.train` (EMA, clipping, non-finite guard,
atomic checkpoints, exact resume)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from pyflowmap.checkpoint import load_checkpoint
from pyflowmap.config import ConfigBase
from pyflowmap.consistency import EDMConsistency
from pyflowmap.derivatives import FiniteDifference, resolve_mode
from pyflowmap.distributed import local_device
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.data import Batches, load_dataset
from pyflowmap.interpolants import GaussianBase
from pyflowmap.nn.unet import UNetFlowMap
from pyflowmap.objectives import DISTILLATION, SELF_DISTILLATION, ECT, make_objective
from pyflowmap.times import ECTSchedule, TimeSampler
from pyflowmap.train import CHECKPOINT, TrainerBase

CONSISTENCY = ("ect", "ect-pretrain")
IMAGE_OBJECTIVES = SELF_DISTILLATION + DISTILLATION + CONSISTENCY


@dataclass
class ImageConfig(ConfigBase):
    """Everything that defines an image run. Defaults: a CPU-sized MNIST-5k run.

    ``objective``: a flow-map objective (fm, lsd, esd, psd-u, psd-m, meanflow), a distillation
    objective (lmd, emd, pfmm: ``teacher`` is the directory of a finished ``fm`` run, whose EMA
    velocity is distilled), ``ect`` (consistency tuning) or ``ect-pretrain`` (EDM denoising, the
    diffusion model ECT tunes from). ``init``: a run directory whose EMA weights start this run
    (ECT tuning from an ``ect-pretrain`` run; any run of the same model kind and size).
    ``ect_stage`` is ECT's stage length d in steps (0 resolves, at construction, to a quarter of
    ``steps``, and is stored so that a resumed or extended run keeps its schedule). ``teacher``
    and ``init`` are stored as absolute paths.
    """

    dataset: str = "mnist5k"
    objective: str = "lsd"
    derivative: str = "auto"  # auto | dual | jvp | fd
    teacher: str = ""
    init: str = ""
    semigradient: bool = False  # lmd / emd: stop the gradient at the teacher's input
    ch: int = 32
    emb_dim: int = 32
    attention: bool = True
    dropout: float = 0.0
    diag_fraction: float = 0.75
    ect_stage: int = 0
    ect_c: float = -1.0  # pseudo-Huber c; < 0: 0.00054 sqrt(pixels)
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    device: str = "cpu"
    ckpt_every: int = 200
    log_every: int = 25
    max_bad_steps: int = 50
    fsdp: bool = False  # under torchrun: FSDP2 (sharded parameters, gradients, optimizer state), else DDP

    def __post_init__(self):
        if self.objective in CONSISTENCY and self.ect_stage == 0 and self.steps >= 1:
            self.ect_stage = max(1, self.steps // 4)
        for name in ("teacher", "init"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        super().__post_init__()

    def validate(self) -> None:
        need = self._need

        need(self.objective in IMAGE_OBJECTIVES, f"objective must be one of {IMAGE_OBJECTIVES}, got {self.objective!r}")
        need(self.derivative in ("auto", "jvp", "fd", "dual"), f"derivative must be auto|jvp|fd|dual, got {self.derivative!r}")
        need((self.objective in DISTILLATION) == bool(self.teacher),
             f"{self.objective!r} " + ("needs teacher= (an fm run directory)" if self.objective in DISTILLATION
                                       else "takes no teacher"))
        for name in ("ch", "emb_dim", "steps", "batch", "ckpt_every", "log_every", "max_bad_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.emb_dim % 2 == 0, f"emb_dim must be even, got {self.emb_dim}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(0 <= self.diag_fraction <= 1, f"diag_fraction must be in [0, 1], got {self.diag_fraction}")
        need(self.ect_stage >= 0, f"ect_stage must be >= 0, got {self.ect_stage}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}")
        need(not self.semigradient or self.objective in ("lmd", "emd"),
             f"semigradient applies to lmd and emd only, not {self.objective!r}")
        # central differences call the network three times: three different dropout masks
        need(not (self.derivative == "fd" and self.dropout > 0),
             "derivative='fd' needs dropout=0 (each difference pass would draw its own dropout mask); "
             "use derivative='dual' or 'jvp'")
        need(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")

    @property
    def consistency(self) -> bool:
        return self.objective in CONSISTENCY



def build_image_model(cfg: ImageConfig, channels: int) -> FlowMap | EDMConsistency:
    """A :class:`UNetFlowMap` inside a :class:`FlowMap` (flow-map objectives, base N(0, I) at
    t = 0, data at t = 1) or inside an :class:`EDMConsistency` (ECT: EDM preconditioning, so
    the net sees unit-scale inputs itself and gets ``data_std=1``)."""
    net = UNetFlowMap(channels, ch=cfg.ch, emb_dim=cfg.emb_dim, attention=cfg.attention, dropout=cfg.dropout,
                      data_std=1.0 if cfg.consistency else 0.5)
    return EDMConsistency(net) if cfg.consistency else FlowMap(net)


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


def _derivative(cfg: ImageConfig, model):
    if cfg.derivative == "fd":
        # float64 differences keep the truncation/rounding balance of the 2D runs
        return FiniteDifference(dtype=torch.float64)
    return resolve_mode(cfg.derivative, model)


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
        cfg.validate()
        self.cfg = cfg
        self.device = local_device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("ImageConfig.device is cuda but no CUDA device is available")
        images = load_dataset(cfg.dataset)[0] if data is None else data
        self.batches = Batches(images, self.device)
        self.channels, self.size = images.shape[1], tuple(images.shape[2:])
        torch.manual_seed(cfg.seed)  # parameter initialization
        self.model = build_image_model(cfg, self.channels).to(self.device)
        if cfg.init:
            init, init_cfg, init_state = load_run(cfg.init, device=self.device)
            if (init_cfg.consistency, init_cfg.ch, init_cfg.emb_dim, init_cfg.attention, init_state["channels"]) != \
                    (cfg.consistency, cfg.ch, cfg.emb_dim, cfg.attention, self.channels):
                raise ValueError(f"init run {cfg.init} has a different model (kind/ch/emb_dim/attention/channels)")
            self.model.load_state_dict(init.state_dict())
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.base = GaussianBase(1.0)
        self.objective = self._build_objective().to(self.device)
        self._parallelize()
        self.params = [p for p in list(self.model.parameters()) + list(self.objective.parameters())
                       if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        warm = max(1, cfg.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda n: min(1.0, (n + 1) / warm))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self._start(out_dir, progress)

    def _build_objective(self):
        cfg = self.cfg
        if cfg.consistency:
            schedule = ECTSchedule(stage_length=cfg.ect_stage)
            return ECT(schedule, c=None if cfg.ect_c < 0 else cfg.ect_c, pretrain=cfg.objective == "ect-pretrain")
        kwargs = dict(base=self.base, times=TimeSampler(diag_fraction=cfg.diag_fraction),
                      derivative=_derivative(cfg, self.model))
        if cfg.objective in DISTILLATION:
            teacher, tcfg, _ = load_run(cfg.teacher, device=self.device)
            if tcfg.objective != "fm" or tcfg.dataset != cfg.dataset:
                raise ValueError(f"teacher run {cfg.teacher} must be an fm run on {cfg.dataset!r}, "
                                 f"got {tcfg.objective!r} on {tcfg.dataset!r}")
            if cfg.objective in ("lmd", "emd"):
                kwargs["semigradient"] = cfg.semigradient
            return make_objective(cfg.objective, teacher=teacher, **kwargs)
        return make_objective(cfg.objective, **kwargs)

    def loss_output(self):
        # the global batch's indices are drawn on every rank; each loads only its own rows
        x1 = self.batches(self.cfg.batch, self.generator, shard=self.shard)
        if self.cfg.consistency:
            return self.objective(self.model, x1, generator=self.generator, iteration=self.step, **self.shard_args())
        return self.objective(self.model, x1, generator=self.generator, **self.shard_args())

    def ema_decay(self) -> float:
        return min(self.cfg.ema, (1 + self.step) / (10 + self.step))

    def extra_state(self) -> dict:
        return {"channels": self.channels, "size": list(self.size)}

    def load_extra_state(self, state: dict) -> None:
        if (state["channels"], list(state["size"])) != (self.channels, list(self.size)):
            raise ValueError(f"the checkpoint was trained on {state['channels']} x {state['size']} images, "
                             f"this data is {self.channels} x {list(self.size)}")

    @classmethod
    def resume(cls, out_dir, progress: bool = True, data: torch.Tensor | None = None, **overrides):
        """Continue ``out_dir`` exactly; ``data`` for a run that was built from a tensor."""
        return cls._resume(out_dir, progress, {"data": data}, overrides)


__all__ = ["ImageConfig", "ImageTrainer", "IMAGE_OBJECTIVES", "build_image_model", "load_run"]
