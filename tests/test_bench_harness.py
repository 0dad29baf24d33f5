"""The interleaved benchmark harness (benchmarks/harness.py), its report and the machine line,
on fake clocks and synthetic timings: no real benchmarking, well under a second."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _costed(clock, costs, drift, log):
    """Variants that advance ``clock`` by cost x drift[round]; ``log`` records the call order.
    The round is read from the log (one call per variant per round, inner=1)."""
    n = len(costs)

    def make(name):
        def fn():
            clock.now += costs[name] * drift[len(log) // n]
            log.append(name)
        return fn

    return {name: make(name) for name in costs}


class FakeBenchmark:
    """What compare() uses of pytest-benchmark's fixture."""

    def __init__(self):
        self.extra_info, self.group, self.calls = {}, "fake group", []

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        self.calls.append((rounds, iterations, warmup_rounds))
        for _ in range(rounds):
            target()


def test_rounds_interleave_and_rotate():
    log = []
    h = harness.Interleaved({k: (lambda k=k: log.append(k)) for k in "ABC"})
    for _ in range(4):
        h.round()
    assert "".join(log) == "ABC" "BCA" "CAB" "ABC"
    assert h.orders == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert all(len(s) == 4 for s in h.samples.values())


def test_no_rotation_keeps_the_order():
    log = []
    h = harness.Interleaved({k: (lambda k=k: log.append(k)) for k in "AB"}, rotate=False)
    h.round(), h.round(), h.round()
    assert "".join(log) == "ABABAB"


def test_warmup_is_untimed_and_inner_divides():
    clock, log = FakeClock(), []
    h = harness.Interleaved(_costed(clock, {"A": 1.0, "B": 3.0}, [1.0] * 10, log), inner=2, timer=clock)
    h.warmup()
    assert log == ["A", "A", "B", "B"] and h.samples == {"A": [], "B": []} and h.orders == []
    h.round()
    assert h.samples == {"A": [1.0], "B": [3.0]}  # seconds per call, not per inner loop


def test_sync_brackets_every_sample():
    events = []
    h = harness.Interleaved({"A": lambda: events.append("A")}, inner=3, sync=lambda: events.append("sync"))
    h.round()
    assert events == ["sync", "A", "A", "A", "sync"]


def test_paired_ratio_median_and_iqr_on_synthetic_samples():
    samples = {"base": [1.0, 2.0, 1.0, 4.0, 1.0], "x": [1.0, 2.4, 1.5, 8.0, 1.1]}  # ratios 1, 1.2, 1.5, 2, 1.1
    rows = harness.summarize(samples, "base")
    assert rows["x"]["ratio_median"] == pytest.approx(1.2)
    assert rows["x"]["ratio_iqr"] == pytest.approx([1.1, 1.5])
    assert rows["x"]["median"] == pytest.approx(1.5)
    assert rows["base"]["ratio_median"] == 1.0 and rows["base"]["ratio_iqr"] == [1.0, 1.0]
    # the paired median differs from the ratio of medians (1.5 / 1.0) on purpose
    assert rows["x"]["median"] / rows["base"]["median"] == pytest.approx(1.5)


def test_drift_within_rounds_cancels_in_the_ratio():
    clock, log = FakeClock(), []
    drift = [1.0, 3.0, 0.5, 2.0, 1.5, 4.0]  # the machine's speed, changing between rounds
    h = harness.Interleaved(_costed(clock, {"fused": 2.0, "jvp": 3.0, "floor": 1.0}, drift, log), timer=clock)
    for _ in drift:
        h.round()
    rows = h.summary("fused")
    assert h.samples["jvp"] == pytest.approx([3.0 * d for d in drift])
    assert rows["jvp"]["ratio_median"] == pytest.approx(1.5) and rows["jvp"]["ratio_iqr"] == pytest.approx([1.5, 1.5])
    assert rows["floor"]["ratio_median"] == pytest.approx(0.5)
    assert rows["jvp"]["iqr"] > 1.0  # the raw times did drift


