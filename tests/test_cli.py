"""End-to-end CLI: prepare -> train -> eval -> predict on a small synthetic set, and the
error messages a user sees for bad input."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ucseg_fast.cli import main

TINY = ["--data.img_size=[32,32]", "--data.labeled_bs=2", "--data.unlabeled_bs=2",
        "--train.max_iterations=3", "--train.val_every=3", "--train.log_every=1",
        "--train.progress=false", "--train.amp='none'", "--loss.queue_size=16",
        "--data.labeled_patients=3"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ACDC"
    assert main(["prepare", "synthetic", "--out", str(root), "--patients", "5"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "demo", f"--data.root='{synthetic}'",
                 f"--train.out_dir='{out}'", *TINY]) == 0
    return out


def test_train_writes_checkpoints_and_log(trained):
    meta = json.loads((trained / "last.json").read_text())
    assert (trained / "best.json").exists() and (trained / meta["tensors_file"]).exists()
    recs = [json.loads(l) for l in open(trained / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2, 3]
    assert any("val_dice" in r for r in recs)


def test_eval_prints_table_and_writes_reports(trained, tmp_path, capsys):
    fig = tmp_path / "overlay.png"
    preds = tmp_path / "preds"
    assert main(["eval", "--checkpoint", str(trained / "best.json"), "--split", "val",
                 "--out", str(tmp_path / "ev"), "--figure", str(fig), "--max-volumes", "2",
                 "--save-predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "RV" in out and "LV" in out and "Dice" in out
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res and (tmp_path / "ev" / "metrics.csv").exists()
    assert fig.stat().st_size > 1000
    assert len(list(preds.glob("*_pred.nii.gz"))) == 2


def test_predict_h5_volume(trained, synthetic, tmp_path):
    vol = sorted((synthetic / "data").glob("*.h5"))[0]
    out = tmp_path / "pred.npy"
    assert main(["predict", "--checkpoint", str(trained / "last"), "--input", str(vol),
                 "--output", str(out)]) == 0
    with h5py.File(vol) as f:
        shape = f["image"].shape
    pred = np.load(out)
    assert pred.shape == shape and pred.max() < 4


def test_errors_name_the_culprit(synthetic, trained, tmp_path, capsys):
    assert main(["train", f"--data.root='{tmp_path / 'nowhere'}'", *TINY]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--train.max_iteratons=3"]) == 2
    assert "train.max_iteratons" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(trained / "best.json"), "--loss.nms=false"]) == 2
    assert "data.root" in capsys.readouterr().err
    # a corrupt slice file is reported by name, never skipped
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(synthetic, bad)
    victim = sorted((bad / "data" / "slices").glob("*.h5"))[0]
    victim.write_bytes(b"not an hdf5 file")
    assert main(["train", f"--data.root='{bad}'", f"--train.out_dir='{tmp_path / 'o'}'",
                 *TINY]) == 2
    assert victim.name in capsys.readouterr().err


def test_predict_nifti_keeps_grid(trained, synthetic, tmp_path):
    import nibabel as nib
    vol = sorted((synthetic / "data").glob("*.h5"))[0]
    with h5py.File(vol) as f:
        img = np.asarray(f["image"])  # [D, H, W]
    affine = np.diag([1.5, 1.25, 10.0, 1.0])
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), affine), str(src))
    out = tmp_path / "out.nii.gz"
    assert main(["predict", "--checkpoint", str(trained / "best.json"), "--input", str(src),
                 "--output", str(out)]) == 0
    res = nib.load(str(out))
    assert res.shape == img.transpose(2, 1, 0).shape and np.allclose(res.affine, affine)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_train_image_folder_with_each_backend(synthetic, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    folder = tmp_path / "png"
    assert main(["prepare", "export", "--src", str(synthetic), "--out", str(folder),
                 "--labeled-patients", "3"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--config", "demo", f"--data.root='{folder}'",
                 "--data.format='folder'", f"--data.backend='{backend}'",
                 f"--train.out_dir='{out}'", "--train.max_val_volumes=2", *TINY]) == 0
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2, 3]
    if backend == "torch":  # the same per-image protocol scores the checkpoint afterwards
        assert main(["eval", "--checkpoint", str(out / "best.json"), "--out",
                     str(tmp_path / "ev")]) == 0
        res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
        assert set(res) == {"dice", "jaccard", "images"} and len(res["images"]) > 0
        assert max(r["iteration"] for r in recs if "val_dice" in r) == 3


def test_help_documents_overwrite_and_the_predict_input_rules(capsys):
    for cmd in (["train", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(cmd)
        assert "--overwrite" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cast to float32" in text and "bool, complex" in text and "4-D NIfTI" in text
