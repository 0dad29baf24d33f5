"""pf.nn.fused_jvp: torch.func.jvp through a user's own transformer (F.scaled_dot_product_attention,
nn.Linear, nn.LayerNorm, nn.GELU / F.silu) without editing it, against a math-attention,
plain-LayerNorm jvp in float64: outputs, tangents, parameter gradients; the SDPA arguments;
O(N) memory; derivative="jvp" of the objectives; torch.compile."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyflowmap as pf
from pyflowmap.reference import math_attention
from tests.helpers import rand

F64 = torch.float64


def plain_layer_norm(z, normalized_shape, weight=None, bias=None, eps=1e-5):
    c = z - z.mean(-1, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + bias


def math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    return math_attention(q, k, v, is_causal) if scale is None else \
        math_attention(q * (scale * q.shape[-1] ** 0.5), k, v, is_causal)


class UserBlock(nn.Module):
    """A transformer block as users write it: nothing from pyflowmap."""

    def __init__(self, d=16, heads=4, kv_heads=None, causal=False, scale=None):
        super().__init__()
        self.h, self.kv, self.causal, self.scale = heads, kv_heads or heads, causal, scale
        hd = d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kvp = nn.Linear(d, 2 * self.kv * hd)
        self.o = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.sdpa, self.ln = F.scaled_dot_product_attention, F.layer_norm

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.h
        h = self.ln(x, (d,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        q = self.q(h).reshape(b, n, self.h, hd).transpose(1, 2)
        k, v = self.kvp(h).reshape(b, n, 2, self.kv, hd).permute(2, 0, 3, 1, 4)
        a = self.sdpa(q, k, v, is_causal=self.causal, scale=self.scale, enable_gqa=self.kv != self.h)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return F.silu(x + self.mlp(self.ln(x, (d,), self.ln2.weight, self.ln2.bias, self.ln2.eps)))


def _with_math(block):
    """The same block with math attention and plain-op LayerNorm (PyTorch's own forward-AD)."""
    block.sdpa, block.ln = math_sdpa, plain_layer_norm
    return block


def _perturbed(**kw):
    torch.manual_seed(0)
    block = UserBlock(**kw).double()
    with torch.no_grad():
        for ln in (block.ln1, block.ln2):
            ln.weight.normal_(1, 0.3), ln.bias.normal_(0, 0.3)
    return block


def _jvp_and_grads(block, x, xd, fused):
    params = list(block.parameters())
    if fused:
        with pf.nn.fused_jvp():
            y, yd = torch.func.jvp(block, (x,), (xd,))
    else:
        y, yd = torch.func.jvp(block, (x,), (xd,))
    loss = (y * torch.cos(y)).sum() + (yd * yd).sum()
    return y, yd, torch.autograd.grad(loss, params)


def test_native_sdpa_has_no_forward_ad_but_the_mode_does():
    block, x = _perturbed(), rand(2, 5, 16)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(block, (x,), (x,))
    with pf.nn.fused_jvp():
        torch.func.jvp(block, (x,), (x,))


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"scale": 0.3}, {"kv_heads": 2}, {"kv_heads": 1, "causal": True}],
                         ids=["plain", "causal", "scale", "gqa", "mqa-causal"])
