"""The training jobs the data-parallel tests run twice: in W gloo processes and in one process
on the same global batch. Importable by spawned workers (no pytest fixtures here)."""

from __future__ import annotations

import datetime
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
# a DiT small enough for the 8 x 8 digits (16 tokens)
TINY_DIT = dict(model="dit", patch=2, depth=2, width=16, heads=2)
# the image-only objectives (ECT and its pretraining, distillation from an FM teacher run),
# the UNet with attention in the dual and jvp modes, and the DiT in both
JOBS_IMAGE = [("ect-pretrain", "auto", {}), ("ect", "auto", {}), ("lmd", "dual", {}), ("emd", "jvp", {}),
              ("pfmm", "auto", {}), ("lsd", "jvp", {}), ("meanflow", "dual", {}),
              ("lsd", "dual", TINY_DIT), ("meanflow", "jvp", TINY_DIT),
              # sCM: continuous-time consistency training and distillation (guided teacher's plumbing aside)
              ("sct", "dual", {}), ("scd", "jvp", {})]
# checkpoint round trips under DDP and FSDP2 (whole-tensor optimizer state), and a step
# whose loss is NaN on one rank only: every rank must skip it together, nobody hangs
JOBS_RESUME = [("lsd", "dual", {"_resume_at": 2}), ("lsd", "dual", {"fsdp": True, "_resume_at": 2}),
               ("meanflow", "jvp", {"_poison_rank": 1}),
               # the last step poisoned, a checkpoint after every step: FSDP2 must reshard and save
               ("lsd", "dual", {"fsdp": True, "_poison_rank": 1, "_poison_step": 2, "ckpt_every": 1})]
# an FSDP2 run stopped at step 2, then resumed by the test in one process without FSDP2
JOBS_HANDOFF = [("emd", "dual", {"fsdp": True, "_stop_at": 2})]
# FSDP2: the dual image models, blockwise sharded
JOBS_FSDP = [("lsd", "dual", {"fsdp": True}), ("esd", "dual", {"fsdp": True}), ("meanflow", "dual", {"fsdp": True}),
             ("ect", "auto", {"fsdp": True}), ("lmd", "dual", {"fsdp": True}), ("psd-m", "auto", {"fsdp": True}),
             ("lsd", "jvp", {"fsdp": True}), ("lsd", "fd", {"fsdp": True}),
             ("lsd", "dual", {"fsdp": True, **TINY_DIT}), ("esd", "jvp", {"fsdp": True, **TINY_DIT}),
             ("sct", "dual", {"fsdp": True}), ("scd", "dual", {"fsdp": True, **TINY_DIT})]


# mixed precision (autocast; FSDP2: its MixedPrecisionPolicy) and compiled steps, float32
JOBS_PRECISION = [("2d", "lsd", "dual", {"precision": "bf16"}), ("2d", "lsd", "jvp", {"precision": "fp16"}),
                  ("2d", "lsd", "dual", {"compile": True}), ("2d", "meanflow", "dual", {"compile": True, "precision": "bf16"}),
                  ("image", "lsd", "dual", {"precision": "bf16"}), ("image", "lsd", "dual", {"fsdp": True, "precision": "bf16"}),
                  ("image", "lsd", "dual", {"fsdp": True, "compile": True, **TINY_DIT})]


def job_name(kind, obj, mode, extra) -> str:
    tail = "-".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return f"{kind}-{obj}-{mode}" + (f"-{tail}" if tail else "")


def build(kind, obj, mode, extra, data=None, teacher="", out_dir=None):
    if kind == "2d":
        from pyflowmap.toy2d.config import TrainConfig
        from pyflowmap.toy2d.train import Trainer

        return Trainer(TrainConfig(objective=obj, derivative=mode, **{**TINY_2D, **extra}), out_dir=out_dir, progress=False)
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer

    cfg = ImageConfig(objective=obj, derivative=mode, teacher=teacher if obj in ("lmd", "emd", "pfmm", "scd") else "",
                      **{**TINY_IMAGE, **extra})
    return ImageTrainer(cfg, out_dir=out_dir, progress=False, data=data)


