"""Data layer: SSL4MIS reader (synthetic set, the real ACDC subset in the real-data tier, broken
files), sampler semantics and resume, synthetic writer, TrainStream, Batch."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ucseg_fast.data import (
    LABELED_SLICES,
    Batch,
    DataError,
    SSL4MISDataset,
    TrainStream,
    TwoStreamSampler,
    cv2_nearest_indices,
    labeled_slice_count,
    resize_nearest,
    slices_of_first_patients,
    write_synthetic_acdc,
)

NO_AUG = dict(hflip_p=0.0, vflip_p=0.0, ssr_p=0.0, distort_p=0.0, dropout_p=0.0)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    # 3 train patients x 2 frames x 4 slices = 24 lines; 1 val patient = 2 volumes; no test.list
    return write_synthetic_acdc(
        tmp_path_factory.mktemp("synth"), n_train_patients=3, slices_per_volume=4, n_val=1, n_test=0,
        size=(40, 48), seed=1,
    )


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


# ---------------------------------------------------------------------------- ACDC sets
@pytest.mark.realdata
def test_acdc_counts(real_acdc):
    """The real subset is what its README says: the SSL4MIS list's first 14 patients."""
    ds = SSL4MISDataset(real_acdc, num_classes=4)
    names = ds.train_slices
    assert len(names) == 256 and names[0] == "patient099_frame01_slice_15"
    assert labeled_slice_count(3) == 68 and labeled_slice_count(7) == 136 and labeled_slice_count(14) == 256
    # the table agrees with the list: the first k patients' lines
    for k in (3, 7, 14):
        assert slices_of_first_patients(names, k) == LABELED_SLICES[k]
    assert len(ds.volumes("val")) == 10
    with pytest.raises(FileNotFoundError, match="test.list"):
        ds.volumes("test")
    with pytest.raises(ValueError, match="unknown split 'train'"):
        ds.volumes("train")


def _slice_and_volume(acdc_set):
    """A base slice with all four classes and a validation volume of the set."""
    if acdc_set.real:
        return "patient004_frame01_slice_1", "patient019_frame01"
    ds = SSL4MISDataset(acdc_set.root)
    return next(n for n in ds.train_slices if n.endswith("_slice_1")), ds.volumes("val")[0]


def test_acdc_read_slice_and_volume(acdc_set):
    ds = SSL4MISDataset(acdc_set.root, num_classes=4)
    name, volume = _slice_and_volume(acdc_set)
    image, label = ds.read_slice(name)
    with h5py.File(acdc_set.root / "data" / "slices" / f"{name}.h5", "r") as f:
        raw_image, raw_label = f["image"][()], f["label"][()]
    assert image.dtype == np.float32 and label.dtype == np.int64 and image.shape == raw_image.shape
    assert np.array_equal(image, raw_image) and np.array_equal(label, raw_label)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    vol, vlab = ds.read_volume(volume)
    with h5py.File(acdc_set.root / "data" / f"{volume}.h5", "r") as f:
        assert vol.shape == vlab.shape == f["image"].shape
    assert vol.dtype == np.float32 and vlab.dtype == np.int64
    assert 0.0 <= vol.min() and vol.max() <= 1.0 and vlab.max() <= 3
    if acdc_set.real:
        assert image.shape == (256, 232) and vol.shape == (11, 256, 216)


def test_acdc_load_slices_resizes_with_cv2_rule(acdc_set):
    ds = SSL4MISDataset(acdc_set.root)
    names = [_slice_and_volume(acdc_set)[0], ds.train_slices[0]]
    images, labels = ds.load_slices(names)
    assert images.shape == labels.shape == (2, 256, 256)
    assert images.dtype == torch.float32 and labels.dtype == torch.uint8
    image, label = ds.read_slice(names[0])  # real: 256 x 232, synthetic: 256 x 216
    assert image.shape[1] != 256
    rows, cols = cv2_nearest_indices(image.shape[0], 256), cv2_nearest_indices(image.shape[1], 256)
    assert np.array_equal(images[0].numpy(), image[rows][:, cols])
    assert np.array_equal(labels[0].numpy(), label[rows][:, cols])


