"""3D DALI backend on CPU operators (device_id=None): `DaliVolumeStream` batches equal
`VolumeStream`'s exactly (image and label; volume axes smaller, equal and larger than the patch;
labeled + unlabeled; 1 and 2 channels; both feeds), forced edge geometries, exact resume with
batches in flight (and across the two backends), factory + config, a 2-iteration CLI run."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ucseg_fast.data.dali import dali_unavailable_reason

pytestmark = [pytest.mark.dali, pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                   reason=str(dali_unavailable_reason()))]

PATCH = (16, 16, 12)
# axis by axis: larger, equal and smaller than the patch (equal pads too: the reference pads when
# any s_i <= p_i), volumes whose axes 0 and 1 differ (odd k swaps them)
SHAPES = [(20, 18, 14), (16, 16, 12), (10, 20, 9), (12, 11, 8), (22, 15, 17), (16, 30, 12), (19, 9, 20)]


def _volumes(shapes=SHAPES):
    """Volume i: image values in [10 i + 1, 10 i + 2) (0 = padding), label a function of the image."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i, shape in enumerate(shapes):
        image = (10 * i + 1 + rng.random(shape)).astype(np.float32)
        images.append(image)
        labels.append((np.floor((image - 1) * 3) % 3).astype(np.uint8))
    return images, labels


def _pair(feed="window", **kw):
    from ucseg_fast.data import VolumeStream
    from ucseg_fast.data.dali3d import DaliVolumeStream
    images, labels = _volumes()
    args = dict(n_labeled=4, labeled_bs=2, unlabeled_bs=2, seed=3, patch_size=PATCH)
    args.update(kw)
    return (VolumeStream.from_arrays(images, labels, **args),
            DaliVolumeStream.from_arrays(images, labels, feed=feed, **args))


def _equal(a, b):
    return torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)


@pytest.fixture
def deep_prefetch(monkeypatch):
    """CPU pipeline with 3 batches in flight (as a GPU pipeline's queue)."""
    import ucseg_fast.data.dali as D
    monkeypatch.setattr(D, "_PREFETCH_DEPTH_CPU", 3)


@pytest.mark.parametrize("feed", ["window", "volume"])
@pytest.mark.parametrize("channels", [1, 2])
def test_dali_equals_volume_stream(feed, channels, deep_prefetch):
    from ucseg_fast.data.dali3d import DaliVolumeStream
    ts, dl = _pair(feed, channels=channels)
    assert isinstance(dl, DaliVolumeStream) and dl.img_size == PATCH and dl.n_labeled == 4
    assert dl.epoch_length == ts.epoch_length == 2 and dl.device == torch.device("cpu")
    for _ in range(6):
        a, b = ts.next(), dl.next()
        assert b.x_l.shape == b.x_u.shape == (2, channels, *PATCH) and b.y_l.shape == (2, *PATCH)
        assert b.x_l.dtype == torch.float32 and b.y_l.dtype == torch.int64
        assert _equal(a, b)
        # labels follow the image voxel for voxel (one geometry), 0 on padding
        f = torch.where(b.x_l[:, 0] > 0, torch.floor((b.x_l[:, 0] - 1) * 3).long() % 3, 0)
        assert torch.equal(b.y_l, f)
    # the draws covered both rotation parities, both flip axes, padded and unpadded crops
    probe, _ = _pair()
    drawn = [p for _ in range(6) for p in probe.draw()[1]]
    assert {p.k % 2 for p in drawn} == {0, 1} and {p.flip_axis for p in drawn} == {0, 1}
    assert {any(p.pad) for p in drawn} == {True, False}


def test_dali_crop_only_and_labeled_only():
    ts, dl = _pair(rot_flip=False, n_labeled=7, unlabeled_bs=0, labeled_bs=3)
    for _ in range(3):
        a, b = ts.next(), dl.next()
        assert b.x_u.shape == (0, 1, *PATCH) and _equal(a, b)


