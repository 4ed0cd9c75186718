"""3D validation on a held-out part of train.list (`data.val_holdout`): the held-out cases never
train, validation reads exactly them, `eval --split test` still reads test.list, bad values are
one-line errors naming the key, the LA preset validates on its last 8 training cases, and
`selection_warning` names a configuration that selects its checkpoint on the test split."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ucseg_fast.config import ConfigError, load_config
from ucseg_fast.data.factory import build_train_stream
from ucseg_fast.data.errors import DataError
from ucseg_fast.data.guards import fingerprint_lines
from ucseg_fast.data.synthetic import write_synthetic_la
from ucseg_fast.data.volumes import VolumeDataset
from ucseg_fast.eval.protocol import evaluation_items, open_dataset, selection_warning

REPO = Path(__file__).resolve().parents[1]
PRESET = "la_3d"
TRAIN = [f"CASE{i:04d}" for i in range(5)]   # train.list of the synthetic set
TEST = ["CASE0005"]                           # test.list
HOLDOUT = 2                                   # CASE0003, CASE0004 validate


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    return write_synthetic_la(tmp_path_factory.mktemp("la"), n_train=5, n_test=1,
                              shape=(36, 34, 32), seed=3)


def overrides(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32,32]", "data.labeled_patients": "1",
          "data.labeled_bs": "1", "data.unlabeled_bs": "1", "data.val_holdout": str(HOLDOUT),
          "data.eval_stride_xy": "32", "data.eval_stride_z": "32", "train.max_iterations": "1",
          "train.val_every": "100", "train.checkpoint_every": "100", "train.out_dir": f"'{out_dir}'",
          "train.progress": "false", "train.amp": "none", "train.channels_last": "false",
          "train.device": "'cpu'", "loss.queue_size": "8", "model.unet_dropout": "[0.0,0.0,0.0,0.0,0.0]"}
    ov.update(over)
    return [f"--{k}={v}" for k, v in ov.items()]


def cfg_for(root, out_dir=".", **over):
    return load_config(PRESET, overrides(root, out_dir, **over))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------- the dataset
def test_dataset_cuts_the_tail_of_train_list(la_root):
    ds = VolumeDataset(la_root, val_holdout=HOLDOUT)
    assert ds.train_volumes == TRAIN[:3] and ds.held_out_volumes == TRAIN[3:]
    assert ds.split_volumes("val") == TRAIN[3:] and ds.split_volumes("test") == TEST
    assert ds.volumes("train") == TRAIN  # the list itself is unchanged
    plain = VolumeDataset(la_root)
    assert plain.train_volumes == TRAIN and plain.held_out_volumes == []
    with pytest.raises(FileNotFoundError, match="val.list"):  # no hold-out: "val" is val.list
        plain.split_volumes("val")
    with pytest.raises(DataError) as e:
        VolumeDataset(la_root, val_holdout=5).train_volumes
    assert one_line(e).startswith(f"{la_root / 'train.list'}: data.val_holdout = 5")
    with pytest.raises(ValueError, match="data.val_holdout = -1"):
        VolumeDataset(la_root, val_holdout=-1)


# ---------------------------------------------------------------------------- training never sees them
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_held_out_cases_never_train(la_root, backend):
    if backend == "dali":
        from ucseg_fast.data.dali import dali_unavailable_reason
        if dali_unavailable_reason() is not None:
            pytest.skip(str(dali_unavailable_reason()))
    cfg = cfg_for(la_root, **{"data.backend": f"'{backend}'"})
    s = build_train_stream(cfg.data, device="cpu", seed=0, channels=1)
    assert s.names == TRAIN[:3] and len(s.images) == 3 and (s.n_labeled, s.n_unlabeled) == (1, 2)
    lab, unl = s.sampler._labeled.tolist(), s.sampler._unlabeled.tolist()
    assert sorted(lab + unl) == [0, 1, 2]
    seen = set()
    for _ in range(12):
        idx, _ = s.draw()
        seen |= {s.names[i] for i in idx.tolist()}
    assert seen == set(TRAIN[:3]) and not seen & set(TRAIN[3:])
    b = s.next()
    assert b.x_l.shape == b.x_u.shape == (1, 1, 32, 32, 32)
    # resume identity: the fingerprints describe the lines trained on, without the held-out tail
    ident = s.sampler.identity
    assert ident["labeled"]["sha256"] == fingerprint_lines(TRAIN[:1], "")["sha256"]
    assert ident["unlabeled"]["sha256"] == fingerprint_lines(TRAIN[1:3], "")["sha256"]
    assert "held out for validation" in ident["unlabeled"]["source"]


def test_resume_refuses_another_hold_out(la_root):
    held = build_train_stream(cfg_for(la_root).data, device="cpu", seed=0, channels=1)
    held.next()
    state = held.state_dict()
    again = build_train_stream(cfg_for(la_root).data, device="cpu", seed=0, channels=1)
    again.load_state_dict(state)  # same hold-out: resumes
    other = build_train_stream(cfg_for(la_root, **{"data.val_holdout": "1"}).data, device="cpu",
                               seed=0, channels=1)
    with pytest.raises(DataError, match="train.list"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------- validation reads them
def test_validation_items_are_the_held_out_cases(la_root):
    cfg = cfg_for(la_root)
    ds = open_dataset(cfg)
    items = evaluation_items(cfg, ds, cfg.data.val_split)  # what the trainer validates on
    assert [it[0] for it in items] == TRAIN[3:]
    image, label = ds.read_volume(TRAIN[3])
    assert np.array_equal(items[0][1], image) and np.array_equal(items[0][2], label)
    assert [it[0] for it in evaluation_items(cfg, ds, "val", limit=1)] == TRAIN[3:4]
    assert [it[0] for it in evaluation_items(cfg, ds, "test")] == TEST
    with pytest.raises(ValueError, match="data.val_holdout = 2; open it with open_dataset"):
        evaluation_items(cfg, VolumeDataset(la_root), "val")


def test_trainer_and_eval_cli(la_root, tmp_path, monkeypatch, capsys):
    from ucseg_fast.cli import main as cli_main
    from ucseg_fast.eval import protocol
    from ucseg_fast.train import Trainer
    out = tmp_path / "run"
    t = Trainer(cfg_for(la_root, out), log=lambda s: None)
    assert t.stream.names == TRAIN[:3]
    assert [it[0] for it in t.val_volumes()] == TRAIN[3:]
    t.save("last")
    read: list[list[str]] = []
    real = protocol.evaluation_items

    def spy(*a, **kw):
        items = real(*a, **kw)
        read.append([it[0] for it in items])
        return items

    monkeypatch.setattr(protocol, "evaluation_items", spy)
    for split in ("test", "val"):
        assert cli_main(["eval", "--checkpoint", str(out / "last.json"), "--split", split,
                         "--out", str(tmp_path / split)]) == 0
        res = json.loads((tmp_path / split / "metrics.json").read_text())
        assert res["summary"]["n_volumes"] == (1 if split == "test" else HOLDOUT)
    assert read == [TEST, TRAIN[3:]]
    captured = capsys.readouterr()
    assert "split val (the last 2 lines of train.list, held out from training)" in captured.out
    assert "WARNING" not in captured.err


# ---------------------------------------------------------------------------- errors name the key
def test_bad_values_are_one_line_errors_naming_the_key(la_root):
    three_d = ["--recipe=binary_3d", "--data.img_size=[32,32,32]", "--data.num_classes=2"]
    with pytest.raises(ConfigError) as e:
        load_config(None, three_d + ["--data.val_holdout=-1"])
    assert "data.val_holdout = -1 must be >= 0" in one_line(e)
    with pytest.raises(ConfigError) as e:  # 2D: val.list
        load_config(None, ["--data.val_holdout=2"])
    assert "data.val_holdout = 2" in one_line(e) and "set data.val_holdout = 0" in str(e.value)
    with pytest.raises(ConfigError) as e:  # NIfTI: imagesVal/
        load_config(None, three_d + ["--data.format=nifti", "--data.val_holdout=2"])
    assert "data.val_holdout = 2" in one_line(e) and "'nifti'" in str(e.value)
    with pytest.raises(ConfigError) as e:  # the hold-out is the validation split: no other list
        load_config(PRESET, ["--data.val_split=test"])
    assert "data.val_holdout = 8" in one_line(e) and "data.val_split = 'test'" in str(e.value)
    with pytest.raises(ConfigError, match="data.val_holdout: expected an integer"):
        load_config(None, three_d + ["--data.val_holdout=2.5"])
    # labeled + held out must leave an unlabeled volume: known once train.list is read
    cfg = cfg_for(la_root, **{"data.labeled_patients": "3"})
    with pytest.raises(DataError) as e:
        build_train_stream(cfg.data, device="cpu", seed=0, channels=1)
    msg = one_line(e)
    assert msg.startswith(str(la_root / "train.list"))
    assert "data.labeled_patients = 3" in msg and "data.val_holdout = 2" in msg
    cfg = cfg_for(la_root, **{"data.val_holdout": "5"})
    with pytest.raises(DataError, match="data.val_holdout = 5"):
        build_train_stream(cfg.data, device="cpu", seed=0, channels=1)


# ---------------------------------------------------------------------------- preset and warning
def test_la_preset_validates_on_held_out_training_cases():
    cfg = load_config(PRESET)
    assert cfg.data.val_holdout == 8 and cfg.data.val_split != "test"
    assert cfg.data.labeled_patients == 8  # 8 labeled + 8 held out of 80: 64 unlabeled
    assert selection_warning(cfg) is None


def test_selection_warning_fires_on_the_test_split():
    two_d = load_config(None)
    assert two_d.data.val_split == "val" and selection_warning(two_d) is None
    for cfg in (load_config(None, ["--data.val_split=test"]),
                load_config(PRESET, ["--data.val_holdout=0", "--data.val_split=test"])):
        w = selection_warning(cfg)
        assert w is not None and "\n" not in w and w.startswith("WARNING")
        assert "test.list" in w and "data.val_holdout" in w
    other = dataclasses.replace(two_d, data=dataclasses.replace(two_d.data, val_split="heldout"))
    assert selection_warning(other) is None
