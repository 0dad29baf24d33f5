"""The training jobs the data-parallel tests run twice: in W gloo processes and in one process
on the same global batch. Importable by spawned workers (no pytest fixtures here)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

TINY_2D = dict(hidden=32, depth=2, emb_dim=8, batch=12, steps=4, lr=3e-3, lr_decay_after=0, log_every=2,
               ckpt_every=1000)
TINY_IMAGE = dict(dataset="digits", ch=8, emb_dim=8, batch=8, steps=3, lr=2e-3, warmup=1, log_every=1,
                  ckpt_every=1000)

# every 2D objective in every derivative mode it has, plus learned weighting and the
# both-terms-carry-gradient ESD variant
JOBS_2D = [("fm", "auto", {})] + [
    (obj, mode, {}) for obj in ("lsd", "esd", "meanflow") for mode in ("dual", "jvp", "fd")
] + [("psd-u", "auto", {}), ("psd-m", "auto", {}), ("lsd", "dual", {"learned_weighting": True}),
     ("esd", "jvp", {"spatial_stopgrad": False})]
# the image-only objectives (ECT and its pretraining, distillation from an FM teacher run)
# and the UNet with attention in the dual and jvp modes
JOBS_IMAGE = [("ect-pretrain", "auto", {}), ("ect", "auto", {}), ("lmd", "dual", {}), ("emd", "jvp", {}),
              ("pfmm", "auto", {}), ("lsd", "jvp", {}), ("meanflow", "dual", {})]


def job_name(kind, obj, mode, extra) -> str:
    tail = "-".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return f"{kind}-{obj}-{mode}" + (f"-{tail}" if tail else "")


def build(kind, obj, mode, extra, data=None, teacher=""):
    if kind == "2d":
        from pyflowmap.config import TrainConfig
        from pyflowmap.train import Trainer

        return Trainer(TrainConfig(objective=obj, derivative=mode, **TINY_2D, **extra), progress=False)
    from pyflowmap.images.train import ImageConfig, ImageTrainer

    cfg = ImageConfig(objective=obj, derivative=mode, teacher=teacher if obj in ("lmd", "emd", "pfmm") else "",
                      **TINY_IMAGE, **extra)
    return ImageTrainer(cfg, progress=False, data=data)


def result(trainer) -> dict:
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in trainer.ema.state_dict().items()},
            "objective": {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()},
            "losses": [row["loss"] for row in trainer.history]}


def run_jobs(jobs, data=None, teacher="") -> dict:
    """Image jobs run in float64: their UNet has biases right before a GroupNorm, whose true
    gradient is 0, so in float32 Adam turns the rounding noise of either reduction order into
    lr-sized steps of either sign; float64 leaves the comparison to the parts that matter."""
    out = {}
    for kind, obj, mode, extra in jobs:
        default = torch.get_default_dtype()
        if kind == "image":
            torch.set_default_dtype(torch.float64)
        try:
            trainer = build(kind, obj, mode, extra, data=None if data is None else data.to(torch.get_default_dtype()),
                            teacher=teacher)
            init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.fit()
        finally:
            torch.set_default_dtype(default)
        out[job_name(kind, obj, mode, extra)] = {**result(trainer), "init": init}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, jobs, data_path: str, teacher: str, out_path: str) -> None:
    """One gloo rank: runs every job; rank 0 saves the results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(data_path) if data_path else None
        res = run_jobs(jobs, data=data, teacher=teacher)
        if rank == 0:
            torch.save(res, Path(out_path))
    finally:
        dist.destroy_process_group()
