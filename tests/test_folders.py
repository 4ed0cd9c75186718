"""PNG/JPEG image+mask folders: reader over a folder exported from the real ACDC subset, bad
data errors that name the file, the factory's torch stream over a folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ucseg_fast.config import load_config
from ucseg_fast.data import DataError, SSL4MISDataset
from ucseg_fast.data.factory import build_train_stream
from ucseg_fast.data.folders import FolderDataset, decode_mask, export_folder


@pytest.fixture(scope="module")
def png_root(tmp_path_factory) -> Path:
    from conftest import ACDC_ROOT
    if not (ACDC_ROOT / "train_slices.list").exists():
        pytest.skip(f"ACDC subset not found at {ACDC_ROOT}")
    out = tmp_path_factory.mktemp("acdc_png")
    counts = export_folder(ACDC_ROOT, out, fmt="png", labeled_patients=3, max_val_volumes=1)
    assert counts["labeled"] == 68 and counts["unlabeled"] == 256 - 68 and counts["val"] > 0
    return out


def test_folder_matches_hdf5(png_root, acdc_root):
    ds = FolderDataset(png_root, num_classes=4)
    assert ds.channels == 1 and len(ds.images("labeled")) == 68
    h5 = SSL4MISDataset(acdc_root)
    name = ds.images("labeled")[5].stem
    img_h5, lab_h5 = h5.read_slice(name)
    img, lab = ds.read_pair(ds.images("labeled")[5])
    assert lab.dtype == np.uint8 and np.array_equal(lab, lab_h5)  # index masks are lossless
    lo, hi = img_h5.min(), img_h5.max()
    assert np.abs(img[0] - (img_h5 - lo) / (hi - lo)).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    x, y = ds.load_split("labeled", (64, 64))
    assert x.shape == (68, 1, 64, 64) and y.shape == (68, 64, 64) and int(y.max()) == 3


def test_bad_data_names_the_file(png_root, tmp_path):
    root = tmp_path / "bad"
    (root / "labeled" / "image").mkdir(parents=True)
    (root / "labeled" / "mask").mkdir(parents=True)
    src = sorted((png_root / "labeled" / "image").iterdir())[:3]
    for p in src:
        shutil.copy(p, root / "labeled" / "image" / p.name)
        shutil.copy(png_root / "labeled" / "mask" / p.name, root / "labeled" / "mask" / p.name)
    ds = FolderDataset(root, num_classes=4)
    a, b, c = ds.images("labeled")
    a.write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable image
    with pytest.raises(DataError, match=a.name):
        ds.read_pair(a)
    m = ds.mask_path(b)  # mask of another size
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(m)
    with pytest.raises(DataError, match=f"{m.name}.*mask size 12x10"):
        ds.read_pair(b)
    m = ds.mask_path(c)  # label outside the class set
    arr = np.asarray(Image.open(m)).copy()
    arr[0, 0] = 7
    Image.fromarray(arr).save(m)
    with pytest.raises(DataError, match=f"{m.name}.*mask value 7 outside the class set"):
        ds.read_pair(c)
    with pytest.raises(FileNotFoundError, match="labeled/image"):
        FolderDataset(tmp_path / "nowhere", num_classes=2)


def test_binary_masks(tmp_path):
    m = tmp_path / "m.png"
    arr = np.array([[0, 255, 128], [127, 3, 254]], np.uint8)
    Image.fromarray(arr).save(m)
    assert decode_mask(m, num_classes=2).tolist() == [[0, 1, 1], [0, 0, 1]]  # auto -> binary
    assert decode_mask(m, num_classes=2, mask_mode="binary").tolist() == [[0, 1, 1], [0, 0, 1]]
    Image.fromarray((arr > 127).astype(np.uint8)).save(m)  # 0/1 masks stay index masks
    assert decode_mask(m, num_classes=2).tolist() == [[0, 1, 1], [0, 0, 1]]


def test_factory_torch_folder_stream(png_root):
    cfg = load_config(None, [f"--data.root='{png_root}'", "--data.format=folder", "--data.img_size=[64,64]",
                             "--data.labeled_bs=4", "--data.unlabeled_bs=4", "--data.augment=false"])
    s = build_train_stream(cfg.data, device="cpu", seed=0)
    b = s.next()
    assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (4, 3, 64, 64) and b.y_l.dtype == torch.int64
    assert s.n_labeled == 68 and s.epoch_length == 17
    x, y = FolderDataset(png_root, num_classes=4).load_split("labeled", (64, 64))
    lab, _ = s.sampler.state_dict(), None
    # no augmentation: the batch is exactly the cached slices the sampler chose
    s2 = build_train_stream(cfg.data, device="cpu", seed=0)
    idx, _ = next(s2.sampler)
    assert torch.equal(b.x_l[:, 0], x[torch.from_numpy(idx), 0]) and torch.equal(b.y_l, y[torch.from_numpy(idx)].long())
    assert lab["position"] == 1


def test_auto_mask_with_a_stray_value_is_an_error_not_an_empty_label(tmp_path):
    from PIL import Image
    from ucseg_fast.data.folders import decode_mask
    from ucseg_fast.data.ssl4mis import DataError
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 2:6] = 1
    arr[0, 0] = 2  # a 0/1 class-id mask with one stray value
    p = tmp_path / "m.png"
    Image.fromarray(arr).save(p)
    with pytest.raises(DataError, match="m.png"):
        decode_mask(p, num_classes=2)
    arr255 = (arr == 1).astype(np.uint8) * 255  # a real 0/255 mask is still binary
    Image.fromarray(arr255).save(p)
    assert int(decode_mask(p, num_classes=2).sum()) == 16
