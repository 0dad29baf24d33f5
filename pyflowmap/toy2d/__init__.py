"""The 2D app: the paper's toy distributions (checkerboard, 8 Gaussians, moons, spiral), their
exact metrics, the 2D run config and trainer, evaluation tables and PNG figures. It stands on
the core and on :mod:`pyflowmap.training`, like :mod:`pyflowmap.images`."""

from pyflowmap.toy2d.config import TrainConfig, build_base, build_model, build_objective, data_statistics
from pyflowmap.toy2d.data import DATASETS, sample_data
from pyflowmap.toy2d.evaluate import SAMPLERS, evaluate, format_table, load_model, to_json
from pyflowmap.toy2d.metrics import checker_kl, energy_distance
from pyflowmap.toy2d.train import Trainer

__all__ = ["DATASETS", "SAMPLERS", "TrainConfig", "Trainer", "build_base", "build_model", "build_objective",
           "checker_kl", "data_statistics", "energy_distance", "evaluate", "format_table", "load_model",
           "sample_data", "to_json"]
