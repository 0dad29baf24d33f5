"""Evaluation of a trained 2D flow map: samples at several step counts, metrics, a table."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pyflowmap import conditioning as cond_
from pyflowmap.flowmap import FlowMap
from pyflowmap.interpolants import GaussianBase
from pyflowmap.sampling import draw
from pyflowmap.toy2d.config import TrainConfig, build_base, build_model
from pyflowmap.toy2d.data import sample_data, sample_labelled
from pyflowmap.toy2d.metrics import checker_kl, energy_distance
from pyflowmap.training.checkpoint import load_checkpoint
from pyflowmap.trigflow import TrigFlowConsistency

# the subset of pyflowmap.sampling.SAMPLERS that fits a 2D flow map trained without re-noising
SAMPLERS = ("map", "euler", "heun")
ALL_SAMPLERS = SAMPLERS + ("consistency",)  # a TrigFlow consistency model (sct / scd) has this one only


def default_samplers(model) -> tuple[str, ...]:
    return ("consistency",) if isinstance(model, TrigFlowConsistency) else SAMPLERS


def starting_noise(model, base: GaussianBase, n: int, generator=None, device="cpu") -> torch.Tensor:
    """The sampler's input: the flow map's base noise, or N(0, I) for a TrigFlow model (its
    sampler scales by sigma_d itself)."""
    if isinstance(model, TrigFlowConsistency):
        return torch.randn((n, 2), generator=generator, device=device)
    return base.sample((n, 2), generator=generator, device=device)


def _check_samplers(model, samplers) -> tuple[str, ...]:
    samplers = default_samplers(model) if samplers is None else tuple(samplers)
    fits = default_samplers(model)
    bad = [s for s in samplers if s not in fits]
    if bad:
        raise ValueError(f"sampler {bad[0]!r} does not fit a {type(model).__name__}; use {', '.join(fits)}")
    return samplers


def load_model(ckpt: str | Path, use_ema: bool = True, device="cpu") -> tuple[FlowMap, GaussianBase, TrainConfig, dict]:
    """(flow map, base, config, raw state) from a checkpoint file or run directory."""
    state = load_checkpoint(ckpt, map_location=device)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg, state["data_std"])
    model.load_state_dict(state["ema" if use_ema else "model"])
    model.to(device).eval()
    return model, build_base(cfg, state["data_std"]), cfg, state


def nearest_label(x: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The label of each point's nearest reference point (a 1-NN classifier of the labelled toy)."""
    out = [ref_labels[torch.cdist(x[i:i + chunk].float(), ref.float()).argmin(1)] for i in range(0, x.shape[0], chunk)]
    return torch.cat(out) if out else ref_labels[:0]


def evaluate(model: FlowMap, base: GaussianBase, data: str, steps=(1, 2, 4, 8), samplers=None,
             n: int = 65536, seed: int = 0, device="cpu", guidance: float | None = None) -> dict:
    """Metrics per sampler and step count, plus the reference row of exact data samples.

    Returns ``{"reference": {...}, "results": {sampler: {steps: {...}}}, "samples": {...}}``
    where each entry holds ``energy`` (energy distance to fresh data) and, for the checker,
    ``kl`` (:func:`~pyflowmap.metrics.checker_kl` on ``n`` samples). A conditional model is
    sampled for balanced requested labels (sample i gets label i mod K), with classifier-free
    ``guidance`` at sampling when given, and each entry also holds ``accuracy``: the share of
    samples whose nearest labelled data point carries the requested label. ``samplers``
    default: map, euler and heun for a flow map, consistency for a TrigFlow model.
    """
    samplers = _check_samplers(model, samplers)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = starting_noise(model, base, n, generator=g, device=device)
    reference_data = sample_data(data, n, generator=torch.Generator().manual_seed(seed + 1))
    fresh = sample_data(data, n, generator=torch.Generator().manual_seed(seed + 2))
    classes = cond_.num_classes(model)
    labels = None if classes is None else torch.arange(n, device=device) % classes
    if labels is None and guidance is not None:
        raise ValueError("guidance at sampling needs a conditional model")
    if labels is not None:
        ref_x, ref_c = sample_labelled(data, min(n, 20000), generator=torch.Generator().manual_seed(seed + 3))

    def scores(x, requested=None):
        x = x.float().cpu()
        out = {"energy": energy_distance(x, reference_data)}
        if data == "checker":
            out["kl"] = checker_kl(x)
        if requested is not None:
            out["accuracy"] = float((nearest_label(x, ref_x, ref_c) == requested.cpu()).double().mean())
        out["finite"] = bool(torch.isfinite(x).all())
        return out

    fresh_labels = None
    if labels is not None:
        fresh, fresh_labels = sample_labelled(data, n, generator=torch.Generator().manual_seed(seed + 2))
    report = {"n": n, "data": data, "reference": scores(fresh, fresh_labels), "results": {}, "samples": {},
              "guidance": guidance, "conditional": labels is not None}
    for sampler in samplers:
        report["results"][sampler] = {}
        for k in steps:
            t0 = time.perf_counter()
            x = draw(model, noise, sampler, k, c=labels, guidance=guidance)
            elapsed = time.perf_counter() - t0
            if not torch.isfinite(x).all():
                report["results"][sampler][k] = {"finite": False, "seconds": elapsed}
                continue
            report["results"][sampler][k] = {**scores(x, labels), "seconds": elapsed}
            report["samples"][(sampler, k)] = x.cpu()
    report["samples"][("data", 0)] = fresh
    return report


def format_table(report: dict, metric: str | None = None) -> str:
    """A fixed-width text table: one row per sampler, one column per step count."""
    metric = metric or ("kl" if report["data"] == "checker" else "energy")
    better = "higher" if metric == "accuracy" else "lower"
    rows = report["results"]
    steps = sorted({k for r in rows.values() for k in r})
    head = f"{metric + f' ({better} is better)':<26}" + "".join(f"{str(k) + ' step' + ('s' if k > 1 else ''):>10}" for k in steps)
    lines = [head, "-" * len(head)]
    for sampler, r in rows.items():
        label = {"map": "flow map (jumps)", "euler": "ODE Euler (diagonal)", "heun": "ODE Heun (diagonal)",
                 "consistency": "consistency (re-noising)"}.get(sampler, sampler)
        cells = []
        for k in steps:
            v = r.get(k, {}).get(metric)
            cells.append(f"{v:>10.4f}" if v is not None else f"{'nan':>10}")
        lines.append(f"{label:<26}" + "".join(cells))
    ref = report["reference"].get(metric)
    if ref is not None:
        lines.append(f"{'exact data (floor)':<26}{ref:>10.4f}   (same estimator on {report['n']} true samples)")
    return "\n".join(lines)


def to_json(report: dict) -> dict:
    """The report without sample tensors, with string keys (JSON-ready)."""
    return {
        "n": report["n"], "data": report["data"], "reference": report["reference"],
        "conditional": report.get("conditional", False), "guidance": report.get("guidance"),
        "results": {s: {str(k): v for k, v in r.items()} for s, r in report["results"].items()},
    }
