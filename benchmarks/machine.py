"""The machine a benchmark ran on, for every table: CPU model, core count, the SIMD / matrix
flags that decide which kernels win here (AVX2, AVX-512F, AVX512-BF16, AMX), the GPU if any,
torch and pyflowmap's build.

    python benchmarks/machine.py        # prints machine_line()
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import torch

import pyflowmap

# /proc/cpuinfo flag -> the name tables print
FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX512-BF16",
         "amx_bf16": "AMX-BF16", "amx_tile": "AMX-TILE"}


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) from the text of /proc/cpuinfo or of ``lscpu`` (first CPU listed)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model"):
            model = value.strip() or None
        elif not flags and key in ("flags", "features"):  # x86 / arm spelling
            flags = set(value.split())
    return model, flags


def _cpu_text() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        if parse_cpuinfo(text)[0]:
            return text
    except OSError:
        text = ""
    try:  # no model name there (some ARM kernels): ask lscpu
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout or text
    except (OSError, subprocess.SubprocessError):
        return text


@functools.lru_cache(maxsize=1)
def _machine_info() -> dict:
    model, flags = parse_cpuinfo(_cpu_text())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": {name: flag in flags for flag, name in FLAGS.items()},
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "build": {k: str(v) for k, v in pyflowmap.build_info().items()},
    }


def machine_info() -> dict:
    """The machine as a JSON-ready dict (a fresh copy; read once per process)."""
    info = _machine_info()
    return {**info, "cpu_flags": dict(info["cpu_flags"]), "build": dict(info["build"])}


def machine_line(info: dict | None = None) -> str:
    """One line for the top of a table, from ``info`` (e.g. a benchmark's stored extra_info
    'machine') or from this machine."""
    m = info or machine_info()
    flags = m.get("cpu_flags", {})
    amx = [n for n in ("AMX-BF16", "AMX-TILE") if flags.get(n)]
    simd = [n for n in ("AVX2", "AVX-512F", "AVX512-BF16") if flags.get(n)]
    cpu = (f"{m.get('cpu_model', '?')}, {m.get('cpus_usable', m.get('cpu_count', '?'))} cpus "
           f"(torch threads {m.get('torch_threads', '?')}), {' '.join(simd) or 'no AVX2'}, "
           f"{'AMX: ' + ' '.join(amx) if amx else 'no AMX'}")
    gpu = f"{m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else "no GPU"
    build = ", ".join(f"{k}={v}" for k, v in m.get("build", {}).items())
    return f"machine: {cpu}; {gpu}; torch {m.get('torch', '?')}, Python {m.get('python', '?')}; pyflowmap build: {build}"


if __name__ == "__main__":
    print(machine_line())
