"""How a trainer runs on several processes (torchrun): the step wrapped in DDP or FSDP2, the
EMA kept shard by shard under FSDP2, whole-tensor state out of and into sharded modules and
optimizers (so a checkpoint is the same whatever the world size or wrapping), and every rank's
RNG stream. In a one-process run every method is the plain single-process operation, so the
loop never asks how it runs."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from pyflowmap import distributed as dist_
from pyflowmap.training.checkpoint import all_finite


class Parallel:
    """The data-parallel wiring of one trainer. Build it after the model, EMA and objective
    and before the optimizer (FSDP2 replaces the parameters by their shards), which
    :class:`~pyflowmap.training.TrainerBase` guarantees."""

    def __init__(self, model, ema, objective, compute: Callable, batch: int, seed: int, device: torch.device,
                 fsdp: bool = False, mp_policy=None, compile_blocks: bool = False):
        self.shard = dist_.current_shard()
        self.device = device
        self.step_module = None  # the DDP / FSDP2-wrapped LossModule
        self.ema_shards = None  # FSDP2: this rank's EMA shards, on the device
        self.compiles_blocks = False  # FSDP2 with compile: a graph per block (wrap_fsdp)
        if self.shard is None:
            self._compute = compute
            return
        if batch % self.shard.world:
            raise ValueError(f"batch={batch} must be divisible by the {self.shard.world} processes "
                             "(each rank trains an equal share of the global batch)")
        # dropout is the only per-rank randomness; rank 0 keeps the one-process stream
        if self.shard.rank > 0:
            torch.manual_seed(dist_.rank_seed(seed, self.shard.rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives and NCCL use the current device
        if fsdp:
            self.step_module = dist_.wrap_fsdp(model, objective, compute, mp_policy=mp_policy,
                                               compile_blocks=compile_blocks)
            self.compiles_blocks = compile_blocks
            # the EMA is updated shard by shard on the device; its whole copy lives in CPU
            # memory, assembled for saving and at the end of fit()
            self.ema_shards = [p.to_local().detach().clone() for p in model.parameters()]
            ema.to("cpu")
        else:
            self.step_module = dist_.wrap_ddp(model, objective, compute, device)

    @property
    def world(self) -> int:
        return 1 if self.shard is None else self.shard.world

    @property
    def rank(self) -> int:
        return 0 if self.shard is None else self.shard.rank

    def loss(self):
        """(loss, metrics, parts) of one step; wrapped, one DDP / FSDP2 forward spans every
        network call of the step, and ``parts`` (the loss terms with their graphs) is empty."""
        if self.step_module is not None:
            loss, metrics = self.step_module()
            return loss, metrics, {}
        out = self._compute()
        return out.loss, out.metrics, getattr(out, "parts", {})  # a user's LossOutput-like object may lack it

    def reshard(self) -> None:
        """FSDP2 frees the gathered root weights in backward; after a step without backward
        (skipped) or before reading the shards, free them explicitly."""
        if self.ema_shards is not None:
            self.step_module.reshard()

    @torch.no_grad()
    def update_ema(self, ema, model, decay: float) -> None:
        if self.ema_shards is not None:
            torch._foreach_lerp_(self.ema_shards, [p.detach().to_local() for p in model.parameters()], 1 - decay)
        else:
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
        for eb, b in zip(ema.buffers(), model.buffers()):
            eb.copy_(b)

    @torch.no_grad()
    def gather_ema(self, ema, model) -> None:
        """Under FSDP2: assemble the whole EMA (kept in CPU memory) from the ranks' shards, one
        parameter at a time (a collective)."""
        if self.ema_shards is None:
            return
        from torch.distributed.tensor import DTensor

        self.reshard()
        for (name, p), local in zip(model.named_parameters(), self.ema_shards):
            whole = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            ema.get_parameter(name).copy_(whole.full_tensor())

    def scatter_ema(self, ema, model) -> None:
        """Under FSDP2: this rank's EMA shards from the whole EMA (after loading a checkpoint)."""
        if self.ema_shards is not None:
            whole = ema.state_dict()
            self.ema_shards = [dist_.like(whole[n], p).to_local().clone() for n, p in model.named_parameters()]

    def finite(self, model, ema) -> bool:
        """Every parameter and EMA value finite, decided over all ranks."""
        self.reshard()
        return dist_.all_true(all_finite(model) and all_finite(ema)
                              and all(bool(torch.isfinite(t).all()) for t in self.ema_shards or []), self.device)

    def whole_state(self, module) -> dict:
        """``module``'s state dict with whole tensors (under FSDP2 each shard is gathered and
        moved to CPU, one tensor at a time)."""
        sd = module.state_dict()
        return sd if self.ema_shards is None else {k: dist_.full(v).cpu() for k, v in sd.items()}

    @staticmethod
    def load_whole_state(module, whole: dict) -> None:
        """Loads whole tensors into ``module``, sharding each like the parameter it replaces."""
        current = module.state_dict()
        module.load_state_dict({k: dist_.like(v, current[k]) if k in current else v for k, v in whole.items()})

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer state with whole tensors: the same checkpoint whether or not FSDP2
        sharded it, so a run can resume with or without FSDP2 and on any number of ranks."""
        sd = optimizer.state_dict()
        if self.ema_shards is None:
            return sd
        # one tensor at a time to CPU: a save never holds the whole Adam state on the device
        sd["state"] = {i: {k: dist_.full(v).cpu() for k, v in st.items()} for i, st in sd["state"].items()}
        return sd

    def load_optimizer_state(self, optimizer, sd: dict) -> None:
        if self.ema_shards is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            sd = {**sd, "state": {i: {k: dist_.like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() else v
                                      for k, v in st.items()} for i, st in sd["state"].items()}}
        optimizer.load_state_dict(sd)

    def rng_states(self) -> list:
        """Every rank's (CPU, CUDA) RNG state, its dropout stream (a collective)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return dist_.gather_objects((torch.get_rng_state(), cuda))

    def set_rng_state(self, state: dict, seed: int) -> None:
        """This rank's dropout stream from a checkpoint; a rank the checkpoint has no stream for
        (more processes than it was saved from) starts a fresh one from ``seed``."""
        ranks = state.get("rank_rng") or [(state["torch_rng"], state.get("cuda_rng"))]
        if len(ranks) == self.world:
            cpu, cuda = ranks[self.rank]
        elif self.rank == 0:
            cpu, cuda = ranks[0]
        else:
            warnings.warn(f"checkpoint from {len(ranks)} processes resumed on {self.world}: rank {self.rank} draws "
                          "its dropout masks from a fresh stream (data, noise and times continue exactly)")
            torch.manual_seed(dist_.rank_seed(seed, self.rank))
            return
        torch.set_rng_state(cpu)
        if self.device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