def test_dali_forced_edge_geometry(monkeypatch):
    """Windows entirely in the padding, reaching past either end, every (k, flip): same result."""
    import ucseg_fast.data.stream3d as S
    orig = S.draw_rot_flip_crop
    seen = set()

    def draw(shape, patch, rng, **kw):
        p = orig(shape, patch, rng, **kw)
        m = int(rng.integers(0, 32))  # the stream's own generator: same choice in both backends
        case, k, flip = m % 4, (m // 4) % 4, (m // 16) % 2
        seen.add((case, k % 2))
        rot = (p.shape[1], p.shape[0], p.shape[2]) if k % 2 else p.shape
        if case == 0:  # window entirely in the padding
            return dataclasses.replace(p, k=k, flip_axis=flip, pad=(40, 40, 40), offset=(0, 0, 0))
        if case == 1:  # past the far end on every axis (past the start for the reversed ones)
            return dataclasses.replace(p, k=k, flip_axis=flip, pad=(0, 0, 0),
                                       offset=tuple(s - q // 2 for s, q in zip(rot, patch)))
        return dataclasses.replace(p, k=k, flip_axis=flip)

    monkeypatch.setattr(S, "draw_rot_flip_crop", draw)
    ts, dl = _pair(labeled_bs=3, unlabeled_bs=1)
    for _ in range(8):
        a, b = ts.next(), dl.next()
        assert _equal(a, b)
    assert {c for c, _ in seen} == {0, 1, 2, 3} and {k for _, k in seen} == {0, 1}


@pytest.mark.parametrize("depth", [1, 3])
def test_dali_resume_exact(monkeypatch, depth):
    import ucseg_fast.data.dali as D
    from ucseg_fast.data import VolumeStream
    monkeypatch.setattr(D, "_PREFETCH_DEPTH_CPU", depth)
    ts, s = _pair()
    s.next()
    state = json.loads(json.dumps(s.state_dict()))
    assert state == (ts.next(), ts.state_dict())[1]  # the torch backend's format and position
    want = [s.next() for _ in range(4)]  # crosses an epoch boundary (epoch_length 2)
    _, t = _pair()
    t.next()
    t.load_state_dict(state)
    s.load_state_dict(state)  # the same stream, with batches in flight
    for w in want:
        for g in (t.next(), s.next()):
            assert _equal(w, g)
    # across backends: the torch stream resumes the DALI state and vice versa
    ts.load_state_dict(state)
    assert _equal(ts.next(), want[0])
    s.load_state_dict(ts.state_dict())
    assert _equal(s.next(), want[1])
    # a rejected state leaves the stream where it was
    bad = dict(state, patch=[8, 8, 8])
    with pytest.raises(ValueError, match="patch"):
        s.load_state_dict(bad)
    assert _equal(s.next(), want[2])
    with pytest.raises(ValueError, match="version"):
        s.load_state_dict({"version": 99})
    assert _equal(s.next(), want[3])
    assert isinstance(s, VolumeStream)


def test_dali_stream_errors():
    from ucseg_fast.data.dali3d import DaliVolumeStream
    images, labels = _volumes(SHAPES[:3])
    kw = dict(n_labeled=1, labeled_bs=1, unlabeled_bs=1, seed=0, patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="feed = 'gpu'"):
        DaliVolumeStream.from_arrays(images, labels, feed="gpu", **kw)
    with pytest.raises(ValueError, match="cache on the CPU"):
        DaliVolumeStream.from_arrays(images, labels, cache_device="meta", **kw)


# ---------------------------------------------------------------------------- factory / config / CLI
@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    from ucseg_fast.data.synthetic import write_synthetic_la
    return write_synthetic_la(tmp_path_factory.mktemp("la"), n_train=3, n_test=1, shape=(40, 36, 30), seed=3)


def _overrides(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32,32]", "data.labeled_patients": "1",
          "data.labeled_bs": "1", "data.unlabeled_bs": "1", "data.eval_stride_xy": "32",
          "data.eval_stride_z": "32", "data.backend": "dali", "train.max_iterations": "2",
          "train.log_every": "1", "train.val_every": "100", "train.checkpoint_every": "100",
          "train.out_dir": f"'{out_dir}'", "train.progress": "false", "train.amp": "none",
          "train.channels_last": "false", "loss.phase2_start": "100", "loss.queue_size": "8",
          # the preset holds out 8 of 80 train.list cases; this 3-case set validates on
          # test.list as the preset did before (tests/test_val_holdout.py covers the hold-out)
          "data.val_holdout": "0", "data.val_split": "'test'"}
    ov.update(over)
    return [f"--{k}={v}" for k, v in ov.items()]


def test_factory_and_config_build_dali_3d(la_root, tmp_path):
    from ucseg_fast.config import load_config
    from ucseg_fast.data import VolumeStream
    from ucseg_fast.data.dali3d import DaliVolumeStream
    from ucseg_fast.data.factory import build_train_stream
    cfg = load_config("la_3d", _overrides(la_root, tmp_path))
    assert cfg.data.backend == "dali" and cfg.data.img_size == (32, 32, 32)
    s = build_train_stream(cfg.data, device="cpu", seed=5, channels=1)
    ref = build_train_stream(dataclasses.replace(cfg.data, backend="torch"), device="cpu", seed=5, channels=1)
    assert type(s) is DaliVolumeStream and type(ref) is VolumeStream
    assert s.names == ref.names and s.img_size == (32, 32, 32) and s.n_labeled == 1
    for _ in range(2):
        a, b = ref.next(), s.next()
        assert b.x_l.shape == b.x_u.shape == (1, 1, 32, 32, 32) and _equal(a, b)
    with pytest.raises(ValueError, match="data.unlabeled_manifest = 'u.txt'"):
        build_train_stream(dataclasses.replace(cfg.data, unlabeled_manifest="u.txt"), device="cpu", seed=0)
    with pytest.raises(ValueError, match="data.backend = 'opencv'"):
        build_train_stream(dataclasses.replace(cfg.data, backend="opencv"), device="cpu", seed=0)


def test_cli_trains_3d_with_dali(la_root, tmp_path):
    from ucseg_fast.cli import main as cli_main
    out = tmp_path / "run"
    assert cli_main(["train", "--config", "la_3d", *_overrides(la_root, out)]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"L"' in line]
    assert [r["iteration"] for r in recs][-1] == 2 and len(recs) == 2
    assert all(np.isfinite(r["L"]) for r in recs)
