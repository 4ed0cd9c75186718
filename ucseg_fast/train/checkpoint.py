"""Checkpoints: safetensors for every tensor + a JSON sidecar for everything else.

`<dir>/<tag>.json` (the sidecar) holds the config, the iteration, sampler positions and
metrics, the name of its tensor file `<dir>/<tag>.<id>.safetensors` (model, objective / CCP
queues, optimizer and RNG tensors) and that file's SHA-256, so a half-written or mismatched
pair is detected. Every save writes a tensor file under a NEW name (temp + fsync + rename),
then replaces the sidecar (temp + fsync + rename): that rename is the only commit point.
A crash at any moment leaves the previous sidecar pointing at the previous, untouched tensor
file; the superseded tensor file is deleted only after the new sidecar is in place.

Multi-process runs (`Trainer.state_tensors`): replicated state (model, optimizer) appears once;
rank-local state (CCP queues/pointers, RNG states, data-stream position) of rank 0 under the
plain names (`objective.*`, `rng.*`, `stream.*`, so a single-process checkpoint keeps this
layout) and of rank r > 0 under `rank{r}.*`, with its JSON part in meta["ranks"][str(r)] and the
number of ranks in meta["world_size"] (absent in older checkpoints: 1). Everything goes
through rank 0 into the same single pair, so atomicity and the hash check cover every rank.
"""
from __future__ import annotations

import hashlib
import json
import uuid
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "ucseg-fast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the requested run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_replace(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    try:  # make the rename itself durable
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into `tensors` (key = dotted path) and
    return the JSON-able remainder with {"__tensor__": key} placeholders."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()  # sync-ok: checkpoint time
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {str(k): split_state(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def join_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_state."""
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_state(v, tensors) for v in state]
    return state


def save_checkpoint(directory: str | Path, tag: str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write `<tag>.<id>.safetensors` then commit `<tag>.json` atomically; returns the JSON
    path. The previous checkpoint of the same tag stays loadable until the commit."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    js = d / f"{tag}.json"
    st = d / f"{tag}.{uuid.uuid4().hex[:12]}.safetensors"
    st_tmp, js_tmp = d / f".{st.name}.tmp", d / f".{tag}.json.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},  # sync-ok: checkpoint
              str(st_tmp))
    sidecar = dict(meta, format=FORMAT, version=VERSION, tensors_file=st.name,
                   tensors_sha256=_sha256(st_tmp))
    js_tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True))
    _fsync_replace(st_tmp, st)   # a new name: nothing the old sidecar refers to is touched
    _fsync_replace(js_tmp, js)   # the commit point
    for old in d.glob(f"{tag}.*.safetensors"):  # superseded (or orphaned by a crash)
        if old.name != st.name:
            old.unlink(missing_ok=True)
    return js


def resolve(path: str | Path) -> Path:
    """Accept the sidecar, the tensor file or the stem; return the sidecar path."""
    p = Path(path)
    if p.suffix == ".safetensors":  # <tag>.<id>.safetensors -> <tag>.json
        p = p.with_name(p.name.split(".")[0] + ".json")
    elif p.suffix != ".json":
        p = p.with_name(p.name + ".json")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    js = resolve(path)
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js}: corrupt checkpoint sidecar ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{js}: not a ucseg-fast checkpoint (format={meta.get('format')!r})")
    st = js.parent / meta["tensors_file"]
    if not st.is_file():
        raise CheckpointError(f"{js}: tensor file {st} is missing")
    if verify and _sha256(st) != meta["tensors_sha256"]:
        raise CheckpointError(f"{st}: contents do not match the hash in {js.name} "
                              "(interrupted write or files from different runs)")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{st}: cannot read tensors ({e})") from e
    return tensors, meta
