"""The 3D recipe on NIfTI volumes in the nnU-Net / MSD layout (Task02_Heart style): axes kept as
stored, header spacing, per-volume z-score, the labeled/unlabeled split, validation items with
spacing, errors that name the file, the factory's `VolumeStream`, and a 2-iteration run through
`Trainer` with the `la_3d` preset followed by `ucseg-fast eval` on its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from ucseg_fast.cli import main as cli_main  # noqa: E402
from ucseg_fast.config import load_config  # noqa: E402
from ucseg_fast.data import DataError  # noqa: E402
from ucseg_fast.data.factory import build_train_stream  # noqa: E402
from ucseg_fast.data.nifti import NiftiDataset, read_nifti, resolve_intensity  # noqa: E402
from ucseg_fast.data.stream3d import VolumeStream  # noqa: E402
from ucseg_fast.eval.metrics import segmentation_metrics  # noqa: E402
from ucseg_fast.eval.protocol import evaluate, evaluation_items, open_dataset  # noqa: E402
from ucseg_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZOOMS = (0.625, 0.75, 1.25)  # x, y, z
# imagesTr file name -> shape [X, Y, Z]; the label file (labelsTr/<case>.nii.gz) or None
TRAIN = {
    "la_003_0000.nii.gz": (40, 36, 34),   # nnU-Net channel suffix
    "la_004.nii.gz": (36, 40, 33),        # plain name
    "la_005_0000.nii.gz": (38, 34, 36),   # labeled file, but beyond labeled_patients = 2
    "la_007.nii.gz": (34, 38, 35),        # no label at all
    "la_009_0000.nii.gz": (37, 35, 34),
}
UNLABELED_FILES = ("la_007.nii.gz",)
VAL_SHAPE = (32, 34, 32)  # 2 sliding windows of 32³ at stride 8: a quick validation


def _case(name: str) -> str:
    return name.replace("_0000", "").replace(".nii.gz", "")


def _volume(shape, seed):
    """int16 MR-like intensities (mean ~300) with a bright ellipsoid = label 1; [X, Y, Z]."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = [n / 2 + rng.uniform(-2, 2) for n in shape]
    lab = (((x - c[0]) / 9) ** 2 + ((y - c[1]) / 7) ** 2 + ((z - c[2]) / 6) ** 2 <= 1).astype(np.uint8)
    img = rng.normal(300.0, 40.0, shape) + 500.0 * lab + 2.0 * x  # a gradient along x: axes matter
    return img.astype(np.int16), lab


def _save(path: Path, arr: np.ndarray, zooms=ZOOMS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms[: arr.ndim] if arr.ndim < 3 else zooms)
    nib.save(img, str(path))


