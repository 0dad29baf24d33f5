"""The image run configuration and the model it describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyflowmap.consistency import EDMConsistency
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.data import DATASETS
from pyflowmap.nn.unet import UNetFlowMap
from pyflowmap.objectives import CONSISTENCY, DISTILLATION, OBJECTIVES
from pyflowmap.training.config import LoopConfig

IMAGE_OBJECTIVES = OBJECTIVES


@dataclass
class ImageConfig(LoopConfig):
    """Everything that defines an image run. Defaults: a CPU-sized MNIST-5k run.

    ``objective``: a flow-map objective (fm, lsd, esd, psd-u, psd-m, meanflow), a distillation
    objective (lmd, emd, pfmm: ``teacher`` is the directory of a finished ``fm`` run, whose EMA
    velocity is distilled), ``ect`` (consistency tuning) or ``ect-pretrain`` (EDM denoising, the
    diffusion model ECT tunes from). ``init``: a run directory whose EMA weights start this run
    (ECT tuning from an ``ect-pretrain`` run; any run of the same model kind and size).
    ``ect_stage`` is ECT's stage length d in steps (0 resolves, at construction, to a quarter of
    ``steps``, and is stored so that a resumed or extended run keeps its schedule). ``teacher``
    and ``init`` are stored as absolute paths.

    ``conditional``: a class-conditional model on the dataset's labels (0..K-1, K = the
    largest label + 1), the conditions dropped with probability ``p_uncond``; ``guidance`` (!= 1)
    trains with classifier-free guidance at that scale (ECT tuning takes the null prediction
    from the ``init`` run, its pretrained denoiser), ``guidance_max`` (> 0, flow-map
    objectives) trains over w ~ U[1, guidance_max] given to the network as an input.
    """

    dataset: str = "mnist5k"
    image_size: int = 0  # > 0: resize an image folder's files to image_size x image_size
    teacher: str = ""
    init: str = ""
    semigradient: bool = False  # lmd / emd: stop the gradient at the teacher's input
    ch: int = 32
    emb_dim: int = 32
    attention: bool = True
    dropout: float = 0.0
    ect_stage: int = 0
    ect_c: float = -1.0  # pseudo-Huber c; < 0: 0.00054 sqrt(pixels)
    warmup: int = 50
    fsdp: bool = False  # under torchrun: FSDP2 (sharded parameters, gradients, optimizer state), else DDP
    # the loop's fields with this app's defaults (a CPU-sized MNIST-5k run)
    steps: int = 600
    batch: int = 64
    grad_clip: float = 1.0
    ckpt_every: int = 200
    log_every: int = 25

    def __post_init__(self):
        if self.objective in CONSISTENCY and self.ect_stage == 0 and self.steps >= 1:
            self.ect_stage = max(1, self.steps // 4)
        for name in ("teacher", "init"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        if isinstance(self.dataset, str) and self.dataset not in DATASETS:  # a folder or tensor file
            self.dataset = str(Path(self.dataset).resolve())
        super().__post_init__()

    def validate_fields(self) -> None:
        need = self._need

        need(self.objective in IMAGE_OBJECTIVES, f"objective must be one of {IMAGE_OBJECTIVES}, got {self.objective!r}")
        need((self.objective in DISTILLATION) == bool(self.teacher),
             f"{self.objective!r} " + ("needs teacher= (an fm run directory)" if self.objective in DISTILLATION
                                       else "takes no teacher"))
        for name, most in (("ch", 4096), ("emb_dim", 65536), ("image_size", 4096)):
            need(getattr(self, name) <= most, f"{name} must be <= {most}, got {getattr(self, name)}")
        for name in ("ch", "emb_dim"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.emb_dim % 2 == 0, f"emb_dim must be even, got {self.emb_dim}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.ect_stage >= 0, f"ect_stage must be >= 0, got {self.ect_stage}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.image_size >= 0, f"image_size must be >= 0 (0: as stored), got {self.image_size}")
        need(not self.semigradient or self.objective in ("lmd", "emd"),
             f"semigradient applies to lmd and emd only, not {self.objective!r}")
        if self.guidance != 1 and self.objective == "ect":
            need(bool(self.init), "guidance in ECT tuning needs init= (the ect-pretrain run whose frozen "
                                  "denoiser gives the null prediction)")
        need(not (self.guidance_max > 0 and self.objective in CONSISTENCY),
             f"guidance_max (w as a network input) is for flow-map objectives, not {self.objective!r}; "
             "use guidance= (one scale)")
        # central differences call the network three times: three different dropout masks
        need(not (self.derivative == "fd" and self.dropout > 0),
             "derivative='fd' needs dropout=0 (each difference pass would draw its own dropout mask); "
             "use derivative='dual' or 'jvp'")

    @property
    def consistency(self) -> bool:
        return self.objective in CONSISTENCY


def build_image_model(cfg: ImageConfig, channels: int, num_classes: int | None = None) -> FlowMap | EDMConsistency:
    """A :class:`UNetFlowMap` inside a :class:`FlowMap` (flow-map objectives, base N(0, I) at
    t = 0, data at t = 1) or inside an :class:`EDMConsistency` (ECT: EDM preconditioning, so
    the net sees unit-scale inputs itself and gets ``data_std=1``). A ``cfg.conditional`` run's
    net is conditioned on ``num_classes`` classes (plus the null class), and also takes the
    guidance scale as an input when ``cfg.guidance_max > 0``; ``num_classes`` is ignored for an
    unconditional run."""
    cond = {}
    if cfg.conditional:
        if num_classes is None or isinstance(num_classes, bool) or int(num_classes) < 1:
            raise ValueError(f"a conditional image model needs num_classes >= 1 (the dataset's classes), "
                             f"got {num_classes!r}")
        cond = dict(num_classes=int(num_classes), guidance_input=cfg.guidance_max > 0)
    net = UNetFlowMap(channels, ch=cfg.ch, emb_dim=cfg.emb_dim, attention=cfg.attention, dropout=cfg.dropout,
                      data_std=1.0 if cfg.consistency else 0.5, **cond)
    return EDMConsistency(net) if cfg.consistency else FlowMap(net)
