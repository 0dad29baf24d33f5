"""The compiled training step (``compile=True``, ``--compile``; docs/precision.md): an
objective's :meth:`~pyflowmap.objectives.ObjectiveBase.loss_from_draws` under
``torch.compile(fullgraph=True)``, so the network calls with their tangents, the teacher and
the loss are one graph, and AOTAutograd compiles its backward with it. The draws stay eager
(a ``torch.Generator`` cannot be traced); they are graph inputs."""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch


class CompileFallbackWarning(UserWarning):
    """torch.compile could not compile the step as one graph; it runs eagerly."""


def _reason(e: BaseException) -> str:
    """The exception's first line, and Dynamo's explanation of it when it gives one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), "")
    return f"{type(e).__name__}: {lines[0] if lines else ''}" + (f" {why}" if why else "")[:300]


class CompiledLoss:
    """``loss_from_draws`` of ``objective``, compiled as one graph on its first call.

    Where PyTorch cannot (a layer or derivative mode Dynamo cannot trace, a backend that fails
    to build), the step runs eagerly from then on, after one :class:`CompileFallbackWarning`
    that names the reason; an error that the eager step raises too is the user's and is raised
    as it is. ``describe`` names the step in that message; ``announce(msg)`` reports the first
    compilation, which takes from seconds (an MLP) to minutes (a UNet on 2 CPU cores)."""

    def __init__(self, objective, describe: str = "the step", announce: Callable[[str], None] | None = None):
        from pyflowmap.objectives.base import ObjectiveBase

        if type(objective).draw is ObjectiveBase.draw or type(objective).loss_from_draws is ObjectiveBase.loss_from_draws:
            raise TypeError(f"compiling needs an objective split into draw() and loss_from_draws() (ObjectiveBase); "
                            f"{type(objective).__name__} implements only its call: train it without compile")
        self.objective = objective
        self.eager = objective.loss_from_draws
        # static shapes: a training step's shapes do not change, and dynamic ones (which Dynamo
        # turns on when one process compiles the same code at two shapes) fail in Inductor for
        # the UNet
        self.compiled = torch.compile(self.eager, fullgraph=True, dynamic=False)
        self.describe = describe
        self.announce = announce
        self.failed: str | None = None  # why the step runs eagerly
        self.compile_seconds: float | None = None

    @staticmethod
    def step_context():
        """The context a whole step (the call and every backward through its graph) runs in:
        no donated buffers, because a trainer's per-part gradient norms run backward through
        the graph with ``retain_graph=True`` before the step's own backward, and AOTAutograd
        decides on donation when it compiles the backward, at the first one."""
        return torch._functorch.config.patch(donated_buffer=False)

    @property
    def active(self) -> bool:
        """Whether the compiled graph runs (False: not compiled yet, or fell back)."""
        return self.failed is None and self.compile_seconds is not None

    def _refuse(self, model) -> str | None:
        """Why this step is not compiled at all, or None. torch.func.jvp is left eager: Dynamo
        cannot trace it through the image models' norms, and where it can (the MLP) the
        compiled backward of LSD's jvp fails at run time inside PyTorch ("ZeroTensors are
        immutable", torch 2.13), after the graph was built, where no fallback can catch it."""
        from pyflowmap.derivatives import JVP

        mode = getattr(self.objective, "mode", None)
        if callable(mode) and isinstance(mode(model), JVP):
            return "derivative 'jvp' (torch.func.jvp) is not compiled; use derivative 'dual' to compile the step"
        return None

    def __call__(self, model, x1, draws):
        if self.failed is None and self.compile_seconds is None:
            self.failed = self._refuse(model)
            if self.failed is not None:
                warnings.warn(f"torch.compile: {self.describe} runs eagerly: {self.failed}", CompileFallbackWarning,
                              stacklevel=2)
        if self.failed is not None:
            return self.eager(model, x1, draws)
        first = self.compile_seconds is None
        if first and self.announce is not None:
            self.announce(f"compiling {self.describe} (once; minutes for an image model on a few CPU cores)")
        t0 = time.perf_counter()
        try:
            out = self.compiled(model, x1, draws)
        except torch._dynamo.exc.TorchDynamoException as e:
            out = self.eager(model, x1, draws)  # the user's own error is raised here, as it is
            self.failed = _reason(e)
            warnings.warn(f"torch.compile cannot compile {self.describe} as one graph ({self.failed}); it runs "
                          "eagerly", CompileFallbackWarning, stacklevel=2)
            return out
        if first:
            self.compile_seconds = time.perf_counter() - t0
        return out
