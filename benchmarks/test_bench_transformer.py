"""Transformers (issue 16): torch.func.jvp over a user's own block under pf.nn.fused_jvp, and
the DiT's derivative modes in LSD / MeanFlow training steps, side by side in one run (CPU).

    mkdir -p runs
    OMP_NUM_THREADS=2 python -m pytest benchmarks/test_bench_transformer.py \
        --benchmark-json runs/bench_transformer.json -q -p no:cacheprovider
    python benchmarks/report.py runs/bench_transformer.json

Group A (N = 256, 1024, 4096): forward + tangent of one user transformer block (width 128,
4 heads, batch 2, fp32; F.scaled_dot_product_attention, nn.LayerNorm, nn.GELU): "fused"
(torch.func.jvp under pf.nn.fused_jvp), "math-jvp" (torch.func.jvp under
sdpa_kernel(SDPBackend.MATH), which does have forward AD on CPU in torch 2.13), "fd" (central
difference, two SDPA forwards), "primal" (one forward). The largest single allocation of one
call (torch.profiler, profile_memory) is stored as ``largest_alloc_mb``. FLOPs: attention
forward 4 N^2 D per head, forward + JVP 3x that; the block's linears 2 B N (12 d^2) per pass.
Groups B / C: one LSD (all off-diagonal) / MeanFlow training step (loss + backward, no
optimizer) of the DiT dit_preset("cpu-small", 32, patch=2) (256 tokens) per derivative mode.
Group D: DiT dual forward + tangent vs two primal forwards, no grad. Each test is one comparison
group, its variants interleaved round by round (benchmarks/harness.py).

CUDA (``PYFLOWMAP_BENCH_DEVICES=cuda``, scripts/gpu_check.sh): group A at DiT-B width (768,
12 heads of 64) in bf16 at N = 1k, 4k, 8k with "primal" = one flash SDPA forward and the peak
CUDA memory of one call as ``peak_mb``; groups B-D on dit_preset("B/2", 32) (256 tokens) in
fp32, batch 32.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, peak_mb
from harness import compare
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import pyflowmap as pf
from pyflowmap.nn.forward_ad import AttentionFn
from pyflowmap.reference import math_attention

WIDTH, HEADS, BATCH = 128, 4, 2
DIT_BATCH = 8  # the batch (section 11 first ran 2 on a shared machine)


class UserBlock(nn.Module):
    """A pre-LN transformer block as users write it: nothing from pyflowmap."""

    def __init__(self, d=WIDTH, heads=HEADS):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


def largest_alloc_mb(fn):
    """The largest single CPU allocation during one call of ``fn``, in MiB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0) / 2**20


CPU = pytest.mark.skipif("cpu" not in DEVICES, reason="PYFLOWMAP_BENCH_DEVICES leaves out the CPU")
CUDA = pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a device")


def _user_block_variants(block, x, xd, h, n, width, heads):
    """The group's variants (fused jvp, math-attention jvp, central difference, one primal
    forward) and their FLOPs: attention forward 4 N^2 D per head, forward + JVP 3x that; the
    block's linears 2 B N (12 d^2) per pass."""
    def fused():
        with pf.nn.fused_jvp():
            return torch.func.jvp(block, (x,), (xd,))

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(block, (x,), (xd,))

    fns = {"fused": fused, "math-jvp": math,
           "fd": lambda: (block(x), (block(x + h * xd) - block(x - h * xd)) / (2 * h)),
           "primal": lambda: block(x)}
    attn = 4 * n * n * (width // heads) * heads * BATCH
    lin = 2 * BATCH * n * 12 * width * width
    flops = {"fused": 3 * (attn + lin), "math-jvp": 3 * (attn + lin), "fd": 3 * (attn + lin), "primal": attn + lin}
    return fns, flops


@CPU
@pytest.mark.parametrize("n", [256, 1024, 4096])
def test_user_block_fwd_jvp(benchmark, n):
    torch.manual_seed(0)
    block = UserBlock()
    x, xd = torch.randn(BATCH, n, WIDTH), torch.randn(BATCH, n, WIDTH)
    fns, flops = _user_block_variants(block, x, xd, 1e-3, n, WIDTH, HEADS)
    with torch.no_grad():
        info = {k: {"flops": flops[k], "largest_alloc_mb": largest_alloc_mb(f)} for k, f in fns.items()}
        benchmark.group = f"user block fwd+JVP N={n} width {WIDTH} {HEADS} heads batch {BATCH} fp32 (cpu)"
        compare(benchmark, fns, "cpu", inner=1, rounds=5 if n <= 1024 else 3, info=info, tokens=n)


@CUDA
@pytest.mark.parametrize("n", [1024, 4096, 8192])
def test_user_block_fwd_jvp_cuda(benchmark, n):
    width, heads, dtype = 768, 12, torch.bfloat16
    torch.manual_seed(0)
    block = UserBlock(width, heads).to("cuda", dtype)
    x = torch.randn(BATCH, n, width, device="cuda", dtype=dtype)
    xd = torch.randn_like(x)
    # bf16: a larger step, the fd variant is timed, not checked
    fns, flops = _user_block_variants(block, x, xd, 1e-2, n, width, heads)
    info, skipped = {}, {}
    with torch.no_grad():
        for name in list(fns):
            try:
                info[name] = {"flops": flops[name], "peak_mb": peak_mb(fns[name], "cuda")}
            except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as e:
                # left out, with the reason in the JSON: one failing variant must not cost the group
                skipped[name] = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:300]
                del fns[name]
                torch.cuda.empty_cache()
        benchmark.group = f"user block fwd+JVP N={n} width {width} {heads} heads batch {BATCH} bf16 (cuda)"
        compare(benchmark, fns, "cuda", inner=3, rounds=5, info=info, skipped=skipped, tokens=n)