def _whole(sd):
    from pyflowmap.distributed import full

    return {k: full(v).detach().clone() for k, v in sd.items()}


def result(trainer) -> dict:
    """Whole tensors (FSDP2 shards gathered: a collective, every rank calls it)."""
    return {"model": _whole(trainer.model.state_dict()), "ema": _whole(trainer.ema.state_dict()),
            "objective": _whole(trainer.objective.state_dict()), "losses": [row["loss"] for row in trainer.history],
            "grad_norms": [row["grad_norm"] for row in trainer.history], "skipped": trainer.skipped,
            "compiled": getattr(trainer.compiled_loss, "active", None), "precision": trainer.precision.state_dict()}


def _run(kind, obj, mode, extra, data, teacher, work_dir):
    """Control keys in ``extra``: ``_resume_at`` trains to that step, saves, and continues from
    the checkpoint in a new trainer; ``_stop_at`` trains to that step and stops (the caller
    resumes the checkpoint elsewhere); ``_poison_rank`` makes that rank's loss NaN at step
    ``_poison_step`` (default 1)."""
    control = {k: v for k, v in extra.items() if k.startswith("_")}
    cfg_extra = {k: v for k, v in extra.items() if not k.startswith("_")}
    out_dir = Path(work_dir) / job_name(kind, obj, mode, extra) if work_dir else None
    trainer = build(kind, obj, mode, cfg_extra, data=data, teacher=teacher, out_dir=out_dir)
    init = _whole(trainer.model.state_dict())
    poison = control.get("_poison_rank")
    if poison is not None:
        from pyflowmap.distributed import rank

        step = trainer.loss_output

        def poisoned():
            out = step()
            if trainer.step == control.get("_poison_step", 1) and rank() == poison:
                out.loss = out.loss * float("nan")
            return out

        trainer.loss_output = poisoned
    if "_stop_at" in control:
        trainer.fit(steps=control["_stop_at"])
        return {**result(trainer), "init": init}
    if "_resume_at" in control:
        trainer.fit(steps=control["_resume_at"])
        trainer = type(trainer).resume(out_dir, progress=False, **({"data": data} if kind == "image" else {}))
    trainer.fit()
    return {**result(trainer), "init": init}