@pytest.mark.parametrize("n", [1, 7])
def test_user_block_matches_math_attention_jvp(kw, n):
    x, xd = rand(3, n, 16), rand(3, n, 16, seed=1)
    got = _jvp_and_grads(_perturbed(**kw), x, xd, fused=True)
    want = _jvp_and_grads(_with_math(_perturbed(**kw)), x, xd, fused=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _mha_jvp_and_grads(fn, params, x, xd, fused):
    if fused:
        with pf.nn.fused_jvp():
            y, yd = torch.func.jvp(fn, (x,), (xd,))
    else:  # PyTorch's own forward AD, through the MATH backend (the fused SDPA ones have none)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            y, yd = torch.func.jvp(fn, (x,), (xd,))
    loss = (y * torch.cos(y)).sum() + (yd * yd).sum()
    return y, yd, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("case", ["self-batch-first", "cross-kdim-vdim", "unbatched", "causal-mask"])
def test_multihead_attention_matches_math_attention_jvp(case):
    """nn.MultiheadAttention(need_weights=False) hides its SDPA call inside
    F.multi_head_attention_forward: the mode routes that function too."""
    torch.manual_seed(0)
    x, xd = rand(2, 7, 16), rand(2, 7, 16, seed=1)
    if case == "cross-kdim-vdim":
        m = nn.MultiheadAttention(16, 4, kdim=6, vdim=10).double()  # separate projections, seq-first
        kv, vv = rand(5, 2, 6, seed=2), rand(5, 2, 10, seed=3)

        def fn(x):
            return m(x.transpose(0, 1), kv, vv, need_weights=False)[0]
    else:
        m = nn.MultiheadAttention(16, 4, batch_first=case != "unbatched").double()
        mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)

        def fn(x):
            if case == "unbatched":
                return m(x[0], x[0], x[0], need_weights=False)[0]
            if case == "causal-mask":
                return m(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0]
            return m(x, x, x, need_weights=False)[0]
    params = list(m.parameters())
    got = _mha_jvp_and_grads(fn, params, x, xd, fused=True)
    want = _mha_jvp_and_grads(fn, params, x, xd, fused=False)
    for a, b in zip(got[:2] + got[2], want[:2] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_transformer_encoder_layer_matches_math_attention_jvp(norm_first, train):
    """nn.TransformerEncoderLayer, in training and in eval (where PyTorch would take its fused
    fast path, which a mode disables), against math attention's forward AD: outputs and tangents."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       activation="gelu").double().train(train)
    x, xd = rand(3, 5, 16), rand(3, 5, 16, seed=1)
    with torch.no_grad():
        with pf.nn.fused_jvp():
            y, yd = torch.func.jvp(layer, (x,), (xd,))
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no forward AD
        try:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                y_ref, yd_ref = torch.func.jvp(layer, (x,), (xd,))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yd, yd_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw,match", [
    ({"key_padding_mask": torch.zeros(2, 7, dtype=torch.bool)}, "key_padding_mask"),
    ({"attn_mask": torch.zeros(7, 7, dtype=torch.bool)}, "attn_mask"),
])
def test_multihead_attention_masks_are_clear_errors(kw, match):
    m = nn.MultiheadAttention(16, 4, batch_first=True).double()
    x = rand(2, 7, 16)
    with pf.nn.fused_jvp(), pytest.raises(ValueError, match=match):
        m(x, x, x, need_weights=False, **kw)
    with pf.nn.fused_jvp():  # need_weights=True: PyTorch's explicit softmax, which has forward AD
        y, yd = torch.func.jvp(lambda x: m(x, x, x, **kw)[0], (x,), (x,))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        y_ref, yd_ref = torch.func.jvp(lambda x: m(x, x, x, need_weights=False, **kw)[0], (x,), (x,))
    torch.testing.assert_close(yd, yd_ref)


def test_native_layer_norm_through_the_mode_gets_right_gradients():
    """nn.LayerNorm modules (F.layer_norm) are routed too: without the mode the native rule's
    reverse-through-tangent gradients are wrong (pytorch/pytorch#196700)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x, xd = rand(4, 6), rand(4, 6, seed=1)

    def grads(norm_fn=None, fused=True):
        with pf.nn.fused_jvp() if fused else contextlib.nullcontext():
            f = net if norm_fn is None else (lambda z: net[2](norm_fn(net[0](z), (6,), net[1].weight, net[1].bias)))
            y, yd = torch.func.jvp(f, (x,), (xd,))
        return torch.autograd.grad((yd * yd).sum() + y.sum(), list(net.parameters()))

    want = grads(plain_layer_norm, fused=False)
    for a, b in zip(grads(), want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_inputs_without_head_dim_and_empty_batch():
    q, k, v = rand(5, 8), rand(6, 8, seed=1), rand(6, 8, seed=2)
    with pf.nn.fused_jvp():
        o, od = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    want = torch.func.jvp(lambda a, b, c: math_attention(a[None, None], b[None, None], c[None, None])[0, 0], (q, k, v), (q, k, v))
    torch.testing.assert_close(o, want[0])
    torch.testing.assert_close(od, want[1])
    e = torch.zeros(0, 2, 4, 8, dtype=F64)
    with pf.nn.fused_jvp():
        o, od = torch.func.jvp(F.scaled_dot_product_attention, (e, e, e), (e, e, e))
    assert o.shape == od.shape == (0, 2, 4, 8)


def test_outside_forward_ad_the_mode_is_the_native_function():
    """A whole training step may run under the mode: outputs and gradients as without it."""
    block, x = _perturbed(causal=True), rand(2, 6, 16)
    want = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    with pf.nn.fused_jvp():
        y = block(x)
        got = torch.autograd.grad(y.square().sum(), list(block.parameters()))
    torch.testing.assert_close(y, block(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,match", [
    ({"attn_mask": torch.ones(4, 4, dtype=torch.bool)}, "attn_mask"),
    ({"dropout_p": 0.1}, "dropout_p"),
])
def test_unsupported_sdpa_arguments_are_clear_errors(kwargs, match):
    q = rand(1, 2, 4, 8)
    with pf.nn.fused_jvp(), pytest.raises(ValueError, match=match):
        F.scaled_dot_product_attention(q, q, q, **kwargs)


def test_unsupported_shapes_are_clear_errors():
    q, k = rand(1, 2, 4, 8), rand(1, 2, 5, 8)
    with pf.nn.fused_jvp():
        with pytest.raises(ValueError, match="is_causal and Nq 4 != Nk 5"):
            F.scaled_dot_product_attention(q, k, k, is_causal=True)
        with pytest.raises(ValueError, match="one head dim"):
            F.scaled_dot_product_attention(q, k, rand(1, 2, 5, 4))
        with pytest.raises(ValueError, match="enable_gqa"):
            F.scaled_dot_product_attention(q, rand(1, 1, 5, 8), rand(1, 1, 5, 8))
        with pytest.raises(ValueError, match="divisible"):
            F.scaled_dot_product_attention(rand(1, 3, 4, 8), k, k, enable_gqa=True)


def test_tanh_gelu_and_inplace_silu_keep_native_semantics():
    z, zd = rand(3, 5), rand(3, 5, seed=1)
    with pf.nn.fused_jvp():
        got = torch.func.jvp(lambda a: F.gelu(a, approximate="tanh"), (z,), (zd,))
    torch.testing.assert_close(got, torch.func.jvp(lambda a: F.gelu(a, approximate="tanh"), (z,), (zd,)))
    with pf.nn.fused_jvp():
        y = F.silu(z.clone(), inplace=True)
    torch.testing.assert_close(y, F.silu(z))


def test_the_mode_is_reentrant_and_leaves_no_trace():
    from torch.overrides import _get_current_function_mode_stack

    with pf.nn.fused_jvp():
        with pf.nn.fused_jvp():
            assert sum(isinstance(m, pf.nn.FusedJVPMode) for m in _get_current_function_mode_stack()) == 1
    assert not any(isinstance(m, pf.nn.FusedJVPMode) for m in _get_current_function_mode_stack())


def test_attention_jvp_memory_is_linear_in_n():
    """N = 4096: math attention's forward AD holds N x N probabilities and tangents (64 MB each
    in float32); through the mode the largest single allocation stays far below one N x N."""
    from torch.profiler import ProfilerActivity, profile

    n, d = 4096, 16
    q, k, v, qd, kd, vd = (torch.randn(1, 1, n, d) for _ in range(6))
    with pf.nn.fused_jvp(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= n * n * 4 // 16, f"largest allocation {largest} bytes is not far below N x N"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.func.jvp(lambda a, b, c: math_attention(a, b, c), (q, k, v), (qd, kd, vd))
    assert max(e.cpu_memory_usage for e in prof.events()) >= n * n * 4  # the check can fail


class UserFlowMap(nn.Module):
    """A user's velocity network v(x, s, t) on [B, N, d] tokens around UserBlock."""

    def __init__(self, d=16):
        super().__init__()
        self.block = _perturbed(d=d)
        self.emb = nn.Linear(2, d)

    def forward(self, x, s, t):
        return self.block(x + self.emb(torch.stack([s, t], -1)).unsqueeze(1))


@pytest.mark.parametrize("objective", ["lsd", "meanflow"])
def test_jvp_derivative_of_the_objectives_over_a_user_model(objective):
    x1 = rand(4, 5, 16)

    def grads(net, mode):
        fm = pf.FlowMap(net)
        obj = pf.make_objective(objective, derivative=mode, times=pf.TimeSampler(diag_fraction=0.25))
        loss = obj(fm, x1, generator=torch.Generator().manual_seed(0)).loss
        return loss.detach(), torch.autograd.grad(loss, list(net.parameters()))

    torch.manual_seed(1)
    net = UserFlowMap().double()
    got = grads(net, "jvp")
    with pytest.raises(RuntimeError, match="forward AD"):
        grads(net, pf.JVP(fused=False))
    _with_math(net.block)
    want = grads(net, pf.JVP(fused=False))
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert float(got[0]) > 0
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_and_eager_tangents_agree(backend):
    """Dynamo can silently drop a custom autograd.Function.jvp (wrong tangents, no error): a
    compiled jvp through the mode must give the eager tangents, or refuse loudly."""
    block, x, xd = _perturbed(), rand(2, 5, 16), rand(2, 5, 16, seed=1)

    def f(a, ad):
        with pf.nn.fused_jvp():
            return torch.func.jvp(block, (a,), (ad,))

    want = f(x, xd)
    try:
        got = torch.compile(f, backend=backend)(x, xd)
    except Exception as e:  # a loud refusal is acceptable; a wrong tangent is not
        pytest.skip(f"torch.compile refuses the fused jvp: {type(e).__name__}")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