def _zscore(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return ((a - a.mean()) / a.std()).astype(np.float32)


@pytest.fixture(scope="module")
def heart_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nifti3d") / "Task02_Heart"
    for i, (name, shape) in enumerate(TRAIN.items()):
        img, lab = _volume(shape, seed=i)
        _save(root / "imagesTr" / name, img)
        if name not in UNLABELED_FILES:
            _save(root / "labelsTr" / f"{_case(name)}.nii.gz", lab)
    img, lab = _volume(VAL_SHAPE, seed=10)
    _save(root / "imagesVal" / "la_010_0000.nii.gz", img)
    _save(root / "labelsVal" / "la_010.nii.gz", lab.astype(np.float32))  # float storage, ints
    img, _ = _volume(VAL_SHAPE, seed=11)
    _save(root / "imagesTs" / "la_020.nii.gz", img)  # MSD test images: no labels, not used here
    return root


def _overrides(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.format": "'nifti'", "data.img_size": "[32,32,32]",
          "data.labeled_patients": "2", "data.labeled_bs": "1", "data.unlabeled_bs": "1",
          "data.val_split": "'val'", "data.val_holdout": "0",  # NIfTI: imagesVal/, no hold-out
          "data.eval_stride_xy": "8", "data.eval_stride_z": "8",
          "train.max_iterations": "2", "train.log_every": "1", "train.val_every": "2",
          "train.checkpoint_every": "100", "train.out_dir": f"'{out_dir}'", "train.progress": "false",
          "train.amp": "none", "train.channels_last": "false", "loss.phase2_start": "2",
          "loss.queue_size": "8"}
    ov.update(over)
    return [f"--{k}={v}" for k, v in ov.items()]


def _cfg(root, out_dir, **over):
    return load_config("la_3d", _overrides(root, out_dir, **over))


# ---------------------------------------------------------------------------- reading
def test_volumes_keep_their_axes_spacing_and_are_z_scored(heart_root):
    raw, _ = _volume(TRAIN["la_003_0000.nii.gz"], seed=0)
    path = heart_root / "imagesTr" / "la_003_0000.nii.gz"
    arr, sp = read_nifti(path, as_stored=True)
    assert np.array_equal(arr, raw) and sp == pytest.approx(ZOOMS)           # [X, Y, Z], (x, y, z)
    arr2d, sp2d = read_nifti(path)                                          # the 2D path: axial slices
    assert arr2d.shape == raw.shape[::-1] and sp2d == pytest.approx(ZOOMS[::-1])

    ds = NiftiDataset(heart_root, num_classes=2, dims=3)
    assert ds.normalize == "zscore"
    img, lab, sp = ds.read_pair(path, heart_root / "labelsTr" / "la_003.nii.gz")
    assert img.dtype == np.float32 and img.shape == raw.shape and sp == pytest.approx(ZOOMS)
    np.testing.assert_allclose(img, _zscore(raw), atol=1e-5)
    assert abs(float(img.mean())) < 1e-4 and float(img.std()) == pytest.approx(1.0, abs=1e-4)
    assert np.array_equal(lab, _volume(TRAIN["la_003_0000.nii.gz"], seed=0)[1])
    # data.intensity overrides: stored values, or min-max to [0, 1]
    none, _ = NiftiDataset(heart_root, num_classes=2, dims=3, normalize="none").read_image(path)
    assert np.array_equal(none, raw.astype(np.float32))
    mm, _ = NiftiDataset(heart_root, num_classes=2, dims=3, normalize="minmax").read_image(path)
    assert float(mm.min()) == 0.0 and float(mm.max()) == pytest.approx(1.0)
    assert [resolve_intensity("auto", d) for d in (2, 3)] == ["minmax", "zscore"]
    assert NiftiDataset(heart_root, num_classes=2).normalize == "minmax"    # 2D default unchanged
    with pytest.raises(ValueError, match="intensity must be one of"):
        resolve_intensity("std", 3)


def test_labeled_unlabeled_split_and_validation_items(heart_root, monkeypatch):
    ds = NiftiDataset(heart_root, num_classes=2, dims=3)
    read = []
    real = ds.read_label
    monkeypatch.setattr(ds, "read_label", lambda p: (read.append(Path(p).name), real(p))[1])
    images, labels, n_l, names = ds.load_volumes(2)
    assert n_l == 2 and names == ["la_003", "la_004", "la_005", "la_007", "la_009"]
    assert read == ["la_003.nii.gz", "la_004.nii.gz"]       # unlabeled cases' labels never read
    assert [tuple(x.shape) for x in images] == list(TRAIN.values())
    assert all(x.dtype == torch.float32 and y.dtype == torch.uint8 for x, y in zip(images, labels))
    assert int(labels[0].max()) == 1 and all(int(y.max()) == 0 for y in labels[2:])
    assert all(tuple(y.shape) == tuple(x.shape) for x, y in zip(images, labels))

    with pytest.raises(DataError, match=rf"{heart_root}: every imagesTr case \(5\) is labeled"):
        _all_labeled(heart_root).load_volumes(5)
    with pytest.raises(DataError, match=r"labeled_patients = 5 labeled volumes asked, 4 imagesTr"):
        ds.load_volumes(5)

    cfg = _cfg(heart_root, "unused")
    dset = open_dataset(cfg)
    assert isinstance(dset, NiftiDataset) and dset.dims == 3
    (name, img, lab, sp), = evaluation_items(cfg, dset, "val")
    raw, want = _volume(VAL_SHAPE, seed=10)
    assert name == "la_010" and img.shape == lab.shape == VAL_SHAPE and sp == pytest.approx(ZOOMS)
    assert img.dtype == np.float32 and lab.dtype == np.int64 and np.array_equal(lab, want)
    np.testing.assert_allclose(img, _zscore(raw), atol=1e-5)
    with pytest.raises(ValueError, match="one held-out split"):
        evaluation_items(cfg, dset, "test")


def _all_labeled(heart_root: Path) -> NiftiDataset:
    """A copy of the training cases in which every one has a label (no unlabeled volume)."""
    tr = sorted((heart_root / "imagesTr").iterdir())
    labs = [heart_root / "labelsTr" / f"{_case(p.name)}.nii.gz" for p in tr]
    labs = [lab if lab.is_file() else heart_root / "labelsTr" / "la_003.nii.gz" for lab in labs]
    ds = NiftiDataset.from_lists(tr, labs, num_classes=2, dims=3)
    ds.root = heart_root  # the error names the folder
    return ds


def test_validation_falls_back_to_imagesTs(tmp_path):
    img, lab = _volume((20, 18, 16), seed=1)
    for i in range(2):
        _save(tmp_path / "imagesTr" / f"c{i}.nii.gz", img)
    _save(tmp_path / "labelsTr" / "c0.nii.gz", lab)
    _save(tmp_path / "imagesTs" / "t0_0000.nii.gz", img)
    _save(tmp_path / "labelsTs" / "t0.nii.gz", lab)
    (name, vimg, vlab, sp), = NiftiDataset(tmp_path, num_classes=2, dims=3).val_volumes()
    assert name == "t0" and vimg.shape == (20, 18, 16) and vlab.dtype == np.int64
    assert sp == pytest.approx(ZOOMS)


# ---------------------------------------------------------------------------- errors
def test_every_error_names_the_file(heart_root, tmp_path):
    ds = NiftiDataset(heart_root, num_classes=2, dims=3)
    img = heart_root / "imagesTr" / "la_003_0000.nii.gz"
    shape = TRAIN["la_003_0000.nii.gz"]
    bad = tmp_path / "bad"
    _save(bad / "shape.nii.gz", np.zeros((40, 36, 33), np.uint8))
    with pytest.raises(DataError, match=r"shape\.nii\.gz: label shape \(40, 36, 33\) \(X, Y, Z\)"):
        ds.read_pair(img, bad / "shape.nii.gz")
    rng = np.zeros(shape, np.uint8)
    rng[1, 2, 3] = 2
    _save(bad / "range.nii.gz", rng)
    with pytest.raises(DataError, match=r"range\.nii\.gz: label value 2 outside the class set \[0, 2\)"):
        ds.read_pair(img, bad / "range.nii.gz")
    frac = np.zeros(shape, np.float32)
    frac[4, 5, 6] = 0.5
    _save(bad / "frac.nii.gz", frac)
    with pytest.raises(DataError, match=r"frac\.nii\.gz: label holds non-integer"):
        ds.read_pair(img, bad / "frac.nii.gz")
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: unreadable NIfTI"):
        ds.read_image(bad / "corrupt.nii.gz")
    _save(bad / "flat.nii.gz", np.ones((16, 16), np.float32))   # a 2D file
    with pytest.raises(DataError, match=r"flat\.nii\.gz: expected a 3D volume"):
        ds.read_image(bad / "flat.nii.gz")
    nan = np.ones(shape, np.float32)
    nan[0, 0, 0] = np.nan
    _save(bad / "nan.nii.gz", nan)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: image holds NaN"):
        ds.read_image(bad / "nan.nii.gz")
    _save(bad / "const.nii.gz", np.full(shape, 7, np.int16))
    with pytest.raises(DataError, match=r"const\.nii\.gz: constant image \(std 0"):
        ds.read_image(bad / "const.nii.gz")
    with pytest.raises(DataError, match=r"val0\.nii\.gz: validation image has no label"):
        _save(bad / "v" / "imagesVal" / "val0.nii.gz", np.ones(shape, np.float32))
        _save(bad / "v" / "imagesTr" / "a.nii.gz", np.ones(shape, np.float32))
        NiftiDataset(bad / "v", num_classes=2, dims=3).val_volumes()
    # in the training cache too: a broken unlabeled image stops the stream, naming it
    tree = tmp_path / "tree"
    good, lab = _volume((20, 20, 20), seed=2)
    _save(tree / "imagesTr" / "a.nii.gz", good)
    _save(tree / "labelsTr" / "a.nii.gz", lab)
    _save(tree / "imagesTr" / "b.nii.gz", nan[:20, :20, :20])
    with pytest.raises(DataError, match=r"imagesTr/b\.nii\.gz: image holds NaN"):
        NiftiDataset(tree, num_classes=2, dims=3).load_volumes(1)
    with pytest.raises(ValueError, match="dims=2"):
        NiftiDataset(tree, num_classes=2, dims=3).load_slices(1, (32, 32))


# ---------------------------------------------------------------------------- factory
def test_factory_builds_a_volume_stream(heart_root, tmp_path):
    cfg = _cfg(heart_root, tmp_path)
    s = build_train_stream(cfg.data, device="cpu", seed=0, channels=1)
    assert isinstance(s, VolumeStream) and s.img_size == (32, 32, 32) and s.rot_flip
    assert s.n_labeled == 2 and s.n_unlabeled == 3 and s.epoch_length == 2
    assert s.names == ["la_003", "la_004", "la_005", "la_007", "la_009"]
    assert [tuple(x.shape) for x in s.images] == list(TRAIN.values())
    assert all(x.device.type == "cpu" for x in s.images)                  # cache on the CPU
    raw, _ = _volume(TRAIN["la_004.nii.gz"], seed=1)
    np.testing.assert_allclose(s.images[1].numpy(), _zscore(raw), atol=1e-5)
    b = s.next()
    assert b.x_l.shape == b.x_u.shape == (1, 1, 32, 32, 32) and b.y_l.shape == (1, 32, 32, 32)
    assert b.y_l.dtype == torch.int64 and set(b.y_l.unique().tolist()) <= {0, 1}
    raw_cfg = _cfg(heart_root, tmp_path, **{"data.intensity": "'none'", "data.augment": "false"})
    r = build_train_stream(raw_cfg.data, device="cpu", seed=0, channels=1)
    assert not r.rot_flip and torch.equal(r.images[1], torch.from_numpy(raw.astype(np.float32)))
    with pytest.raises(DataError, match="labeled_patients = 5 labeled volumes asked"):
        build_train_stream(_cfg(heart_root, tmp_path, **{"data.labeled_patients": "5"}).data,
                           device="cpu", seed=0, channels=1)


def test_strict_metrics_use_the_header_spacing(heart_root):
    cfg = _cfg(heart_root, "unused")
    items = evaluation_items(cfg, open_dataset(cfg), "val")

    def everything(x):  # σ(P)[:, 1] > 0.5 everywhere: the prediction is the whole volume
        return torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])], 1)

    kw = dict(device=torch.device("cpu"), batch_size=8, mode="strict")
    res = evaluate(cfg, everything, items, **kw)
    vox = evaluate(cfg, everything, [it[:3] for it in items], **kw)
    _, _, lab, sp = items[0]
    want = segmentation_metrics(np.ones_like(lab), lab, 2, spacing=sp, mode="strict")
    got = res.per_volume[0]
    assert got.units == "spacing" and vox.per_volume[0].units == "voxel"
    assert float(got.hd95[0]) == pytest.approx(float(want.hd95[0]))
    assert float(got.asd[0]) == pytest.approx(float(want.asd[0]))
    assert float(got.hd95[0]) != pytest.approx(float(vox.per_volume[0].hd95[0]))


