"""Checkpoints: safetensors for every tensor + a JSON sidecar for everything else.

`<dir>/<tag>.json` (the sidecar) holds the config, the iteration, sampler positions and
metrics, the name of its tensor file `<dir>/<tag>.<id>.safetensors` (model, objective / CCP
queues, optimizer and RNG tensors) and that file's SHA-256, so a half-written or mismatched
pair is detected. Every save writes a tensor file under a NEW name (temp + fsync + rename),
then replaces the sidecar (temp + fsync + rename): that rename is the only commit point.
A crash at any moment leaves the previous sidecar pointing at the previous, untouched tensor
file; the superseded tensor file is deleted only after the new sidecar is in place. Temporary
files are named `.<final name>.<pid>.<random>.tmp`, so two writers never share one.

Run folders (`Trainer.train`): `RunLock` (`<dir>/.ucseg-run.lock`, O_CREAT|O_EXCL, pid + host)
keeps one writer per folder; `run_in_folder` says whether a folder already holds a run (which
a fresh run refuses, `RunFolderError`, unless told to overwrite: `remove_run`);
`remove_orphans` deletes what a crash left behind (temporaries, tensor files no sidecar
references); `truncate_log` cuts `metrics.jsonl` back to a resumed checkpoint's iteration.

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
import os
import re
import socket
import uuid
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "ucseg-fast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the requested run."""


class RunFolderError(CheckpointError):
    """The output folder cannot take this run: it holds another run (resume it or overwrite
    it) or another process is writing to it (the lock)."""


def _tmp_name(final: str) -> str:
    """`.<final>.<pid>.<random>.tmp`: unique per writer (matches the orphan pattern `.*.tmp`)."""
    return f".{final}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


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
    st_tmp, js_tmp = d / _tmp_name(st.name), d / _tmp_name(js.name)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},  # sync-ok: checkpoint
                  str(st_tmp))
        sidecar = dict(meta, format=FORMAT, version=VERSION, tensors_file=st.name,
                       tensors_sha256=_sha256(st_tmp))
        js_tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True))
        _fsync_replace(st_tmp, st)   # a new name: nothing the old sidecar refers to is touched
        _fsync_replace(js_tmp, js)   # the commit point
    except BaseException:
        # an error (disk full, ...) leaves no temporaries; a kill leaves them to remove_orphans.
        # A tensor file renamed before a failed commit is unreferenced: removed at the next save
        # of this tag or by remove_orphans
        for t in (st_tmp, js_tmp):
            t.unlink(missing_ok=True)
        raise
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


# ----------------------------------------------------------------------------------------------
# run folders: what a run owns, the lock, orphans, the log
# ----------------------------------------------------------------------------------------------
LOCK_NAME = ".ucseg-run.lock"
LOG_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
#: tensor files as save_checkpoint names them: <tag>.<12 hex>.safetensors
_TENSOR_FILE = re.compile(r"^(?P<tag>[^/]+)\.[0-9a-f]{12}\.safetensors$")


def _sidecar_meta(p: Path) -> dict[str, Any] | None:
    """The parsed sidecar, or None when `p` is no checkpoint sidecar (config.json, other JSON)."""
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return meta
    return None


def sidecars(directory: str | Path) -> list[Path]:
    """The checkpoint sidecars of a folder: `*.json` with the checkpoint format, and unreadable
    `*.json` files that have tensor files of their tag beside them (a damaged sidecar still
    marks a run)."""
    d = Path(directory)
    out = []
    for p in sorted(d.glob("*.json")):
        if p.name == CONFIG_NAME or not p.is_file():
            continue
        if _sidecar_meta(p) is not None or any(d.glob(f"{glob_escape(p.stem)}.*.safetensors")):
            out.append(p)
    return out


