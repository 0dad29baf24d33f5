"""The training machinery every app shares: the loop (:class:`TrainerBase`), the config base
with the loop's fields (:class:`LoopConfig`), the data-parallel wiring (:class:`Parallel`), the
non-finite step guard (:class:`NonFiniteGuard`), atomic checkpoints and safetensors weights."""

from pyflowmap.training.checkpoint import (all_finite, atomic_write, load_checkpoint, load_weights, save_checkpoint,
                                           save_weights)
from pyflowmap.training.config import LoopConfig
from pyflowmap.training.guard import NonFiniteGuard, NonFiniteTraining
from pyflowmap.training.loop import CHECKPOINT, WEIGHTS, TrainerBase
from pyflowmap.training.parallel import Parallel

__all__ = ["CHECKPOINT", "WEIGHTS", "LoopConfig", "NonFiniteGuard", "NonFiniteTraining", "Parallel", "TrainerBase",
           "all_finite", "atomic_write", "load_checkpoint", "load_weights", "save_checkpoint", "save_weights"]
