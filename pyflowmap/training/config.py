"""What every run configuration shares: the loop's fields, their checks, dict round trips."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from pyflowmap.training.precision import PRECISIONS
from pyflowmap.validation import MAX_BATCH

DERIVATIVES = ("auto", "jvp", "fd", "dual")
_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


@dataclass
class LoopConfig:
    """The fields the shared training loop reads (:class:`pyflowmap.training.TrainerBase`).

    An app's config (``pyflowmap.toy2d.TrainConfig``, ``pyflowmap.images.ImageConfig``) adds its
    own fields and may restate a field here to change its default; :meth:`validate` checks these
    fields and then :meth:`validate_fields`, the app's own checks. Construction validates, and
    :meth:`from_dict` refuses unknown keys, so a checkpoint's config is read back exactly.
    """

    objective: str = "lsd"
    derivative: str = "auto"  # auto | jvp | fd | dual
    diag_fraction: float = 0.75
    steps: int = 5000
    batch: int = 2048
    lr: float = 1e-3
    grad_clip: float = 10.0
    ema: float = 0.999
    seed: int = 0
    device: str = "cpu"
    ckpt_every: int = 500
    log_every: int = 50
    max_bad_steps: int = 50
    # conditioning (docs/conditioning.md): a class-conditional model, condition dropout, and
    # guidance in training, either one scale (1: none) or w ~ U[1, guidance_max] as an input
    conditional: bool = False
    p_uncond: float = 0.1
    guidance: float = 1.0
    guidance_max: float = 0.0
    # the step's arithmetic (docs/precision.md): fp32, or bf16 / fp16 autocast with fp32 master
    # weights and EMA (fp16 with a dynamic loss scale); compile: one torch.compile graph
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        need = self._need
        for f in fields(self):  # a config.json edited by hand, or a value from Python
            value, want = getattr(self, f.name), _TYPES.get(f.type)
            if want is not None:
                ok = isinstance(value, want) and (f.type == "bool" or not isinstance(value, bool))
                need(ok, f"{f.name} must be {f.type}, got {type(value).__name__} {value!r}")
                if f.type == "float":
                    need(math.isfinite(value), f"{f.name} must be finite, got {value}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            need(False, f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        self.validate_fields()
        need(self.derivative in DERIVATIVES, f"derivative must be auto|jvp|fd|dual, got {self.derivative!r}")
        need(self.precision in PRECISIONS, f"precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")
        need(0 <= self.diag_fraction <= 1, f"diag_fraction must be in [0, 1], got {self.diag_fraction}")
        for name in ("steps", "batch", "ckpt_every", "log_every", "max_bad_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name, most in (("steps", 10**9), ("batch", MAX_BATCH)):  # beyond: a typo, not a run
            need(getattr(self, name) <= most, f"{name} must be <= {most:,}, got {getattr(self, name):,}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}")
        need(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")
        need(0 <= self.p_uncond < 1, f"p_uncond must be in [0, 1), got {self.p_uncond}")
        need(self.guidance >= 0, f"guidance must be >= 0 (1: no guidance in training), got {self.guidance}")
        need(self.guidance_max == 0 or self.guidance_max >= 1,
             f"guidance_max must be 0 (off) or >= 1 (w ~ U[1, guidance_max]), got {self.guidance_max}")
        guided = self.guidance != 1 or self.guidance_max > 0
        need(not guided or self.conditional, "guidance and guidance_max train a conditional model: add --conditional")
        need(not guided or self.p_uncond > 0, "guidance in training needs p_uncond > 0 (it uses the null prediction)")
        need(not (self.guidance != 1 and self.guidance_max > 0),
             "give guidance (one scale) or guidance_max (w as a network input), not both")

    def conditioning(self) -> dict:
        """The objective's conditioning keywords (``p_uncond``, ``guidance``, ``guidance_range``)."""
        if not self.conditional:
            return {}
        return {"p_uncond": self.p_uncond, "guidance": None if self.guidance == 1 else self.guidance,
                "guidance_range": (1.0, self.guidance_max) if self.guidance_max > 0 else None}

    def validate_fields(self) -> None:
        """The app's own checks (its objective names, model sizes, ...)."""

    def _need(self, cond, msg: str) -> None:
        if not cond:
            raise ValueError(f"{type(self).__name__}: {msg}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: a config must be a dict of fields, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**d)
