"""Turn a pytest-benchmark JSON into markdown: the machine line first, then one table per
comparison group with, per variant, the median per call, the median of the paired per-round
ratios against the baseline (and their IQR), effective bandwidth and TFLOP/s where bytes /
flops were recorded, and peak memory.

    python benchmarks/report.py runs/bench.json [--baseline two-primal]

Groups measured by the interleaved harness (benchmarks/harness.py) store their per-round
samples, so ``--baseline`` re-bases every group that has that variant. Older JSONs (one
pytest-benchmark entry per variant, timed block by block) still print, with ratios of medians.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from harness import summarize
from machine import machine_line


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _row(variant: str, median: float, info: dict, ratio: str, spread: str) -> str:
    gbs = f"{info['bytes'] / median / 1e9:.1f}" if "bytes" in info else "-"
    tfs = f"{info['flops'] / median / 1e12:.3g}" if "flops" in info else "-"
    peak = f"{info['peak_mb']:.0f}" if info.get("peak_mb") is not None else "-"
    return f"| {variant} | {_time(median)} | {ratio} | {spread} | {gbs} | {tfs} | {peak} |"


def _header(group: str, baseline: str, ratio: str = "median of paired ratios") -> str:
    return (f"| {group} | median / call | vs {baseline} ({ratio}) | ratio IQR | GB/s | TFLOP/s | peak MB |\n"
            "|---|---|---|---|---|---|---|")


def group_table(group: str, extra: dict, baseline: str | None = None) -> str:
    """Markdown for one interleaved group (``extra`` = the benchmark's extra_info)."""
    variants = extra["variants"]
    base = baseline if baseline in variants else extra.get("baseline")
    rows = summarize({v: r["samples"] for v, r in variants.items()}, base if base in variants else None)
    lines = [f"{group}: {extra.get('rounds')} interleaved rounds x {extra.get('inner')} calls, device {extra.get('device')}",
             "", _header(group, base)]
    for variant, row in rows.items():
        info = variants[variant]
        ratio = f"{row['ratio_median']:.2f}x" if "ratio_median" in row else "-"
        spread = (f"{row['ratio_iqr'][0]:.2f}-{row['ratio_iqr'][1]:.2f}" if "ratio_iqr" in row else "-")
        lines.append(_row(variant, row["median"], info, ratio, spread))
    for variant, why in extra.get("skipped", {}).items():
        lines.append(f"| {variant} | skipped: {why} | | | | | |")
    return "\n".join(lines)


def _legacy_tables(entries: list, baseline: str) -> list[str]:
    groups = defaultdict(list)
    for b in entries:
        median = b["stats"]["median"] / b["extra_info"].get("inner", 1)
        groups[b["group"]].append((b["params"].get("variant", b["name"]), median, b["extra_info"]))
    out = []
    for group, rows in groups.items():
        base = dict((v, m) for v, m, _ in rows).get(baseline)
        lines = [f"{group}: timed block by block (not interleaved); ratios of medians", "", _header(group, baseline, "ratio of medians")]
        lines += [_row(v, m, info, f"{m / base:.2f}x" if base else "-", "-") for v, m, info in rows]
        out.append("\n".join(lines))
    return out


def render(data: dict, baseline: str | None = None) -> str:
    entries = data["benchmarks"]
    interleaved = [b for b in entries if b.get("extra_info", {}).get("interleaved")]
    machines = [b["extra_info"]["machine"] for b in interleaved if "machine" in b["extra_info"]]
    if machines:
        top = machines[0]
        head = machine_line(top)
    else:  # an older JSON: pytest-benchmark's own record of the machine
        m = data.get("machine_info", {})
        top, head = None, (f"machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cpus "
                           "(flags not recorded)")
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    parts = [head, f"commit {commit}; {data.get('datetime', '')}"]
    for b in interleaved:
        extra = b["extra_info"]
        table = group_table(b.get("group") or b["name"], extra, baseline)
        if extra.get("machine") not in (None, top):  # a merged JSON from another machine
            table = machine_line(extra["machine"]) + "\n" + table
        parts.append(table)
    legacy = [b for b in entries if b not in interleaved]
    parts += _legacy_tables(legacy, baseline or "fused") if legacy else []
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--baseline", default=None, help="re-base ratios on this variant (default: each group's own)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        print(render(json.load(f), args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
