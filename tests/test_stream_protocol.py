"""The training-stream contract (`ucseg_fast.data.base`), checked on every stream class: it is a
`Stream` (and a `BatchStream`), iterates, its state is JSON and round-trips, a resume mid-epoch
(and across an epoch boundary) gives bit-identical batches, a foreign state is refused without
changing the stream, and the state keys checkpoints hold stay what they were."""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from ucseg_fast.data import Batch, BatchStream, Identity, SSL4MISDataset, Stream, TrainStream, VolumeStream
from ucseg_fast.data.dali import dali_unavailable_reason
from ucseg_fast.data.errors import DataError
from ucseg_fast.data.folder_stream import FolderTrainStream
from ucseg_fast.data.folders import FolderDataset
from ucseg_fast.data.guards import fingerprint_lines
from ucseg_fast.data.manifest import ManifestStream
from ucseg_fast.data.manifest_stream import ManifestTrainStream
from ucseg_fast.data.synthetic import write_synthetic_acdc

AUG = dict(hflip_p=0.5, vflip_p=0.5, ssr_p=0.5, distort_p=0.5, dropout_p=0.5)
SIZE = (16, 16)
PATCH = (8, 8, 8)
DALI = dali_unavailable_reason()

# The keys each state format holds (checkpoints store them: a stream may add keys, never drop one).
KEYS_2D = {"sampler", "generator", "generator_device"}
KEYS_MANIFEST = {"labeled", "manifest", "generator"}
KEYS_DALI = {"backend", "labeled", "unlabeled"}
KEYS_3D = {"version", "sampler", "rng", "patch"}


# ---------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    x_l = torch.from_numpy(rng.random((6, *SIZE), dtype=np.float32))
    y_l = torch.from_numpy(rng.integers(0, 4, (6, *SIZE)).astype(np.uint8))
    files = []
    (root / "u").mkdir()
    for i in range(9):
        path = root / "u" / f"u{i}.png"
        Image.fromarray(rng.integers(0, 256, (18, 14)).astype(np.uint8)).save(path)
        files.append(path)
    manifest = root / "manifest.txt"
    manifest.write_text("".join(f"{p}\n" for p in files))
    acdc = write_synthetic_acdc(root / "acdc", n_train_patients=2, slices_per_volume=3, n_val=0, n_test=0,
                                size=(20, 18))
    shapes = [(12, 11, 10), (10, 12, 9), (11, 10, 12), (9, 9, 11)]
    vols = [rng.normal(size=s).astype(np.float32) for s in shapes]
    labs = [(v > 0.5).astype(np.uint8) for v in vols]
    return dict(x_l=x_l, y_l=y_l, files=files, manifest=manifest, acdc=acdc, vols=vols, labs=labs)


def _cat_cache(d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from ucseg_fast.data.folders import decode_image
    x_u = torch.from_numpy(np.stack([decode_image(p, channels=1, size=SIZE)[0] for p in d["files"]]))
    return torch.cat([d["x_l"], x_u]), torch.cat([d["y_l"], torch.zeros((len(d["files"]), *SIZE), dtype=torch.uint8)])


def _train_dataset(d, seed):
    return TrainStream(SSL4MISDataset(d["acdc"], num_classes=4), n_labeled=6, labeled_bs=2, unlabeled_bs=2,
                       seed=seed, augment=AUG, img_size=SIZE)


def _train_tensors(d, seed):
    x, y = _cat_cache(d)
    return TrainStream.from_tensors(x, y, n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=seed, augment=AUG)


def _train_rgb(d, seed):
    x, y = _cat_cache(d)
    x = torch.stack([x, 1 - x, x * x], 1)  # [N, 3, H, W]: colour is kept
    return TrainStream.from_tensors(x, y, n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=seed, augment=AUG)


def _folder(workers):
    def make(d, seed):
        return FolderTrainStream(d["x_l"], d["y_l"], d["files"], labeled_bs=2, unlabeled_bs=3, seed=seed,
                                 augment=AUG, decode_workers=workers)
    return make


def _manifest_train(d, seed):
    lab = TrainStream.from_tensors(d["x_l"], d["y_l"], n_labeled=6, labeled_bs=2, unlabeled_bs=0, seed=seed,
                                   augment=AUG)
    return ManifestTrainStream(lab, ManifestStream(d["manifest"], size=SIZE, decode_workers=2), 3, AUG, seed, 0)


def _dali_cache(d, seed):
    from ucseg_fast.data.dali import DaliTrainStream
    x, y = _cat_cache(d)
    return DaliTrainStream(x, y, n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=seed, augment=AUG)


def _dali_files(d, seed):
    from ucseg_fast.data.dali import DaliTrainStream
    return DaliTrainStream(d["x_l"], d["y_l"], n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=seed, augment=AUG,
                           unlabeled_files=d["files"])


def _dali_manifest(d, seed):
    from ucseg_fast.data.dali import DaliTrainStream
    return DaliTrainStream(d["x_l"], d["y_l"], n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=seed, augment=AUG,
                           unlabeled_manifest=ManifestStream(d["manifest"], size=SIZE))


def _volume(d, seed):
    return VolumeStream.from_arrays(d["vols"], d["labs"], n_labeled=3, labeled_bs=1, unlabeled_bs=2, seed=seed,
                                    patch_size=PATCH)


def _dali_volume(d, seed):
    from ucseg_fast.data.dali3d import DaliVolumeStream
    return DaliVolumeStream.from_arrays(d["vols"], d["labs"], n_labeled=3, labeled_bs=1, unlabeled_bs=2, seed=seed,
                                        patch_size=PATCH)


_dali = pytest.mark.skipif(DALI is not None, reason=str(DALI))
KINDS: dict[str, tuple[Callable, set[str]]] = {
    "TrainStream(dataset)": (_train_dataset, KEYS_2D),
    "TrainStream.from_tensors": (_train_tensors, KEYS_2D),
    "TrainStream.from_tensors RGB": (_train_rgb, KEYS_2D),
    "FolderTrainStream workers=0": (_folder(0), KEYS_2D),
    "FolderTrainStream workers=2": (_folder(2), KEYS_2D),
    "ManifestTrainStream": (_manifest_train, KEYS_MANIFEST),
    "DaliTrainStream cache": (_dali_cache, KEYS_DALI),
    "DaliTrainStream files": (_dali_files, KEYS_DALI),
    "DaliTrainStream manifest": (_dali_manifest, KEYS_DALI),
    "VolumeStream": (_volume, KEYS_3D),
    "DaliVolumeStream": (_dali_volume, KEYS_3D),
}
PARAMS = [pytest.param(k, marks=_dali) if "Dali" in k else k for k in KINDS]


def _same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)


