"""Trainer: exact resume, checkpoint atomicity/validation, phase switch, logging."""
from __future__ import annotations

import json

import pytest
import torch

from ucseg_fast.config import load_config
from ucseg_fast.train import Trainer
from ucseg_fast.train.schedules import lr_at
from ucseg_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def tiny_cfg(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32]", "data.labeled_bs": "2",
          "data.unlabeled_bs": "2", "train.max_iterations": "4", "train.log_every": "1",
          "train.val_every": "100", "train.checkpoint_every": "100", "train.max_val_volumes": "1",
          "train.out_dir": f"'{out_dir}'", "train.progress": "false", "train.amp": "none",
          "train.channels_last": "false", "loss.phase2_start": "2", "loss.queue_size": "16"}
    ov.update(over)
    return load_config(None, [f"--{k}={v}" for k, v in ov.items()])


def losses(out_dir):
    return [json.loads(l)["L"] for l in open(out_dir / "metrics.jsonl") if '"L"' in l]


def test_resume_is_exact(synth_acdc, tmp_path):
    # N straight == N/2, save, resume in a fresh Trainer, N/2 — crossing the phase-2 switch
    a = Trainer(tiny_cfg(synth_acdc, tmp_path / "a"), log=lambda s: None)
    a.train()
    ref_losses = losses(tmp_path / "a")
    assert len(ref_losses) == 4

    b = Trainer(tiny_cfg(synth_acdc, tmp_path / "b"), log=lambda s: None)
    b.train(stop_at=2)
    c = Trainer(tiny_cfg(synth_acdc, tmp_path / "b"), log=lambda s: None)
    c.load(tmp_path / "b" / "last.json", strict_config=True)
    assert c.iteration == 2
    c.train()
    assert losses(tmp_path / "b") == ref_losses
    for (ka, va), (kc, vc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert ka == kc and torch.equal(va, vc), ka
    for (ka, va), (kc, vc) in zip(a.objective.state_dict().items(), c.objective.state_dict().items()):
        assert torch.equal(va, vc), ka


def test_resume_rejects_other_config(synth_acdc, tmp_path):
    a = Trainer(tiny_cfg(synth_acdc, tmp_path, **{"train.max_iterations": "1"}), log=lambda s: None)
    a.train()
    other = Trainer(tiny_cfg(synth_acdc, tmp_path / "o", **{"loss.nms": "false"}), log=lambda s: None)
    with pytest.raises(CheckpointError, match="loss.nms"):
        other.load(tmp_path / "last.json")
    # world size: recorded; another one is refused naming both (the JSON sidecar is not hashed,
    # so editing it stands in for a checkpoint written by 2 processes)
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["world_size"] == 1 and meta["ranks"] == {}
    (tmp_path / "w2.safetensors").write_bytes((tmp_path / meta["tensors_file"]).read_bytes())
    (tmp_path / "w2.json").write_text(json.dumps(dict(meta, world_size=2,
                                                      tensors_file="w2.safetensors")))
    with pytest.raises(CheckpointError, match="world size 2 but this run has world size 1"):
        a.load(tmp_path / "w2.json")
    # a checkpoint from before per-rank state (no world_size / ranks keys) loads as world size 1
    old = {k: v for k, v in meta.items() if k not in ("world_size", "ranks")}
    (tmp_path / "last.json").write_text(json.dumps(old))
    a.load(tmp_path / "last.json")
    assert a.iteration == 1


def test_checkpoint_pair_is_verified(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    js = save_checkpoint(tmp_path, "x", t, {"iteration": 3})
    tensors, meta = load_checkpoint(js)
    assert torch.equal(tensors["w"], t["w"]) and meta["iteration"] == 3
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    # a second save supersedes the first; the first tensor file is gone, one file per tag
    js = save_checkpoint(tmp_path, "x", {"w": t["w"] + 1}, {"iteration": 4})
    assert len(list(tmp_path.glob("x.*.safetensors"))) == 1
    assert load_checkpoint(js)[1]["iteration"] == 4
    # a tensor file from another save under the same name is detected by its hash
    st = tmp_path / json.loads(js.read_text())["tensors_file"]
    other = save_checkpoint(tmp_path / "other", "x", {"w": torch.zeros(2, 3)}, {"iteration": 9})
    st.write_bytes((other.parent / json.loads(other.read_text())["tensors_file"]).read_bytes())
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(js)
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(js)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.json")


def test_crash_before_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from ucseg_fast.train import checkpoint as ck
    js = save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, {"iteration": 1})
    real = ck._fsync_replace
    calls = []

    def crash_on_commit(src, dst):
        calls.append(dst)
        if dst.suffix == ".json":
            raise OSError("simulated crash before the sidecar rename")
        return real(src, dst)

    monkeypatch.setattr(ck, "_fsync_replace", crash_on_commit)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, {"iteration": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(js)  # still the previous, complete checkpoint
    assert meta["iteration"] == 1 and torch.equal(tensors["w"], torch.ones(3))


def test_training_logs_and_best_checkpoint(synth_acdc, tmp_path):
    cfg = tiny_cfg(synth_acdc, tmp_path, **{"train.max_iterations": "2", "train.val_every": "1",
                                         "loss.phase2_start": "1"})
    tr = Trainer(cfg, log=lambda s: None)
    summary = tr.train()
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in recs if "L" in r]
    vals = [r for r in recs if "val_dice" in r]
    assert [r["iteration"] for r in steps] == [1, 2] and [r["iteration"] for r in vals] == [0, 1, 2]
    for r in steps:
        assert all(k in r for k in ("sup1", "pseudo", "unsup1", "ic", "ife1", "gate1", "img_per_s"))
        assert r["lr"] == pytest.approx(lr_at(r["iteration"] - 1, 0.01, 2))
    assert "mix1" in steps[-1] and "mix1" not in steps[0]  # phase 2 starts at iteration 2
    assert (tmp_path / "best.json").exists() and (tmp_path / "last.json").exists()
    _, meta = load_checkpoint(tmp_path / "best.json")
    assert meta["iteration"] == summary["best_iteration"]
    assert 0.0 <= summary["best_val_dice"] <= 1.0


def test_resume_rejects_changed_schedule(synth_acdc, tmp_path):
    a = Trainer(tiny_cfg(synth_acdc, tmp_path, **{"train.max_iterations": "1"}), log=lambda s: None)
    a.train()
    other = Trainer(tiny_cfg(synth_acdc, tmp_path / "o", **{"train.max_iterations": "9"}),
                    log=lambda s: None)
    with pytest.raises(CheckpointError, match="train.max_iterations"):
        other.load(tmp_path / "last.json")


def test_log_window_spanning_the_phase_switch_averages_each_term_over_its_steps(synth_acdc,
                                                                                tmp_path):
    cfg = tiny_cfg(synth_acdc, tmp_path, **{"train.max_iterations": "4", "train.log_every": "4",
                                           "loss.phase2_start": "3"})
    Trainer(cfg, log=lambda s: None).train()
    rec = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"L"' in l][-1]
    # mix1 exists only at step t=3: its logged value is that step's value, not a quarter of it
    # (the mixed CE + Dice of 4 classes is far above 0.25 * its own value at any init)
    assert rec["mix1"] > 1.0