def run_jobs(jobs, data=None, teacher="", work_dir=None) -> dict:
    """Image jobs run in float64: their UNet has biases right before a GroupNorm, whose true
    gradient is 0, so in float32 Adam turns the rounding noise of either reduction order into
    lr-sized steps of either sign; float64 leaves the comparison to the parts that matter."""
    out = {}
    for kind, obj, mode, extra in jobs:
        default = torch.get_default_dtype()
        # (mixed precision leaves float64 alone: those jobs stay float32)
        if kind == "image" and extra.get("precision", "fp32") == "fp32" and not extra.get("compile"):
            torch.set_default_dtype(torch.float64)
        try:
            out[job_name(kind, obj, mode, extra)] = _run(
                kind, obj, mode, extra, None if data is None else data.to(torch.get_default_dtype()), teacher, work_dir)
        finally:
            torch.set_default_dtype(default)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, jobs, data_path: str, teacher: str, out_path: str,
           work_dir: str = "") -> None:
    """One gloo rank: runs every job; rank 0 saves the results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective that never completes (a rank skipping a step alone) fails the test in 2
    # minutes instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    if rank != 0:  # only rank 0 writes: any file write from another rank fails the job
        import pyflowmap.training.loop as train_module

        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} tried to write a file")

        for name in ("save_checkpoint", "save_weights", "atomic_write"):
            setattr(train_module, name, refuse)
    try:
        data = torch.load(data_path) if data_path else None
        res = run_jobs(jobs, data=data, teacher=teacher, work_dir=work_dir or None)
        if rank == 0:
            torch.save(res, Path(out_path))
        dist.barrier()  # no rank tears gloo down while another still uses it (seen: a SIGABRT)
    finally:
        dist.destroy_process_group()


# -- conditioning (issue 15): label dropout and training guidance under DDP ----------------------
# Objective-level jobs (no trainer): a class-conditional float64 MLP, the global batch's labels
# sharded with its rows, the dropout mask and the per-row guidance scales drawn over the global
# batch. Each job: (objective, derivative mode, conditioning keywords).
COND_CLASSES, COND_BATCH, COND_STEPS = 4, 12, 3
JOBS_COND = [("lsd", "dual", {"p_uncond": 0.3, "guidance": 2.0}),
             ("meanflow", "jvp", {"p_uncond": 0.3, "guidance_range": (1.0, 3.0)}),
             ("esd", "fd", {"p_uncond": 0.4, "guidance": 1.5}),
             ("psd-u", "auto", {"p_uncond": 0.5})]
# the 2D trainer's labelled 8-Gaussians run, with dropout and guidance (as a scale and as an input)
JOBS_COND_2D = [("lsd", "dual", {"data": "8gaussians", "conditional": True, "p_uncond": 0.3, "guidance": 2.0}),
                ("meanflow", "jvp", {"data": "8gaussians", "conditional": True, "p_uncond": 0.3,
                                     "guidance_max": 3.0})]


def _cond_job(obj, mode, extra) -> dict:
    from torch import nn

    from pyflowmap import distributed as dist_
    from pyflowmap.derivatives import FiniteDifference
    from pyflowmap.flowmap import FlowMap
    from pyflowmap.nn.mlp import FlowMapMLP
    from pyflowmap.objectives import make_objective
    from pyflowmap.times import TimeSampler

    torch.manual_seed(0)
    net = FlowMapMLP(dim=2, hidden=16, depth=2, emb_dim=8, num_classes=COND_CLASSES,
                     guidance_input="guidance_range" in extra).double()
    nn.init.normal_(net.head.weight, std=0.3)
    nn.init.normal_(net.cond_emb.table.weight, std=1.0)
    model = FlowMap(net)
    derivative = FiniteDifference(dtype=torch.float64) if mode == "fd" else mode
    objective = make_objective(obj, derivative=derivative, times=TimeSampler(diag_fraction=0.5), **extra)
    init = _whole(model.state_dict())
    shard = dist_.current_shard()
    B = COND_BATCH
    data_gen, gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    batch = {}

    def compute():
        x1, c = batch["x1"], batch["c"]
        if shard is None:
            return objective(model, x1, generator=gen, c=c)
        idx = shard.indices(B)
        return objective(model, x1[idx], generator=gen, shard=shard, global_batch=B, c=c[idx])

    step = dist_.wrap_ddp(model, objective, compute, torch.device("cpu")) if shard else None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, norms = [], []
    for _ in range(COND_STEPS):
        # labels include the null class: rows given no condition at all
        batch["c"] = torch.randint(0, COND_CLASSES + 1, (B,), generator=data_gen)
        batch["x1"] = torch.randn(B, 2, generator=data_gen, dtype=torch.float64) + batch["c"][:, None].double()
        loss, metrics = step() if step is not None else (lambda o: (o.loss, o.metrics))(compute())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        opt.step()
        losses.append(float(dist_.mean_over_ranks({"loss": loss.detach()})["loss"]))
    return {"model": _whole(model.state_dict()), "ema": {}, "objective": _whole(objective.state_dict()),
            "losses": losses, "grad_norms": norms, "skipped": 0, "init": init}


def run_cond_jobs(jobs) -> dict:
    return {job_name("cond", obj, mode, extra): _cond_job(obj, mode, extra) for obj, mode, extra in jobs}


def cond_worker(rank: int, world: int, port: int, jobs, out_path: str) -> None:
    """One gloo rank of the conditioning jobs; rank 0 saves the results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        res = run_cond_jobs(jobs)
        if rank == 0:
            torch.save(res, Path(out_path))
        dist.barrier()  # no rank tears gloo down while another still uses it (seen: a SIGABRT)
    finally:
        dist.destroy_process_group()
