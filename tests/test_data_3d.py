"""3D data path: UA-MT / SSL4MIS volume reader (every layout, broken files), the reference's
RandomRotFlip -> RandomCrop against a literal numpy port, VolumeStream (shapes, streams, resume,
ranks), the factory's 3D branch and an LA set (synthetic; the real subset in the real-data tier)."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ucseg_fast.config import DataConfig
from ucseg_fast.data import (
    Batch,
    DataError,
    RotFlipCrop,
    TwoStreamSampler,
    VolumeDataset,
    VolumeNotFoundError,
    VolumeStream,
    draw_rot_flip_crop,
    rot_flip_crop,
)
from ucseg_fast.data.factory import build_train_stream
from ucseg_fast.data.stream3d import _numpy_rng

LAYOUTS = {
    "la": lambda root, n: root / "2018LA_Seg_Training Set" / n / "mri_norm2.h5",
    "case_dir": lambda root, n: root / n / "mri_norm2.h5",
    "pancreas": lambda root, n: root / "Pancreas_h5" / f"{n}_norm.h5",
    "data": lambda root, n: root / "data" / f"{n}.h5",
    "flat": lambda root, n: root / f"{n}.h5",
}


def _write(path: Path, image: np.ndarray, label: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label, compression="gzip")
    return path


def _volume(shape, seed: int, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape).astype(np.float32)
    label = (rng.random(shape) * num_classes).astype(np.uint8)
    return image, label


def _make_root(root: Path, layout: str, shapes, *, seed: int = 0, extra_lines: str = "") -> Path:
    names = [f"case{i:02d}" for i in range(len(shapes))]
    for i, (name, shape) in enumerate(zip(names, shapes)):
        _write(LAYOUTS[layout](root, name), *_volume(shape, seed + i))
    (root / "train.list").write_text(extra_lines + "\n".join(names) + "\n\n")
    return root


# ---------------------------------------------------------------------------- reader
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads(tmp_path, layout):
    root = _make_root(tmp_path, layout, [(6, 5, 4), (7, 6, 3)], extra_lines="  \n")
    ds = VolumeDataset(root, num_classes=2)
    assert ds.train_volumes == ["case00", "case01"]  # stripped, blank lines skipped
    assert ds.path("case01") == LAYOUTS[layout](root, "case01")
    image, label = ds.read_volume("case01")
    ref_image, ref_label = _volume((7, 6, 3), 1)
    assert image.dtype == np.float32 and label.dtype == np.int64 and image.shape == (7, 6, 3)
    assert np.array_equal(image, ref_image) and np.array_equal(label, ref_label)
    images, labels = ds.load_volumes()
    assert [tuple(x.shape) for x in images] == [(6, 5, 4), (7, 6, 3)]
    assert images[0].dtype == torch.float32 and labels[0].dtype == torch.uint8


def test_layout_order_and_missing(tmp_path):
    root = tmp_path
    la = _write(LAYOUTS["la"](root, "a"), *_volume((4, 4, 4), 0))
    _write(LAYOUTS["data"](root, "a"), *_volume((5, 5, 5), 1))
    _write(LAYOUTS["flat"](root, "b"), *_volume((5, 5, 5), 1))
    ds = VolumeDataset(root)
    assert ds.path("a") == la  # first existing wins
    with pytest.raises(DataError) as info:
        ds.path("nope")
    assert isinstance(info.value, VolumeNotFoundError) and isinstance(info.value, FileNotFoundError)
    for make in LAYOUTS.values():
        assert str(make(root, "nope")) in str(info.value)
    with pytest.raises(FileNotFoundError, match=str(root / "train.list")):
        ds.train_volumes
    with pytest.raises(FileNotFoundError, match="test.list"):
        ds.volumes("test")
    (root / "test.list").write_text("\n \n")
    with pytest.raises(DataError, match="test.list: the list is empty"):
        ds.volumes("test")
    (root / "sample_test.list").write_text("b\n")
    assert ds.volumes("sample_test") == ["b"]
    with pytest.raises(ValueError, match="plain list name"):
        ds.volumes("../x")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VolumeDataset(tmp_path / "nowhere")


def test_broken_volumes_name_the_file(tmp_path):
    ds = VolumeDataset(tmp_path, num_classes=2)
    flat = lambda n: tmp_path / f"{n}.h5"  # noqa: E731
    flat("corrupt").write_bytes(b"this is not an HDF5 file" * 10)
    _write(flat("nolabel"), np.zeros((4, 4, 4), np.float32))
    _write(flat("flat2d"), np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8))
    _write(flat("mismatch"), np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint8))
    _write(flat("floatlabel"), np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 0.5, np.float32))
    _write(flat("toobig"), np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 2, np.uint8))
    _write(flat("negative"), np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), -1, np.int8))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    _write(flat("nan"), nan, np.zeros((4, 4, 4), np.uint8))
    _write(flat("intlabel_ok"), np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), np.float64))
    cases = {
        "corrupt": "not a readable HDF5",
        "nolabel": "missing dataset 'label'",
        "flat2d": "expected 3-D 'image' and 'label'",
        "mismatch": r"'image' shape \(4, 4, 4\) != 'label' shape \(4, 4, 5\)",
        "floatlabel": "'label' must hold integer class ids",
        "toobig": r"'label' value 2 outside \[0, num_classes=2\)",
        "negative": r"'label' value -1 outside",
        "nan": "NaN",
    }
    for name, msg in cases.items():
        with pytest.raises(DataError, match=f"{name}.h5: {msg}" if name != "nan" else f"{name}.h5.*{msg}"):
            ds.read_volume(name)
    _, label = ds.read_volume("intlabel_ok")  # integral floats are accepted
    assert label.dtype == np.int64 and (label == 1).all()


# ---------------------------------------------------------------------------- augmentation
def _oracle(image, label, patch, rng, rot_flip=True):
    """Literal UA-MT ``RandomRotFlip`` -> ``RandomCrop`` (numpy, whole volume), draws from ``rng``."""
    if rot_flip:
        k = rng.integers(0, 4)
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = rng.integers(0, 2)
        image, label = np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()
    if label.shape[0] <= patch[0] or label.shape[1] <= patch[1] or label.shape[2] <= patch[2]:
        pw = max((patch[0] - label.shape[0]) // 2 + 3, 0)
        ph = max((patch[1] - label.shape[1]) // 2 + 3, 0)
        pd = max((patch[2] - label.shape[2]) // 2 + 3, 0)
        image = np.pad(image, [(pw, pw), (ph, ph), (pd, pd)], mode="constant", constant_values=0)
        label = np.pad(label, [(pw, pw), (ph, ph), (pd, pd)], mode="constant", constant_values=0)
    (w, h, d) = image.shape
    w1 = rng.integers(0, w - patch[0])
    h1 = rng.integers(0, h - patch[1])
    d1 = rng.integers(0, d - patch[2])
    sl = (slice(w1, w1 + patch[0]), slice(h1, h1 + patch[1]), slice(d1, d1 + patch[2]))
    return image[sl], label[sl]


def test_rot_flip_crop_equals_numpy_oracle():
    meta = np.random.default_rng(123)
    cases = [((96, 96, 96), (96, 96, 96)), ((10, 9, 8), (9, 9, 9)), ((1, 1, 1), (1, 1, 1)),
             ((1, 1, 1), (5, 3, 2)), ((40, 30, 12), (16, 16, 16)), ((17, 11, 9), (16, 12, 9))]
    for _ in range(400):
        shape = tuple(int(s) for s in meta.integers(1, 14, 3))
        patch = tuple(int(p) for p in meta.integers(1, 12, 3))
        cases.append((shape, patch))
    seen_pad = seen_nopad = 0
    for n, (shape, patch) in enumerate(cases):
        image = meta.standard_normal(shape).astype(np.float32)
        label = meta.integers(0, 4, shape).astype(np.uint8)
        for seed in (n, n + 10_000):
            for rot_flip in (True, False):
                ref_x, ref_y = _oracle(image, label, patch, np.random.default_rng(seed), rot_flip)
                rng = np.random.default_rng(seed)
                x, y, params = rot_flip_crop(torch.from_numpy(image), torch.from_numpy(label), patch, rng,
                                             rot_flip=rot_flip)
                assert x.dtype == torch.float32 and y.dtype == torch.uint8 and x.is_contiguous()
                assert np.array_equal(x.numpy(), ref_x), (shape, patch, seed, params)
                assert np.array_equal(y.numpy(), ref_y), (shape, patch, seed, params)
                # the oracle and the draw consumed the same numbers of the same generator
                probe = np.random.default_rng(seed)
                _oracle(image, label, patch, probe, rot_flip)
                assert rng.bit_generator.state == probe.bit_generator.state
                seen_pad += any(params.pad)
                seen_nopad += not any(params.pad)
    assert seen_pad > 100 and seen_nopad > 100
    # every (k, flip) combination occurs with the default rotation
    rng = np.random.default_rng(0)
    combos = {(p.k, p.flip_axis) for p in (draw_rot_flip_crop((9, 8, 7), (4, 4, 4), rng) for _ in range(200))}
    assert combos == set(itertools.product(range(4), range(2)))


def test_same_transform_on_image_and_label():
    # label is a function of the image (pad value 0 maps to class 0), so one geometry for both
    # keeps the relation voxel for voxel; labels stay in the class set.
    rng = np.random.default_rng(7)
    for trial in range(60):
        shape = tuple(int(s) for s in rng.integers(3, 20, 3))
        image = rng.random(shape).astype(np.float32) * 0.999 + 0.001
        label = np.floor(image * 3).astype(np.uint8)  # classes {0, 1, 2}
        x, y, _ = rot_flip_crop(torch.from_numpy(image), torch.from_numpy(label), (8, 8, 8), rng)
        assert torch.equal(y, torch.floor(x * 3).to(torch.uint8))
        assert set(y.unique().tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="differ in shape"):
        rot_flip_crop(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5, dtype=torch.uint8), (2, 2, 2), rng)
    p = draw_rot_flip_crop((4, 4, 4), (2, 2, 2), rng)
    assert isinstance(p, RotFlipCrop)
    with pytest.raises(ValueError, match="drawn for a volume of shape"):
        p.apply(torch.zeros(5, 4, 4))


# ---------------------------------------------------------------------------- stream
def _coded_volumes(shapes, n_classes: int = 2):
    """Volume i has image values in [10 i + 1, 10 i + 2) (pad voxels are 0) and label = f(image)."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i, shape in enumerate(shapes):
        image = (10 * i + 1 + rng.random(shape)).astype(np.float32)
        images.append(image)
        labels.append((np.floor((image - 1) * n_classes) % n_classes).astype(np.uint8))
    return images, labels


