"""Training configuration and the factory that turns it into model, objective and base."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from pyflowmap.data import DATASETS, sample_data
from pyflowmap.derivatives import FiniteDifference, resolve_mode
from pyflowmap.flowmap import FlowMap
from pyflowmap.interpolants import INTERPOLANTS, GaussianBase
from pyflowmap.nn.mlp import ACTIVATIONS, FlowMapMLP
from pyflowmap.objectives import DISTILLATION, SELF_DISTILLATION, LearnedWeighting, make_objective
from pyflowmap.times import TimeSampler


class ConfigBase:
    """What every run configuration dataclass shares: validation on construction, a check
    helper whose message names the class, and dict round trips that refuse unknown keys."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def _need(self, cond, msg: str) -> None:
        if not cond:
            raise ValueError(f"{type(self).__name__}: {msg}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class TrainConfig(ConfigBase):
    """Everything that defines a 2D training run. Defaults: the CPU demo (LSD on the checker).

    The paper's checker run is ``hidden=512, depth=4, batch=100_000, steps=150_000,
    lr_decay_after=35_000``; the demo keeps its recipe (RAdam, clip 10, EMA 0.999, sqrt decay)
    at a size that trains on 2 CPU cores in minutes.
    """

    data: str = "checker"
    objective: str = "lsd"
    derivative: str = "auto"  # auto | jvp | fd | dual
    fd_step: float = 0.0  # 0: eps(dtype)^(1/3)
    fd_dtype: str = "float32"
    interpolant: str = "linear"
    base: str = "adaptive"  # adaptive (per-coordinate data std) | fixed (base_std)
    base_std: float = 1.0
    diag_fraction: float = 0.75
    time_distribution: str = "uniform"
    spatial_stopgrad: bool = True
    learned_weighting: bool = False
    hidden: int = 256
    depth: int = 4
    emb_dim: int = 64
    activation: str = "gelu"
    steps: int = 5000
    batch: int = 2048
    lr: float = 1e-3
    grad_clip: float = 10.0
    lr_decay_after: int = 1500  # sqrt decay lr * sqrt(a / step) after step a; 0 disables
    ema: float = 0.999
    seed: int = 0
    device: str = "cpu"
    ckpt_every: int = 500
    log_every: int = 50
    max_bad_steps: int = 50

    def validate(self) -> None:
        need = self._need

        need(self.data in DATASETS, f"data must be one of {sorted(DATASETS)}, got {self.data!r}")
        need(self.objective in SELF_DISTILLATION,
             f"objective must be one of {SELF_DISTILLATION} (distillation objectives {DISTILLATION} "
             f"need a teacher and are used from Python), got {self.objective!r}")
        need(self.derivative in ("auto", "jvp", "fd", "dual"), f"derivative must be auto|jvp|fd|dual, got {self.derivative!r}")
        need(self.fd_dtype in ("float32", "float64"), f"fd_dtype must be float32|float64, got {self.fd_dtype!r}")
        need(self.fd_step >= 0 and self.fd_step < 1, f"fd_step must be in [0, 1), got {self.fd_step}")
        need(self.interpolant in INTERPOLANTS, f"interpolant must be one of {sorted(INTERPOLANTS)}")
        need(self.base in ("adaptive", "fixed"), f"base must be adaptive|fixed, got {self.base!r}")
        need(self.base_std > 0, f"base_std must be positive, got {self.base_std}")
        need(0 <= self.diag_fraction <= 1, f"diag_fraction must be in [0, 1], got {self.diag_fraction}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}")
        for name in ("hidden", "depth", "steps", "batch", "ckpt_every", "log_every", "max_bad_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.emb_dim >= 2 and self.emb_dim % 2 == 0, f"emb_dim must be even and >= 2, got {self.emb_dim}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}")
        need(self.lr_decay_after >= 0, f"lr_decay_after must be >= 0, got {self.lr_decay_after}")
        need(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")


def data_statistics(cfg: TrainConfig, n: int = 100_000) -> torch.Tensor:
    """Per-coordinate data std from a fixed-seed sample (independent of the training stream)."""
    g = torch.Generator().manual_seed(12345)
    return sample_data(cfg.data, n, generator=g).std(dim=0)


def build_base(cfg: TrainConfig, data_std: torch.Tensor) -> GaussianBase:
    return GaussianBase(std=data_std.clone()) if cfg.base == "adaptive" else GaussianBase(cfg.base_std)


def build_model(cfg: TrainConfig, data_std: torch.Tensor) -> FlowMap:
    net = FlowMapMLP(dim=2, hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim,
                     activation=cfg.activation, data_std=float(data_std.mean()))
    return FlowMap(net)


def build_derivative(cfg: TrainConfig, flowmap: FlowMap):
    if cfg.derivative == "fd":
        dtype = torch.float64 if cfg.fd_dtype == "float64" else torch.float32
        return FiniteDifference(h=cfg.fd_step or None, dtype=dtype)
    return resolve_mode(cfg.derivative, flowmap)


def build_objective(cfg: TrainConfig, flowmap: FlowMap, base: GaussianBase):
    kwargs = dict(
        interpolant=cfg.interpolant,
        base=base,
        times=TimeSampler(diag_fraction=cfg.diag_fraction, distribution=cfg.time_distribution),
        derivative=build_derivative(cfg, flowmap),
        weighting=LearnedWeighting() if cfg.learned_weighting else None,
    )
    if cfg.objective == "esd":
        kwargs["spatial_stopgrad"] = cfg.spatial_stopgrad
    return make_objective(cfg.objective, **kwargs)
