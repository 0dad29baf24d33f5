"""A PNG of a run's training curves: each loss part (flow matching, distillation, ...) and the
total on a log scale, the gradient norm and the learning rate below (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from pyflowmap._figures import pyplot, save_png


def plot_training(history: list[dict], path: str | Path, parts=(), title: str = "") -> Path:
    """``history``: the trainer's logged rows (``step``, ``loss``, one key per part, ``lr``,
    ``grad_norm``); ``parts``: the part names to draw beside the total."""
    plt = pyplot()
    if not history:
        raise ValueError("no logged steps to plot (train for at least log_every steps)")
    steps = [r["step"] for r in history]
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(6.4, 6.4), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.2, 1]})
    plotted = []
    for key in ("loss", *parts):
        ys = [r.get(key) for r in history]
        if all(isinstance(y, (int, float)) for y in ys):
            plotted += [y for y in ys if y > 0]
            top.plot(steps, ys, label={"loss": "total", "fm": "flow matching (diagonal)",
                                        "distill": "distillation (off-diagonal)"}.get(key, key),
                     lw=1.6 if key == "loss" else 1.1)
    top.set_yscale("log")
    if len(plotted) > 20:  # a part that starts at ~0 (distillation of the initial map) would squash the rest
        top.set_ylim(bottom=0.5 * sorted(plotted)[len(plotted) // 100])
    top.set_ylabel("loss")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    for key in [k for k in history[-1] if k.startswith("grad_norm")]:
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        mid.plot(*zip(*pts), label=key.replace("grad_norm_", "grad norm, "), lw=1.0)
    mid.set_yscale("log")
    mid.set_ylabel("grad norm")
    mid.legend(fontsize=7)
    mid.grid(alpha=0.3)
    low.plot(steps, [r.get("lr", float("nan")) for r in history], color="gray", lw=1.0)
    low.set_ylabel("lr")
    low.set_xlabel("step")
    low.grid(alpha=0.3)
    if title:
        top.set_title(title, fontsize=10)
    return save_png(fig, path)