SHAPES = [(20, 18, 14), (18, 20, 11), (24, 16, 16), (16, 16, 10), (22, 19, 17), (15, 21, 12), (19, 19, 19)]


def _make_stream(**kw) -> VolumeStream:
    images, labels = _coded_volumes(SHAPES)
    args = dict(n_labeled=4, labeled_bs=2, unlabeled_bs=2, seed=3, patch_size=(16, 16, 12))
    args.update(kw)
    return VolumeStream.from_arrays(images, labels, **args)


def test_stream_shapes_and_oracle():
    images, labels = _coded_volumes(SHAPES)
    s = _make_stream(channels=2)
    assert s.epoch_length == 2 and s.n_labeled == 4 and s.n_unlabeled == 3 and s.img_size == (16, 16, 12)
    assert s.device == torch.device("cpu") and s.images[0].device.type == "cpu"
    for _ in range(5):
        state = json.loads(json.dumps(s.state_dict()))
        b = s.next()
        assert isinstance(b, Batch) and b.labeled_bs == 2 and b.unlabeled_bs == 2
        assert b.x_l.shape == b.x_u.shape == (2, 2, 16, 16, 12) and b.y_l.shape == (2, 16, 16, 12)
        assert b.x_l.dtype == torch.float32 and b.y_l.dtype == torch.int64 and b.x_l.device.type == "cpu"
        assert torch.equal(b.x_l[:, 0], b.x_l[:, 1])  # gray repeated
        # the batch is the literal numpy pipeline on the sampler's volumes with the stream's generator
        probe = TwoStreamSampler(np.arange(4), np.arange(4, 7), 2, 2, seed=3)
        probe.load_state_dict(state["sampler"])
        lab, unl = next(probe)
        assert (lab < 4).all() and (unl >= 4).all()
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        for b_i, v in enumerate(np.concatenate([lab, unl])):
            ref_x, ref_y = _oracle(images[v], labels[v], (16, 16, 12), rng)
            x = b.x_l[b_i, 0] if b_i < 2 else b.x_u[b_i - 2, 0]
            assert np.array_equal(x.numpy(), ref_x)
            if b_i < 2:
                assert np.array_equal(b.y_l[b_i].numpy(), ref_y)
                # labeled batches draw labeled volumes only (image values identify the volume)
                assert int(x.max()) // 10 == v < 4
        # geometry is shared: label = f(image) on every non-pad voxel, 0 on pad voxels
        f = torch.where(b.x_l[:, 0] > 0, torch.floor((b.x_l[:, 0] - 1) * 2).long() % 2, 0)
        assert torch.equal(b.y_l, f) and set(b.y_l.unique().tolist()) <= {0, 1}


