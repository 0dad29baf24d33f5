"""Peak host memory of one LSD training step per variant, each in a fresh process.

    python benchmarks/peak_memory.py            # prints a markdown table

The figure is the growth of the process's peak resident set (ru_maxrss) over three steps,
after model, optimizer and data were built: activations, tangents and gradients of one step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
import pyflowmap as pf
from test_bench_cpu_dual import lsd_step
variant, eta = {variant!r}, {eta!r}
step = lsd_step("dual" if variant in ("fused", "reference") else variant, eta)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with pf.nn.reference_ops(variant == "reference"):
    for _ in range(3):
        step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"variant": variant, "eta": eta, "peak_mb": (after - before) / 1024}}))
"""


def measure(variant: str, eta: float) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), variant=variant, eta=eta)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    rows = [measure(v, eta) for eta in (0.75, 0.0) for v in ("fused", "jvp", "reference", "fm-step")
            if not (v == "fm-step" and eta == 0.0)]
    print("| variant | diag fraction | peak step memory (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['eta']} | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