def test_cv2_nearest_rule():
    # OpenCV INTER_NEAREST: src = min(floor(dst * src_size / dst_size), src_size - 1), corner-aligned
    assert cv2_nearest_indices(4, 2).tolist() == [0, 2]  # the pixel-centre rule would give [1, 3]
    assert cv2_nearest_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert cv2_nearest_indices(3, 5).tolist() == [0, 0, 1, 1, 2]
    idx = cv2_nearest_indices(232, 256)
    assert idx[:12].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9] and idx[32] == 29 and idx[-1] == 231
    # torch's legacy "nearest" is documented to reproduce OpenCV's rule: agree on ACDC's sizes
    for src in (154, 208, 216, 224, 232, 240, 248, 256, 264, 276, 288, 304, 384):
        ref = F.interpolate(torch.arange(src, dtype=torch.float64).view(1, 1, -1), size=256, mode="nearest")
        assert np.array_equal(cv2_nearest_indices(src, 256), ref.view(-1).long().numpy()), src
    a = np.arange(12).reshape(3, 4)
    assert resize_nearest(a, (3, 4)) is a
    assert resize_nearest(a, (6, 2)).tolist() == [[0, 2], [0, 2], [4, 6], [4, 6], [8, 10], [8, 10]]


def test_labeled_slice_count_error():
    with pytest.raises(ValueError, match=r"5 is not in .*allowed: 3, 7, 14, 21, 28, 35, 70, 140"):
        labeled_slice_count(5)
    assert labeled_slice_count(140) == labeled_slice_count(70) == 1312


