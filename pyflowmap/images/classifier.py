"""A small digit classifier that pyflowmap trains itself, deterministically, and caches: the
feature extractor of the offline sample-quality metric (:mod:`pyflowmap.images.metrics`).

Its 64-d pooled features play the role Inception features play in FID; being trained on the
same few thousand digits, its numbers are comparable only with each other (same dataset, same
classifier seed), never with published FIDs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyflowmap.images.data import load_dataset, split
from pyflowmap.training.checkpoint import load_checkpoint, save_checkpoint


class DigitClassifier(nn.Module):
    """conv 32 (stride 2 above 16 pixels) -> conv 64 (stride 2) -> conv 64 -> global average pool
    -> 10 classes. Works at any resolution (28 x 28 MNIST, 8 x 8 digits); sized to train in
    seconds on 2 CPU cores."""

    feature_dim = 64

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 28):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1, stride=2 if size > 16 else 1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(64, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 800, batch: int = 128,
                     lr: float = 2e-3, seed: int = 0, augment: bool = True) -> DigitClassifier:
    """Adam with cosine decay; small random shifts as augmentation. Deterministic on CPU for a
    given seed."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError("train_classifier: need as many labels as images, and at least one image")
    if (labels < 0).any():
        raise ValueError("train_classifier: every image needs a label >= 0")
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1], int(labels.max()) + 1, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    pad = max(1, images.shape[-1] // 14)
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (batch,), generator=g)
        x = images[idx]
        if augment:  # one random shift per batch keeps it cheap and deterministic
            dx, dy = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=g))
            x = torch.roll(F.pad(x, (pad,) * 4, value=-1.0), (dy, dx), dims=(2, 3))[..., pad:-pad, pad:-pad]
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    hits = sum(int((model(images[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum())
               for i in range(0, images.shape[0], chunk))
    return hits / max(1, images.shape[0])


def cache_dir() -> Path:
    return Path(os.environ.get("PYFLOWMAP_CACHE", Path.home() / ".cache" / "pyflowmap"))


def cached_classifier(dataset: str = "mnist5k", steps: int = 800, seed: int = 0) -> tuple[DigitClassifier, dict]:
    """The classifier for ``dataset`` (trained on a fixed 90% split, accuracy on the other 10%),
    from the cache when a matching one exists. Returns ``(model, info)`` with ``info`` holding
    ``test_accuracy``, ``train_size`` and the cache path."""
    images, labels = load_dataset(dataset)
    (xtr, ytr), (xte, yte) = split(images, labels, 0.1, seed=seed)
    key = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()
                         + f"{steps}-{seed}-v2-torch{torch.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / f"classifier-{Path(dataset).name}-{key}.pt"
    if path.is_file():
        try:
            state = load_checkpoint(path)
            model = DigitClassifier(images.shape[1], state["classes"], images.shape[-1])
            model.load_state_dict(state["model"])
            return model.eval().requires_grad_(False), state["info"]
        except Exception:  # noqa: BLE001  (a corrupt or foreign cache entry: retrain)
            pass
    model = train_classifier(xtr, ytr, steps=steps, seed=seed)
    info = {"dataset": dataset, "test_accuracy": accuracy(model, xte, yte), "train_size": int(xtr.shape[0]),
            "test_size": int(xte.shape[0]), "steps": steps, "seed": seed, "cache": str(path)}
    save_checkpoint({"model": model.state_dict(), "classes": model.head.out_features, "info": info}, path)
    return model, info
