"""PNG/JPEG image+mask folders: reader over a folder exported from an SSL4MIS ACDC set (the
synthetic one; the real subset in the real-data tier), bad data errors that name the file, the
factory's torch stream over a folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ucseg_fast.config import load_config
from ucseg_fast.data import DataError, SSL4MISDataset, slices_of_first_patients
from ucseg_fast.data.factory import build_train_stream
from ucseg_fast.data.folders import FolderDataset, decode_mask, export_folder


@pytest.fixture(scope="module")
def exported(acdc_set, tmp_path_factory):
    """(SSL4MIS root, PNG folder exported from it with 3 labeled patients, labeled count)."""
    out = tmp_path_factory.mktemp(f"acdc_png_{acdc_set.kind}")
    counts = export_folder(acdc_set.root, out, fmt="png", labeled_patients=3, max_val_volumes=1)
    names = SSL4MISDataset(acdc_set.root).train_slices
    n_l = slices_of_first_patients(names, 3)
    assert counts["labeled"] == n_l and counts["unlabeled"] == len(names) - n_l and counts["val"] > 0
    if acdc_set.real:
        assert n_l == 68 and len(names) == 256
    return acdc_set.root, out, n_l


@pytest.fixture(scope="module")
def png_root(exported) -> Path:
    return exported[1]


def test_folder_matches_hdf5(exported):
    h5_root, png_root, n_l = exported
    ds = FolderDataset(png_root, num_classes=4)
    assert ds.channels == 1 and len(ds.images("labeled")) == n_l
    h5 = SSL4MISDataset(h5_root)
    name = ds.images("labeled")[5].stem
    img_h5, lab_h5 = h5.read_slice(name)
    img, lab = ds.read_pair(ds.images("labeled")[5])
    assert lab.dtype == np.uint8 and np.array_equal(lab, lab_h5)  # index masks are lossless
    lo, hi = img_h5.min(), img_h5.max()
    assert np.abs(img[0] - (img_h5 - lo) / (hi - lo)).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    x, y = ds.load_split("labeled", (64, 64))
    assert x.shape == (n_l, 1, 64, 64) and y.shape == (n_l, 64, 64) and int(y.max()) == 3


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


def test_factory_torch_folder_stream(exported):
    _, png_root, n_l = exported
    cfg = load_config(None, [f"--data.root='{png_root}'", "--data.format=folder", "--data.img_size=[64,64]",
                             "--data.labeled_bs=4", "--data.unlabeled_bs=4", "--data.augment=false"])
    s = build_train_stream(cfg.data, device="cpu", seed=0)
    b = s.next()
    assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (4, 3, 64, 64) and b.y_l.dtype == torch.int64
    assert s.n_labeled == n_l and s.epoch_length == n_l // 4
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