def run_in_folder(directory: str | Path) -> list[str]:
    """What marks `directory` as holding a run: a non-empty metrics.jsonl and every checkpoint
    sidecar (names; empty list = the folder is free for a fresh run)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    log = d / LOG_NAME
    if log.is_file() and log.stat().st_size > 0:
        found.append(LOG_NAME)
    found += [p.name for p in sidecars(d)]
    return found


def _referenced(d: Path) -> tuple[set[str], set[str]]:
    """(tensor files referenced by a readable sidecar, tags whose sidecar is unreadable)."""
    refs, unknown = set(), set()
    for p in sidecars(d):
        meta = _sidecar_meta(p)
        if meta is None:
            unknown.add(p.stem)
        elif isinstance(meta.get("tensors_file"), str):
            refs.add(meta["tensors_file"])
    return refs, unknown


def remove_orphans(directory: str | Path) -> list[str]:
    """Delete what an interrupted save leaves: temporaries (`.*.tmp`) and checkpoint tensor
    files (`<tag>.<id>.safetensors`) that no sidecar of the folder references (a tag whose
    sidecar is unreadable keeps its files). Call with the folder's lock held. Returns the
    names removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    refs, unknown = _referenced(d)
    for p in d.glob("*.safetensors"):
        m = _TENSOR_FILE.match(p.name)
        if m and p.name not in refs and m["tag"] not in unknown and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def remove_run(directory: str | Path) -> list[str]:
    """Delete the run a folder holds (overwrite): metrics.jsonl, config.json, every checkpoint
    sidecar, the tensor files they reference or that are named like checkpoint tensor files,
    and temporaries. Other files are left alone. Call with the folder's lock held. Returns the
    names removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    refs, _ = _referenced(d)
    victims = [d / LOG_NAME, d / CONFIG_NAME, *sidecars(d), *(d / r for r in refs),
               *(p for p in d.glob("*.safetensors") if _TENSOR_FILE.match(p.name))]
    removed = []
    for p in victims:
        if p.is_file() and p.name not in removed:
            p.unlink()
            removed.append(p.name)
    return sorted(removed + remove_orphans(d))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `path` through a unique temporary + fsync + rename."""
    p = Path(path)
    tmp = p.with_name(_tmp_name(p.name))
    try:
        tmp.write_text(text)
        _fsync_replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def truncate_log(path: str | Path, iteration: int) -> int:
    """Cut a metrics.jsonl back to a checkpoint: drop rows whose "iteration" is greater than
    `iteration` (written after that checkpoint by a run that was then killed) and torn lines;
    atomic rewrite. Returns the number of rows dropped."""
    p = Path(path)
    if not p.is_file():
        return 0
    keep, dropped = [], 0
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), (int, float)) \
                and row["iteration"] > iteration:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        atomic_write_text(p, "".join(f"{line}\n" for line in keep))
    return dropped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OSError, OverflowError):
        return False
    return True


class RunLock:
    """`<dir>/.ucseg-run.lock`: one writer per run folder.

    Created with O_CREAT|O_EXCL and holding {"pid", "host", "token"}; released (only if it is
    still this holder's) by `release`. A lock of this host whose pid is gone is stale and taken
    over (`acquire` returns a warning line); a live holder or another host's lock is refused
    with `RunFolderError` naming the folder and the holder."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            h = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return h if isinstance(h, dict) else None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning line when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        body = json.dumps({"pid": os.getpid(), "host": host, "token": self.token}).encode()
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self._holder()
                d = self.path.parent
                if h is None:
                    if not self.path.exists():  # released meanwhile
                        continue
                    raise RunFolderError(
                        f"{d}: another run may be writing to this folder (unreadable lock file "
                        f"{self.path}); if none is, delete the lock file and start again")
                pid, lhost = h.get("pid"), h.get("host")
                if lhost == host and isinstance(pid, int) and not _pid_alive(pid):
                    warning = (f"warning: {d}: taking over the stale lock {self.path.name} of "
                               f"pid {pid} on {lhost} (that process no longer exists)")
                    self.path.unlink(missing_ok=True)
                    continue
                extra = ("" if lhost == host else
                         f"; if no run is active on {lhost}, delete {self.path}")
                raise RunFolderError(
                    f"{d}: another run is writing to this folder (lock {self.path.name} held by "
                    f"pid {pid} on {lhost}); wait for it to finish or choose another "
                    f"train.out_dir{extra}") from None
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            self.held = True
            return warning
        raise RunFolderError(f"{self.path.parent}: could not take the run lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        h = self._holder()
        if h is not None and h.get("token") == self.token:
            self.path.unlink(missing_ok=True)