def test_stream_resume_exact():
    a = _make_stream()
    straight = [a.next() for _ in range(6)]  # crosses two epoch boundaries (epoch_length 2)
    b = _make_stream()
    first = [b.next() for _ in range(3)]
    state = json.loads(json.dumps(b.state_dict()))
    c = _make_stream(seed=3)
    c.next()  # a different position, overwritten by the load
    c.load_state_dict(state)
    rest = [c.next() for _ in range(3)]
    for r, g in zip(straight, first + rest):
        assert torch.equal(r.x_l, g.x_l) and torch.equal(r.y_l, g.y_l) and torch.equal(r.x_u, g.x_u)
    with pytest.raises(ValueError, match="patch"):
        _make_stream(patch_size=(8, 8, 8)).load_state_dict(state)


def test_stream_ranks_and_seeding():
    def labeled_volumes(stream, n):
        return [tuple(int(x.max()) // 10 for x in stream.next().x_l[:, 0]) for _ in range(n)]

    r0 = labeled_volumes(_make_stream(rank=0, world_size=2, n_labeled=6, unlabeled_bs=1), 12)
    r1 = labeled_volumes(_make_stream(rank=1, world_size=2, n_labeled=6, unlabeled_bs=1), 12)
    for rank, got in ((0, r0), (1, r1)):  # exactly the 2D sampler's per-rank groups
        sampler = TwoStreamSampler(np.arange(6), np.arange(6, 7), 2, 1, seed=3, rank=rank, world_size=2)
        assert got == [tuple(next(sampler)[0].tolist()) for _ in range(12)]
    assert r0 != r1
    # augmentation generators: distinct per rank, independent of the sampler's stream
    assert _numpy_rng(3, 0).integers(1 << 62) != _numpy_rng(3, 1).integers(1 << 62)
    assert _numpy_rng(3, 0).integers(1 << 62) == _numpy_rng(3, 0).integers(1 << 62)
    a, b = _make_stream(seed=1).next(), _make_stream(seed=2).next()
    assert not torch.equal(a.x_l, b.x_l)
    # crop only: without RandomRotFlip every patch is an axis-aligned window of its volume
    s = _make_stream(rot_flip=False, unlabeled_bs=0, n_labeled=7)
    assert s.next().x_u.shape == (0, 1, 16, 16, 12)


def test_stream_errors():
    images, labels = _coded_volumes(SHAPES[:3])
    common = dict(labeled_bs=1, unlabeled_bs=1, seed=0, patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="n_labeled=0"):
        VolumeStream.from_arrays(images, labels, n_labeled=0, **common)
    with pytest.raises(ValueError, match="volume 1"):
        VolumeStream.from_arrays(images, [labels[0], labels[1][:-1], labels[2]], n_labeled=1, **common)
    with pytest.raises(ValueError, match="integer"):
        VolumeStream.from_arrays(images, [y.astype(np.float32) for y in labels], n_labeled=1, **common)
    with pytest.raises(ValueError, match="patch_size"):
        VolumeStream.from_arrays(images, labels, n_labeled=1, **{**common, "patch_size": (8, 8)})
    with pytest.raises(ValueError, match="cannot fill one batch"):
        VolumeStream.from_arrays(images, labels, n_labeled=1, **{**common, "labeled_bs": 2})


def test_stream_from_dataset(tmp_path):
    root = _make_root(tmp_path, "la", [(12, 10, 9), (10, 12, 8), (11, 11, 11)])
    ds = VolumeDataset(root)
    s = VolumeStream(ds, n_labeled=2, labeled_bs=1, unlabeled_bs=1, seed=0, patch_size=(8, 8, 8))
    assert s.names == ["case00", "case01", "case02"] and s.n_unlabeled == 1
    b = s.next()
    assert b.x_l.shape == (1, 1, 8, 8, 8) and b.y_l.dtype == torch.int64
    with pytest.raises(ValueError, match=r"n_labeled=4 outside \[1, 3\]"):
        VolumeStream(ds, n_labeled=4, labeled_bs=1, unlabeled_bs=1, seed=0)


# ---------------------------------------------------------------------------- factory
def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), num_classes=2, labeled_patients=2, img_size=(8, 8, 8), labeled_bs=1,
                unlabeled_bs=1, format="ssl4mis", backend="torch", unlabeled_manifest="")
    base.update(kw)
    return dataclasses.replace(DataConfig(), **base)


