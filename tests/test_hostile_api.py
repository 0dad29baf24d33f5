"""Hostile-input fuzzing of the public Python API and the CLI (the raw ops have their own, in
test_hostile_inputs.py): one argument of a valid call mutated at a time; every outcome is a
clear error (ValueError / TypeError naming what is wrong, or the CLI's one-line error with exit
code 2) or a correct result, never another exception, a crash or a hang."""

import contextlib
import io
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyflowmap as pf
from pyflowmap import cli
from tests.helpers import mlp

CLEAR = (ValueError, TypeError)
HOSTILE = [None, 0, -1, 1.5, -0.5, math.nan, math.inf, -math.inf, 1e308, 10**12, "x", "", [], [0.5], True,
           torch.tensor(math.nan), torch.tensor([0.2, 0.1]), torch.zeros(0), torch.zeros(3, 2, dtype=torch.long),
           torch.full((3, 2), math.nan), torch.zeros(3, 5), torch.zeros(0, 2), torch.zeros(3)]


def _fm():
    return pf.FlowMap(mlp(dtype=torch.float32)).eval()


FM = _fm()
NOISE = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))

CALLS = {  # name -> (function, valid keyword arguments)
    "sample": (lambda **k: pf.sample(FM, **k), dict(noise=NOISE, steps=2, grid=None, kind="flowmap")),
    "sample_ode": (lambda **k: pf.sample_ode(FM, **k), dict(noise=NOISE, steps=2, method="heun")),
    "draw": (lambda **k: pf.draw(FM, **k), dict(noise=NOISE, sampler="map", steps=2)),
    "time_grid": (pf.time_grid, dict(steps=3, t0=0.0, t1=1.0)),
    "jump": (lambda **k: FM.jump(**k), dict(x=NOISE, s=0.0, t=1.0)),
    "objective": (lambda name, **k: pf.make_objective(name)(FM, **k),
                  dict(name="lsd", x1=NOISE, generator=None, step=0)),
    "time_sampler": (lambda n, **k: pf.TimeSampler(**k).sample(n),
                     dict(n=5, diag_fraction=0.5, t_min=0.0, t_max=1.0, logit_std=1.0)),
    "base": (lambda shape, **k: pf.GaussianBase(**k).sample(shape), dict(shape=(3, 2), std=1.0, mean=0.0)),
    "config": (lambda **k: pf.toy2d.TrainConfig(**k), dict(lr=1e-3, steps=5, batch=8, ema=0.9, diag_fraction=0.5)),
}


def _check_result(name, out):
    """A call that did not raise returned something correct: finite and of the right shape."""
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in getattr(out, "__dict__", {}).values()
                                                              if isinstance(t, torch.Tensor)]
    if name in ("sample", "sample_ode", "draw", "jump"):
        assert out.shape == NOISE.shape, (name, out.shape)
    for t in tensors:
        if t.is_floating_point() and t.numel():
            assert torch.isfinite(t).all(), f"{name} returned non-finite values without an error"


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_public_api_one_mutated_argument(data):
    name = data.draw(st.sampled_from(sorted(CALLS)), label="call")
    fn, kwargs = CALLS[name]
    arg = data.draw(st.sampled_from(sorted(kwargs)), label="argument")
    bad = data.draw(st.sampled_from(range(len(HOSTILE))), label="value")
    kwargs = {**kwargs, arg: HOSTILE[bad]}
    try:
        out = fn(**kwargs)
    except CLEAR as e:
        assert str(e).strip(), f"{name}({arg}=...) raised an empty {type(e).__name__}"
        return
    _check_result(name, out)


TRAIN = ["train", "--steps", "2", "--hidden", "8", "--depth", "1", "--batch", "8", "--quiet", "--overwrite"]
FLAGS = ["--steps", "--batch", "--lr", "--ema", "--diag-fraction", "--hidden", "--depth", "--emb-dim", "--seed",
         "--device", "--objective", "--derivative", "--data", "--grad-clip", "--fd-step", "--base-std",
         "--log-every", "--ckpt-every", "--max-bad-steps", "--interpolant"]
VALUES = ["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "", "99999999999", "0.5", "cuda:7", "1e-300", "3"]


@settings(max_examples=40, deadline=None)
@given(flag=st.sampled_from(FLAGS), value=st.sampled_from(VALUES))
def test_cli_one_mutated_flag(tmp_path_factory, flag, value):
    out = tmp_path_factory.mktemp("cli")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(TRAIN + ["--out", str(out), flag, value])
        except SystemExit as e:  # argparse: the value does not parse as the flag's type
            code = e.code
    err = err.getvalue()
    assert code in (0, 2), (flag, value, code, err)
    if code == 2:
        assert "Traceback" not in err and err.strip(), (flag, value, err)
        assert "error:" in err.strip().splitlines()[-1]
