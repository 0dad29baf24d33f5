"""A training step's precision (docs/precision.md): fp32, or bf16 / fp16 mixed precision with
fp32 master weights. The loss runs under ``torch.autocast`` (pyflowmap's ops follow the
policies of :mod:`pyflowmap.ops._autocast`); the parameters, their gradients, the optimizer
state and the EMA stay fp32. fp16 adds a dynamic loss scale (:class:`LossScaler`), and under
FSDP2 the policy becomes FSDP2's ``MixedPrecisionPolicy`` (16-bit all-gathers, fp32
gradient reduction)."""

from __future__ import annotations

import contextlib
import warnings

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16_units() -> bool:
    """Whether this CPU runs bf16 GEMMs and convolutions in hardware (AVX512-BF16 or AMX, as
    oneDNN sees it); without them PyTorch emulates bf16, far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class LossScaler:
    """fp16's dynamic loss scale: the loss is multiplied by ``scale`` before backward and the
    gradients divided by it after; a step whose gradients overflow is skipped and halves the
    scale, ``growth_interval`` clean steps in a row double it. The skip decision is the
    trainer's (agreed over ranks from the global gradient norm), so every rank keeps the same
    scale; the state is three numbers in the checkpoint, so a resume continues exactly."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, growth: float = 2.0,
                 backoff: float = 0.5):
        self.scale, self.growth_interval, self.growth, self.backoff = float(init_scale), growth_interval, growth, backoff
        self.clean_steps = 0
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff
            self.clean_steps = 0
            self.overflows += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        self.overflows = int(state["overflows"])


class Precision:
    """How a trainer runs its step in ``name`` precision (fp32 | bf16 | fp16) on ``device``."""

    def __init__(self, name: str, device: torch.device, warn: bool = True, world: int = 1):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {name!r}")
        self.name, self.device = name, torch.device(device)
        self.dtype = DTYPES[name]
        self.scaler = LossScaler() if name == "fp16" else None
        self.world = world  # data-parallel processes (the trainer sets it once they are known)
        if warn and self.device.type == "cpu":
            if name == "fp16":
                warnings.warn("precision fp16 on a CPU: pyflowmap's CPU kernels have no fp16 path (their reference "
                              "twins run) and PyTorch emulates fp16 GEMMs; bf16 is the CPU's 16-bit format",
                              stacklevel=3)
            elif name == "bf16" and not cpu_has_bf16_units():
                warnings.warn("precision bf16 on a CPU without bf16 units (AVX512-BF16 or AMX): PyTorch emulates bf16 "
                              "convolutions and GEMMs outside pyflowmap's ops, often many times slower than fp32",
                              stacklevel=3)

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        """The context a step's loss runs in (none for fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_factor(self) -> float:
        """What the loss is multiplied by before backward: fp16's scale over the number of
        processes. A rank's loss is W times its share of the global mean (so DDP's average is
        the global gradient), so scale / W gives every sample's backward the magnitude it has
        in one process, and W processes overflow exactly when one process does."""
        return 1.0 if self.scaler is None else self.scaler.scale / self.world

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What backward runs from: the loss, times :meth:`loss_factor` under fp16."""
        return loss if self.scaler is None else loss * self.loss_factor()

    def unscale_(self, params) -> None:
        """Divides the gradients of ``params`` by :meth:`loss_factor` (fp16; else nothing)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_factor())

    def fsdp_policy(self):
        """FSDP2's mixed-precision policy: 16-bit all-gathers and compute weights, gradients
        reduced in fp32 into the fp32 shards; the step's inputs are not cast (times and data
        stay fp32 for the embeddings and the residual, and autocast casts per op)."""
        if not self.mixed:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"loss_scale": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("loss_scale") is not None:
            self.scaler.load_state_dict(state["loss_scale"])
