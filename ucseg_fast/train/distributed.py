"""Data-parallel training with `torchrun` + `torch.distributed` (DESIGN.md §4: no home-made
distribution).

`torchrun --nproc_per_node N -m ucseg_fast.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; `init_from_env` starts the process group from them (NCCL on CUDA,
gloo on CPU) or adopts a group that the caller already started (tests spawn 2 gloo processes).

What each rank does (the Trainer's DDP contract):
* the UC-Seg pair is wrapped in DistributedDataParallel (gradients averaged in backward);
  BatchNorm keeps per-rank statistics like the single-GPU reference (`train.sync_bn = true`
  converts to SyncBatchNorm); rank 0's buffers are broadcast at each forward;
* each rank draws its own batches (`TrainStream(rank=, world_size=)`, independent streams);
* each rank keeps its own CCP memory queues, filled from its own batches (the queues are not
  model parameters; averaging them would mix features of different steps). Checkpoints hold
  rank 0's queues;
* loss terms accumulate on each device and are all-reduced only at log time;
* validation, the JSONL log and checkpoints happen on rank 0 only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "all_reduce_mean", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Start (or adopt) the process group; a single process without torchrun gets DistInfo()."""
    if dist.is_available() and dist.is_initialized():
        ws = dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() if device_type != "cuda" else 0))
        return DistInfo(dist.get_rank(), ws, local, dist.get_backend())
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ws} but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (SUM / world: gloo has no AVG). Log time only, never inside the step."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
