"""A run's training metrics where experiment trackers read them: ``train_log.jsonl`` in the run
directory (always: one JSON object per logged step) and TensorBoard event files in
``tensorboard/`` (when the ``tensorboard`` package is installed: ``pip install
'pyflowmap[track]'``). A resumed run first drops what was logged after its checkpoint (a run
killed between a log and a save logged steps that it will train again), so both logs hold each
step once."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from pyflowmap.training.checkpoint import atomic_write

LOG = "train_log.jsonl"
TENSORBOARD = "tensorboard"


def has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class RunLog:
    """Appends logged rows (``{"step": n, "loss": ..., ...}``) from ``start_step`` on."""

    def __init__(self, out_dir: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(out_dir) / LOG
        if self.path.exists():
            keep = [row for row in read_log(out_dir) if row.get("step", start_step + 1) <= start_step]
            atomic_write(self.path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in keep).encode()))
        self._file = self.path.open("a")
        self.writer = None
        if tensorboard and has_tensorboard():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events after the checkpoint's step are hidden from TensorBoard
            self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k.replace("grad_norm_", "grad_norm/") if k.startswith("grad_norm_")
                                           else f"train/{k}", v, row["step"])
            self.writer.flush()

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def read_log(out_dir: str | Path) -> list[dict]:
    """The rows of a run's ``train_log.jsonl`` (a torn last line is left out)."""
    rows = []
    path = Path(out_dir) / LOG
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line (killed mid-write)
        if isinstance(row, dict):
            rows.append(row)
    return rows