# ---------------------------------------------------------------------------- training
def test_la_3d_trains_on_nifti_and_evaluates(heart_root, tmp_path):
    out = tmp_path / "run"
    t = Trainer(_cfg(heart_root, out), log=lambda s: None)
    assert isinstance(t.stream, VolumeStream) and isinstance(t.dataset, NiftiDataset)
    t.train()
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2]
    assert all(np.isfinite(r["L"]) for r in recs if "L" in r)
    vals = [r for r in recs if "val_dice" in r]
    assert [r["iteration"] for r in vals] == [0, 2] and all(0.0 <= r["val_dice"] <= 1.0 for r in vals)
    assert (out / "last.json").is_file()
    assert cli_main(["eval", "--checkpoint", str(out / "last.json"), "--split", "val",
                     "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["summary"]["classes"] == [1] and res["summary"]["n_volumes"] == 1
    assert set(res["summary"]["mean"]) == {"dice", "jaccard", "hd95", "asd"}
    assert res["summary"]["mean"]["dice"] == pytest.approx(vals[-1]["val_dice"], abs=1e-12)
    # predict on the raw NIfTI file: the training scaling (z-score), the file's axes and grid
    import nibabel as nib
    from ucseg_fast.cli import read_input
    from ucseg_fast.eval.sliding_window import predict_case_3d
    src = heart_root / "imagesVal" / "la_010_0000.nii.gz"
    img, spacing, _ = read_input(t.cfg, src)
    want_img, want_spacing = t.dataset.read_image(src)
    assert np.array_equal(img, want_img) and spacing == want_spacing
    assert abs(float(img.mean())) < 1e-4 and abs(float(img.std()) - 1.0) < 1e-3  # z-scored
    raw = np.asarray(nib.load(str(src)).dataobj)
    assert img.shape == raw.shape  # [X, Y, Z] as stored
    pred_path = tmp_path / "seg.nii.gz"
    assert cli_main(["predict", "--checkpoint", str(out / "last.json"), "--input", str(src),
                     "--output", str(pred_path)]) == 0
    pred = np.asarray(nib.load(str(pred_path)).dataobj)
    t.model.eval()
    want = predict_case_3d(t.predict_fn(), want_img, patch=(32, 32, 32),
                           stride_xy=t.cfg.data.eval_stride_xy,
                           stride_z=t.cfg.data.eval_stride_z).numpy()
    assert np.array_equal(pred, want)