def test_factory_builds_volume_stream(tmp_path):
    root = _make_root(tmp_path, "pancreas", [(12, 10, 9), (10, 12, 8), (11, 11, 11)])
    s = build_train_stream(_cfg(root), device="cpu", seed=42, channels=1)
    assert isinstance(s, VolumeStream) and s.img_size == (8, 8, 8) and s.n_labeled == 2 and s.rot_flip
    b = s.next()
    assert b.x_l.shape == b.x_u.shape == (1, 1, 8, 8, 8) and b.y_l.shape == (1, 8, 8, 8)
    assert not build_train_stream(_cfg(root, augment=False), device="cpu", seed=0, channels=1).rot_flip
    with pytest.raises(ValueError, match="data.backend = 'opencv'"):  # 'dali' is built (tests/test_dali3d.py)
        build_train_stream(_cfg(root, backend="opencv"), device="cpu", seed=0)
    with pytest.raises(ValueError, match="data.format = 'folder'"):
        build_train_stream(_cfg(root, format="folder"), device="cpu", seed=0)
    with pytest.raises(ValueError, match="data.unlabeled_manifest = 'u.txt'"):
        build_train_stream(_cfg(root, unlabeled_manifest="u.txt"), device="cpu", seed=0)
    for n in (3, 0):
        with pytest.raises(DataError, match=rf"{root}: train.list has 3 volumes; data.labeled_patients = {n}"):
            build_train_stream(_cfg(root, labeled_patients=n), device="cpu", seed=0)


