"""The registry of a run's stateful parts, saved to and restored from one checkpoint.

A part is a name, a getter, a setter and a layout in the checkpoint pair (`train.checkpoint`):
- "tensors": a flat {name: tensor} state, stored as tensors `<key>.<name>` (the model, the
  objective's CCP queues);
- "nested": any state with tensors inside (optimizer, RNG states, data-stream position),
  stored as JSON metadata under `<key>` whose tensors are split out under `<tensor_key>.`;
- "plain": JSON metadata only (the Python and NumPy RNG states).
Replicated parts (identical on every rank: model, optimizer) are rank 0's; rank-local parts
(queues, RNGs, stream) are gathered from every rank — rank 0's under the plain names, rank r's
tensors under `rank{r}.` and its metadata under meta["ranks"][str(r)] — so a single-process
checkpoint has the plain layout, and a DDP run resumes exactly with the same world size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, join_state, split_state
from .distributed import DistInfo, gather_to_main


@dataclass
class Part:
    key: str
    get: Callable[[], Any]
    set: Callable[[Any], None]
    layout: str = "nested"          # "tensors" | "nested" | "plain"
    rank_local: bool = False
    tensor_key: str | None = None   # tensor name prefix (default: key)


class RunState:
    """The parts a checkpoint holds (see the module docstring), in restore order."""

    def __init__(self, dist: DistInfo, device: torch.device):
        self.dist, self.device = dist, device
        self.parts: list[Part] = []

    def add(self, key: str, get: Callable[[], Any], set: Callable[[Any], None], *,
            layout: str = "nested", rank_local: bool = False,
            tensor_key: str | None = None) -> None:
        self.parts.append(Part(key, get, set, layout, rank_local, tensor_key))

    def _put(self, p: Part, prefix: str, tensors: dict, meta: dict) -> None:
        tk = f"{prefix}{p.tensor_key or p.key}"
        if p.layout == "tensors":
            for k, v in p.get().items():
                tensors[f"{tk}.{k}"] = v
        elif p.layout == "nested":
            meta[p.key] = split_state(p.get(), tk, tensors)
        else:
            meta[p.key] = p.get()

    def capture(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, metadata) on rank 0, None on the other ranks. Collective under DDP."""
        r = self.dist.rank
        local: tuple[dict, dict] = ({}, {})
        for p in self.parts:
            if p.rank_local:
                self._put(p, "" if r == 0 else f"rank{r}.", *local)
        gathered = gather_to_main(local, self.dist, self.device)
        if gathered is None:
            return None
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for p in self.parts:
            if not p.rank_local:
                self._put(p, "", tensors, meta)
        ranks: dict[str, Any] = {}
        for rank, (t_r, m_r) in enumerate(gathered):
            tensors.update(t_r)
            if rank:
                ranks[str(rank)] = m_r
        meta.update(gathered[0][1])
        meta.update(world_size=self.dist.world_size, ranks=ranks)
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Every part from a checkpoint: this rank's rank-local state, rank 0's replicated."""
        r = self.dist.rank
        saved_ws = int(meta.get("world_size", 1))
        if saved_ws != self.dist.world_size:
            raise CheckpointError(
                f"{source}: checkpoint was saved with world size {saved_ws} but this run has "
                f"world size {self.dist.world_size}: each rank's data position, RNG and CCP "
                f"queues cannot be mapped onto another number of processes; resume with "
                f"{saved_ws} process(es) (eval / predict load the model weights from any "
                "checkpoint)")
        local = meta if r == 0 else meta.get("ranks", {}).get(str(r))
        if local is None:
            raise CheckpointError(f"{source}: no rank-local state for rank {r} "
                                  f"(meta['ranks'] has {sorted(meta.get('ranks', {}))})")
        for p in self.parts:
            src, prefix = (local, "" if r == 0 else f"rank{r}.") if p.rank_local else (meta, "")
            tk = f"{prefix}{p.tensor_key or p.key}"
            if p.layout == "tensors":
                head = f"{tk}."
                p.set({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
            elif p.layout == "nested":
                p.set(join_state(src[p.key], tensors))
            else:
                p.set(src[p.key])


def rng_part(state: RunState, mix_generator: torch.Generator) -> None:
    """Register the RNG states: torch CPU, the copy-paste generator, CUDA (on CUDA), Python
    and NumPy — all rank-local."""
    device = state.device

    def get() -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state(), "mix": mix_generator.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return rng

    def set_(rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["cpu"])
        mix_generator.set_state(rng["mix"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)

    state.add("rng", get, set_, rank_local=True)
    state.add("python_rng", lambda: _py_state(random.getstate()),
              lambda s: random.setstate(_py_state_back(s)), layout="plain", rank_local=True)
    state.add("numpy_rng", lambda: _np_state(np.random.get_state()),
              lambda s: np.random.set_state(_np_state_back(s)), layout="plain", rank_local=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                     prefix: str = "model.") -> None:
    """Load the model tensors of a checkpoint (the names after `prefix`) into `model`;
    CheckpointError naming `source` when they do not match."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{source}: no model tensors in checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: model does not match the checkpoint "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            if k == "state":  # optimizer per-param state: move tensors to the device
                out[k] = {int(pk): {n: (t.to(device) if isinstance(t, torch.Tensor) and t.dim() > 0
                                        else t) for n, t in pv.items()} for pk, pv in v.items()}
            else:
                out[k] = to_device(v, device)
        return out
    if isinstance(state, list):
        return [to_device(v, device) for v in state]
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_back(s):
    return (s[0], tuple(s[1]), s[2])


def _np_state(s):
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]  # sync-ok: numpy RNG state, host only


def _np_state_back(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])
