"""The 2D run configuration and the factory that turns it into model, objective and base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pyflowmap.derivatives import make_mode
from pyflowmap.flowmap import FlowMap
from pyflowmap.interpolants import INTERPOLANTS, GaussianBase
from pyflowmap.nn.mlp import ACTIVATIONS, FlowMapMLP
from pyflowmap.objectives import DISTILLATION, SCM_OBJECTIVES, SELF_DISTILLATION, LearnedWeighting, make_objective
from pyflowmap.objectives.base import PART_WEIGHTINGS
from pyflowmap.times import TimeSampler
from pyflowmap.toy2d.data import DATASETS, LABELLED, sample_data
from pyflowmap.training.config import LoopConfig
from pyflowmap.trigflow import PARAMETERIZATIONS, TrigFlowConsistency, TrigFlowPath

TOY_OBJECTIVES = SELF_DISTILLATION + SCM_OBJECTIVES
OPTIMIZERS = ("radam", "adam", "adamw")
LR_SCHEDULES = ("sqrt", "cosine", "constant")

# Objectives that train without Fourier features by default: with them ESD's 1-step map was
# worse than without and at batch 2048 it diverged (benchmarks/RESULTS.md section 15)
NO_FOURIER = ("esd",)

# The 2D trainer's named recipes (docs/recipes.md, benchmarks/RESULTS.md section 15): what each
# sets beside TrainConfig's defaults, which are "fast". ``TrainConfig.from_recipe(name, ...)``
# and ``--recipe NAME`` start from one.
RECIPES = {
    "fast": {},
    # the paper's optimizer, schedule, EMA and conditioning at the demo's size (its run: 4 x 512,
    # batch 100k, 150k steps); the demo's recipe before the learning-speed study
    "paper": dict(hidden=256, depth=4, emb_dim=64, batch=2048, steps=5000, lr=1e-3, optimizer="radam",
                  lr_schedule="sqrt", lr_decay_after=1500, warmup=0, ema=0.999, ema_warmup=False, time_scale=0.0,
                  fourier=0, diag_fraction=0.75, part_weighting="equal"),
}


@dataclass
class TrainConfig(LoopConfig):
    """Everything that defines a 2D training run. Defaults: the "fast" recipe of the CPU demo
    (LSD on the checker), the outcome of the learning-speed study (docs/recipes.md,
    benchmarks/RESULTS.md section 15): a 4 x 128 MLP fed 64 random Fourier features of x / sigma_d,
    batch 512, 20k steps, the EMA warmed up; RAdam at 1e-3 with sqrt decay and clip 10 as in the
    paper. ``TrainConfig.from_recipe("paper")`` is the paper's recipe at the old demo's size (its
    own checker run is ``hidden=512, batch=100_000, steps=150_000, lr_decay_after=35_000``).

    ``conditional=True`` trains on a labelled toy (``8gaussians``: the component, ``moons``:
    the half circle, ``checker``: the light square; :data:`pyflowmap.toy2d.data.LABELLED`) with
    the loop's conditioning fields (``p_uncond``, ``guidance``, ``guidance_max``).

    ``sct`` / ``scd``: sCM on TrigFlow (sigma_d = the mean data std, which is also the linear
    interpolant's base std here, k = 1); ``scd`` distills the EMA velocity of the ``teacher``
    2D fm run; ``scm_param``, ``scm_warmup`` (0: a tenth of ``steps``) as in the image trainer.
    """

    data: str = "checker"
    fd_step: float = 0.0  # 0: eps(dtype)^(1/3)
    fd_dtype: str = "float32"
    interpolant: str = "linear"
    base: str = "adaptive"  # adaptive (per-coordinate data std) | fixed (base_std)
    base_std: float = 1.0
    time_distribution: str = "uniform"
    spatial_stopgrad: bool = True
    learned_weighting: bool = False
    steps: int = 20000
    batch: int = 512
    hidden: int = 128
    depth: int = 4
    emb_dim: int = 64
    activation: str = "gelu"
    fourier: int = -1  # random Fourier features of x / sigma_d fed to the MLP; 0: none; -1: 64, none for NO_FOURIER
    fourier_scale: float = 0.5  # their frequency scale, in cycles per sigma_d
    optimizer: str = "radam"  # radam | adam | adamw
    lr_schedule: str = "sqrt"  # sqrt (decay after lr_decay_after) | cosine (to 0 at steps) | constant
    warmup: int = 0  # linear learning-rate warm-up steps
    lr_decay_after: int = 1500  # sqrt decay lr * sqrt(a / step) after step a; 0 disables
    ema_warmup: bool = True  # EMA decay min(ema, (1 + n) / (10 + n)): short runs not tied to the init
    part_weighting: str = "equal"  # equal (sum of the part means) | count (the mean over all samples)
    teacher: str = ""  # scd: the directory of a finished 2D fm run on the same data
    scm_param: str = "linear"  # sct / scd: the TrigFlow parameterization (linear | trigflow)
    scm_warmup: int = 0  # sct / scd: tangent warm-up steps (0: a tenth of steps)
    time_scale: float = 0.0  # the time embeddings' frequency scale; 0: 10 for sct / scd, 100 otherwise

    def __post_init__(self):
        if self.objective in SCM_OBJECTIVES and self.scm_warmup == 0 and self.steps >= 1:
            self.scm_warmup = max(1, self.steps // 10)
        if self.fourier == -1:
            self.fourier = 0 if self.objective in NO_FOURIER else 64
        if self.time_scale == 0:
            self.time_scale = 10.0 if self.objective in SCM_OBJECTIVES else 100.0
        if self.teacher:
            self.teacher = str(Path(self.teacher).resolve())
        super().__post_init__()

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "TrainConfig":
        """A config from recipe ``name`` (:data:`RECIPES`), then ``overrides``."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(sorted(RECIPES))}")
        return cls(**{**RECIPES[name], **overrides})

    def validate_fields(self) -> None:
        need = self._need

        need(self.data in DATASETS, f"data must be one of {sorted(DATASETS)}, got {self.data!r}")
        need(self.objective in TOY_OBJECTIVES,
             f"objective must be one of {TOY_OBJECTIVES} (distillation objectives {DISTILLATION} "
             f"are used from Python), got {self.objective!r}")
        need((self.objective == "scd") == bool(self.teacher),
             "scd needs teacher= (a 2D fm run directory)" if self.objective == "scd"
             else f"{self.objective!r} takes no teacher")
        need(self.scm_param in PARAMETERIZATIONS, f"scm_param must be one of {PARAMETERIZATIONS}, got {self.scm_param!r}")
        need(self.scm_warmup >= 0, f"scm_warmup must be >= 0, got {self.scm_warmup}")
        need(self.time_scale > 0, f"time_scale must be > 0 (0 at construction: the objective's default), "
                                  f"got {self.time_scale}")
        need(not (self.objective in SCM_OBJECTIVES and self.guidance_max > 0),
             "guidance_max (w as a network input) is for flow-map objectives; sCM takes guidance= (scd) only")
        need(not (self.objective == "sct" and self.guidance != 1),
             "guidance in training needs a teacher to guide: use scd, or guide sct at sampling")
        need(self.fd_dtype in ("float32", "float64"), f"fd_dtype must be float32|float64, got {self.fd_dtype!r}")
        need(self.fd_step >= 0 and self.fd_step < 1, f"fd_step must be in [0, 1), got {self.fd_step}")
        need(self.interpolant in INTERPOLANTS, f"interpolant must be one of {sorted(INTERPOLANTS)}")
        need(self.base in ("adaptive", "fixed"), f"base must be adaptive|fixed, got {self.base!r}")
        need(self.base_std > 0, f"base_std must be positive, got {self.base_std}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}")
        for name, most in (("hidden", 65536), ("depth", 1000), ("emb_dim", 65536)):
            need(1 <= getattr(self, name) <= most, f"{name} must be in [1, {most}], got {getattr(self, name)}")
        need(self.emb_dim >= 2 and self.emb_dim % 2 == 0, f"emb_dim must be even and >= 2, got {self.emb_dim}")
        need(self.lr_decay_after >= 0, f"lr_decay_after must be >= 0, got {self.lr_decay_after}")
        need(0 <= self.fourier <= 4096, f"fourier must be in [0, 4096] (-1 at construction: the objective's default), "
                                        f"got {self.fourier}")
        need(self.fourier_scale > 0, f"fourier_scale must be positive, got {self.fourier_scale}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {'|'.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {'|'.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.part_weighting in PART_WEIGHTINGS,
             f"part_weighting must be one of {'|'.join(PART_WEIGHTINGS)}, got {self.part_weighting!r}")
        need(self.part_weighting == "equal" or self.objective not in SCM_OBJECTIVES,
             f"{self.objective} has one consistency loss, not two parts: part_weighting must stay 'equal'")
        need(not self.conditional or self.data in LABELLED,
             f"conditional runs need a labelled toy ({', '.join(LABELLED)}), got {self.data!r}")


