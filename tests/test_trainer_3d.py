"""The 3D recipe end to end on a synthetic LA-like set: training (phase switch included),
exact resume, validation with the sliding-window protocol, eval / predict from the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ucseg_fast.cli import main as cli_main
from ucseg_fast.config import load_config
from ucseg_fast.data.stream3d import VolumeStream
from ucseg_fast.train import Trainer
from ucseg_fast.train.recipe import build_model

PRESET = "la_3d"


@pytest.fixture(scope="module")
def la_root(synth_la):
    return synth_la  # 3 train + 1 test volumes about 40 x 36 x 34 (conftest.SYNTH_LA)


def overrides(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32,32]", "data.labeled_patients": "1",
          "data.labeled_bs": "1", "data.unlabeled_bs": "1", "data.eval_stride_xy": "8",
          "data.eval_stride_z": "8", "train.max_iterations": "4", "train.log_every": "1",
          "train.val_every": "100", "train.checkpoint_every": "100", "train.out_dir": f"'{out_dir}'",
          "train.progress": "false", "train.amp": "none", "train.channels_last": "false",
          "loss.phase2_start": "2", "loss.queue_size": "8",
          # the preset holds out 8 of 80 train.list cases; this 3-case set validates on
          # test.list as the preset did before (tests/test_val_holdout.py covers the hold-out)
          "data.val_holdout": "0", "data.val_split": "'test'"}
    ov.update(over)
    return [f"--{k}={v}" for k, v in ov.items()]


def cfg_for(root, out_dir, **over):
    return load_config(PRESET, overrides(root, out_dir, **over))


def losses(out_dir):
    return [json.loads(line)["L"] for line in open(out_dir / "metrics.jsonl") if '"L"' in line]


def test_3d_recipe_builds_the_3d_pair(la_root, tmp_path):
    cfg = cfg_for(la_root, tmp_path)
    model = build_model(cfg)
    assert type(model.net_1).__name__ == "UNet3D" and type(model.net_2).__name__ == "VNet3D"
    assert model.upg.cross_attn.pos_embed.shape == (1, 8, 1024)  # (32/16)^3 tokens, 1024 wide
    t = Trainer(cfg, log=lambda s: None)
    assert isinstance(t.stream, VolumeStream)
    b = t.stream.next()
    assert b.x_l.shape == (1, 1, 32, 32, 32) and b.y_l.shape == (1, 32, 32, 32)
    assert t.objective.binary and t.objective.ccp.levels[0].queue_size == 8


def test_3d_training_resumes_exactly(la_root, tmp_path):
    # 4 straight steps == 2 + save + resume + 2, crossing the phase-2 (copy-paste) switch
    a = Trainer(cfg_for(la_root, tmp_path / "a"), log=lambda s: None)
    a.train()
    ref = losses(tmp_path / "a")
    assert len(ref) == 4 and all(np.isfinite(ref))
    b = Trainer(cfg_for(la_root, tmp_path / "b"), log=lambda s: None)
    b.train(stop_at=2)
    c = Trainer(cfg_for(la_root, tmp_path / "b"), log=lambda s: None)
    c.load(tmp_path / "b" / "last.json")
    c.train()
    assert losses(tmp_path / "b") == ref
    for (ka, va), (kc, vc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert ka == kc and torch.equal(va, vc), ka
    for (ka, va), (kc, vc) in zip(a.objective.state_dict().items(), c.objective.state_dict().items()):
        assert torch.equal(va, vc), ka
    # phase-2 terms exist in the log from the switch on
    recs = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl") if '"L"' in line]
    assert "mix1" not in recs[1] and "mix1" in recs[2]


def test_3d_validation_eval_and_predict_cli(la_root, tmp_path, capsys):
    out = tmp_path / "run"
    ov = overrides(la_root, out, **{"train.max_iterations": "2", "train.val_every": "2",
                                     "data.val_split": "test"})
    assert cli_main(["train", "--config", PRESET, *ov]) == 0
    hist = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_dice" in line]
    assert [h["iteration"] for h in hist] == [0, 2]
    assert all(0.0 <= h["val_dice"] <= 1.0 for h in hist)
    assert cli_main(["eval", "--checkpoint", str(out / "last.json"), "--split", "test",
                     "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["summary"]["classes"] == [1] and res["summary"]["n_volumes"] == 1
    assert set(res["summary"]["mean"]) == {"dice", "jaccard", "hd95", "asd"}
    # the validation score and the evaluation's Dice are the same protocol
    assert res["summary"]["mean"]["dice"] == pytest.approx(hist[-1]["val_dice"], abs=1e-12)
    case = next((la_root / "2018LA_Seg_Training Set").glob("*/mri_norm2.h5"))
    pred = tmp_path / "pred.npy"
    assert cli_main(["predict", "--checkpoint", str(out / "last.json"), "--input", str(case),
                     "--output", str(pred)]) == 0
    import h5py
    with h5py.File(case) as f:
        shape = f["image"].shape
    p = np.load(pred)
    assert p.shape == shape and set(np.unique(p)) <= {0, 1}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["eager", "fused", "graph"])
def test_3d_training_on_cuda(la_root, tmp_path, variant):
    """GPU tier: the 3D recipe with the CUDA settings (bf16, channels-last-3d), with the fused
    UPG / losses, and captured as CUDA graphs (nms off unless the native CC library is built)."""
    from ucseg_fast.ops.components import _native_cuda
    over = {"train.device": "'cuda'", "train.amp": "bf16", "train.channels_last": "true",
            "train.max_iterations": "6", "loss.phase2_start": "3", "train.val_every": "6"}
    if variant == "fused":
        over.update({"model.uncertainty": "fused", "model.upg_head": "fused",
                     "loss.fused_losses": "true"})
    if variant == "graph":
        over.update({"train.step_mode": "graph", "train.graph_warmup": "1"})
        if _native_cuda() is None:
            over["loss.nms"] = "false"
    t = Trainer(cfg_for(la_root, tmp_path, **over), log=lambda s: None)
    res = t.train()
    ls = losses(tmp_path)
    assert len(ls) == 6 and all(np.isfinite(ls)), ls
    assert 0.0 <= res["best_val_dice"] <= 1.0
    if variant == "graph":
        assert t.runner.mode == "graph"

