"""Mixed precision and compiled steps in the trainers (issue 18, docs/precision.md): bf16 / fp16
autocast with fp32 master weights and EMA, fp16's loss scale, exact resume, the objective split
into eager draws and a traceable loss, the dual path compiled with no graph break, and the
eager fallback with its message where PyTorch cannot compile a step."""

import warnings

import pytest
import torch
from torch import nn

import pyflowmap as pf
from pyflowmap.toy2d.config import TrainConfig
from pyflowmap.toy2d.train import Trainer
from pyflowmap.training import NonFiniteTraining
from pyflowmap.training.compiled import CompiledLoss, CompileFallbackWarning
from pyflowmap.training.precision import LossScaler, Precision

TINY = dict(hidden=32, depth=2, emb_dim=8, batch=64, steps=6, lr=3e-3, lr_decay_after=0, log_every=2,
            ckpt_every=1000)
TINY_DIT = dict(model="dit", patch=2, depth=2, width=16, heads=2)


def _trainer(out_dir=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fp16 / bf16 on this CPU: the speed warnings
        return Trainer(TrainConfig(**{**TINY, **kw}), out_dir=out_dir, progress=False)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _fit(trainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return trainer.fit(**kw)


# -- the objective split ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lsd", "meanflow", "psd-u", "sct"])
def test_draw_then_loss_equals_one_call(name):
    """draw() + loss_from_draws() is the call itself: same loss and gradients, same generator
    state after, so the trainers' split changes nothing."""
    torch.manual_seed(0)
    net = pf.nn.FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8)
    nn.init.normal_(net.head.weight, std=0.3)
    model = pf.FlowMap(net)
    if name == "sct":
        model = pf.TrigFlowConsistency(net)
    obj = pf.make_objective(name, derivative="dual")
    x1 = torch.randn(24, 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = obj(model, x1, generator=g1, step=4)
    grads = torch.autograd.grad(whole.loss, list(net.parameters()))
    split = obj.loss_from_draws(model, x1, obj.draw(model, x1, generator=g2, step=4))
    obj.report(split)
    torch.testing.assert_close(split.loss, whole.loss, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(split.loss, list(net.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert split.metrics.keys() == whole.metrics.keys()


# -- precision --------------------------------------------------------------------------------

def test_precision_is_checked_and_on_the_command_line():
    with pytest.raises(ValueError, match="precision must be fp32|bf16|fp16"):
        TrainConfig(precision="bf32")
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("half", torch.device("cpu"))
    from pyflowmap.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--precision", "bf16", "--compile"])
    assert args.precision == "bf16" and args.compile is True


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_computes_low_and_keeps_fp32_master_weights(precision):
    trainer = _trainer(precision=precision)
    seen = []
    trainer.model.net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _fit(trainer)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and set(seen) == {low}  # the network ran under autocast
    for module in (trainer.model, trainer.ema):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    assert states and {v.dtype for v in states} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.history)


def test_bf16_training_follows_fp32_and_differs_from_it():
    """Same seed: the bf16 run's losses track the fp32 run's to bf16 accuracy, and are not the
    fp32 numbers (autocast really ran); the weights moved."""
    runs = {p: _fit(_trainer(precision=p, steps=20)) for p in ("fp32", "bf16")}
    a = torch.tensor([r["loss"] for r in runs["fp32"].history])
    b = torch.tensor([r["loss"] for r in runs["bf16"].history])
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.0)
    assert not torch.equal(a, b)
    fresh = _trainer()
    moved = max((p - q).abs().max().item() for p, q in zip(runs["bf16"].model.parameters(), fresh.model.parameters()))
    assert moved > 1e-3


def test_loss_scaler_backs_off_and_grows():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    s.update(overflow=True)
    assert s.scale == 4.0 and s.overflows == 1
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 8.0 and s.clean_steps == 0
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_fp16_overflow_halves_the_scale_without_counting_as_bad():
    """A loss scale far too high overflows fp16 for many steps in a row: each is skipped and
    halves the scale, and max_bad_steps (2) is not reached; then the run trains."""
    trainer = _trainer(precision="fp16", steps=40, max_bad_steps=2)
    trainer.precision.scaler.scale = 2.0**36
    before = _params(trainer)
    _fit(trainer)
    sc = trainer.precision.scaler
    assert sc.overflows >= 10 and trainer.skipped == 0 and trainer.step == 40
    assert sc.scale < 2.0**36
    assert any("loss_scale" in row for row in trainer.history)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_fp16_non_finite_loss_still_stops_the_run():
    trainer = _trainer(precision="fp16", steps=10, max_bad_steps=3)
    step = trainer.loss_output

    def poisoned():
        out = step()
        out.loss = out.loss * float("nan")
        return out

    trainer.loss_output = poisoned
    with pytest.raises(NonFiniteTraining):
        _fit(trainer)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resumes_exactly(tmp_path, precision):
    straight = _fit(_trainer(precision=precision))
    first = _trainer(out_dir=tmp_path, precision=precision)
    if precision == "fp16":  # overflow steps in the first half: the scale must come back with the run
        first.precision.scaler.scale = 2.0**30
        straight_fp16 = _trainer(precision=precision)
        straight_fp16.precision.scaler.scale = 2.0**30
        straight = _fit(straight_fp16)
    _fit(first, stop_after=3)
    first.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        resumed = Trainer.resume(tmp_path, progress=False)
    _fit(resumed)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert resumed.precision.state_dict() == straight.precision.state_dict()
    with pytest.raises(ValueError, match="cannot change"):
        resumed.close()
        Trainer.resume(tmp_path, progress=False, precision="fp32")


# -- compiled steps ---------------------------------------------------------------------------

def _no_breaks(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["lsd", "meanflow", "esd", "psd-m", "shortcut", "lmd"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dual_step_traces_as_one_graph_mlp(name, precision):
    torch.manual_seed(0)
    model = pf.FlowMap(pf.nn.FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8))
    teacher = pf.FlowMap(pf.nn.FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8)) if name == "lmd" else None
    obj = pf.make_objective(name, derivative="dual", teacher=teacher)
    x1 = torch.randn(16, 2)
    draws = obj.draw(model, x1, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        _no_breaks(obj.loss_from_draws, model, x1, draws)


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("name", ["lsd", "meanflow", "sct"])
def test_dual_step_traces_as_one_graph_images(arch, name):
    """The image models' dual path, tangents, teacher and loss: zero graph breaks (dropout on,
    so MeanFlow and sCT keep their one-pass form under compile)."""
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer

    data = torch.rand(16, 1, 8, 8) * 2 - 1
    extra = TINY_DIT if arch == "dit" else dict(ch=8, emb_dim=8)
    cfg = ImageConfig(objective=name, derivative="dual", batch=8, dataset="digits", dropout=0.1, **extra)
    trainer = ImageTrainer(cfg, progress=False, data=data)
    x1 = data[:8]
    draws = trainer.objective.draw(trainer.model, x1, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _no_breaks(trainer.objective.loss_from_draws, trainer.model, x1, draws)


@pytest.mark.parametrize("name", ["lsd", "meanflow"])
def test_compiled_step_trains_like_the_eager_one(name):
    eager = _fit(_trainer(objective=name, derivative="dual"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        compiled = _fit(_trainer(objective=name, derivative="dual", compile=True))
    assert isinstance(compiled.compiled_loss, CompiledLoss) and compiled.compiled_loss.active
    a = torch.tensor([r["loss"] for r in eager.history])
    b = torch.tensor([r["loss"] for r in compiled.history])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert "grad_norm_fm" in compiled.history[-1]  # the per-part norms run through the compiled graph


def test_compiled_run_resumes_exactly(tmp_path):
    straight = _fit(_trainer(compile=True, precision="bf16"))
    first = _trainer(out_dir=tmp_path, compile=True, precision="bf16")
    _fit(first, stop_after=3)
    first.close()
    resumed = Trainer.resume(tmp_path, progress=False)
    assert resumed.cfg.compile and resumed.cfg.precision == "bf16"
    _fit(resumed)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


class _Branchy(nn.Module):
    """A velocity net with a data-dependent Python branch, which Dynamo cannot put in one graph."""

    def __init__(self, boom: bool = False):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.boom = boom

    def forward(self, x, s, t):
        if self.boom:
            raise ValueError("boom: the user's own error")
        h = self.lin(torch.cat([x, s[:, None], t[:, None]], 1))
        return h if float(h.abs().sum()) > 0 else -h


def test_compile_leaves_jvp_eager_with_a_message():
    trainer = _trainer(derivative="jvp", compile=True)
    with pytest.warns(CompileFallbackWarning, match="derivative 'jvp' .* is not compiled; use derivative 'dual'"):
        trainer.train_step()
    assert not trainer.compiled_loss.active and trainer.compiled_loss.failed


def test_compile_falls_back_to_eager_with_a_message():
    model = pf.FlowMap(_Branchy())
    obj = pf.make_objective("lsd", derivative="fd")
    x1 = torch.randn(8, 2)
    draws = obj.draw(model, x1, generator=torch.Generator().manual_seed(0))
    fn = CompiledLoss(obj, "the lsd (fd) step")
    with pytest.warns(CompileFallbackWarning, match=r"cannot compile the lsd \(fd\) step as one graph .* runs eagerly"):
        out = fn(model, x1, draws)
    assert not fn.active and fn.failed
    torch.testing.assert_close(out.loss, obj.loss_from_draws(model, x1, draws).loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # one message, then quiet
        fn(model, x1, draws)


def test_compile_raises_the_users_own_error_as_it_is():
    model = pf.FlowMap(_Branchy(boom=True))
    obj = pf.make_objective("lsd", derivative="fd")
    x1 = torch.randn(8, 2)
    draws = obj.draw(model, x1, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with pytest.raises(ValueError, match="boom"):
            CompiledLoss(obj, "the step")(model, x1, draws)


def test_compile_refuses_an_objective_that_is_only_a_call():
    class OnlyCall(pf.objectives.ObjectiveBase):
        def forward(self, model, x1, generator=None, step=0, shard=None, global_batch=None, c=None):
            return pf.objectives.LossOutput(loss=model(x1, x1[:, 0], x1[:, 0]).sum(), per_sample=x1[:, 0], n_diag=0)

    with pytest.raises(TypeError, match="split into draw"):
        CompiledLoss(OnlyCall())