# ---------------------------------------------------------------------------- broken layouts
def test_missing_root_and_files(synth_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SSL4MISDataset(tmp_path / "nowhere")
    root = _copy(synth_root, tmp_path)
    victim = root / "data" / "slices" / "patient001_frame01_slice_1.h5"
    if not victim.exists():
        victim = sorted((root / "data" / "slices").glob("*.h5"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        SSL4MISDataset(root)
    ds = SSL4MISDataset(root, check_files=False)  # lazily: the read names the file
    with pytest.raises(FileNotFoundError, match=victim.name):
        ds.read_slice(victim.stem)
    (root / "train_slices.list").unlink()
    with pytest.raises(FileNotFoundError, match="train_slices.list"):
        SSL4MISDataset(root).train_slices


def test_corrupt_and_bad_h5(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path)
    ds = SSL4MISDataset(root, num_classes=4)
    names = ds.train_slices
    path = lambda n: root / "data" / "slices" / f"{n}.h5"  # noqa: E731
    path(names[0]).write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match=f"{names[0]}.h5: not a readable HDF5"):
        ds.read_slice(names[0])
    with h5py.File(path(names[1]), "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
    with pytest.raises(DataError, match=f"{names[1]}.h5: missing dataset 'label'"):
        ds.read_slice(names[1])
    with h5py.File(path(names[2]), "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
        f["label"] = np.full((8, 8), 7, np.uint8)
    with pytest.raises(DataError, match=rf"{names[2]}.h5: 'label' value 7 outside \[0, num_classes=4\)"):
        ds.read_slice(names[2])
    with pytest.raises(DataError, match="value 7"):
        ds.load_slices([names[2]])
    with h5py.File(path(names[3]), "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
        f["label"] = np.zeros((8, 9), np.uint8)
    with pytest.raises(DataError, match=r"shape \(8, 8\) != 'label' shape \(8, 9\)"):
        ds.read_slice(names[3])
    vol = ds.volumes("val")[0]
    shutil.copy(path(names[4]), root / "data" / f"{vol}.h5")  # a 2-D slice where a volume belongs
    with pytest.raises(DataError, match=f"{vol}.h5: expected 3-D"):
        ds.read_volume(vol)
    assert isinstance(DataError("x"), ValueError)


# ---------------------------------------------------------------------------- sampler
def _ssl4mis_oracle(labeled, unlabeled, lbs, ubs, rng, epochs):
    """Literal SSL4MIS TwoStreamBatchSampler (grouper/iterate_eternally) on a given generator."""
    def grouper(it, n):
        args = [iter(it)] * n
        return zip(*args)

    def eternal(idx):
        def shuffles():
            while True:
                yield rng.permutation(idx)
        return itertools.chain.from_iterable(shuffles())

    out = []
    for _ in range(epochs):
        primary = rng.permutation(labeled)
        out += [(list(a), list(b)) for a, b in zip(grouper(primary, lbs), grouper(eternal(unlabeled), ubs))]
    return out


@pytest.mark.parametrize("n_l,n_u,lbs,ubs", [(136, 120, 12, 12), (10, 3, 3, 5), (8, 40, 2, 2)])
def test_sampler_matches_ssl4mis(n_l, n_u, lbs, ubs):
    lab, unl = np.arange(n_l), np.arange(n_l, n_l + n_u)
    s = TwoStreamSampler(lab, unl, lbs, ubs, seed=42)
    assert s.epoch_length == n_l // lbs
    got = [(a.tolist(), b.tolist()) for a, b in itertools.islice(s, 3 * s.epoch_length)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(42)))
    assert got == _ssl4mis_oracle(lab, unl, lbs, ubs, rng, 3)


def test_sampler_semantics():
    lab, unl = np.arange(0, 10), np.arange(10, 17)
    s = TwoStreamSampler(lab, unl, 3, 4, seed=0)
    assert s.epoch_length == 3
    for _ in range(4):  # epochs
        batches = [next(s) for _ in range(s.epoch_length)]
        l_all = np.concatenate([b[0] for b in batches])
        u_all = np.concatenate([b[1] for b in batches])
        assert len(set(l_all)) == 9 and set(l_all) <= set(lab)  # one permutation, last 1 dropped
        assert set(u_all) <= set(unl)
        # the unlabeled chain restarts with the epoch: its first 7 form a permutation
        assert sorted(u_all[:7]) == list(unl)
        assert all(len(b[0]) == 3 and len(b[1]) == 4 for b in batches)


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_sampler_resume_exact(k):
    make = lambda: TwoStreamSampler(np.arange(10), np.arange(10, 17), 3, 4, seed=5)  # noqa: E731
    a = make()
    for _ in range(k):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    rest_a = [next(a) for _ in range(8)]
    b = make()
    next(b)  # a different position, overwritten by the load
    b.load_state_dict(state)
    rest_b = [next(b) for _ in range(8)]
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(rest_a, rest_b))


def test_sampler_ranks_and_errors():
    a = TwoStreamSampler(np.arange(20), np.arange(20, 40), 4, 4, seed=1, rank=0, world_size=2)
    b = TwoStreamSampler(np.arange(20), np.arange(20, 40), 4, 4, seed=1, rank=1, world_size=2)
    c = TwoStreamSampler(np.arange(20), np.arange(20, 40), 4, 4, seed=1, rank=1, world_size=2)
    xa, xb, xc = next(a), next(b), next(c)
    assert not np.array_equal(xa[0], xb[0]) and np.array_equal(xb[0], xc[0])
    with pytest.raises(ValueError, match="overlap"):
        TwoStreamSampler([0, 1, 2], [2, 3], 1, 1, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        TwoStreamSampler([0, 1], [2, 3], 3, 1, seed=0)
    with pytest.raises(ValueError, match="no unlabeled"):
        TwoStreamSampler([0, 1], [], 1, 1, seed=0)
    s = TwoStreamSampler([0, 1], [], 1, 0, seed=0)  # supervised only
    assert next(s)[1].shape == (0,)
    with pytest.raises(ValueError, match="n_labeled=2, this sampler has 3"):
        TwoStreamSampler([0, 1, 5], [], 1, 0, seed=0).load_state_dict(s.state_dict())


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_dataset(synth_root):
    ds = SSL4MISDataset(synth_root, num_classes=4)
    names = ds.train_slices
    assert len(names) == 3 * 2 * 4
    assert slices_of_first_patients(names, 1) == 8 and slices_of_first_patients(names, 2) == 16
    assert [n.rsplit("_", 2)[0] for n in names[:8]] == [names[0].rsplit("_", 2)[0]] * 4 + [
        names[4].rsplit("_", 2)[0]
    ] * 4
    vols = ds.volumes("val")
    assert len(vols) == 2 and vols[0].endswith("frame01") and vols[1].endswith("frame02")
    with pytest.raises(FileNotFoundError, match="test.list"):
        ds.volumes("test")
    image, label = ds.read_volume(vols[0])
    assert image.shape == label.shape == (4, 40, 48)
    assert image.min() == 0.0 and image.max() == 1.0
    assert set(np.unique(label)) == {0, 1, 2, 3}
    # classes differ in mean intensity but overlap: LV brighter than myocardium
    assert image[label == 3].mean() > image[label == 2].mean() + 0.2
    with h5py.File(synth_root / "data" / f"{vols[0]}.h5", "r") as f:
        assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
        assert f["image"].compression == "gzip"
    im1, _ = ds.read_slice(names[0])
    assert im1.shape == (40, 48)
    # deterministic in the seed
    with pytest.raises(ValueError):
        write_synthetic_acdc(synth_root / "bad", n_train_patients=0)


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic_acdc(tmp_path / "a", n_train_patients=1, slices_per_volume=2, n_val=0, n_test=1,
                             size=(16, 16), seed=3)
    b = write_synthetic_acdc(tmp_path / "b", n_train_patients=1, slices_per_volume=2, n_val=0, n_test=1,
                             size=(16, 16), seed=3)
    da, db = SSL4MISDataset(a), SSL4MISDataset(b)
    assert da.train_slices == db.train_slices and da.volumes("test") == db.volumes("test")
    va, vb = da.read_volume(da.volumes("test")[0]), db.read_volume(db.volumes("test")[0])
    assert np.array_equal(va[0], vb[0]) and np.array_equal(va[1], vb[1])


# ---------------------------------------------------------------------------- stream
def test_stream_shapes_and_streams(synth_root):
    ds = SSL4MISDataset(synth_root, num_classes=4)
    s = TrainStream(ds, n_labeled=8, labeled_bs=3, unlabeled_bs=5, seed=0, augment=NO_AUG, img_size=(32, 36))
    assert s.epoch_length == 2 and s.n_unlabeled == 16 and s.img_size == (32, 36)
    cache_x, cache_y = ds.load_slices(size=(32, 36))
    for _ in range(3):
        st = s.sampler.state_dict()
        b = s.next()
        assert b.x_l.shape == (3, 3, 32, 36) and b.x_u.shape == (5, 3, 32, 36) and b.y_l.shape == (3, 32, 36)
        assert b.x_l.dtype == torch.float32 and b.y_l.dtype == torch.int64
        assert torch.equal(b.x_l[:, 0], b.x_l[:, 2])  # gray repeated
        # without augmentation the batch is the cache at the sampler's indices
        probe = TwoStreamSampler(np.arange(8), np.arange(8, 24), 3, 5, seed=0)
        probe.load_state_dict(st)
        li, ui = next(probe)
        assert (li < 8).all() and (ui >= 8).all()
        assert torch.equal(b.x_l[:, 0], cache_x[li]) and torch.equal(b.y_l, cache_y[li].long())
        assert torch.equal(b.x_u[:, 1], cache_x[ui])


def test_stream_resume_exact_with_augmentation(synth_root):
    ds = SSL4MISDataset(synth_root, num_classes=4)
    make = lambda: TrainStream(ds, n_labeled=8, labeled_bs=2, unlabeled_bs=2, seed=7, img_size=(32, 32))  # noqa: E731
    a = make()
    for _ in range(5):  # crosses an epoch boundary (epoch_length 4)
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    ref = [a.next() for _ in range(4)]
    b = make()
    b.load_state_dict(state)
    got = [b.next() for _ in range(4)]
    for r, g in zip(ref, got):
        assert torch.equal(r.x_l, g.x_l) and torch.equal(r.y_l, g.y_l) and torch.equal(r.x_u, g.x_u)
    assert set(torch.cat([r.y_l.unique() for r in ref]).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(TypeError, match="unknown augmentation option"):
        TrainStream(ds, n_labeled=8, labeled_bs=2, unlabeled_bs=2, seed=0, augment={"hflip": 0.5})
    with pytest.raises(ValueError, match="n_labeled=0"):
        TrainStream(ds, n_labeled=0, labeled_bs=2, unlabeled_bs=2, seed=0)


def test_stream_acdc_7_patients(acdc_set):
    ds = SSL4MISDataset(acdc_set.root, num_classes=4)
    n_l = slices_of_first_patients(ds.train_slices, 7)
    s = TrainStream(ds, n_labeled=n_l, labeled_bs=12, unlabeled_bs=12, seed=42)
    assert s.epoch_length == n_l // 12 and s.n_unlabeled == len(ds.train_slices) - n_l
    if acdc_set.real:  # docs/method.md §3: 136 / 12 -> 11
        assert n_l == labeled_slice_count(7) == 136 and s.epoch_length == 11 and s.n_unlabeled == 120
    b = s.next()
    assert b.x_l.shape == b.x_u.shape == (12, 3, 256, 256) and b.y_l.shape == (12, 256, 256)
    assert b.labeled_bs == 12 and b.unlabeled_bs == 12
    assert 0.0 <= b.x_l.min().item() and b.x_l.max().item() <= 1.0 + 1e-6
    assert set(b.y_l.unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.gpu
def test_stream_on_cuda(synth_root):
    ds = SSL4MISDataset(synth_root, num_classes=4)
    s = TrainStream(ds, n_labeled=8, labeled_bs=2, unlabeled_bs=2, seed=0, device="cuda", img_size=(32, 32))
    state = s.state_dict()
    b1 = s.next()
    assert b1.x_l.is_cuda and b1.y_l.is_cuda
    s.load_state_dict(state)
    b2 = s.next()
    assert torch.equal(b1.x_l, b2.x_l) and torch.equal(b1.y_l, b2.y_l)


# ---------------------------------------------------------------------------- batch
def test_batch_contract():
    b = Batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long), torch.zeros(3, 3, 4, 5))
    assert b.labeled_bs == 2 and b.unlabeled_bs == 3
    c = b.to("cpu")
    assert torch.equal(c.x_u, b.x_u)
    with pytest.raises(ValueError, match="y_l shape"):
        Batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long), torch.zeros(3, 3, 4, 5))
    with pytest.raises(ValueError, match="differ in C, H, W"):
        Batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long), torch.zeros(3, 1, 4, 5))
    with pytest.raises(ValueError, match="integer"):
        Batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5), torch.zeros(3, 3, 4, 5))


