"""The pairing of every fused op with its twin, and that every caller goes through it."""

import pytest
import torch

import pyflowmap as pf
from pyflowmap import ops, reference
from pyflowmap._dispatch import FusedOp
from tests.helpers import mlp


@pytest.mark.parametrize("name", ops.__all__)
def test_every_fused_op_is_paired_with_its_twin_of_the_same_name(name):
    op = getattr(ops, name)
    assert isinstance(op.dispatch, FusedOp)
    assert op.dispatch.fused is op and op.twin is getattr(reference, name) and op.dispatch.twin is op.twin
    assert op.dispatch.kernels["cpu"], f"pyflowmap::{op.dispatch.kernel} has no CPU kernel"


def test_dispatch_picks_the_twin_where_the_kernel_does_not_cover_the_input():
    x = torch.zeros(2, 3)
    assert ops.dual_act.dispatch.pick(x) is ops.dual_act
    assert ops.dual_act.dispatch.pick(x.half()) is reference.dual_act  # no float16 CPU kernel
    assert ops.flowmap_step.dispatch.pick(x.half()) is ops.flowmap_step  # the sampler's covers it
    with pf.nn.reference_ops():
        assert ops.dual_act.dispatch.pick(x) is reference.dual_act


def _counting(monkeypatch, fused_op, which):
    calls = []
    target = getattr(fused_op.dispatch, which)

    def counted(*args, **kwargs):
        calls.append(which)
        return target(*args, **kwargs)

    monkeypatch.setattr(fused_op.dispatch, which, counted)
    return calls


@pytest.mark.parametrize("reference_mode", [False, True])
def test_sampling_and_losses_follow_reference_ops(monkeypatch, reference_mode):
    """Sampling once bypassed the choice: reference_ops() left it on the fused kernel."""
    step = {w: _counting(monkeypatch, ops.flowmap_step, w) for w in ("fused", "twin")}
    loss = {w: _counting(monkeypatch, ops.flowmap_loss, w) for w in ("fused", "twin")}
    fm = pf.FlowMap(mlp(dtype=torch.float32))
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    with pf.nn.reference_ops(reference_mode):
        pf.sample(fm, z, steps=2)
        pf.sample_ode(fm, z, steps=2, method="heun")
        pf.make_objective("lsd")(fm, z, generator=torch.Generator().manual_seed(1))
    used, unused = ("twin", "fused") if reference_mode else ("fused", "twin")
    assert len(step[used]) == 2 + 4 and not step[unused]  # 2 jumps + 2 Heun steps of 2 updates
    assert len(loss[used]) == 2 and not loss[unused]  # one reduction per part (fm, distill)
