"""Atomic checkpoints: a crash mid-write never leaves a truncated or half-new file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` (atomic on POSIX), then fsync the directory so the rename itself is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def save_weights(state_dict: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a weights-only ``state_dict`` as safetensors, atomically: no pickle, so a shared
    file cannot run code when loaded. ``metadata`` values are stored as strings."""
    try:
        from safetensors.torch import save
    except ImportError as e:
        raise ImportError("save_weights needs safetensors: pip install 'pyflowmap[safetensors]'") from e
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    blob = save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(blob))


def load_weights(path: str | os.PathLike, device="cpu") -> tuple[dict, dict]:
    """(state_dict, metadata) from a file written by :func:`save_weights`."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("load_weights needs safetensors: pip install 'pyflowmap[safetensors]'") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def all_finite(module: torch.nn.Module) -> bool:
    """True when every floating parameter and buffer of ``module`` is finite."""
    tensors = list(module.parameters()) + list(module.buffers())
    # an FSDP2 parameter is checked on this rank's shard (the trainer ANDs over ranks)
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
