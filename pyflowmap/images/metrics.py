"""Offline sample quality for digit images: the Frechet distance between real and generated
images in the feature space of pyflowmap's own classifier ("classifier Frechet distance", CFD;
not FID: different features, different data, not comparable with published FIDs), and the
classifier's label entropy over samples (diversity: log 10 = 2.303 when all ten digits are
equally frequent), and for class-conditional samples the accuracy on the requested labels (the
classifier's argmax equal to the class each sample was drawn for)."""

from __future__ import annotations

import math

import torch

from pyflowmap.images.classifier import DigitClassifier, cached_classifier
from pyflowmap.images.data import load_dataset


def _moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / max(1, f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits of
    two feature sets ``[N, d]`` (float64; the symmetric form needs only eigendecompositions)."""
    if feat_a.dim() != 2 or feat_b.dim() != 2 or feat_a.shape[1] != feat_b.shape[1]:
        raise ValueError(f"frechet_distance: need [N, d] features of equal d, got {tuple(feat_a.shape)}, "
                         f"{tuple(feat_b.shape)}")
    if feat_a.shape[0] < 2 or feat_b.shape[0] < 2:
        raise ValueError("frechet_distance: need at least 2 samples per set")
    if not (torch.isfinite(feat_a).all() and torch.isfinite(feat_b).all()):
        raise ValueError("frechet_distance: features contain NaN or inf")
    mu_a, s_a = _moments(feat_a)
    mu_b, s_b = _moments(feat_b)
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


@torch.no_grad()
def label_entropy(probs: torch.Tensor) -> float:
    """Entropy (nats) of the mean predicted label distribution."""
    p = probs.double().mean(0).clamp_min(1e-12)
    return float(-(p * p.log()).sum())


class ImageEvaluator:
    """Scores generated digits against the real dataset with the cached classifier.

    ``evaluator(samples)`` -> ``{"cfd", "label_entropy", "confidence", "n"}``; samples outside
    [-1, 1] are clipped first (what a PNG of them shows); non-finite samples raise.
    ``evaluator(samples, labels)`` (the classes the samples were drawn for, ``[N]``) adds
    ``"accuracy"``: the share whose classifier argmax is the requested label.
    ``evaluator.info`` has the classifier's held-out accuracy and ``evaluator.floor`` the CFD
    between two disjoint halves of the real data (what a perfect generator would score at
    that sample size).
    """

    def __init__(self, dataset: str = "mnist5k", classifier: DigitClassifier | None = None, device="cpu"):
        if classifier is None:
            classifier, info = cached_classifier(dataset)
        else:
            info = {"dataset": dataset}
        self.info = info
        self.device = torch.device(device)
        self.model = classifier.to(self.device).eval()
        images, _ = load_dataset(dataset)
        self.shape = tuple(images.shape[1:])
        self.real = self.features(images)
        # the dataset may be sorted by label (MNIST-5k is): halves of a fixed shuffle
        perm = torch.randperm(self.real.shape[0], generator=torch.Generator().manual_seed(0))
        half = self.real.shape[0] // 2
        self.floor = frechet_distance(self.real[perm[:half]], self.real[perm[half:2 * half]])
        self.max_entropy = math.log(self.model.head.out_features)

    @torch.no_grad()
    def features(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        return torch.cat([self.model.features(images[i:i + chunk].to(self.device)).cpu()
                          for i in range(0, images.shape[0], chunk)])

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        if labels is not None:
            classes = self.model.head.out_features
            if not isinstance(labels, torch.Tensor) or labels.shape != (samples.shape[0],) \
                    or labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"ImageEvaluator: labels must be integer class indices [N={samples.shape[0]}], got "
                                 f"{getattr(labels, 'dtype', type(labels).__name__)} "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise ValueError(f"ImageEvaluator: labels must lie in [0, {classes}) (the classifier's classes), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        if tuple(samples.shape[1:]) != self.shape:
            raise ValueError(f"ImageEvaluator: samples must be [N, {', '.join(map(str, self.shape))}], "
                             f"got {tuple(samples.shape)}")
        if not torch.isfinite(samples).all():
            raise ValueError("ImageEvaluator: samples contain NaN or inf")
        x = samples.float().clamp(-1, 1)
        feats = self.features(x)
        probs = torch.cat([torch.softmax(self.model.head(feats[i:i + 4096].to(self.device)), -1).cpu()
                           for i in range(0, feats.shape[0], 4096)])
        out = {"cfd": frechet_distance(feats, self.real), "label_entropy": label_entropy(probs),
               "confidence": float(probs.max(1).values.mean()), "n": int(samples.shape[0])}
        if labels is not None:
            out["accuracy"] = float((probs.argmax(1) == labels.cpu().long()).double().mean())
        return out
