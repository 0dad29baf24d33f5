"""The image run configuration and the model it describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyflowmap.consistency import EDMConsistency
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.data import DATASETS
from pyflowmap.nn.dit import POS_EMBEDS, PRESETS, DiTFlowMap, preset_settings
from pyflowmap.nn.unet import UNetFlowMap
from pyflowmap.objectives import CONSISTENCY, DISTILLATION, OBJECTIVES, SCM_OBJECTIVES
from pyflowmap.training.config import LoopConfig
from pyflowmap.trigflow import PARAMETERIZATIONS, TrigFlowConsistency, TrigFlowPath

IMAGE_OBJECTIVES = OBJECTIVES + SCM_OBJECTIVES
TEACHER_OBJECTIVES = DISTILLATION + ("scd",)  # they distill the EMA velocity of an fm run
IMAGE_MODELS = ("unet", "dit")
# the DiT's fields and their defaults: a unet run takes none of them
_DIT_FIELDS = {"dit_preset": "cpu-small", "patch": 0, "depth": 0, "width": 0, "heads": 0, "qk_norm": False,
               "pos_embed": "sincos"}


@dataclass
class ImageConfig(LoopConfig):
    """Everything that defines an image run. Defaults: a CPU-sized MNIST-5k run.

    ``objective``: a flow-map objective (fm, lsd, esd, psd-u, psd-m, meanflow), a distillation
    objective (lmd, emd, pfmm: ``teacher`` is the directory of a finished ``fm`` run, whose EMA
    velocity is distilled), ``ect`` (consistency tuning), ``ect-pretrain`` (EDM denoising, the
    diffusion model ECT tunes from), ``sct`` or ``scd`` (sCM's continuous-time consistency
    training, or its distillation from the ``teacher`` fm run, on a TrigFlow model:
    ``scm_param`` its parameterization, ``scm_warmup`` the tangent warm-up in steps, 0 resolving
    to a tenth of ``steps`` and stored). ``init``: a run directory whose EMA weights start this run
    (ECT tuning from an ``ect-pretrain`` run; any run of the same model kind and size).
    ``ect_stage`` is ECT's stage length d in steps (0 resolves, at construction, to a quarter of
    ``steps``, and is stored so that a resumed or extended run keeps its schedule). ``teacher``
    and ``init`` are stored as absolute paths.

    ``conditional``: a class-conditional model on the dataset's labels (0..K-1, K = the
    largest label + 1), the conditions dropped with probability ``p_uncond``; ``guidance`` (!= 1)
    trains with classifier-free guidance at that scale (ECT tuning takes the null prediction
    from the ``init`` run, its pretrained denoiser), ``guidance_max`` (> 0, flow-map
    objectives) trains over w ~ U[1, guidance_max] given to the network as an input.

    ``model``: ``"unet"`` (:class:`pyflowmap.nn.UNetFlowMap`, sized by ``ch``, ``emb_dim``,
    ``attention``) or ``"dit"`` (:class:`pyflowmap.nn.dit.DiTFlowMap`, for every objective): the
    ``dit_preset`` size (cpu-small, S/2, S/4, S/8, B/2, ..., L/8; its emb_dim too), each of
    ``patch``, ``depth``, ``width``, ``heads`` overriding it when > 0, ``qk_norm`` and
    ``pos_embed`` (sincos | learned). ``dropout`` applies to both. A unet run takes none of the
    DiT fields. A config stored before ``model`` existed is a unet run.
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
    model: str = "unet"  # unet | dit
    dit_preset: str = "cpu-small"  # dit: the size that patch / depth / width / heads (> 0) override
    patch: int = 0  # dit: the patch side (0: the preset's)
    depth: int = 0  # dit: transformer blocks (0: the preset's)
    width: int = 0  # dit: token channels (0: the preset's)
    heads: int = 0  # dit: attention heads, dividing width (0: the preset's)
    qk_norm: bool = False  # dit: RMSNorm of queries and keys
    pos_embed: str = "sincos"  # dit: sincos (fixed) | learned
    ect_stage: int = 0
    scm_param: str = "linear"  # sct / scd: the TrigFlow parameterization (linear | trigflow)
    scm_warmup: int = 0  # sct / scd: tangent warm-up steps (0: a tenth of steps)
    time_scale: float = 0.0  # the time embeddings' frequency scale; 0: 10 for sct / scd, 100 otherwise
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
        if self.objective in SCM_OBJECTIVES and self.scm_warmup == 0 and self.steps >= 1:
            self.scm_warmup = max(1, self.steps // 10)
        if self.time_scale == 0:  # sCM's tangent runs through d/dt of the embedding: low frequencies
            self.time_scale = 10.0 if self.objective in SCM_OBJECTIVES else 100.0
        for name in ("teacher", "init"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        if isinstance(self.dataset, str) and self.dataset not in DATASETS:  # a folder or tensor file
            self.dataset = str(Path(self.dataset).resolve())
        super().__post_init__()

    def validate_fields(self) -> None:
        need = self._need

        need(self.objective in IMAGE_OBJECTIVES, f"objective must be one of {IMAGE_OBJECTIVES}, got {self.objective!r}")
        need((self.objective in TEACHER_OBJECTIVES) == bool(self.teacher),
             f"{self.objective!r} " + ("needs teacher= (an fm run directory)" if self.objective in TEACHER_OBJECTIVES
                                       else "takes no teacher"))
        need(self.scm_param in PARAMETERIZATIONS, f"scm_param must be one of {PARAMETERIZATIONS}, got {self.scm_param!r}")
        need(self.scm_warmup >= 0, f"scm_warmup must be >= 0, got {self.scm_warmup}")
        need(self.time_scale > 0, f"time_scale must be > 0 (0 at construction: the objective's default), "
                                  f"got {self.time_scale}")
        need(not (self.guidance != 1 and self.objective == "sct"),
             "guidance in training needs a teacher to guide: use scd, or train sct with p_uncond > 0 and guide at "
             "sampling (--cfg-scale)")
        for name, most in (("ch", 4096), ("emb_dim", 65536), ("image_size", 4096)):
            need(getattr(self, name) <= most, f"{name} must be <= {most}, got {getattr(self, name)}")
        for name in ("ch", "emb_dim"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.emb_dim % 2 == 0, f"emb_dim must be even, got {self.emb_dim}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        self._validate_model()
        need(self.ect_stage >= 0, f"ect_stage must be >= 0, got {self.ect_stage}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.image_size >= 0, f"image_size must be >= 0 (0: as stored), got {self.image_size}")
        need(not self.semigradient or self.objective in ("lmd", "emd"),
             f"semigradient applies to lmd and emd only, not {self.objective!r}")
        if self.guidance != 1 and self.objective == "ect":
            need(bool(self.init), "guidance in ECT tuning needs init= (the ect-pretrain run whose frozen "
                                  "denoiser gives the null prediction)")
        need(not (self.guidance_max > 0 and self.objective in CONSISTENCY + SCM_OBJECTIVES),
             f"guidance_max (w as a network input) is for flow-map objectives, not {self.objective!r}; "
             "use guidance= (one scale)")
        # central differences call the network three times: three different dropout masks
        need(not (self.derivative == "fd" and self.dropout > 0),
             "derivative='fd' needs dropout=0 (each difference pass would draw its own dropout mask); "
             "use derivative='dual' or 'jvp'")

    def _validate_model(self) -> None:
        need = self._need
        need(self.model in IMAGE_MODELS, f"model must be one of {IMAGE_MODELS}, got {self.model!r}")
        if self.model != "dit":
            given = [k for k, v in _DIT_FIELDS.items() if getattr(self, k) != v]
            need(not given, f"{', '.join(given)} configure the DiT: they need model='dit' (--model dit), "
                            f"this run's model is {self.model!r}")
            return
        need(self.dit_preset in PRESETS, f"dit_preset must be one of {PRESETS}, got {self.dit_preset!r}")
        for name, most in (("patch", 4096), ("depth", 1000), ("width", 65536), ("heads", 4096)):
            value = getattr(self, name)
            need(0 <= value <= most, f"{name} must be in [0, {most}] (0: the dit_preset's), got {value}")
        need(self.pos_embed in POS_EMBEDS, f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        arch = self._dit_arch()
        need(arch["width"] % arch["heads"] == 0,
             f"heads {arch['heads']} must divide width {arch['width']} (dit_preset {self.dit_preset!r}, "
             f"width={self.width or 'preset'}, heads={self.heads or 'preset'})")
        need(self.pos_embed != "sincos" or arch["width"] % 4 == 0,
             f"width {arch['width']} must be divisible by 4 for pos_embed='sincos' (or use pos_embed='learned')")
        if self.image_size > 0:
            patch = self.patch or preset_settings(self.dit_preset, self.image_size)["patch"]
            need(self.image_size % patch == 0,
                 f"patch {patch} must divide image_size {self.image_size}")

    def _dit_arch(self) -> dict:
        arch = preset_settings(self.dit_preset, 16)  # width, depth, heads, emb_dim: not size-dependent
        arch.pop("patch")
        arch.update({k: getattr(self, k) for k in ("width", "depth", "heads") if getattr(self, k) > 0})
        return arch

    def dit_settings(self, size) -> dict:
        """The :class:`DiTFlowMap` keywords of this DiT run on images of ``size`` (H, W): the
        preset's values with this config's overrides. A patch that does not divide the images is
        a ValueError naming the option."""
        if self.model != "dit":
            raise ValueError(f"{type(self).__name__}: dit_settings of a {self.model!r} run")
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        patch = self.patch or preset_settings(self.dit_preset, (h, w))["patch"]
        if h % patch or w % patch:
            origin = "patch" if self.patch else f"the patch of dit_preset {self.dit_preset!r}"
            raise ValueError(f"{type(self).__name__}: {origin} ({patch}) must divide the {h}x{w} images; "
                             "pass --patch (patch=) with a divisor of both sides")
        return dict(image_size=(h, w), patch=patch, **self._dit_arch(), qk_norm=self.qk_norm,
                    pos_embed=self.pos_embed, dropout=self.dropout)

    def architecture(self, size=None) -> tuple:
        """What the network's shape depends on (an ``init`` run must match it)."""
        if self.model == "dit":
            settings = self.dit_settings(size)
            settings.pop("dropout")  # not a shape
            return ("dit", self.consistency, tuple(sorted(settings.items())))
        return ("unet", self.consistency, self.ch, self.emb_dim, self.attention)

    @property
    def consistency(self) -> bool:
        """An EDM consistency model (ECT and its pretraining)."""
        return self.objective in CONSISTENCY

    @property
    def trigflow(self) -> bool:
        """A TrigFlow consistency model (sCT, sCD): its net is a flow-map net's, so fm runs init it."""
        return self.objective in SCM_OBJECTIVES


def build_image_model(cfg: ImageConfig, channels: int, num_classes: int | None = None,
                      size=None) -> FlowMap | EDMConsistency | TrigFlowConsistency:
    """A :class:`UNetFlowMap` (``cfg.model == "unet"``) or a :class:`DiTFlowMap` (``"dit"``, on
    images of ``size``: an int or (H, W), which the DiT needs; default ``cfg.image_size``)
    inside a :class:`FlowMap` (flow-map objectives, base N(0, I) at
    t = 0, data at t = 1), inside an :class:`EDMConsistency` (ECT: EDM preconditioning, so
    the net sees unit-scale inputs itself and gets ``data_std=1``) or inside a
    :class:`TrigFlowConsistency` (sCT / sCD: sigma_d = 0.5, base N(0, I), ``cfg.scm_param``). A ``cfg.conditional`` run's
    net is conditioned on ``num_classes`` classes (plus the null class), and also takes the
    guidance scale as an input when ``cfg.guidance_max > 0``; ``num_classes`` is ignored for an
    unconditional run."""
    cond = {}
    if cfg.conditional:
        if num_classes is None or isinstance(num_classes, bool) or int(num_classes) < 1:
            raise ValueError(f"a conditional image model needs num_classes >= 1 (the dataset's classes), "
                             f"got {num_classes!r}")
        cond = dict(num_classes=int(num_classes), guidance_input=cfg.guidance_max > 0)
    data_std = 1.0 if cfg.consistency else 0.5
    # shortcut models condition on log2 of the jump (an fm run can still init one: same shapes)
    step = {"step_embedding": "dyadic"} if cfg.objective == "shortcut" else {}
    step["time_scale"] = cfg.time_scale
    if cfg.model == "dit":
        if size is None:
            if cfg.image_size < 1:
                raise ValueError("a DiT image model needs the image size: pass size= (H, W) of the data")
            size = cfg.image_size
        settings = cfg.dit_settings(size)
        net = DiTFlowMap(settings.pop("image_size"), channels, data_std=data_std, **settings, **cond, **step)
    else:
        net = UNetFlowMap(channels, ch=cfg.ch, emb_dim=cfg.emb_dim, attention=cfg.attention, dropout=cfg.dropout,
                          data_std=data_std, **cond, **step)
    if cfg.trigflow:
        return TrigFlowConsistency(net, TrigFlowPath(sigma_d=0.5, base_std=1.0), parameterization=cfg.scm_param)
    return EDMConsistency(net) if cfg.consistency else FlowMap(net)
