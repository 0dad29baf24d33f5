"""The 2D run configuration and the factory that turns it into model, objective and base."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyflowmap.derivatives import make_mode
from pyflowmap.flowmap import FlowMap
from pyflowmap.interpolants import INTERPOLANTS, GaussianBase
from pyflowmap.nn.mlp import ACTIVATIONS, FlowMapMLP
from pyflowmap.objectives import DISTILLATION, SELF_DISTILLATION, LearnedWeighting, make_objective
from pyflowmap.times import TimeSampler
from pyflowmap.toy2d.data import DATASETS, LABELLED, sample_data
from pyflowmap.training.config import LoopConfig


@dataclass
class TrainConfig(LoopConfig):
    """Everything that defines a 2D training run. Defaults: the CPU demo (LSD on the checker).

    The paper's checker run is ``hidden=512, depth=4, batch=100_000, steps=150_000,
    lr_decay_after=35_000``; the demo keeps its recipe (RAdam, clip 10, EMA 0.999, sqrt decay)
    at a size that trains on 2 CPU cores in minutes.

    ``conditional=True`` trains on a labelled toy (``8gaussians``: the component, ``moons``:
    the half circle, ``checker``: the light square; :data:`pyflowmap.toy2d.data.LABELLED`) with
    the loop's conditioning fields (``p_uncond``, ``guidance``, ``guidance_max``).
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
    hidden: int = 256
    depth: int = 4
    emb_dim: int = 64
    activation: str = "gelu"
    lr_decay_after: int = 1500  # sqrt decay lr * sqrt(a / step) after step a; 0 disables

    def validate_fields(self) -> None:
        need = self._need

        need(self.data in DATASETS, f"data must be one of {sorted(DATASETS)}, got {self.data!r}")
        need(self.objective in SELF_DISTILLATION,
             f"objective must be one of {SELF_DISTILLATION} (distillation objectives {DISTILLATION} "
             f"need a teacher and are used from Python), got {self.objective!r}")
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
        need(not self.conditional or self.data in LABELLED,
             f"conditional runs need a labelled toy ({', '.join(LABELLED)}), got {self.data!r}")


def data_statistics(cfg: TrainConfig, n: int = 100_000) -> torch.Tensor:
    """Per-coordinate data std from a fixed-seed sample (independent of the training stream)."""
    g = torch.Generator().manual_seed(12345)
    return sample_data(cfg.data, n, generator=g).std(dim=0)


def build_base(cfg: TrainConfig, data_std: torch.Tensor) -> GaussianBase:
    return GaussianBase(std=data_std.clone()) if cfg.base == "adaptive" else GaussianBase(cfg.base_std)


def build_model(cfg: TrainConfig, data_std: torch.Tensor) -> FlowMap:
    net = FlowMapMLP(dim=2, hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim,
                     activation=cfg.activation, data_std=float(data_std.mean()),
                     num_classes=LABELLED[cfg.data] if cfg.conditional else None,
                     guidance_input=cfg.conditional and cfg.guidance_max > 0,
                     step_embedding="dyadic" if cfg.objective == "shortcut" else "sinusoidal")
    return FlowMap(net)


def build_objective(cfg: TrainConfig, flowmap: FlowMap, base: GaussianBase):
    kwargs = dict(
        interpolant=cfg.interpolant,
        base=base,
        times=TimeSampler(diag_fraction=cfg.diag_fraction, distribution=cfg.time_distribution),
        derivative=make_mode(cfg.derivative, flowmap, fd_step=cfg.fd_step or None,
                             fd_dtype=torch.float64 if cfg.fd_dtype == "float64" else torch.float32),
        weighting=LearnedWeighting() if cfg.learned_weighting else None,
        **cfg.conditioning(),
    )
    if cfg.objective == "esd":
        kwargs["spatial_stopgrad"] = cfg.spatial_stopgrad
    if cfg.objective == "shortcut":  # its own dyadic times: the diagonal fraction and distribution carry over
        times = kwargs.pop("times")
        if cfg.time_distribution != "uniform":
            raise ValueError("shortcut draws dyadic jumps; time_distribution must stay 'uniform'")
        kwargs["diag_fraction"] = times.diag_fraction
    return make_objective(cfg.objective, **kwargs)