# ---------------------------------------------------------------------------- LA sets
def test_la_volumes(la_set):
    """The UA-MT layout end to end: the synthetic LA-like set, and the real subset (2 cases about
    [180, 140, 88]) in the real-data tier."""
    ds = VolumeDataset(la_set.root, num_classes=2)
    names = ds.train_volumes
    assert len(names) == (2 if la_set.real else 3)
    for name in names:
        assert ds.path(name) == la_set.root / "2018LA_Seg_Training Set" / name / "mri_norm2.h5"
        image, label = ds.read_volume(name)
        assert image.dtype == np.float32 and label.dtype == np.int64 and image.shape == label.shape
        if la_set.real:
            assert 170 <= image.shape[0] <= 210 and 130 <= image.shape[1] <= 150 and image.shape[2] == 88
        assert set(np.unique(label).tolist()) == {0, 1}
    # an axis shorter than 96 (real: Z = 88; synthetic: every axis): RandomCrop pads it first
    s = VolumeStream(ds, n_labeled=1, labeled_bs=1, unlabeled_bs=1, seed=42, patch_size=(96, 96, 96))
    assert s.epoch_length == 1 and s.n_unlabeled == len(names) - 1
    b = s.next()
    assert b.x_l.shape == b.x_u.shape == (1, 1, 96, 96, 96) and b.y_l.shape == (1, 96, 96, 96)
    assert b.y_l.dtype == torch.int64 and set(b.y_l.unique().tolist()) <= {0, 1}
    assert torch.isfinite(b.x_l).all() and torch.isfinite(b.x_u).all()


@pytest.mark.gpu
def test_stream_on_cuda_matches_cpu():
    cpu, gpu = _make_stream(), _make_stream(device="cuda")
    state = gpu.state_dict()
    for _ in range(3):
        a, b = cpu.next(), gpu.next()
        assert b.x_l.is_cuda and b.y_l.is_cuda and b.x_u.is_cuda and gpu.images[0].device.type == "cpu"
        assert torch.equal(a.x_l, b.x_l.cpu()) and torch.equal(a.y_l, b.y_l.cpu())
        assert torch.equal(a.x_u, b.x_u.cpu())
    gpu.load_state_dict(state)
    assert torch.equal(gpu.next().x_l.cpu(), _make_stream().next().x_l)
