"""Training objectives, one contract (:class:`ObjectiveBase`): flow-map self-distillation (FM,
LSD, ESD, PSD-U, PSD-M, MeanFlow, shortcut models), distillation from a frozen teacher (LMD, EMD, PFMM) and
consistency tuning (ECT and its EDM pretraining) and sCM's continuous-time consistency
training and distillation (sCT, sCD) on TrigFlow. The math, with every stop-gradient, is in
docs/objectives.md.

Files follow the paper's families: ``lagrangian.py`` (LSD, LMD), ``eulerian.py`` (ESD, EMD),
``progressive.py`` (PSD-U/M, PFMM), ``shortcut.py``, ``fm.py``, ``meanflow.py``, ``ect.py``, ``scm.py``; the contract and
the shared flow-map reduction in ``base.py``; learned weighting in ``weighting.py``."""

from __future__ import annotations

from pyflowmap.objectives.base import LossOutput, Objective, ObjectiveBase, as_velocity
from pyflowmap.objectives.ect import ECT
from pyflowmap.objectives.eulerian import EMD, ESD
from pyflowmap.objectives.fm import FM
from pyflowmap.objectives.lagrangian import LMD, LSD
from pyflowmap.objectives.meanflow import MeanFlow
from pyflowmap.objectives.progressive import PFMM, PSD, EulerTeacher
from pyflowmap.objectives.scm import SCM, TangentExplosionWarning
from pyflowmap.objectives.shortcut import Shortcut
from pyflowmap.objectives.weighting import LearnedWeighting

SELF_DISTILLATION = ("fm", "lsd", "esd", "psd-u", "psd-m", "meanflow", "shortcut")
DISTILLATION = ("lmd", "emd", "pfmm")
CONSISTENCY = ("ect", "ect-pretrain")
SCM_OBJECTIVES = ("sct", "scd")  # on a TrigFlowConsistency model, not a FlowMap
OBJECTIVES = SELF_DISTILLATION + DISTILLATION + CONSISTENCY


def make_objective(name: str, teacher=None, **kwargs) -> ObjectiveBase:
    """Build an objective by name: fm, lsd, esd, psd-u, psd-m, meanflow, shortcut (no teacher), lmd, emd,
    pfmm (``teacher`` required), ect or ect-pretrain (for an EDMConsistency model), sct or scd
    (``teacher`` required; for a TrigFlowConsistency model). Other keyword arguments go to
    the objective's constructor."""
    if not isinstance(name, str):
        raise TypeError(f"objective name must be a string, one of {', '.join(OBJECTIVES)}; got {name!r}")
    key = name.lower().replace("_", "-")
    if key in SCM_OBJECTIVES:
        if (key == "scd") != (teacher is not None):
            raise ValueError("objective 'scd' distills a frozen teacher: pass teacher=" if key == "scd" else
                             "objective 'sct' trains from data alone and takes no teacher (use 'scd')")
        return SCM(teacher=teacher, **kwargs)
    if key in CONSISTENCY:
        if teacher is not None:
            raise ValueError(f"objective {name!r} tunes the model itself and takes no teacher")
        return ECT(pretrain=key == "ect-pretrain", **kwargs)
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
    if key == "shortcut":
        return Shortcut(**kwargs)
    if key in ("psd-u", "psd-m"):
        return PSD(gamma="uniform" if key == "psd-u" else "midpoint", **kwargs)
    raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES + SCM_OBJECTIVES)}")


__all__ = [
    "Objective", "ObjectiveBase", "LossOutput", "ECT", "MeanFlow", "Shortcut", "FM", "LSD", "ESD", "PSD", "LMD", "EMD", "PFMM", "EulerTeacher",
    "LearnedWeighting", "SCM", "TangentExplosionWarning", "make_objective", "SCM_OBJECTIVES", "as_velocity", "SELF_DISTILLATION", "DISTILLATION", "CONSISTENCY", "OBJECTIVES",
]
