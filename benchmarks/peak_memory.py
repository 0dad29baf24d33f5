"""Peak host memory of one training step per variant, each in a fresh process.

    python benchmarks/peak_memory.py              # LSD step variants (dual kernels, jvp, twins)
    python benchmarks/peak_memory.py --precision  # fp32 / bf16, dual / jvp, eager / compiled

The figure is the growth of the process's peak resident set (ru_maxrss) over three steps,
after model, optimizer and data were built (and a compiled step compiled): activations,
tangents and gradients of one step.
"""

from __future__ import annotations

import argparse
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

# the paper MLP's step of benchmarks/test_bench_precision.py; the warm-up call compiles a
# compiled variant and is not counted
CHILD_PRECISION = r"""
import json, resource, sys, warnings, torch
warnings.simplefilter("ignore")
sys.path.insert(0, {bench!r})
import pyflowmap as pf
from test_bench_precision import _init, make_step
objective, mode, precision, compiled = {objective!r}, {mode!r}, {precision!r}, {compiled!r}
torch.manual_seed(0)
model = pf.FlowMap(_init(pf.nn.FlowMapMLP(dim=2, hidden=512, depth=4)))
data = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
step = make_step(model, data, objective, mode, precision, compiled=compiled, times=pf.TimeSampler(diag_fraction=0.0))
fn = step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ok = not compiled or not fn.failed
print(json.dumps({{"variant": mode + "-" + precision + ("-compiled" if compiled else ""), "objective": objective,
                   "peak_mb": (after - before) / 1024 if ok else None}}))
"""


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(variant: str, eta: float) -> dict:
    return _child(CHILD.format(bench=str(Path(__file__).parent), variant=variant, eta=eta))


def measure_precision(objective: str, mode: str, precision: str, compiled: bool) -> dict:
    return _child(CHILD_PRECISION.format(bench=str(Path(__file__).parent), objective=objective, mode=mode,
                                         precision=precision, compiled=compiled))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", action="store_true", help="the precision / compile variants of the MLP step")
    p.add_argument("--bf16", action="store_true", help="with --precision: the bf16 variants too (slow on a CPU "
                   "without bf16 units)")
    args = p.parse_args(argv)
    if args.precision:
        precisions = ("fp32", "bf16") if args.bf16 else ("fp32",)
        rows = [measure_precision(o, m, pr, c) for o in ("lsd", "meanflow") for pr in precisions
                for m in ("dual", "jvp") for c in (False, True)]
        print("| objective | variant | peak step memory (MB) |\n|---|---|---|")
        for r in rows:
            mb = "falls back" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            print(f"| {r['objective']} | {r['variant']} | {mb} |")
        return 0
    rows = [measure(v, eta) for eta in (0.75, 0.0) for v in ("fused", "jvp", "reference", "fm-step")
            if not (v == "fm-step" and eta == 0.0)]
    print("| variant | diag fraction | peak step memory (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['eta']} | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
