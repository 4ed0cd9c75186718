"""NIfTI image/label volumes (nnU-Net / MSD layout): axis order and spacing against what was
written, labeled/unlabeled split, errors that name the file, the factory stream, and a
2-iteration CLI run with validation on a tiny set written in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from ucseg_fast.cli import main  # noqa: E402
from ucseg_fast.config import load_config  # noqa: E402
from ucseg_fast.data import DataError  # noqa: E402
from ucseg_fast.data.factory import build_train_stream  # noqa: E402
from ucseg_fast.data.nifti import NiftiDataset, read_nifti  # noqa: E402

ZOOMS = (0.5, 0.7, 2.0)  # x, y, z


def _save(path: Path, arr_DHW: np.ndarray, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(arr_DHW.transpose(2, 1, 0)).astype(dtype),
                          np.diag([*ZOOMS, 1.0]))
    img.header.set_zooms(ZOOMS)
    nib.save(img, str(path))


def _volume(rng, d=3, h=24, w=20):
    img = rng.normal(100.0, 20.0, (d, h, w)).astype(np.float32)
    lab = np.zeros((d, h, w), np.uint8)
    lab[:, 6:16, 4:12] = 1
    lab[:, 10:14, 6:9] = 2
    img[lab > 0] += 80.0
    return img, lab


@pytest.fixture()
def nifti_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "Task01"
    for i in range(5):  # 4 labeled cases (3 used as labeled) + 1 case without a label
        img, lab = _volume(rng)
        _save(root / "imagesTr" / f"case{i}_0000.nii.gz", img)  # nnU-Net channel suffix
        if i < 4:
            _save(root / "labelsTr" / f"case{i}.nii.gz", lab, np.uint8)
    img, lab = _volume(rng)
    _save(root / "imagesVal" / "val0.nii.gz", img)
    _save(root / "labelsVal" / "val0.nii.gz", lab, np.float32)  # float storage, integer values
    return root


def test_reader_axes_spacing_and_split(nifti_root):
    vol, sp = read_nifti(nifti_root / "imagesTr" / "case0_0000.nii.gz")
    assert vol.shape == (3, 24, 20) and sp == pytest.approx((2.0, 0.7, 0.5))
    ds = NiftiDataset(nifti_root, num_classes=3)
    cases = ds.cases("train")
    assert [c[0].name for c in cases][:2] == ["case0_0000.nii.gz", "case1_0000.nii.gz"]
    assert cases[4][1] is None and cases[0][1].name == "case0.nii.gz"
    img, lab, sp = ds.read_pair(*cases[0])
    rng = np.random.default_rng(0)
    want_img, want_lab = _volume(rng)
    assert np.array_equal(lab, want_lab) and lab.dtype == np.uint8
    lo, hi = want_img.min(), want_img.max()
    assert np.allclose(img, (want_img - lo) / (hi - lo), atol=1e-6)  # per-volume min-max
    labeled, unlabeled = ds.labeled_split(3)
    assert [p.name for p, _ in labeled] == [f"case{i}_0000.nii.gz" for i in range(3)]
    assert [p.name for p in unlabeled] == ["case3_0000.nii.gz", "case4_0000.nii.gz"]
    x, y, n_l = ds.load_slices(3, (32, 32))
    assert x.shape == (15, 32, 32) and y.shape == (15, 32, 32) and n_l == 9
    assert int(y[:9].max()) == 2 and int(y[9:].max()) == 0
    (name, vimg, vlab, vsp), = ds.val_volumes()
    assert name == "val0" and vimg.shape == vlab.shape == (3, 24, 20) and int(vlab.max()) == 2


def test_bad_nifti_errors_name_the_file(nifti_root, tmp_path):
    ds = NiftiDataset(nifti_root, num_classes=3)
    img = nifti_root / "imagesTr" / "case0_0000.nii.gz"
    bad = tmp_path / "bad"
    _save(bad / "shape.nii.gz", np.zeros((3, 24, 21), np.uint8), np.uint8)
    with pytest.raises(DataError, match=r"shape\.nii\.gz: label shape \(3, 24, 21\)"):
        ds.read_pair(img, bad / "shape.nii.gz")
    out = np.zeros((3, 24, 20), np.uint8)
    out[0, 0, 0] = 5
    _save(bad / "range.nii.gz", out, np.uint8)
    with pytest.raises(DataError, match=r"range\.nii\.gz: label value 5 outside the class set \[0, 3\)"):
        ds.read_pair(img, bad / "range.nii.gz")
    frac = np.zeros((3, 24, 20), np.float32)
    frac[1, 2, 3] = 0.5
    _save(bad / "frac.nii.gz", frac)
    with pytest.raises(DataError, match=r"frac\.nii\.gz: label holds non-integer"):
        ds.read_pair(img, bad / "frac.nii.gz")
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: unreadable NIfTI"):
        read_nifti(bad / "corrupt.nii.gz")
    flat = nib.Nifti1Image(np.zeros((4, 4, 2, 3), np.float32), np.eye(4))
    nib.save(flat, str(bad / "four_d.nii.gz"))
    with pytest.raises(DataError, match=r"four_d\.nii\.gz: expected a 3D volume"):
        read_nifti(bad / "four_d.nii.gz")
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        NiftiDataset(tmp_path / "nowhere", num_classes=3)


def test_explicit_lists(nifti_root):
    tr = sorted((nifti_root / "imagesTr").iterdir())
    ds = NiftiDataset.from_lists(tr[:2], [nifti_root / "labelsTr" / "case0.nii.gz", None],
                                 num_classes=3)
    labeled, unlabeled = ds.labeled_split(3)
    assert len(labeled) == 1 and [p.name for p in unlabeled] == ["case1_0000.nii.gz"]
    with pytest.raises(FileNotFoundError, match="no validation volumes"):
        ds.val_volumes()


def test_factory_stream_over_nifti(nifti_root):
    cfg = load_config(None, [f"--data.root='{nifti_root}'", "--data.format='nifti'",
                             "--data.num_classes=3", "--data.labeled_patients=3",
                             "--data.img_size=[32,32]", "--data.labeled_bs=2",
                             "--data.unlabeled_bs=2", "--data.augment=false"])
    s = build_train_stream(cfg.data, device="cpu", seed=0, channels=3)
    assert s.n_labeled == 9 and s.epoch_length == 4
    b = s.next()
    assert b.x_l.shape == (2, 3, 32, 32) and b.x_u.shape == (2, 3, 32, 32)
    assert torch.equal(b.x_l[:, 0], b.x_l[:, 2])  # gray repeated to 3 channels
    assert set(b.y_l.unique().tolist()) <= {0, 1, 2}


def test_nifti_trains_from_cli(nifti_root, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "demo", f"--data.root='{nifti_root}'",
                 "--data.format='nifti'", "--data.num_classes=3", "--data.labeled_patients=3",
                 f"--train.out_dir='{out}'", "--data.img_size=[32,32]", "--data.labeled_bs=2",
                 "--data.unlabeled_bs=2", "--train.max_iterations=2", "--train.val_every=2",
                 "--train.log_every=1", "--train.progress=false", "--train.amp='none'",
                 "--loss.queue_size=16"]) == 0
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2]
    vals = [r for r in recs if "val_dice" in r]
    assert [r["iteration"] for r in vals] == [0, 2] and all(0 <= r["val_dice"] <= 1 for r in vals)


def test_case_names_keep_numeric_suffixes_and_skip_extra_channels(tmp_path):
    import nibabel as nib
    import numpy as np
    from ucseg_fast.data.nifti import NiftiDataset
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    img = nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4))
    lab = nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4))
    for case in ("pat_0001", "pat_0002"):          # numbered cases, one channel each
        nib.save(img, str(tmp_path / "imagesTr" / f"{case}.nii.gz"))
        nib.save(lab, str(tmp_path / "labelsTr" / f"{case}.nii.gz"))
    for ch in ("0000", "0001"):                     # a two-channel nnU-Net case
        nib.save(img, str(tmp_path / "imagesTr" / f"mm_{ch}.nii.gz"))
    nib.save(lab, str(tmp_path / "labelsTr" / "mm.nii.gz"))
    ds = NiftiDataset(tmp_path, num_classes=2)
    names = sorted(p.name for p, _ in ds.cases("train"))
    assert names == ["mm_0000.nii.gz", "pat_0001.nii.gz", "pat_0002.nii.gz"]
    assert all(l is not None for _, l in ds.cases("train"))