@pytest.mark.gpu
def test_batch_pin_and_move():
    b = Batch(torch.ones(2, 3, 4, 5), torch.ones(2, 4, 5, dtype=torch.long), torch.ones(1, 3, 4, 5)).pin_memory()
    assert b.x_l.is_pinned()
    c = b.to("cuda")
    assert c.y_l.is_cuda and c.y_l.dtype == torch.int64


def test_non_finite_image_is_an_error_naming_the_file(tmp_path):
    import h5py
    import numpy as np
    from ucseg_fast.data.errors import DataError
    from ucseg_fast.data.ssl4mis import SSL4MISDataset
    (tmp_path / "data" / "slices").mkdir(parents=True)
    img = np.zeros((8, 8), np.float32)
    img[3, 3] = np.nan
    with h5py.File(tmp_path / "data" / "slices" / "patient001_frame01_slice_1.h5", "w") as f:
        f["image"] = img
        f["label"] = np.zeros((8, 8), np.uint8)
    (tmp_path / "train_slices.list").write_text("patient001_frame01_slice_1\n")
    ds = SSL4MISDataset(tmp_path, check_files=False)
    with pytest.raises(DataError, match="patient001_frame01_slice_1.h5.*NaN"):
        ds.read_slice("patient001_frame01_slice_1")
