"""Data-parallel training on PyTorch's own engine (torchrun + DDP, or FSDP2).

The design that makes N processes train the same run as one process:

* every rank draws the randomness of the *global* batch (data indices, base noise, times, PSD
  splits, ECT noise) from the same ``torch.Generator`` and keeps only its rows,
  :meth:`Shard.indices` (rank, rank + W, ...): the diagonal and off-diagonal parts split
  evenly, and the drawn batch does not depend on the number of processes;
* each part's mean is taken over the part's *global* count, and the local loss is scaled by W
  so that DDP's gradient average is the gradient of the global batch's loss;
* the whole loss (every network evaluation, JVP and teacher call of one step) runs inside ONE
  forward of a :class:`LossModule` that DDP or FSDP2 wraps, so parameter gradients are
  synchronized once per step whatever the objective does inside, including torch.func.jvp
  (under DDP the JVP traces the inner network, never the wrapper; under FSDP2 it runs through
  the blocks' gather hooks, whose gathered weights carry no tangent, and is tested equal).

Dropout is the only per-rank randomness: the global torch RNG is seeded per rank, and every
rank's RNG state is saved in the checkpoint. With dropout the masks differ from a one-process
run's (each rank draws masks for its own rows), so the equivalence above is exact for
dropout-free models and in distribution otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Shard:
    """This process's share of a global batch: rows ``rank, rank + world, ...``."""

    rank: int
    world: int

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"Shard: need 0 <= rank < world, got rank={self.rank}, world={self.world}")

    def indices(self, n: int, device=None) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world, device=device)

    def count(self, n: int, start: int = 0) -> int:
        """How many of the global rows ``start .. n-1`` are this rank's."""
        return len(range(self.rank, n, self.world)) - len(range(self.rank, start, self.world))

    def scale(self, n_local: int, n_global: int) -> float:
        """Turns a local mean over ``n_local`` rows into this rank's share of the global mean
        over ``n_global`` rows, times W (DDP averages gradients over ranks)."""
        return self.world * n_local / n_global if n_global else 0.0


def current_shard() -> Shard | None:
    """The shard of the initialized default process group, or None when not distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size())
    return None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if current_shard() is not None:
        dist.barrier()


def init_from_env(device: str = "cpu") -> Shard | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment):
    gloo for CPU runs, nccl for CUDA; a CUDA run uses ``cuda:LOCAL_RANK``. Returns the shard,
    or None for a plain single-process launch. Idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return current_shard()


def shutdown() -> None:
    """Leave the process group (the CLI's last step under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: str) -> torch.device:
    """``cuda`` becomes this process's ``cuda:LOCAL_RANK`` under torchrun; an explicit index
    that is not this process's GPU is refused (two ranks on one GPU hang NCCL)."""
    d = torch.device(device)
    if d.type != "cuda" or current_shard() is None:
        return d
    local = int(os.environ.get("LOCAL_RANK", str(rank() % max(1, torch.cuda.device_count()))))
    if d.index is not None and d.index != local:
        raise ValueError(f"device={device!r} under a process group: rank {rank()} (local rank {local}) must use "
                         f"cuda:{local}; pass device='cuda' and each rank takes its own GPU")
    return torch.device("cuda", local)


def all_true(flag: bool, device: torch.device) -> bool:
    """The AND of ``flag`` over ranks, so that every rank skips the same steps (a rank that
    skipped backward alone would leave the others waiting in DDP's all-reduce forever)."""
    if current_shard() is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Averages logged scalars over ranks (the loss is then the global batch's loss)."""
    if current_shard() is None or not values:
        return values
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.unbind()))


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (small Python values such as RNG states)."""
    if current_shard() is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, r: int) -> int:
    """Rank 0 keeps ``seed`` (a one-process run is the W = 1 case); others get distinct streams."""
    return seed if r == 0 else (seed * 1_000_003 + 7_919 * r) % (2**63 - 1)


class LossModule(nn.Module):
    """Holds the trained modules and computes one step's loss in ``forward``, so that a single
    DDP / FSDP2 forward spans every network call of the step. ``compute`` returns a
    :class:`~pyflowmap.objectives.LossOutput`; the forward returns ``(loss, metrics)``."""

    def __init__(self, model: nn.Module, objective: nn.Module, compute: Callable):
        super().__init__()
        self.model = model
        self.objective = objective
        self._compute = compute

    def forward(self):
        out = self._compute()
        return out.loss, out.metrics


def wrap_ddp(model: nn.Module, objective: nn.Module, compute: Callable, device: torch.device):
    """The step's :class:`LossModule` inside DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = LossModule(model, objective, compute)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: every module that declares ``fsdp_unit = True``
    (the UNet's residual and attention blocks); the rest stays in the root unit."""
    return [m for m in model.modules() if getattr(m, "fsdp_unit", False)]


def wrap_fsdp(model: nn.Module, objective: nn.Module, compute: Callable, mp_policy=None, compile_blocks: bool = False):
    """FSDP2 (``fully_shard``): each block of ``model`` is its own unit, gathered just before
    it runs and freed after, with its ``dual`` (explicit-tangent) method registered as a
    forward so the tangent pass gathers it too; a frozen teacher inside ``objective`` is
    sharded the same way; the root unit (stems, embeddings, heads) wraps the step's
    :class:`LossModule`. Parameters,
    gradients and optimizer state are sharded over ranks; gradients are averaged like DDP's.
    ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` for every unit (None: fp32).
    ``compile_blocks``: each unit's ``forward`` and ``dual`` under torch.compile, inside
    FSDP2's gather / free hooks (Dynamo does not trace those hooks, so a compiled step under
    FSDP2 is a graph per block, not one graph)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the objective's frozen teacher (LMD, EMD, PFMM) is sharded block by block too
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in fsdp_blocks(model) + fsdp_blocks(objective):
        if compile_blocks:  # before fully_shard: its hooks must wrap the compiled methods
            block.forward = torch.compile(block.forward)
            if hasattr(block, "dual"):
                block.dual = torch.compile(block.dual)
        fully_shard(block, **kw)
        if hasattr(block, "dual"):
            register_fsdp_forward_method(block, "dual")
    module = LossModule(model, objective, compute)
    fully_shard(module, **kw)
    return module


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective), or ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``ref``: sharded the same way when ``ref`` is
    an FSDP2 DTensor, else unchanged."""
    if not is_dtensor(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


__all__ = ["shutdown", "fsdp_blocks", "wrap_fsdp", "full", "like", "is_dtensor", "Shard", "current_shard", "init_from_env", "is_main", "rank", "barrier", "all_true",
           "mean_over_ranks", "gather_objects", "rank_seed", "LossModule", "wrap_ddp", "local_device"]
