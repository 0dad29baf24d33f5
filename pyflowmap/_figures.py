"""How pyflowmap makes a PNG: headless matplotlib (an optional dependency, named with its install
hint when missing) and one save that lays out, creates the folder and frees the figure."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plots need matplotlib: pip install 'pyflowmap[plots]'") from exc
    return plt


def save_png(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
