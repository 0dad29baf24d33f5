"""Sampling and scoring image runs: flow-map jumps, the Euler ODE of the diagonal velocity and
the multistep consistency sampler, each at several step counts, scored by the classifier
Frechet distance, with PNG sample grids; class-conditional models on balanced requested labels,
also scored by the accuracy on them, with and without classifier-free guidance."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pyflowmap import conditioning as cond_
from pyflowmap.consistency import EDMConsistency
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.metrics import ImageEvaluator
from pyflowmap.sampling import draw, sampler_name
from pyflowmap.trigflow import TrigFlowConsistency

CONSISTENCY_MODELS = (EDMConsistency, TrigFlowConsistency)


def default_samplers(model) -> tuple[str, ...]:
    """What a model is sampled with: consistency models by re-noising, flow maps by jumps."""
    return ("consistency",) if isinstance(model, CONSISTENCY_MODELS) else ("map",)


@torch.no_grad()
def generate(model, sampler: str, steps: int, n: int, shape, seed: int = 0, device="cpu",
             chunk: int = 500, labels: torch.Tensor | None = None, guidance: float | None = None,
             w: float | None = None) -> torch.Tensor:
    """``n`` images ``[n, *shape]`` from ``sampler`` with ``steps`` network calls per image
    (Euler ODE: ``steps`` velocity calls). The same ``seed`` gives the same starting noise for
    every sampler and step count, so grids line up. Returns CPU float32.

    A conditional model: ``labels`` ``[n]``, the class of each image (None: the null class,
    i.e. the unconditional model); ``guidance``: classifier-free guidance at sampling (each
    network call on the doubled batch [c; null]); ``w``: the guidance scale as the network's
    input (a model trained with ``guidance_max``). Guided calls cost twice the compute."""
    name = sampler_name(sampler)
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
            raise ValueError(f"labels must be a tensor [n={n}], got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        labels = labels.to(device)
    is_cm = isinstance(model, CONSISTENCY_MODELS)
    if is_cm != (name == "consistency"):
        raise ValueError(f"sampler {sampler!r} does not fit a {type(model).__name__}")
    # the starting noise comes from its own generator, so it is the same for every sampler and
    # step count whatever the re-noising draws
    z_all = torch.randn((n, *shape), generator=torch.Generator(device=device).manual_seed(seed), device=device)
    g_renoise = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for i in range(0, n, chunk):
        z = z_all[i:i + chunk]
        c = None if labels is None else labels[i:i + chunk]
        x = draw(model, z, sampler, steps, generator=g_renoise, c=c, guidance=guidance, w=w)
        out.append(x.float().cpu())
    return torch.cat(out)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2,
                    pad: int = 1) -> Path:
    """A PNG grid of ``[N, C, H, W]`` images in [-1, 1] (clipped), ``nrow`` per row (default a
    square), each pixel ``scale`` x ``scale``. Needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("PNG grids need Pillow: pip install 'pyflowmap[images]'") from e
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid: need [N, 1 or 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("save_image_grid: images contain NaN or inf")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[k]
    arr = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def class_grid(images: torch.Tensor, num_classes: int, cols: int = 8) -> tuple[torch.Tensor, int]:
    """The images of a balanced draw (image i of class ``i % num_classes``) reordered one class
    per row, ``cols`` per row (fewer when there are fewer): ``(images, nrow)``."""
    n = images.shape[0]
    rows = min(num_classes, n)
    cols = max(1, min(cols, n // num_classes))
    idx = [k + j * num_classes for k in range(rows) for j in range(cols)]
    return images[idx], cols


def evaluate_model(model: FlowMap | EDMConsistency, evaluator: ImageEvaluator, steps=(1, 2, 4, 8),
                   samplers=None, n: int = 2000, seed: int = 0, device="cpu", grid_dir: str | Path | None = None,
                   grid_n: int = 64, name: str = "samples", guidance=(None,), grid_cols: int = 8) -> list[dict]:
    """Score ``model`` at every (sampler, steps): rows ``{"sampler", "steps", "cfd",
    "label_entropy", "confidence", "n", "sample_seconds"}``. With ``grid_dir`` also writes
    ``{name}-{sampler}-{k}step.png`` (the first ``grid_n`` samples).

    A class-conditional model is sampled on balanced requested labels (image i of class
    ``i % K``) at every (sampler, guidance, steps), ``guidance`` being the sampling guidance
    scales (None: the conditional model alone): classifier-free guidance from the doubled
    batch, or for a model that takes the guidance scale as an input (trained with
    ``guidance_max``) that input. Its rows add ``"guidance"``, ``"guidance_as"`` ("sampling" or
    "input") and ``"accuracy"`` (the classifier's argmax equal to the requested label); its
    grids show one class per row, ``grid_cols`` per class, named
    ``{name}-{sampler}-cfg{g}-{k}step.png`` for a guidance scale g."""
    samplers = samplers or default_samplers(model)
    if guidance is None or isinstance(guidance, (int, float)):
        guidance = (guidance,)
    guidance = tuple(cond_.check_guidance("guidance", g) for g in guidance)
    k_classes = cond_.num_classes(model)
    if k_classes is not None:
        return _evaluate_conditional(model, evaluator, steps, samplers, n, seed, device, grid_dir, name, guidance,
                                     k_classes, grid_cols)
    if any(g is not None for g in guidance):
        raise ValueError("guidance (classifier-free guidance at sampling) needs a class-conditional model; "
                         f"this {type(model).__name__} is unconditional")
    rows = []
    for sampler in samplers:
        for k in steps:
            t0 = time.perf_counter()
            x = generate(model, sampler, k, n, evaluator.shape, seed=seed, device=device)
            secs = time.perf_counter() - t0
            rows.append({"sampler": sampler, "steps": int(k), **evaluator(x), "sample_seconds": secs})
            if grid_dir is not None:
                save_image_grid(x[:grid_n], Path(grid_dir) / f"{name}-{sampler}-{k}step.png")
    return rows


def _evaluate_conditional(model, evaluator, steps, samplers, n, seed, device, grid_dir, name, guidance, k_classes,
                          grid_cols) -> list[dict]:
    labels = torch.arange(n) % k_classes
    as_input = cond_.takes_guidance(model)
    rows = []
    for sampler in samplers:
        for g in guidance:
            kw = {"w": g} if as_input else {"guidance": g}
            for k in steps:
                t0 = time.perf_counter()
                x = generate(model, sampler, k, n, evaluator.shape, seed=seed, device=device, labels=labels, **kw)
                secs = time.perf_counter() - t0
                rows.append({"sampler": sampler, "steps": int(k), "guidance": g,
                             "guidance_as": "input" if as_input else "sampling", **evaluator(x, labels),
                             "sample_seconds": secs})
                if grid_dir is not None:
                    tag = "" if g is None else f"cfg{g:g}-"
                    grid, nrow = class_grid(x, k_classes, grid_cols)
                    save_image_grid(grid, Path(grid_dir) / f"{name}-{sampler}-{tag}{k}step.png", nrow=nrow)
    return rows