@contextlib.contextmanager
def math_attention_in_dit():
    """AttentionFn.apply -> math attention (PyTorch's own forward-AD through softmax(QK^T)V)."""
    AttentionFn.apply = staticmethod(lambda q, k, v, causal: math_attention(q, k, v, causal))
    try:
        yield
    finally:
        del AttentionFn.apply  # back to the inherited torch.autograd.Function.apply


def _dit(preset="cpu-small", device="cpu"):
    torch.manual_seed(0)
    kw = {"patch": 2} if preset == "cpu-small" else {}
    net = pf.nn.dit_preset(preset, 32, channels=1, **kw).to(device)  # 16 x 16 = 256 tokens
    with torch.no_grad():  # leave AdaLN-Zero's identity start: every layer does real work
        for p in net.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


def _step(name, derivative, net, x1, math=False, **kw):
    objective = pf.make_objective(name, derivative=derivative, **kw)
    fm, g = pf.FlowMap(net), torch.Generator(device=x1.device)

    def step():
        g.manual_seed(1)
        with math_attention_in_dit() if math else contextlib.nullcontext():
            out = objective(fm, x1, generator=g)
            net.zero_grad(set_to_none=True)
            out.loss.backward()

    return step


def _dit_step_group(benchmark, objective, preset, device, batch):
    net = _dit(preset, device)
    x1 = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    kw = {"times": pf.TimeSampler(diag_fraction=0.0)} if objective == "lsd" else {}
    fns = {"fused": _step(objective, "dual", net, x1, **kw),
           "jvp-math": _step(objective, pf.JVP(fused=False), net, x1, math=True, **kw),
           "jvp-fused": _step(objective, "jvp", net, x1, **kw),
           "fd": _step(objective, "fd", net, x1, **kw)}
    label = "LSD (diag fraction 0)" if objective == "lsd" else "MeanFlow (diag fraction 0.75)"
    name = "cpu-small/2" if preset == "cpu-small" else preset
    benchmark.group = f"DiT {name} {label} step, 256 tokens, batch {batch} ({device})"
    cuda = device == "cuda"
    compare(benchmark, fns, device, inner=3 if cuda else 1, rounds=5 if cuda else 3, tokens=256, batch=batch)


@CPU
@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_dit_step(benchmark, objective):
    _dit_step_group(benchmark, objective, "cpu-small", "cpu", DIT_BATCH)


@CUDA
@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_dit_step_cuda(benchmark, objective):
    _dit_step_group(benchmark, objective, "B/2", "cuda", 32)


def _dit_forward_group(benchmark, preset, device, b):
    net = _dit(preset, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 32, 32, generator=g).to(device)
    s, t = (torch.rand(b, generator=g) * 0.5).to(device), (0.5 + torch.rand(b, generator=g) * 0.5).to(device)
    one = torch.ones(b, device=device)
    fns = {"two-primal": lambda: (net(x, s, t), net(x, s, t)),
           "fused": lambda: net(x, s, t, tangents=(None, None, one)),
           "one-primal": lambda: net(x, s, t)}
    name = "cpu-small/2" if preset == "cpu-small" else preset
    benchmark.group = f"DiT {name} forward + tangent, 256 tokens, batch {b}, no grad ({device})"
    with torch.no_grad():
        compare(benchmark, fns, device, baseline="two-primal", inner=5 if device == "cuda" else 1, rounds=5,
                tokens=256, batch=b)


@CPU
def test_dit_dual_forward(benchmark):
    _dit_forward_group(benchmark, "cpu-small", "cpu", 8)


@CUDA
def test_dit_dual_forward_cuda(benchmark):
    _dit_forward_group(benchmark, "B/2", "cuda", 32)
