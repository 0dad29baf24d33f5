"""Sampling and scoring image runs: flow-map jumps, the Euler ODE of the diagonal velocity and
the multistep consistency sampler, each at several step counts, scored by the classifier
Frechet distance, with PNG sample grids."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pyflowmap.consistency import EDMConsistency
from pyflowmap.flowmap import FlowMap
from pyflowmap.images.metrics import ImageEvaluator
from pyflowmap.sampling import draw, sampler_name


def default_samplers(model) -> tuple[str, ...]:
    """What a model is sampled with: consistency models by re-noising, flow maps by jumps."""
    return ("consistency",) if isinstance(model, EDMConsistency) else ("map",)


@torch.no_grad()
def generate(model, sampler: str, steps: int, n: int, shape, seed: int = 0, device="cpu",
             chunk: int = 500) -> torch.Tensor:
    """``n`` images ``[n, *shape]`` from ``sampler`` with ``steps`` network calls per image
    (Euler ODE: ``steps`` velocity calls). The same ``seed`` gives the same starting noise for
    every sampler and step count, so grids line up. Returns CPU float32."""
    name = sampler_name(sampler)
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    is_cm = isinstance(model, EDMConsistency)
    if is_cm != (name == "consistency"):
        raise ValueError(f"sampler {sampler!r} does not fit a {type(model).__name__}")
    # the starting noise comes from its own generator, so it is the same for every sampler and
    # step count whatever the re-noising draws
    z_all = torch.randn((n, *shape), generator=torch.Generator(device=device).manual_seed(seed), device=device)
    g_renoise = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for i in range(0, n, chunk):
        z = z_all[i:i + chunk]
        x = draw(model, z, sampler, steps, generator=g_renoise)
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


def evaluate_model(model: FlowMap | EDMConsistency, evaluator: ImageEvaluator, steps=(1, 2, 4, 8),
                   samplers=None, n: int = 2000, seed: int = 0, device="cpu", grid_dir: str | Path | None = None,
                   grid_n: int = 64, name: str = "samples") -> list[dict]:
    """Score ``model`` at every (sampler, steps): rows ``{"sampler", "steps", "cfd",
    "label_entropy", "confidence", "n", "sample_seconds"}``. With ``grid_dir`` also writes
    ``{name}-{sampler}-{k}step.png`` (the first ``grid_n`` samples)."""
    samplers = samplers or default_samplers(model)
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
