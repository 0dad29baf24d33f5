"""Regression tests for defects found in review: fake strides, silent second-order
gradients, graph breaks under torch.compile, unchecked shapes, twin/kernel divergences."""

import pytest
import torch
from torch.library import opcheck

import pyflowmap as pf
from pyflowmap import ops, reference
from pyflowmap.nn.forward_ad import AttentionFn


def test_fakes_match_contiguous_outputs_for_strided_inputs():
    g = torch.Generator().manual_seed(0)
    xg = torch.randn(4, 4, 3, 3, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, generator=g).requires_grad_()
    opcheck(torch.ops.pyflowmap.dual_norm.default, (xg, w, None, 18, 2, 9, True, 1e-5))
    p = torch.randn(3, 8, generator=g)[:, ::2].requires_grad_()
    opcheck(torch.ops.pyflowmap.flowmap_loss.default, (p, None, None, "l2sq", 0.0))
    opcheck(torch.ops.pyflowmap.flowmap_fd_loss.default, (p, p.detach() + 0.1, None, None, 2.0, "l2sq", 0.0))


SECOND_ORDER = {
    "dual_norm": (lambda x: ops.dual_layer_norm(x, (5,)), lambda x: reference.dual_layer_norm(x, (5,))),
    "flowmap_loss": (lambda x: ops.flowmap_loss(x)[0], lambda x: reference.flowmap_loss(x)[0]),
    "flowmap_fd_loss": (lambda x: ops.flowmap_fd_loss(x, x.detach() * 0.5, None, None, 3.0)[0],
                        lambda x: reference.flowmap_fd_loss(x, x.detach() * 0.5, None, None, 3.0)[0]),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_order_through_fused_backward_raises_and_the_twin_works(name):
    fused, twin = SECOND_ORDER[name]
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        g.sum().backward()
    (g2,) = torch.autograd.grad(twin(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g2.square().sum(), x)
    assert torch.isfinite(h).all()


def test_attention_second_order_gradients():
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda a, b, c: AttentionFn.apply(a, b, c, False), (q, k, v))


def test_dual_model_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(hidden=16, depth=2, emb_dim=8)
    x, s, t = torch.randn(6, 2), torch.rand(6), torch.rand(6)
    fn = lambda x, s, t: net(x, s, t, tangents=(None, None, torch.ones_like(t)))  # noqa: E731
    explanation = torch._dynamo.explain(fn)(x, s, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(fn)(x, s, t), fn(x, s, t))


def test_dual_linear_rejects_one_dimensional_input():
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ops.dual_linear(torch.zeros(4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[2B, \.\.\., in\]"):
        reference.dual_linear(torch.zeros(4), torch.zeros(3, 4))


def test_layer_norm_checks_normalized_shape():
    xx = torch.zeros(4, 4, 6)
    for fn in (ops.dual_layer_norm, reference.dual_layer_norm):
        with pytest.raises(ValueError, match="needs an input ending in those dims"):
            fn(xx, (8,))


def test_reference_loss_agrees_with_the_kernel_at_the_l2_kink_and_on_scalar_targets():
    p = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    for fn in (ops.flowmap_loss, reference.flowmap_loss):
        (g,) = torch.autograd.grad(fn(p, 0.0 if fn is reference.flowmap_loss else None, None,
                                      "pseudo_huber", 0.0)[0], p)
        assert torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError, match="`weight` must have shape"):
        reference.flowmap_loss(p, None, torch.ones(3, 1, dtype=torch.float64))
