"""Taking a run's output folder: one writer per folder (`RunLock`), a fresh run never writes
over another run unless told to, orphans of interrupted saves are removed, a resumed run cuts
its log back to the checkpoint it resumes from, and `config.json` says what is trained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (LOG_NAME, RunFolderError, RunLock, atomic_write_text, remove_orphans,
                         remove_run, run_in_folder, truncate_log)
from .distributed import DistInfo, broadcast_flag


def open_run_folder(d: Path, *, fresh: bool, overwrite: bool, cut_log_at: int | None,
                    iteration: int, config: dict, log: Callable[[str], None], dist: DistInfo,
                    device: torch.device) -> RunLock | None:
    """Rank 0 takes the folder's lock and prepares the folder (`prepare_folder`); every rank
    learns whether that worked (collective under DDP). Returns the held lock (rank 0)."""
    err: BaseException | None = None
    lock = None
    if dist.is_main:
        try:
            lock = RunLock(d)
            warning = lock.acquire()
            if warning:
                log(warning)
            try:
                prepare_folder(d, fresh=fresh, overwrite=overwrite, cut_log_at=cut_log_at,
                               iteration=iteration, config=config, log=log)
            except BaseException:
                lock.release()
                raise
        except Exception as e:  # re-raised below, once the other ranks know
            err = e
    if dist.enabled and not broadcast_flag(err is None, dist, device) and err is None:
        raise RunFolderError(f"{d}: rank 0 could not start the run in this folder (its error "
                             "says why)")
    if err is not None:
        raise err
    return lock


def prepare_folder(d: Path, *, fresh: bool, overwrite: bool, cut_log_at: int | None,
                   iteration: int, config: dict, log: Callable[[str], None]) -> None:
    """With the lock held: refuse (or, overwrite, clear) a used folder for a fresh run, remove
    orphans of interrupted saves, cut the log back on resume, write config.json."""
    if fresh:
        found = run_in_folder(d)
        if found and not overwrite:
            sidecar = next((n for n in ("last.json", *found) if n.endswith(".json")
                            and (d / n).is_file()), "last.json")
            raise RunFolderError(
                f"{d} already holds a run ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}): resume it with --resume "
                f"{d / sidecar}, or start over with --overwrite (deletes that run)")
        if found:
            removed = remove_run(d)
            log(f"overwrite: removed the previous run in {d} ({len(removed)} files)")
    elif overwrite:
        log(f"overwrite ignored: resuming the run in {d} at iteration {iteration}")
    orphans = remove_orphans(d)
    if orphans:
        log(f"{d}: removed {len(orphans)} orphaned file(s) of interrupted saves "
            f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''})")
    if cut_log_at is not None:
        cut = truncate_log(d / LOG_NAME, cut_log_at)
        if cut:
            log(f"{d / LOG_NAME}: removed {cut} row(s) written after iteration {cut_log_at}, "
                "the checkpoint this run resumes from")
    atomic_write_text(d / "config.json", json.dumps(config, indent=1))
