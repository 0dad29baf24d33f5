"""Interleaved comparison of benchmark variants, for machines whose speed drifts.

On a shared machine speed moves between blocks of rounds: timing variant A for 15 rounds and
then variant B for 15 rounds puts the drift into the ratio A / B (the same code once gave a dual
MLP forward of 1.49x two primal forwards timed block by block, and 1.03x interleaved). Here the
variants of one comparison group run round by round instead::

    round 0: A B C    round 1: B C A    round 2: C A B    ...

(the order rotates each round, so no variant always runs first or always follows the same
neighbour). Every variant is warmed up first, outside the timed rounds (torch.compile compiles
there). A sample is ``inner`` back-to-back calls followed by a device synchronize on CUDA,
divided by ``inner``: seconds per call. Reported per variant: the median and IQR of its
samples and, against the group's named baseline, the median of the paired per-round ratios
``variant[r] / baseline[r]`` with their IQR. A slowdown that hits a whole round scales both
sides of each ratio and cancels; only drift within one round remains, and the ratio's IQR
shows how much there was.

pytest-benchmark integration (the design of the JSON). One pytest-benchmark test per
comparison group, not per variant: its timed function is one interleaved round, run through
``benchmark.pedantic(rounds=R, iterations=1, warmup_rounds=0)``. So in
``--benchmark-json`` the usual ``stats`` of an entry describe one round of the whole group
(all variants once, ``inner`` calls each): a meaningful total that is comparable across runs
but says nothing per variant. The per-variant figures live in the entry's ``extra_info``:

    extra_info = {
        "interleaved": 1, "baseline": "fused", "rounds": R, "inner": n, "device": "cpu",
        "orders": [["fused", "jvp"], ["jvp", "fused"], ...],      # what ran when
        "variants": {"jvp": {"samples": [s per call, one per round], "median": s, "iqr": s,
                             "ratio_median": x, "ratio_iqr": [q1, q3], "bytes": .., ...}},
        "skipped": {"variant": "why"},                             # left out of this group
        "machine": machine.machine_info(),
        ...group facts (bytes, flops) ...
    }

``benchmarks/report.py`` turns that into one markdown table per group (and can re-base the
ratios on any variant, since the paired samples are stored); the pytest session prints the same
tables in its terminal summary (benchmarks/conftest.py). Rounds: 15 on CPU, 10 on CUDA, or
``PYFLOWMAP_BENCH_ROUNDS``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Mapping

from machine import machine_info

# every group measured in this process, for the pytest terminal summary
RESULTS: list[tuple[str, dict]] = []


def quartiles(xs):
    """(q1, q3) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def paired_ratios(samples: Mapping[str, list[float]], variant: str, baseline: str) -> list[float]:
    """variant[r] / baseline[r] for every round r both ran in."""
    return [a / b for a, b in zip(samples[variant], samples[baseline])]


def summarize(samples: Mapping[str, list[float]], baseline: str | None) -> dict[str, dict]:
    """Per variant: its samples, their median and IQR, and (when ``baseline`` has samples) the
    median and quartiles of the paired per-round ratios against it."""
    out = {}
    for name, xs in samples.items():
        q1, q3 = quartiles(xs)
        row = {"samples": list(xs), "median": statistics.median(xs), "iqr": q3 - q1}
        if baseline in samples and samples[baseline]:
            ratios = paired_ratios(samples, name, baseline)
            row["ratio_median"] = statistics.median(ratios)
            row["ratio_iqr"] = list(quartiles(ratios))
        out[name] = row
    return out


class Interleaved:
    """Times ``variants`` (name -> zero-argument callable) round by round.

    ``timer`` (seconds) and ``sync`` (called after every sample, and before its start) are
    injectable, so tests can drive it with a fake clock.
    """

    def __init__(self, variants: Mapping[str, Callable[[], object]], *, inner: int = 1,
                 rotate: bool = True, sync: Callable[[], None] = lambda: None,
                 timer: Callable[[], float] = time.perf_counter):
        if not variants:
            raise ValueError("nothing to compare")
        self.names = list(variants)
        self.fns = dict(variants)
        self.inner, self.rotate, self.sync, self.timer = inner, rotate, sync, timer
        self.samples: dict[str, list[float]] = {n: [] for n in self.names}
        self.orders: list[list[str]] = []

    def order(self, r: int) -> list[str]:
        """The order of round ``r``: rotated by ``r`` places when ``rotate``."""
        k = r % len(self.names) if self.rotate else 0
        return self.names[k:] + self.names[:k]

    def time_one(self, name: str) -> float:
        """Seconds per call of ``name``: ``inner`` calls, then synchronize."""
        fn = self.fns[name]
        self.sync()
        t0 = self.timer()
        for _ in range(self.inner):
            fn()
        self.sync()
        return (self.timer() - t0) / self.inner

    def warmup(self, rounds: int = 1) -> None:
        """Untimed calls of every variant (compilation, allocator and cache warm-up)."""
        for _ in range(rounds):
            for name in self.names:
                self.time_one(name)

    def round(self) -> None:
        """One timed round: every variant once, in this round's order."""
        order = self.order(len(self.orders))
        self.orders.append(order)
        for name in order:
            self.samples[name].append(self.time_one(name))

    def summary(self, baseline: str | None) -> dict[str, dict]:
        return summarize(self.samples, baseline)


def device_sync(device) -> Callable[[], None]:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def default_rounds(device) -> int:
    env = os.environ.get("PYFLOWMAP_BENCH_ROUNDS")
    if env:
        return max(1, int(env))
    return 10 if str(device).startswith("cuda") else 15


def compare(benchmark, variants: Mapping[str, Callable[[], object]], device, *, baseline: str = "fused",
            inner: int | None = None, rounds: int | None = None, info: Mapping[str, dict] | None = None,
            skipped: Mapping[str, str] | None = None, timer: Callable[[], float] = time.perf_counter,
            **group_info) -> dict[str, dict]:
    """Time ``variants`` interleaved under pytest-benchmark's ``benchmark`` fixture (one group).

    ``info`` holds per-variant facts (e.g. ``{"fused": {"flops": ...}}``), ``group_info`` facts
    shared by the group (e.g. ``bytes=``); ``skipped`` the variants left out and why. Returns
    the per-variant summary also stored in ``benchmark.extra_info["variants"]``.
    """
    inner = inner or (50 if str(device).startswith("cuda") else 5)
    rounds = rounds or default_rounds(device)
    h = Interleaved(variants, inner=inner, sync=device_sync(device), timer=timer)
    h.warmup()
    benchmark.pedantic(h.round, rounds=rounds, iterations=1, warmup_rounds=0)
    rows = h.summary(baseline if baseline in h.names else None)
    for name, row in rows.items():
        row.update(group_info, **(info or {}).get(name, {}))
    benchmark.extra_info.update(
        group_info, interleaved=1, baseline=baseline, rounds=len(h.orders), inner=inner, device=str(device),
        orders=h.orders, variants=rows, skipped=dict(skipped or {}), machine=machine_info())
    RESULTS.append((getattr(benchmark, "group", None) or getattr(benchmark, "name", "?"), dict(benchmark.extra_info)))
    return rows
