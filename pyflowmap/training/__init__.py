"""The training machinery every app shares: the loop (:class:`TrainerBase`), the config base
with the loop's fields (:class:`LoopConfig`), atomic checkpoints and safetensors weights."""

from pyflowmap.training.checkpoint import (
                                           all_finite,
                                           atomic_write,
                                           load_checkpoint,
                                           load_weights,
                                           save_checkpoint,
                                           save_weights,
)
from pyflowmap.training.config import LoopConfig
from pyflowmap.training.loop import CHECKPOINT, WEIGHTS, NonFiniteTraining, TrainerBase

__all__ = ["CHECKPOINT", "WEIGHTS", "LoopConfig", "NonFiniteTraining", "TrainerBase", "all_finite", "atomic_write",
           "load_checkpoint", "load_weights", "save_checkpoint", "save_weights"]