@pytest.fixture
def build(data):
    """``build(kind, seed)``; every stream built is closed after the test."""
    made: list[Stream] = []

    def make(kind: str, seed: int) -> Stream:
        s = KINDS[kind][0](data, seed)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("kind", PARAMS)
def test_stream_iterates_and_describes_itself(build, kind):
    s = build(kind, 0)
    assert isinstance(s, Stream) and isinstance(s, BatchStream)
    assert iter(s) is s
    dims = len(s.img_size)
    for b in (next(s), s.next()):
        assert isinstance(b, Batch)
        assert tuple(b.x_l.shape[2:]) == tuple(b.y_l.shape[1:]) == tuple(b.x_u.shape[2:]) == s.img_size
        assert b.x_l.dtype == b.x_u.dtype == torch.float32 and b.y_l.dtype == torch.int64
        assert b.x_l.device == s.device
    assert dims in (2, 3) and s.epoch_length >= 1 and s.n_labeled >= 1
    assert isinstance(s.skipped_files, int) and s.skipped_files == 0
    s.close()
    s.close()  # idempotent


@pytest.mark.parametrize("kind", PARAMS)
def test_state_is_json_and_round_trips(build, kind):
    s = build(kind, 1)
    for _ in range(2):
        s.next()
    state = s.state_dict()
    assert set(state) >= KINDS[kind][1]
    text = json.dumps(state)
    other = build(kind, 1)  # same seed (the sampler state records its own), another position
    for _ in range(5):
        other.next()
    other.load_state_dict(json.loads(text))
    assert json.dumps(other.state_dict()) == text  # the loaded stream stands where the saved one stood


