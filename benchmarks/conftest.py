"""Shared benchmark helpers: devices, synchronizing timed loops, byte accounting."""

import os

import pytest
import torch

import pyflowmap

_AVAILABLE = ["cpu"] + (["cuda"] if pyflowmap.has_cuda_kernels() else [])
# PYFLOWMAP_BENCH_DEVICES=cuda restricts the matrix (e.g. to run only CUDA cases under compute-sanitizer)
DEVICES = [d for d in os.environ.get("PYFLOWMAP_BENCH_DEVICES", ",".join(_AVAILABLE)).split(",") if d in _AVAILABLE]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_loop(fn, device, inner: int):
    """A callable running ``fn`` ``inner`` times then synchronizing, so GPU timings measure the
    kernels and not one launch; pytest-benchmark divides nothing, so results record ``inner``."""

    def run():
        for _ in range(inner):
            fn()
        sync(device)

    return run


def bench(benchmark, fn, device, inner=None, **info):
    """Time ``fn`` with pytest-benchmark; per-call seconds = reported time / inner."""
    inner = inner or (50 if torch.device(device).type == "cuda" else 5)
    loop = timed_loop(fn, device, inner)
    loop()  # warm-up (and torch.compile's compilation)
    benchmark.extra_info.update(info, inner=inner, device=str(device),
                                torch=torch.__version__, build=str(pyflowmap.build_info()))
    benchmark.pedantic(loop, rounds=10 if torch.device(device).type == "cuda" else 15, iterations=1, warmup_rounds=1)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