def test_block_timing_would_not_cancel_the_drift():
    """The failure the harness exists for: the same costs timed block by block under a drift
    between blocks give a wrong ratio of medians."""
    first_block, second_block = [1.0] * 5, [2.0] * 5  # the machine slows down halfway
    samples = {"fused": [2.0 * d for d in first_block], "jvp": [3.0 * d for d in second_block]}
    ratio_of_medians = harness.summarize(samples, "fused")["jvp"]["ratio_median"]
    assert ratio_of_medians == pytest.approx(3.0)  # instead of the true 1.5


def test_compare_stores_a_json_ready_group(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(harness, "RESULTS", [])
    fns = _costed(clock, {"fused": 2e-3, "eager": 4e-3}, [1.0] * 20, log)
    bm = FakeBenchmark()
    rows = harness.compare(bm, fns, "cpu", inner=1, rounds=4, bytes=8e6, info={"eager": {"flops": 1e9}},
                           skipped={"compile": "not here"}, timer=clock)
    assert bm.calls == [(4, 1, 0)]
    assert len(log) == 2 + 2 * 4  # one warm-up call each, then 4 rounds
    e = bm.extra_info
    assert e["interleaved"] == 1 and e["baseline"] == "fused" and e["rounds"] == 4 and e["inner"] == 1
    assert e["orders"] == [["fused", "eager"], ["eager", "fused"]] * 2
    assert e["variants"]["eager"]["ratio_median"] == pytest.approx(2.0)
    assert e["variants"]["eager"]["flops"] == 1e9 and e["variants"]["fused"]["bytes"] == 8e6
    assert e["skipped"] == {"compile": "not here"} and e["machine"]["cpu_model"]
    assert rows is e["variants"] and harness.RESULTS[0][0] == "fake group"
    json.dumps(e)  # --benchmark-json must be able to write it

    data = {"benchmarks": [{"name": "t", "group": "fake group", "extra_info": e, "stats": {}, "params": {}}]}
    md = report.render(data)
    assert md.splitlines()[0] == machine.machine_line(e["machine"])
    assert "| eager | 4.00 ms | 2.00x | 2.00-2.00 | 2.0 | 0.25 | - |" in md  # 8 MB / 4 ms, 1 GFLOP / 4 ms
    assert "| compile | skipped: not here |" in md
    assert "| fused | 2.00 ms | 0.50x |" in report.render(data, baseline="eager")  # re-based from the samples


def test_parse_cpuinfo_flags():
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert machine.parse_cpuinfo(text) == ("Intel(R) Xeon(R) Platinum 8480+",
                                           {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    lscpu = "Architecture: x86_64\nModel name:   AMD EPYC\nFlags:  fpu avx2\n"
    assert machine.parse_cpuinfo(lscpu) == ("AMD EPYC", {"fpu", "avx2"})


def test_machine_info_keys_and_line():
    info = machine.machine_info()
    assert {"cpu_model", "cpu_count", "cpus_usable", "torch_threads", "cpu_flags", "gpu", "cuda", "torch",
            "python", "build"} <= set(info)
    assert set(info["cpu_flags"]) == {"AVX2", "AVX-512F", "AVX512-BF16", "AMX-BF16", "AMX-TILE"}
    assert info["cpu_count"] >= 1 and isinstance(info["build"], dict)
    info["cpu_flags"]["AVX2"] = "mutated"
    assert machine.machine_info()["cpu_flags"]["AVX2"] in (True, False)  # callers get a copy
    fake = {"cpu_model": "Xeon X", "cpus_usable": 2, "torch_threads": 2, "torch": "2.13.0+cpu", "python": "3.11",
            "cpu_flags": {"AVX2": True, "AVX-512F": True, "AVX512-BF16": False, "AMX-BF16": True, "AMX-TILE": True},
            "gpu": None, "build": {"cpu": "True", "cuda": "False"}}
    assert machine.machine_line(fake) == ("machine: Xeon X, 2 cpus (torch threads 2), AVX2 AVX-512F, AMX: AMX-BF16 "
                                          "AMX-TILE; no GPU; torch 2.13.0+cpu, Python 3.11; pyflowmap build: "
                                          "cpu=True, cuda=False")
