"""A run directory owned by one writer: an exclusive OS lock held for the run's whole life,
start-up checks that it is writable and has room for a checkpoint, and removal of the temp
files of writers that died mid-save."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK = ".lock"


class RunDirectoryBusy(ValueError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock``. The OS releases it when the holder
    exits in any way, ``kill -9`` included, so a stale lock cannot block a later run; the file
    holds the holder's pid, host, start time and command line for the error a second writer
    gets. Re-entrant within a process (a CLI command and the trainer it builds share it)."""

    _held: dict[str, list] = {}  # resolved path -> [fd, count]

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.key = None

    def acquire(self) -> "RunLock":
        if self.key is not None:
            return self
        key = str(prepare_run_dir(self.directory))
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self.key = key
            return self
        path = Path(key) / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirectoryBusy(f"{self.directory} is in use by another run ({holder}); wait for it to finish, "
                                   "or pass another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        RunLock._held[key] = [fd, 1]
        self.key = key
        remove_stale_temp_files(Path(key))  # we hold the lock: no live writer owns them
        return self

    def release(self) -> None:
        key, self.key = self.key, None
        entry = RunLock._held.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[key]
            os.close(entry[0])  # closing the descriptor releases the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def prepare_run_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that files can be written in it; returns its
    resolved path. Fails at start-up, not at the first save hundreds of steps later."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"run directory {d} exists and is not a directory; pass another --out")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run directory {d} is not writable ({e.strerror}); pass another --out") from None
    return d.resolve()


def check_free_space(directory: Path, need_bytes: int) -> None:
    """Room for one more checkpoint beside the current one (it is written next to it, then
    renamed over it)."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise ValueError(f"run directory {directory} has {free / 2**20:.1f} MiB free, a checkpoint needs about "
                         f"{need_bytes / 2**20:.1f} MiB; free some space or pass another --out")


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """The ``.<name>.*.tmp`` files :func:`~pyflowmap.training.checkpoint.atomic_write` leaves
    when its process is killed mid-write (call with the directory's lock held)."""
    removed = []
    for p in directory.glob(".*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
