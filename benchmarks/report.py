"""Turn a pytest-benchmark JSON into a markdown table: median per call, ratio to the first
variant of each group (the fused op), and effective bandwidth and TFLOP/s where bytes / flops were recorded, and peak memory.

    python benchmarks/report.py runs/bench.json [--baseline fused]
"""

import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--baseline", default="fused")
    args = ap.parse_args()
    data = json.load(open(args.json))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        inner = b["extra_info"].get("inner", 1)
        median = b["stats"]["median"] / inner
        variant = b["params"].get("variant", b["name"])
        groups[b["group"]].append((variant, median, b["extra_info"]))
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cpus; "
          f"commit {data.get('commit_info', {}).get('id', '?')[:10]}; {data.get('datetime', '')}")
    for group, rows in groups.items():
        base = dict((v, m) for v, m, _ in rows).get(args.baseline)
        print(f"\n| {group} | median / call | vs {args.baseline} | GB/s | TFLOP/s | peak MB |\n|---|---|---|---|---|---|")
        for variant, median, info in rows:
            ratio = f"{median / base:.2f}x" if base else "-"
            gbs = f"{info['bytes'] / median / 1e9:.1f}" if "bytes" in info else "-"
            unit = f"{median * 1e6:.1f} us" if median < 1e-3 else f"{median * 1e3:.2f} ms"
            tfs = f"{info['flops'] / median / 1e12:.1f}" if "flops" in info else "-"
            peak = f"{info['peak_mb']:.0f}" if "peak_mb" in info else "-"
            print(f"| {variant} | {unit} | {ratio} | {gbs} | {tfs} | {peak} |")


if __name__ == "__main__":
    main()
