"""PNG figures of 2D samples (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from pyflowmap._figures import pyplot, save_png


def plot_sample_grid(samples: dict, path: str | Path, lim: float = 4.5, bins: int = 200, title: str = "") -> Path:
    """2D histograms: one row per sampler, the data first, then each step count.

    ``samples`` maps ``(sampler, steps)`` to ``[N, 2]`` tensors and ``("data", 0)`` to data.
    """
    plt = pyplot()
    data = samples.get(("data", 0))
    samplers = [s for s in dict.fromkeys(k[0] for k in samples) if s != "data"]
    steps = sorted({k[1] for k in samples if k[0] != "data"})
    ncols = len(steps) + (data is not None)
    fig, axes = plt.subplots(len(samplers), ncols, figsize=(2.4 * ncols, 2.5 * len(samplers)), squeeze=False)
    names = {"map": "flow map", "euler": "ODE Euler", "heun": "ODE Heun"}
    for r, sampler in enumerate(samplers):
        panels = ([("data", data)] if data is not None else []) + [
            (f"{names.get(sampler, sampler)}, {k} step{'s' if k > 1 else ''}", samples.get((sampler, k))) for k in steps]
        for c, (label, x) in enumerate(panels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
            if x is None:
                ax.text(0.5, 0.5, "non-finite", ha="center", va="center", transform=ax.transAxes)
                continue
            x = x.float().cpu().numpy()
            ax.hist2d(x[:, 0], x[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]], cmap="magma")
            ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)