def data_statistics(cfg: TrainConfig, n: int = 100_000) -> torch.Tensor:
    """Per-coordinate data std from a fixed-seed sample (independent of the training stream)."""
    g = torch.Generator().manual_seed(12345)
    return sample_data(cfg.data, n, generator=g).std(dim=0)


def build_base(cfg: TrainConfig, data_std: torch.Tensor) -> GaussianBase:
    return GaussianBase(std=data_std.clone()) if cfg.base == "adaptive" else GaussianBase(cfg.base_std)


def build_model(cfg: TrainConfig, data_std: torch.Tensor) -> FlowMap | TrigFlowConsistency:
    net = FlowMapMLP(dim=2, hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim,
                     activation=cfg.activation, data_std=float(data_std.mean()),
                     num_classes=LABELLED[cfg.data] if cfg.conditional else None,
                     guidance_input=cfg.conditional and cfg.guidance_max > 0,
                     step_embedding="dyadic" if cfg.objective == "shortcut" else "sinusoidal",
                     time_scale=cfg.time_scale, fourier_features=cfg.fourier, fourier_scale=cfg.fourier_scale)
    if cfg.objective in SCM_OBJECTIVES:
        sd = float(data_std.mean())
        return TrigFlowConsistency(net, TrigFlowPath(sigma_d=sd, base_std=sd), parameterization=cfg.scm_param)
    return FlowMap(net)


