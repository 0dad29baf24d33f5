"""Atomic checkpoints: a crash mid-write never leaves a truncated or half-new file behind, and
a file corrupted after it was written is refused on load (a digest of every tensor and value is
stored in it). Loading never executes pickled code (``weights_only=True``)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

DIGEST = "sha256"  # the key of the digest in a checkpoint's state


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as written: truncated, corrupt or not a checkpoint."""


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and _disk_full(e, path.parent):
            # torch's zip writer reports a full disk as "unexpected pos ..."
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} "
                                        f"({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free); "
                                        "the previous file is kept") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _disk_full(e: BaseException, directory: Path) -> bool:
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain):
        return True
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def digest(state) -> str:
    """sha256 over every tensor (dtype, shape, bytes) and plain value of a nested state, in a
    fixed order: what :func:`load_checkpoint` compares against the stored digest."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                visit(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    visit(state)
    return h.hexdigest()


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` atomically, with the digest of its contents."""
    return atomic_write(path, lambda f: torch.save({**state, DIGEST: digest(state)}, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only),
    verified against its digest. Raises :class:`CheckpointError` naming the file when it is
    truncated, corrupt, or not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise CheckpointError(f"{path} is not a regular file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: never do that here
        raise CheckpointError(f"{path} is not a readable pyflowmap checkpoint (truncated or corrupt: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a pyflowmap checkpoint")
    stored = state.pop(DIGEST, None)
    # checkpoints written before digests existed load unverified
    if stored is not None and stored != digest(state):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the digest written with them "
                              "(a damaged disk or copy); resume from another copy or start over")
    return state


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
