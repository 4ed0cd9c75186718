"""Data-parallel training with `torchrun` + `torch.distributed` (docs/design.md §4: no home-made
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
  model parameters; averaging them would mix features of different steps);
* loss terms accumulate on each device and are all-reduced only at log time;
* validation and the JSONL log happen on rank 0 only; rank 0 broadcasts whether validation
  improved (`broadcast_flag`) so that every rank takes part in saving `best`;
* checkpoints: every rank's rank-local state (data-stream position, RNG states, copy-paste
  generator, CCP queues and pointers) is gathered to rank 0 (`gather_to_main`), which writes
  one atomic checkpoint pair; on load each rank restores its own state (same world size only).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "all_reduce_mean", "barrier", "gather_to_main",
           "broadcast_flag"]


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


def _collective_device(device: torch.device):
    """NCCL object collectives stage their bytes on `torch.cuda.current_device()`: make that
    this rank's device (a caller-adopted process group may not have set it)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def gather_to_main(obj: Any, info: DistInfo, device: torch.device) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0 (None on the other ranks).

    Checkpoint time only (a pickle round trip plus a host sync). Tensors inside `obj` must be
    on the CPU: a CUDA tensor would be unpickled onto the sender's device index on rank 0."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    with _collective_device(device):
        dist.gather_object(obj, out, dst=0)
    return out


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (e.g. "validation improved: save best"). Host sync:
    validation / checkpoint time only."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())  # sync-ok: once per validation, outside the step
