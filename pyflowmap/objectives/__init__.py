"""Flow-map objectives: self-distillation (FM, LSD, ESD, PSD-U, PSD-M) and distillation from
a frozen teacher (LMD, EMD, PFMM). See MATH.md-style docstrings on each class."""

from __future__ import annotations

from pyflowmap.objectives.base import LossOutput, Objective, as_velocity
from pyflowmap.objectives.ect import ECT
from pyflowmap.objectives.eulerian import EMD, ESD
from pyflowmap.objectives.fm import FM
from pyflowmap.objectives.lagrangian import LMD, LSD
from pyflowmap.objectives.meanflow import MeanFlow
from pyflowmap.objectives.progressive import PFMM, PSD, EulerTeacher
from pyflowmap.objectives.weighting import LearnedWeighting

SELF_DISTILLATION = ("fm", "lsd", "esd", "psd-u", "psd-m", "meanflow")
DISTILLATION = ("lmd", "emd", "pfmm")


def make_objective(name: str, teacher=None, **kwargs) -> Objective:
    """Build an objective by name: fm, lsd, esd, psd-u, psd-m, meanflow (no teacher) or lmd, emd, pfmm
    (``teacher`` required). Other keyword arguments go to the objective's constructor."""
    key = name.lower().replace("_", "-")
    if key in DISTILLATION:
        if teacher is None:
            raise ValueError(f"objective {name!r} distills a frozen teacher: pass teacher=")
        cls = {"lmd": LMD, "emd": EMD, "pfmm": PFMM}[key]
        return cls(teacher, **kwargs)
    if teacher is not None:
        raise ValueError(f"objective {name!r} is self-distillation and takes no teacher")
    if key == "fm":
        return FM(**kwargs)
    if key == "lsd":
        return LSD(**kwargs)
    if key == "esd":
        return ESD(**kwargs)
    if key == "meanflow":
        return MeanFlow(**kwargs)
    if key in ("psd-u", "psd-m"):
        return PSD(gamma="uniform" if key == "psd-u" else "midpoint", **kwargs)
    raise ValueError(f"unknown objective {name!r}; choose from {', '.join(SELF_DISTILLATION + DISTILLATION)}")


__all__ = [
    "Objective", "LossOutput", "ECT", "MeanFlow", "FM", "LSD", "ESD", "PSD", "LMD", "EMD", "PFMM", "EulerTeacher",
    "LearnedWeighting", "make_objective", "as_velocity", "SELF_DISTILLATION", "DISTILLATION",
]