def build_objective(cfg: TrainConfig, flowmap: FlowMap, base: GaussianBase, teacher=None):
    """The run's objective; ``teacher``: scd's frozen fm flow map (the trainer loads it)."""
    if cfg.objective in SCM_OBJECTIVES:
        return _scm_objective(cfg, flowmap, teacher)
    kwargs = dict(
        interpolant=cfg.interpolant,
        base=base,
        times=TimeSampler(diag_fraction=cfg.diag_fraction, distribution=cfg.time_distribution),
        derivative=make_mode(cfg.derivative, flowmap, fd_step=cfg.fd_step or None,
                             fd_dtype=torch.float64 if cfg.fd_dtype == "float64" else torch.float32),
        weighting=LearnedWeighting() if cfg.learned_weighting else None,
        part_weighting=cfg.part_weighting,
        **cfg.conditioning(),
    )
    if cfg.objective == "esd":
        kwargs["spatial_stopgrad"] = cfg.spatial_stopgrad
    if cfg.objective == "shortcut":  # its own dyadic times, with this run's diagonal fraction
        if cfg.time_distribution != "uniform":
            raise ValueError("shortcut draws dyadic jumps; time_distribution must stay 'uniform'")
        kwargs.pop("times")
        kwargs["diag_fraction"] = cfg.diag_fraction
    return make_objective(cfg.objective, **kwargs)


def check_teacher(cfg: TrainConfig, tcfg: TrainConfig) -> None:
    """An scd teacher run must be a 2D fm run on the same data and conditioning."""
    if tcfg.objective != "fm" or tcfg.data != cfg.data:
        raise ValueError(f"teacher run {cfg.teacher} must be an fm run on {cfg.data!r}, got {tcfg.objective!r} "
                         f"on {tcfg.data!r}")
    if tcfg.conditional != cfg.conditional:
        raise ValueError(f"teacher run {cfg.teacher} must be conditional exactly when this run is")
    if cfg.conditional and cfg.guidance != 1 and tcfg.p_uncond <= 0:
        raise ValueError(f"guidance in distillation uses the teacher's null prediction, but teacher run "
                         f"{cfg.teacher} was trained with p_uncond=0")


def _scm_objective(cfg: TrainConfig, model: TrigFlowConsistency, teacher):
    cond = cfg.conditioning()
    cond.pop("guidance_range", None)
    derivative = make_mode(cfg.derivative, model, fd_step=cfg.fd_step or None,
                           fd_dtype=torch.float64 if cfg.fd_dtype == "float64" else torch.float32)
    return make_objective(cfg.objective, teacher=teacher, derivative=derivative, warmup_steps=cfg.scm_warmup,
                          **cond)
