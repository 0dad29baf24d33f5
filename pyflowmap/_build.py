"""Loading the compiled extension and reporting what it was built with."""

from __future__ import annotations

import torch

try:
    from pyflowmap import _C  # registers the torch.ops.pyflowmap schemas and kernels
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pyflowmap's compiled extension pyflowmap._C failed to load. Reinstall with "
        "`pip install --no-build-isolation -e .` using the same torch you import "
        f"(torch {torch.__version__}). Original error: {exc}"
    ) from exc


def build_info() -> dict:
    """What this build of pyflowmap contains.

    Keys: ``cpu`` and ``cuda`` (kernels compiled), ``cuda_archs`` (e.g. ``"90a"``),
    ``torch_version`` (the torch compiled against), ``torch_runtime`` (the torch imported now),
    ``cuda_available`` (a device is usable now), ``compiler``, ``openmp``, ``native``.
    """
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled and a CUDA device is visible."""
    return build_info()["cuda_available"]
