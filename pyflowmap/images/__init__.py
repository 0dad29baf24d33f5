"""Images: datasets that ship in packages, an offline sample-quality metric built on a small
classifier, and the image experiment helpers (ECT, MeanFlow and the flow-map objectives)."""

from pyflowmap.images.data import (DATASETS, Batches, load_dataset, load_digits, load_image_folder, load_mnist5k,
                                   load_tensor_file, split)

__all__ = ["DATASETS", "Batches", "load_dataset", "load_digits", "load_image_folder", "load_mnist5k",
           "load_tensor_file", "split"]
