"""Images: datasets that ship in packages, an offline sample-quality metric built on a small
classifier, and training / sampling / scoring of image flow maps and consistency models
(every flow-map objective, ECT and its EDM pretraining, distillation from an FM run)."""

from pyflowmap.images.config import IMAGE_OBJECTIVES, ImageConfig, build_image_model
from pyflowmap.images.data import (DATASETS, Batches, load_dataset, load_digits, load_image_folder, load_mnist5k,
                                   load_tensor_file, split)
from pyflowmap.images.evaluate import evaluate_model, generate, save_image_grid
from pyflowmap.images.metrics import ImageEvaluator, frechet_distance
from pyflowmap.images.train import ImageTrainer, load_run

__all__ = ["DATASETS", "Batches", "load_dataset", "load_digits", "load_image_folder", "load_mnist5k",
           "load_tensor_file", "split", "ImageEvaluator", "frechet_distance", "ImageConfig", "ImageTrainer",
           "IMAGE_OBJECTIVES", "build_image_model", "load_run", "evaluate_model", "generate", "save_image_grid"]