@pytest.mark.parametrize("kind", PARAMS)
def test_resume_mid_epoch_and_across_epochs_is_exact(build, kind):
    s = build(kind, 5)
    n = s.epoch_length
    states, batches = [], []
    for _ in range(2 * n + 2):
        states.append(json.loads(json.dumps(s.state_dict())))
        batches.append(s.next())
    for k in sorted({1, n // 2 + 1, n, n + 1}):
        r = build(kind, 12345)  # another seed: everything comes from the state
        r.next()  # and a position of its own, with batches drawn (or prefetched) ahead
        r.load_state_dict(states[k])
        assert all(_same(batches[i], r.next()) for i in range(k, min(k + 3, len(batches)))), f"resume at {k}"


@pytest.mark.parametrize("kind", PARAMS)
def test_foreign_state_is_refused_before_anything_changes(build, kind, data):
    s = build(kind, 3)
    s.next()
    want = build(kind, 3)
    want.next()
    foreign = _volume(data, 0) if len(s.img_size) == 2 else _train_tensors(data, 0)
    with pytest.raises((ValueError, KeyError, TypeError)):
        s.load_state_dict(foreign.state_dict())
    assert all(_same(want.next(), s.next()) for _ in range(2))


# ---------------------------------------------------------------------------- construction
def test_identity_is_a_constructor_argument(data):
    lab, unl = fingerprint_lines(["a", "b"], "labeled list"), fingerprint_lines(["c"], "unlabeled list")
    x, y = _cat_cache(data)
    kw = dict(n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=0)
    built = TrainStream.from_tensors(x, y, identity=Identity(lab, unl, True), **kw)
    later = TrainStream.from_tensors(x, y, **kw)
    later.set_identity(lab, unl, resume_changed_data=True)
    assert built.state_dict() == later.state_dict() and built.sampler.resume_changed_data
    assert built.state_dict()["sampler"]["content"]["labeled"]["sha256"] == lab["sha256"]
    changed = TrainStream.from_tensors(x, y, identity=Identity(lab, fingerprint_lines(["d"], "unlabeled list")),
                                       **kw)
    with pytest.raises(DataError, match="unlabeled list: content changed"):
        changed.load_state_dict(built.state_dict())
    vs = VolumeStream.from_arrays(data["vols"], data["labs"], n_labeled=3, labeled_bs=1, unlabeled_bs=1, seed=0,
                                  patch_size=PATCH, names=["p", "q", "r", "s"], identity=Identity(lab, unl))
    assert vs.names == ["p", "q", "r", "s"] and vs.sampler.identity["unlabeled"]["sha256"] == unl["sha256"]
    with pytest.raises(TypeError, match="feed"):
        VolumeStream.from_arrays(data["vols"], data["labs"], n_labeled=3, labeled_bs=1, unlabeled_bs=1, seed=0,
                                 patch_size=PATCH, feed="window")  # an option of DaliVolumeStream only


def test_dataset_stream_keeps_its_fingerprints_and_takes_resume_changed_data(data):
    ds = SSL4MISDataset(data["acdc"], num_classes=4)
    s = TrainStream(ds, n_labeled=6, labeled_bs=2, unlabeled_bs=2, seed=0, img_size=SIZE,
                    identity=Identity(resume_changed_data=True))
    content = s.state_dict()["sampler"]["content"]
    assert content["labeled"]["source"].endswith("train_slices.list (labeled lines)")
    assert content["unlabeled"]["lines"] == 6 and s.sampler.resume_changed_data


def test_rgb_cache_is_kept_and_gray_is_repeated(data):
    rgb = _train_rgb(data, 0)
    assert rgb.images_NCHW.shape[1] == 3 and rgb.next().x_l.shape[1] == 3
    gray = _train_tensors(data, 0)
    b = gray.next()
    assert gray.images_NCHW.shape[1] == 1 and torch.equal(b.x_l[:, 0], b.x_l[:, 2])


def test_folder_dataset_lists_its_labeled_files_once(tmp_path):
    for split in ("labeled", "unlabeled"):
        for sub in ("image", "mask"):
            (tmp_path / split / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((6, 5), 40 * i, np.uint8)).save(tmp_path / "labeled" / "image" / f"l{i}.png")
        Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "labeled" / "mask" / f"l{i}.png")
    ds = FolderDataset(tmp_path, num_classes=2)
    assert [p.name for p in ds.labeled_files] == ["l0.png", "l1.png", "l2.png"] == [p.name for p in ds.images("labeled")]


# ---------------------------------------------------------------------------- the base class
class _Counter(Stream):
    """A minimal stream: only the three abstract methods."""

    def __init__(self) -> None:
        super().__init__(device="cpu", img_size=(2, 2), n_labeled=1)
        self.i = 0

    def next(self) -> Batch:
        self.i += 1
        x = torch.full((1, 1, 2, 2), float(self.i))
        return Batch(x_l=x, y_l=torch.zeros((1, 2, 2), dtype=torch.int64), x_u=x[:0])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state) -> None:
        self.i = int(state["i"])


def test_base_class_defaults():
    with pytest.raises(TypeError):
        Stream(device="cpu", img_size=(2, 2), n_labeled=1)  # abstract
    s = _Counter()
    assert [float(b.x_l.max()) for b, _ in zip(s, range(3))] == [1.0, 2.0, 3.0]
    assert s.skipped_files == 0 and s.img_size == (2, 2) and s.device == torch.device("cpu")
    with pytest.raises(AttributeError, match="epoch_length"):
        s.epoch_length
    assert not isinstance(s, BatchStream)  # no epoch_length: not a training stream yet
    with pytest.raises(NotImplementedError, match="set_identity"):
        s.set_identity(resume_changed_data=True)
    with s as same:
        assert same is s
    assert "n_labeled=1" in repr(s)

    class WithEpoch(_Counter):
        epoch_length = 4

    assert isinstance(WithEpoch(), BatchStream) and WithEpoch().epoch_length == 4


def test_old_import_paths_still_work():
    from ucseg_fast.data import DataError as A
    from ucseg_fast.data.guards import DataError as B
    from ucseg_fast.data.ssl4mis import DataError as C
    from ucseg_fast.data.factory import ManifestTrainStream as M
    from ucseg_fast.data.stream import _torch_seed, generator_state, restore_generator
    assert A is B is C is DataError and M is ManifestTrainStream
    assert callable(_torch_seed) and callable(generator_state) and callable(restore_generator)
