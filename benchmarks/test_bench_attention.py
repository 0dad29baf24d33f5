"""JVP attention: forward + tangent and the backward through (O, O_dot), side by side in one run.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-json runs/bench_attn.json
    python benchmarks/report.py runs/bench_attn.json

CUDA (bf16, B x H = 8, N = 1k..16k, D = 64 / 128): the fused kernel vs torch.func.jvp over
SDPA's math backend, vs one SDPA flash forward of the same shape, and vs the
jvp-flash-attention package (Triton) when it is importable (scripts/gpu_check.sh installs it
from .whl/). FLOPs: attention forward = 4 N^2 D per head; forward + JVP with all tangents = 3x
that; the backward through O and O_dot counts 2.5x the forward + JVP (the usual flash ratio).
Peak memory of one call is recorded as ``peak_mb``. CPU: the chunked path vs math attention
under torch.func.jvp at N = 2048. Each test is one comparison group, its variants interleaved
round by round (benchmarks/harness.py).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, peak_mb
from harness import compare
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyflowmap import ops

BH = 8
try:  # the public Triton kernel to beat (optional)
    from jvp_flash_attention.jvp_attention import attention as _jfa
except Exception:  # noqa: BLE001  (ImportError, or triton failing to initialise)
    _jfa = None


def _qkv(n, d, dtype, device, grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    ts = [torch.randn(1, BH, n, d, device=device, dtype=dtype, generator=g) for _ in range(6)]
    return [t.requires_grad_(grad) for t in ts]


def _math_jvp(q, k, v, qd, kd, vd):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))


def _run(benchmark, fns, device, flops, skipped):
    """Compare ``fns`` interleaved; peak memory of one call per variant first (a variant out of
    memory is left out of the group, and the group skips if the fused op is)."""
    info = {}
    for name in list(fns):
        try:
            peak = peak_mb(fns[name], device)
        except torch.OutOfMemoryError:
            del fns[name]
            skipped[name] = "out of memory"
            torch.cuda.empty_cache()
            continue
        info[name] = {"flops": flops[name]} | ({"peak_mb": peak} if peak is not None else {})
    if "fused" not in fns:
        pytest.skip("out of memory")
    compare(benchmark, fns, device, inner=5 if torch.device(device).type == "cuda" else 1, info=info, skipped=skipped)


CUDA_N = [1024, 4096, 8192, 16384]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", CUDA_N)
def test_fwd_jvp_cuda(benchmark, n, d):
    q, k, v, qd, kd, vd = _qkv(n, d, torch.bfloat16, "cuda")
    fwd_flops = 4 * n * n * d * BH
    benchmark.group = f"attention fwd+JVP N={n} D={d} bf16 BxH={BH} (cuda)"
    fns = {
        "fused": lambda: ops.jvp_attention(q, k, v, qd, kd, vd),
        "jvp-math-sdpa": lambda: _math_jvp(q, k, v, qd, kd, vd),
        "sdpa-flash-fwd": lambda: F.scaled_dot_product_attention(q, k, v),
        "jvp-flash-attention": lambda: torch.func.jvp(_jfa, (q, k, v), (qd, kd, vd)),
    }
    skipped = {}
    if _jfa is None:
        skipped["jvp-flash-attention"] = "jvp-flash-attention not installed"
    if n > 8192:
        skipped["jvp-math-sdpa"] = "math attention's N x N tangents: skipped above 8k to keep the run short"
    fns = {k_: f for k_, f in fns.items() if k_ not in skipped}
    flops = {name: fwd_flops if name == "sdpa-flash-fwd" else 3 * fwd_flops for name in fns}
    with torch.no_grad():
        _run(benchmark, fns, "cuda", flops, skipped)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", CUDA_N)
def test_fwd_bwd_cuda(benchmark, n, d):
    """Forward + backward (the comparable unit; subtract the forward group for the backward
    alone). fused: loss on O and O_dot, gradients for all six inputs. fused-primal-only: loss on
    O alone (MeanFlow / sCM). math-autograd: the same loss through torch.func.jvp over math SDPA."""
    xs = _qkv(n, d, torch.bfloat16, "cuda", grad=True)
    g1, g2 = torch.randn_like(xs[0]), torch.randn_like(xs[0])
    fwd_flops = 4 * n * n * d * BH
    benchmark.group = f"attention fwd+bwd through O, O_dot N={n} D={d} bf16 BxH={BH} (cuda)"

    def fused():
        o, od = ops.jvp_attention(*xs)
        return torch.autograd.grad((o * g1).sum() + (od * g2).sum(), xs)

    def primal_only():
        o, _ = ops.jvp_attention(*xs)
        return torch.autograd.grad((o * g1).sum(), xs[:3])

    def math():
        o, od = _math_jvp(*xs)
        return torch.autograd.grad((o * g1).sum() + (od * g2).sum(), xs)

    def flash():
        o = F.scaled_dot_product_attention(*xs[:3])
        return torch.autograd.grad((o * g1).sum(), xs[:3])

    fns = {"fused": fused, "fused-primal-only": primal_only, "math-autograd": math, "sdpa-flash-fwd-bwd": flash}
    flops = {"fused": 3.5 * 3 * fwd_flops, "fused-primal-only": 3 * fwd_flops + 2 * fwd_flops,
             "math-autograd": 3.5 * 3 * fwd_flops, "sdpa-flash-fwd-bwd": 3.5 * fwd_flops}
    skipped = {}
    if n > 4096:
        del fns["math-autograd"]
        skipped["math-autograd"] = "math attention's N x N tangents and their gradients: skipped above 4k"
    _run(benchmark, fns, "cuda", flops, skipped)


def test_fwd_jvp_cpu(benchmark):
    n, d = 2048, 64
    q, k, v, qd, kd, vd = (t[:, :2] for t in _qkv(n, d, torch.float32, "cpu"))
    from pyflowmap import reference
    from pyflowmap.reference import math_attention

    fns = {
        "fused": lambda: ops.jvp_attention(q, k, v, qd, kd, vd),
        "jvp-math": lambda: torch.func.jvp(math_attention, (q, k, v), (qd, kd, vd)),
        "reference": lambda: reference.jvp_attention(q, k, v, qd, kd, vd),
    }
    benchmark.group = f"attention fwd+JVP N={n} D={d} fp32 BxH=2 (cpu)"
    with torch.no_grad():
        _run(benchmark, fns, "cpu", dict.fromkeys(fns, 3 * 4 * n * n * d * 2), {})
