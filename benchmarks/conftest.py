"""Shared benchmark setup: the device matrix, the machine in the session header, and the
interleaved tables (benchmarks/harness.py) in the terminal summary."""

import os

import harness
import pytest
import torch
from machine import machine_line
from report import group_table

import pyflowmap

_AVAILABLE = ["cpu"] + (["cuda"] if pyflowmap.has_cuda_kernels() else [])
# PYFLOWMAP_BENCH_DEVICES=cuda restricts the matrix (e.g. to run only CUDA cases under compute-sanitizer)
DEVICES = [d for d in os.environ.get("PYFLOWMAP_BENCH_DEVICES", ",".join(_AVAILABLE)).split(",") if d in _AVAILABLE]


def copy_floor(numel, device="cpu", dtype=torch.float32):
    """A copy of ``numel`` elements into a preallocated buffer: the bytes-moved floor of a
    streaming op (a copy of n elements reads n and writes n)."""
    src = torch.empty(int(numel), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def clone_floor(numel, device="cpu", dtype=torch.float32):
    """The same bytes into a fresh allocation, as an out-of-place op pays for its output."""
    src = torch.empty(int(numel), device=device, dtype=dtype)
    return lambda: src.clone()


def peak_mb(fn, device):
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it, in MiB (None
    off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def pytest_report_header(config):
    return machine_line()


def pytest_terminal_summary(terminalreporter):
    if not harness.RESULTS:
        return
    terminalreporter.section("interleaved comparisons (benchmarks/harness.py)")
    terminalreporter.write_line(machine_line())
    for group, extra in harness.RESULTS:
        terminalreporter.write_line("")
        terminalreporter.write_line(group_table(group, extra))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
