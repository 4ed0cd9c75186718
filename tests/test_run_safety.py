"""Run safety: nothing lost, nothing silently wrong.

A fresh run never replaces a run folder's log and checkpoints (resume or overwrite, said in one
line); one writer per folder (the lock, stale locks taken over); orphans of interrupted saves
removed; a non-finite loss or non-finite weights stop the run without saving; a resume cuts
metrics.jsonl back to its checkpoint; skipped data files are counted in the log and summary.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ucseg_fast.config import load_config
from ucseg_fast.train import Trainer
from ucseg_fast.train.checkpoint import (LOCK_NAME, CheckpointError, RunFolderError,
                                         load_checkpoint, save_checkpoint)
from ucseg_fast.train.trainer import NonFiniteError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from ucseg_fast.data.synthetic import write_synthetic_acdc
    return write_synthetic_acdc(tmp_path_factory.mktemp("acdc"), n_train_patients=4,
                                slices_per_volume=4, n_val=1, n_test=0, size=(48, 48), seed=1)


def cfg(root, out, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32]", "data.labeled_bs": "1",
          "data.unlabeled_bs": "1", "data.labeled_patients": "3", "train.max_iterations": "4",
          "train.log_every": "1", "train.val_every": "100", "train.checkpoint_every": "100",
          "train.max_val_volumes": "1", "train.out_dir": f"'{out}'", "train.progress": "false",
          "train.amp": "'none'", "train.channels_last": "false", "loss.phase2_start": "2",
          "loss.queue_size": "16", **over}
    return load_config(None, [f"--{k}={v}" for k, v in ov.items()])


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def all_finite(js: Path) -> bool:
    tensors, _ = load_checkpoint(js)
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------
def test_fresh_run_into_a_used_folder_is_refused_overwrite_replaces_resume_continues(root,
                                                                                     tmp_path):
    out = tmp_path / "run"
    a = Trainer(cfg(root, out, **{"train.val_every": "1"}), log=lambda s: None)
    a.train(stop_at=2)
    before = snapshot(out)
    assert {"metrics.jsonl", "best.json", "last.json", "config.json"} <= set(before)

    # a fresh run is refused, with both ways out, and the folder is untouched
    b = Trainer(cfg(root, out), log=lambda s: None)
    with pytest.raises(RunFolderError) as e:
        b.train()
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg
    assert str(out) in msg and f"--resume {out / 'last.json'}" in msg and "--overwrite" in msg
    assert snapshot(out) == before

    # a resume is allowed and continues the same log
    c = Trainer(cfg(root, out, **{"train.val_every": "1"}), log=lambda s: None)
    c.load(out / "last.json")
    c.train()
    its = [r["iteration"] for r in rows(out) if "L" in r]
    assert its == [1, 2, 3, 4] and load_checkpoint(out / "last.json")[1]["iteration"] == 4

    # overwrite=True: the previous run's files go, the new run starts clean
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    log = Log()
    d = Trainer(cfg(root, out, **{"train.max_iterations": "1"}), log=log, overwrite=True)
    d.train()
    assert any(line.startswith("overwrite: removed the previous run") for line in log)
    assert [r["iteration"] for r in rows(out)] == [0, 1, 1]  # baseline, step row, val row
    assert not (out / "best.json").exists() or load_checkpoint(out / "best.json")[1][
        "iteration"] == 1
    assert load_checkpoint(out / "last.json")[1]["iteration"] == 1
    assert len(list(out.glob("*.safetensors"))) == len(list(out.glob("*.json"))) - 1  # no strays
    assert (out / "notes.txt").read_text() == "mine" and not (out / LOCK_NAME).exists()


def test_a_second_run_is_refused_by_the_lock_and_a_stale_lock_is_taken_over(root, tmp_path):
    out = tmp_path / "run"
    host = socket.gethostname()
    first = Trainer(cfg(root, out, **{"train.max_iterations": "2"}), log=lambda s: None)
    second = Trainer(cfg(root, out, **{"train.max_iterations": "2"}), log=lambda s: None)

    # while `first` trains, `second` is refused at once, naming the folder and the holder
    refused = []
    nxt = first.stream.next

    def next_and_try_second():
        if not refused:
            with pytest.raises(RunFolderError) as e:
                second.train()
            refused.append(str(e.value))
        return nxt()
    first.stream.next = next_and_try_second
    first.train()
    assert len(refused) == 1
    assert str(out) in refused[0] and f"pid {os.getpid()} on {host}" in refused[0]
    assert "\n" not in refused[0]
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert [r["iteration"] for r in rows(out) if "L" in r] == [1, 2]  # one writer's log

    # a lock of another host cannot be judged: refused, naming that host
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "token": "x"}))
    log_before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="pid 1 on elsewhere.example"):
        second.train()
    assert (out / "metrics.jsonl").read_bytes() == log_before and lock.exists()

    # a lock of this host whose process is gone is stale: taken over, with a warning
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    lock.write_text(json.dumps({"pid": p.pid, "host": host, "token": "x"}))
    log = Log()
    third = Trainer(cfg(root, out, **{"train.max_iterations": "2"}), log=log, overwrite=True)
    third.train()
    assert any("stale lock" in line and f"pid {p.pid}" in line for line in log)
    assert not lock.exists()


def test_orphans_of_interrupted_saves_are_removed_at_the_start(root, tmp_path, monkeypatch):
    # temporaries are unique per writer: pid + random, never a shared name
    from ucseg_fast.train import checkpoint as ck
    seen = []
    real = ck._fsync_replace
    monkeypatch.setattr(ck, "_fsync_replace", lambda src, dst: (seen.append(src.name),
                                                                 real(src, dst))[1])
    save_checkpoint(tmp_path / "ck", "x", {"w": torch.ones(2)}, {"iteration": 1})
    save_checkpoint(tmp_path / "ck", "x", {"w": torch.ones(2)}, {"iteration": 2})
    monkeypatch.undo()
    assert len(set(seen)) == 4 and all(f".{os.getpid()}." in n and n.startswith(".")
                                       and n.endswith(".tmp") for n in seen)

    out = tmp_path / "run"
    Trainer(cfg(root, out), log=lambda s: None).train(stop_at=1)
    orphans = [".last.0123456789ab.safetensors.4242.deadbeef.tmp", ".last.json.4242.cafe.tmp",
               "last.0123456789ab.safetensors", "best.fedcba987654.safetensors"]
    for name in orphans:
        (out / name).write_bytes(b"left by a crash")
    (out / "weights.safetensors").write_bytes(b"a user's file")  # not a checkpoint name: kept
    log = Log()
    t = Trainer(cfg(root, out), log=log)
    t.load(out / "last.json")
    t.train(stop_at=2)
    assert not any((out / n).exists() for n in orphans)
    assert (out / "weights.safetensors").exists()
    assert any("removed 4 orphaned file(s)" in line for line in log)
    assert load_checkpoint(out / "last.json")[1]["iteration"] == 2


@pytest.mark.parametrize("where", ["log", "save"])
def test_nan_learning_rate_stops_at_the_first_check_without_saving(root, tmp_path, where):
    out = tmp_path / "run"
    over = ({"train.log_every": "2"} if where == "log" else
            {"train.log_every": "4", "train.val_every": "1", "train.checkpoint_every": "1"})
    t = Trainer(cfg(root, out, **{"train.max_iterations": "8", **over}), log=lambda s: None)
    # what `--train.base_lr=nan` trained with before the config refused non-finite numbers (or
    # any schedule gone wrong): the learning rate the step reads is NaN from step 0 on
    t.scalars.base_lr = float("nan")
    with pytest.raises(NonFiniteError) as e:
        t.train()
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint of this run was saved" in msg
    if where == "log":  # the first log window: step 1's loss is finite, step 2's is not
        assert t.iteration == 2 and "iterations 1-2 (L = nan)" in msg
        last = rows(out)[-1]
        assert last["iteration"] == 2 and last["nonfinite"] == "L" and last["L"] is None
    else:  # the weights are NaN after step 1 (its loss was finite): caught before validation
        assert t.iteration == 1 and "non-finite weights at iteration 1" in msg
        assert "= nan" in msg and "before validation" in msg
        assert [r["iteration"] for r in rows(out) if "val_dice" in r] == [0]
    assert not (out / "best.json").exists()
    assert not (out / "last.json").exists() or all_finite(out / "last.json")
    assert not list(out.glob("*.safetensors")) and not (out / LOCK_NAME).exists()
    with pytest.raises(NonFiniteError, match="non-finite weights"):  # save() refuses as well
        t.save("manual")
    assert not (out / "manual.json").exists()


def test_huge_intensities_stop_the_run_and_keep_the_last_finite_checkpoint(root, tmp_path):
    out = tmp_path / "run"
    t = Trainer(cfg(root, out, **{"train.max_iterations": "8", "train.log_every": "2",
                                  "train.val_every": "2", "train.checkpoint_every": "2"}),
                log=lambda s: None)
    nxt, calls = t.stream.next, []

    def huge():  # from the third batch on, labeled slices of finite but huge intensity
        b = nxt()
        calls.append(1)
        return dataclasses.replace(b, x_l=torch.full_like(b.x_l, 3e38)) if len(calls) > 2 else b
    t.stream.next = huge
    with pytest.raises(NonFiniteError) as e:
        t.train()
    msg = str(e.value)
    assert t.iteration == 4 and "iterations 3-4" in msg and "\n" not in msg
    assert f"last finite checkpoint {out / 'last.json'} (iteration 2)" in msg
    for tag in ("best", "last"):
        assert load_checkpoint(out / f"{tag}.json")[1]["iteration"] == 2
        assert all_finite(out / f"{tag}.json")
    assert max(r["iteration"] for r in rows(out) if "val_dice" in r) == 2


def test_resume_cuts_the_log_back_to_the_checkpoint(root, tmp_path):
    out = tmp_path / "run"
    a = Trainer(cfg(root, out), log=lambda s: None)
    a.train(stop_at=2)
    a.save("mid")  # the checkpoint a killed run is resumed from
    a.train()      # rows 3 and 4 are written after it ...
    ref = [r["L"] for r in rows(out) if "L" in r]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "L": 0.')  # ... and a row torn by the kill (4 rows to cut)
    # keys that do not change what is trained may differ on resume
    log = Log()
    b = Trainer(cfg(root, out, **{"data.decode_workers": "0", "data.max_image_pixels": "1000000",
                                  "data.resume_changed_data": "true"}), log=log)
    b.load(out / "mid.json")
    assert b.iteration == 2
    b.train()
    recs = rows(out)
    its = [r["iteration"] for r in recs if "L" in r]
    assert its == [1, 2, 3, 4]  # no duplicates
    assert [r["L"] for r in recs if "L" in r] == ref  # and the resumed rows are the same
    assert any("removed 4 row(s) written after iteration 2" in line for line in log)
    # the model-changing keys are still compared
    c = Trainer(cfg(root, tmp_path / "c", **{"loss.nms": "false"}), log=lambda s: None)
    with pytest.raises(CheckpointError, match="loss.nms"):
        c.load(out / "mid.json")


def test_skipped_files_are_in_every_log_row_and_the_summary(root, tmp_path):
    out = tmp_path / "run"
    t = Trainer(cfg(root, out, **{"train.max_iterations": "2", "train.val_every": "2"}),
                log=lambda s: None)
    t.stream.skipped_files = 3
    summary = t.train()
    recs = rows(out)
    assert len(recs) == 4 and all(r["skipped_files"] == 3 for r in recs)
    assert summary["skipped_files"] == 3
    assert all(math.isfinite(r["L"]) for r in recs if "L" in r)


def test_checkpoints_load_without_pickle_and_resume_exactly(root, tmp_path, monkeypatch):
    """A checkpoint is a JSON sidecar + safetensors: loading one never unpickles anything, and a
    run resumed from it ends with the weights of the run that was never interrupted."""
    import pickle
    whole = Trainer(cfg(root, tmp_path / "whole"), log=lambda s: None)
    whole.train()
    out = tmp_path / "run"
    Trainer(cfg(root, out), log=lambda s: None).train(stop_at=2)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load path unpickled something")
    with monkeypatch.context() as m:
        for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                          (torch, "load")):
            m.setattr(mod, name, refuse)
        resumed = Trainer(cfg(root, out), log=lambda s: None)
        resumed.load(out / "last.json")
    assert resumed.iteration == 2
    resumed.train()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
