"""Nothing lost, nothing silently wrong: resume identity by content, the decoded-size cap, paths
reported as what they are, skipped-file counts, and parallel decoding that changes no batch."""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ucseg_fast.config import DataConfig
from ucseg_fast.data import DataError, SSL4MISDataset, TrainStream, TwoStreamSampler, write_synthetic_acdc
from ucseg_fast.data.factory import ManifestTrainStream, build_train_stream
from ucseg_fast.data.folder_stream import FolderTrainStream
from ucseg_fast.data.folders import FolderDataset, decode_image
from ucseg_fast.data.guards import DataPathError, check_file, fingerprint_lines
from ucseg_fast.data.manifest import ManifestStream, read_unlabeled_image
from ucseg_fast.data.prefetch import THREAD_PREFIX, ordered_map

NO_AUG = dict(hflip_p=0.0, vflip_p=0.0, ssr_p=0.0, distort_p=0.0, dropout_p=0.0)
FLAG = "--data.resume_changed_data=true"


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _no_decode_threads(timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while _decode_threads() and time.monotonic() < end:
        time.sleep(0.02)
    return not _decode_threads()


def _png(path: Path, value: int, hw=(12, 10), rgb: bool = False) -> Path:
    rng = np.random.default_rng(value)
    arr = np.clip(value + rng.integers(0, 40, (*hw, 3) if rgb else hw), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _cfg(**kw) -> DataConfig:
    """A `DataConfig` built directly (the data layer reads it; config validation is tested elsewhere)."""
    return DataConfig(**kw)


def _same(a, b) -> bool:
    return torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)


@pytest.fixture
def synth(tmp_path) -> Path:
    # 3 patients x 2 frames x 3 slices = 18 lines, grouped by patient
    return write_synthetic_acdc(tmp_path / "synth", n_train_patients=3, slices_per_volume=3, n_val=0, n_test=0,
                                size=(20, 24), seed=2)


@pytest.fixture
def png_folder(tmp_path) -> Path:
    """A gray image folder: 6 labeled pairs, 11 unlabeled images of varying sizes."""
    root = tmp_path / "folder"
    for split in ("labeled", "unlabeled"):
        (root / split / "image").mkdir(parents=True)
    (root / "labeled" / "mask").mkdir()
    for i in range(6):
        _png(root / "labeled" / "image" / f"l{i}.png", 20 * i, (18, 16))
        m = np.zeros((18, 16), np.uint8)
        m[4:10, 3:9] = 1 + i % 3
        Image.fromarray(m).save(root / "labeled" / "mask" / f"l{i}.png")
    for i in range(11):
        _png(root / "unlabeled" / "image" / f"u{i:02d}.png", 10 + 15 * i, (14 + i, 20 - i))
    return root


@pytest.fixture
def manifest(tmp_path) -> Path:
    """14 images (two corrupt) named by a manifest with relative paths and a comment."""
    d = tmp_path / "arch"
    d.mkdir()
    lines = ["# unlabeled archive"]
    for i in range(14):
        p = d / f"img{i:02d}.png"
        if i in (3, 9):
            p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            _png(p, 7 * i, (10 + i % 4, 12))
        lines.append(p.name)
    (d / "m.txt").write_text("\n".join(lines) + "\n")
    return d / "m.txt"


# ---------------------------------------------------------------------------- resume identity
def _reorder_labeled(root: Path) -> None:
    """Swap two slices of the first patient: same length, same set, other order."""
    lst = root / "train_slices.list"
    lines = lst.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    lst.write_text("\n".join(lines) + "\n")


def test_reordered_list_is_refused_naming_it(synth, caplog):
    ds = SSL4MISDataset(synth, num_classes=4)
    s = TrainStream(ds, n_labeled=6, labeled_bs=2, unlabeled_bs=2, seed=3, augment=NO_AUG, img_size=(16, 16))
    for _ in range(2):
        s.next()
    state = json.loads(json.dumps(s.state_dict()))
    assert state["sampler"]["content"]["labeled"]["lines"] == 6
    _reorder_labeled(synth)
    t = TrainStream(SSL4MISDataset(synth, num_classes=4), n_labeled=6, labeled_bs=2, unlabeled_bs=2, seed=3,
                    augment=NO_AUG, img_size=(16, 16))
    with pytest.raises(DataError, match="train_slices.list") as exc:
        t.load_state_dict(state)
    msg = str(exc.value)
    assert "\n" not in msg and FLAG in msg and "labeled lines" in msg and "changed" in msg
    # with the key, the stream continues from the saved position on the new content
    t.set_identity(resume_changed_data=True)
    with caplog.at_level(logging.WARNING):
        t.load_state_dict(state)
    assert "content changed" in caplog.text and "train_slices.list" in caplog.text
    assert t.sampler.position == 2 and t.sampler.epoch == 0
    t.next()


def test_factory_resume_identity_and_changed_data(synth):
    kw = dict(labeled_patients=1, img_size=(16, 16), labeled_bs=2, unlabeled_bs=2, augment=False)
    s = build_train_stream(_cfg(root=str(synth), **kw), device="cpu", seed=0)
    s.next()
    state = json.loads(json.dumps(s.state_dict()))
    expect = [s.next() for _ in range(3)]
    # a copy of the dataset elsewhere (new timestamps, same content) resumes exactly
    copy = synth.parent / "copied"
    shutil.copytree(synth, copy)
    os.utime(copy / "train_slices.list", (1, 1))
    t = build_train_stream(_cfg(root=str(copy), **kw), device="cpu", seed=0)
    t.load_state_dict(state)
    assert all(_same(a, t.next()) for a in expect)
    # the unlabeled lines changed (order): refused, then accepted with the key
    lst = copy / "train_slices.list"
    lines = lst.read_text().splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    lst.write_text("\n".join(lines) + "\n")
    u = build_train_stream(_cfg(root=str(copy), **kw), device="cpu", seed=0)
    with pytest.raises(DataError, match=r"unlabeled lines.*--data\.resume_changed_data=true"):
        u.load_state_dict(state)
    v = build_train_stream(_cfg(root=str(copy), resume_changed_data=True, **kw), device="cpu", seed=0)
    v.load_state_dict(state)
    assert v.sampler.position == 1
    v.next()


def test_sampler_identity_old_states_and_clamp():
    lab = fingerprint_lines([f"a{i}" for i in range(9)], "list.txt (labeled lines)")
    unl = fingerprint_lines([f"b{i}" for i in range(5)], "list.txt (unlabeled lines)")
    s = TwoStreamSampler(np.arange(9), np.arange(9, 14), 2, 1, seed=1)
    s.set_identity(lab, unl)
    for _ in range(3):
        next(s)
    state = s.state_dict()
    # an old checkpoint (no fingerprint) loads on counts, as before
    old = {k: v for k, v in state.items() if k != "content"}
    t = TwoStreamSampler(np.arange(9), np.arange(9, 14), 2, 1, seed=1)
    t.set_identity(lab, unl)
    t.load_state_dict(old)
    assert [next(t)[0].tolist() for _ in range(3)] == [next(s)[0].tolist() for _ in range(3)]
    with pytest.raises(ValueError, match="n_labeled=9, this sampler has 5"):
        TwoStreamSampler(np.arange(5), np.arange(9, 14), 2, 1, seed=1).load_state_dict(old)
    # a shorter labeled list: refused; with resume_changed_data the position is clamped
    short = fingerprint_lines([f"a{i}" for i in range(5)], "list.txt (labeled lines)")
    u = TwoStreamSampler(np.arange(5), np.arange(9, 14), 2, 1, seed=1)
    u.set_identity(short, unl)
    with pytest.raises(DataError, match=r"list.txt \(labeled lines\): content changed .*9 lines.*5 lines"):
        u.load_state_dict(state)
    u.set_identity(resume_changed_data=True)
    u.load_state_dict(state)
    assert u.position == u.epoch_length == 2
    a, _ = next(u)
    assert u.epoch == 1 and set(a.tolist()) <= set(range(5))


def test_manifest_touch_copy_and_comments_resume(manifest, tmp_path):
    s = ManifestStream(manifest, size=(8, 8))
    s.next_batch(5)
    state = json.loads(json.dumps(s.state_dict()))
    expect = s.next_batch(6)
    os.utime(manifest, (12345, 12345))  # touch: new timestamp, same content
    t = ManifestStream(manifest, size=(8, 8))
    t.load_state_dict(state)
    assert np.array_equal(t.next_batch(6), expect)
    # a copy somewhere else (absolute paths inside, other comments, CRLF): same path lines
    other = tmp_path / "elsewhere"
    other.mkdir()
    lines = [line for line in manifest.read_text().splitlines() if not line.startswith("#")]
    text = "# copied\r\n\r\n" + "\r\n".join(str(manifest.parent / n) for n in lines) + "\r\n"
    (other / "copy.txt").write_text(text)
    u = ManifestStream(other / "copy.txt", size=(8, 8))
    assert u.fingerprint["sha256"] != s.fingerprint["sha256"]  # absolute paths: other lines
    (other / "rel.txt").write_text("# other comment\n\n" + "\n".join(lines) + "\n")
    shutil.copytree(manifest.parent, other / "arch")
    (other / "arch" / "m.txt").write_text("# other comment\n\n" + "\n".join(lines) + "\n")
    v = ManifestStream(other / "arch" / "m.txt", size=(8, 8))
    assert v.fingerprint["sha256"] == s.fingerprint["sha256"] and v.fingerprint["lines"] == 14
    v.load_state_dict(state)
    assert np.array_equal(v.next_batch(6), expect) and v.skipped_files == state["corrupt_count"] + 1


def test_manifest_changed_content_refused_then_continues(manifest, caplog):
    s = ManifestStream(manifest, size=(8, 8))
    s.next_batch(4)  # img00..img04, img03 skipped
    state = s.state_dict()
    assert state["line"] == 5
    lines = manifest.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # reordered, same length
    manifest.write_text("\n".join(lines) + "\n")
    t = ManifestStream(manifest, size=(8, 8))
    with pytest.raises(DataError) as exc:
        t.load_state_dict(state)
    msg = str(exc.value)
    assert str(manifest) in msg and FLAG in msg and "\n" not in msg
    t = ManifestStream(manifest, size=(8, 8), resume_changed_data=True)
    with caplog.at_level(logging.WARNING):
        t.load_state_dict(state)
    assert "content changed" in caplog.text
    assert t.line == 5 and t.next_image()[0].endswith("img05.png")
    # shortened below the saved line: clamped, the next image starts the next epoch
    s2 = ManifestStream(manifest, size=(8, 8))
    for _ in range(12):
        s2.next_image()
    late = s2.state_dict()
    manifest.write_text("\n".join(lines[:6]) + "\n")
    u = ManifestStream(manifest, size=(8, 8), resume_changed_data=True)
    u.load_state_dict(late)
    path, _ = u.next_image()
    assert u.epoch == late["epoch"] + 1 and path.endswith(lines[1])


def test_manifest_version1_checkpoint(manifest):
    s = ManifestStream(manifest, size=(8, 8))
    s.next_batch(3)
    st = manifest.stat()
    v1 = {"version": 1, "manifest": str(manifest), "fingerprint": [st.st_size, st.st_mtime_ns], "rank": 0,
          "world_size": 1, "epoch": 0, "line": s.line, "offset": int(s._fh.tell()),
          "yielded_in_epoch": s.line, "corrupt_count": s.corrupt_count}
    expect = s.next_batch(3)
    t = ManifestStream(manifest, size=(8, 8))
    t.load_state_dict(v1)
    assert np.array_equal(t.next_batch(3), expect)
    os.utime(manifest, (1, 1))
    with pytest.raises(DataError, match="predates content fingerprints"):
        ManifestStream(manifest, size=(8, 8)).load_state_dict(v1)
    u = ManifestStream(manifest, size=(8, 8), resume_changed_data=True)
    u.load_state_dict(v1)
    assert np.array_equal(u.next_batch(3), expect)


# ---------------------------------------------------------------------------- the pixel cap
def test_too_large_image_in_a_folder_is_an_error_naming_it(png_folder):
    big = _png(png_folder / "labeled" / "image" / "l3.png", 40, (30, 40))
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(png_folder / "labeled" / "mask" / "l3.png")
    words = r"l3\.png: image of 40x30 = 1,200 pixels exceeds data\.max_image_pixels = 1,000"
    with pytest.raises(DataError, match=words):
        FolderDataset(png_folder, num_classes=4, max_image_pixels=1000).load_split("labeled", (8, 8), workers=2)
    x, _ = FolderDataset(png_folder, num_classes=4, max_image_pixels=1200).load_split("labeled", (8, 8))
    assert x.shape[0] == 6
    with pytest.raises(DataError, match="exceeds data.max_image_pixels"):
        decode_image(big, max_pixels=1199)
    # through the config key
    cfg = _cfg(root=str(png_folder), format="folder", num_classes=4, img_size=(8, 8), labeled_bs=2, unlabeled_bs=2,
               max_image_pixels=1000)
    with pytest.raises(DataError, match=r"l3\.png: image of 40x30"):
        build_train_stream(cfg, device="cpu", seed=0)


def test_too_large_image_in_a_manifest_is_skipped_and_counted(tmp_path, caplog):
    for i in range(4):
        _png(tmp_path / f"s{i}.png", 10 * i, (6, 6))
    _png(tmp_path / "huge.png", 50, (40, 30))
    np.save(tmp_path / "huge.npy", np.zeros((30, 40), np.float32))
    (tmp_path / "m.txt").write_text("s0.png\nhuge.png\ns1.png\nhuge.npy\ns2.png\ns3.png\n")
    s = ManifestStream(tmp_path / "m.txt", size=(4, 4), max_image_pixels=1000)
    with caplog.at_level(logging.WARNING):
        batch = s.next_batch(4)
    assert batch.shape == (4, 4, 4)
    assert s.skipped_files == s.corrupt_count == 2
    assert [p.rsplit("/", 1)[1] for p in s.corrupt_files] == ["huge.png", "huge.npy"]
    assert "huge.png" in caplog.text and "30x40 = 1,200 pixels exceeds" in caplog.text
    assert ManifestStream(tmp_path / "m.txt", size=(4, 4), max_image_pixels=1200).next_batch(5).shape == (5, 4, 4)


# ---------------------------------------------------------------------------- paths
def test_path_messages(tmp_path):
    (tmp_path / "adir.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    good = _png(tmp_path / "good.png", 5)
    os.symlink(good, tmp_path / "link.png")
    cases = {"adir.png": "is a directory, not a file", "dangling.png": "is a dangling symlink",
             "loop_a.png": "is a symlink loop", "missing.png": "not found"}
    for name, words in cases.items():
        with pytest.raises(DataPathError, match=words) as exc:
            check_file(tmp_path / name, "image file")
        assert name in str(exc.value) and "does not exist" not in str(exc.value).replace("which does not exist", "")
        assert isinstance(exc.value, DataError) and isinstance(exc.value, FileNotFoundError)
        with pytest.raises(DataPathError, match=words):  # every reader says the same
            decode_image(tmp_path / name)
        with pytest.raises(DataPathError, match=words):
            read_unlabeled_image(str(tmp_path / name.replace(".png", ".npy")) if name == "missing.png"
                                 else str(tmp_path / name))
    assert check_file(tmp_path / "link.png") == str(tmp_path / "link.png")
    assert "gone.png" in str(pytest.raises(DataPathError, check_file, tmp_path / "dangling.png").value)


def test_broken_paths_in_folders_lists_and_manifests(png_folder, synth, tmp_path, caplog):
    # a labeled image that is a dangling symlink is listed and reported, not silently dropped
    os.symlink(png_folder / "nowhere.png", png_folder / "labeled" / "image" / "l9.png")
    with pytest.raises(DataPathError, match=r"l9\.png is a dangling symlink"):
        FolderDataset(png_folder, num_classes=4).load_split("labeled", (8, 8))
    (png_folder / "labeled" / "image" / "l9.png").unlink()
    m = png_folder / "labeled" / "mask" / "l2.png"
    m.unlink()
    m.mkdir()
    with pytest.raises(DataPathError, match=r"mask file .*l2\.png is a directory"):
        FolderDataset(png_folder, num_classes=4).load_split("labeled", (8, 8))
    # SSL4MIS: a slice file that is a directory, a list that is a symlink loop
    ds = SSL4MISDataset(synth)
    victim = synth / "data" / "slices" / f"{ds.train_slices[2]}.h5"
    victim.unlink()
    victim.mkdir()
    with pytest.raises(DataPathError, match=rf"{victim.name} \(listed in .*train_slices.list\) is a directory"):
        SSL4MISDataset(synth)
    (synth / "val.list").unlink(missing_ok=True)
    os.symlink(synth / "val.list", synth / "val.list")
    with pytest.raises(DataPathError, match="val.list is a symlink loop"):
        SSL4MISDataset(synth, check_files=False).volumes("val")
    # a manifest entry that is a directory / dangling symlink: skipped with what it is
    (tmp_path / "d.png").mkdir()
    os.symlink(tmp_path / "x.png", tmp_path / "dl.png")
    _png(tmp_path / "ok.png", 3, (5, 5))
    (tmp_path / "m.txt").write_text("d.png\ndl.png\nok.png\n")
    s = ManifestStream(tmp_path / "m.txt", size=(4, 4))
    with caplog.at_level(logging.WARNING):
        s.next_image()
    assert s.skipped_files == 2 and "is a directory" in caplog.text and "dangling symlink" in caplog.text
    (tmp_path / "mdir").mkdir()
    with pytest.raises(DataPathError, match="unlabeled manifest .*mdir is a directory"):
        ManifestStream(tmp_path / "mdir")


# ---------------------------------------------------------------------------- parallel decoding
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_manifest_parallel_equals_serial_across_resume(manifest, workers):
    ref = ManifestStream(manifest, size=(8, 8))
    par = ManifestStream(manifest, size=(8, 8), decode_workers=workers, prefetch=5)
    for _ in range(3):  # crosses epochs (12 readable images an epoch), corrupt files included
        assert np.array_equal(ref.next_batch(5), par.next_batch(5))
    assert par.skipped_files == ref.skipped_files > 0
    state = par.state_dict()  # images decoded ahead are not consumed
    assert state == ref.state_dict()
    want = [ref.next_batch(4) for _ in range(4)]
    for other in (ManifestStream(manifest, size=(8, 8)), ManifestStream(manifest, size=(8, 8), decode_workers=2)):
        other.load_state_dict(state)
        assert all(np.array_equal(w, other.next_batch(4)) for w in want)
        assert other.skipped_files == ref.skipped_files
        other.close()
    par.load_state_dict(state)  # in place, with images in flight
    assert all(np.array_equal(w, par.next_batch(4)) for w in want)
    assert par.next_path() == ref.next_path()  # a path read drops the read-ahead first
    par.close()
    assert _no_decode_threads()


def test_manifest_train_stream_workers_do_not_change_batches(png_folder, tmp_path):
    files = sorted((png_folder / "unlabeled" / "image").iterdir())
    (tmp_path / "u.txt").write_text("".join(f"{p}\n" for p in files) + "not_there.png\n")
    kw = dict(root=str(png_folder), format="folder", num_classes=4, img_size=(8, 8), labeled_bs=3, unlabeled_bs=3,
              unlabeled_manifest=str(tmp_path / "u.txt"))
    make = lambda w: build_train_stream(_cfg(decode_workers=w, **kw), device="cpu", seed=4)  # noqa: E731
    a, b = make(0), make(2)
    assert isinstance(b, ManifestTrainStream) and b.manifest.decode_workers == 2
    for _ in range(3):
        assert _same(a.next(), b.next())
    state = b.state_dict()
    assert b.skipped_files == state["manifest"]["corrupt_count"] == 0
    want = [a.next() for _ in range(5)]  # 24 images: two passes over 11 readable + 1 missing
    assert a.skipped_files == 2
    c = make(2)
    c.load_state_dict(state)
    assert all(_same(w, c.next()) for w in want)
    assert c.skipped_files == 2
    for s in (a, b, c):
        s.close()
    assert _no_decode_threads()


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_stream_equals_cached_stream_across_resume(png_folder, workers):
    ds = FolderDataset(png_folder, num_classes=4)
    size = (8, 8)
    x_l, y_l = ds.load_split("labeled", size)
    x_u, _ = ds.load_split("unlabeled", size, with_labels=False, workers=2)
    aug = dict(hflip_p=0.5, vflip_p=0.5, ssr_p=0.5, distort_p=0.5, dropout_p=0.5)
    cached = TrainStream.from_tensors(torch.cat([x_l, x_u])[:, 0], torch.cat([y_l, torch.zeros((11, *size),
                                      dtype=y_l.dtype)]), n_labeled=6, labeled_bs=2, unlabeled_bs=3, seed=9,
                                      augment=aug)
    streamed = FolderTrainStream(x_l, y_l, ds.images("unlabeled"), labeled_bs=2, unlabeled_bs=3, seed=9,
                                 augment=aug, decode_workers=workers)
    streamed.set_identity(ds.fingerprint("labeled"), ds.fingerprint("unlabeled"))
    for _ in range(4):
        assert _same(cached.next(), streamed.next())
    state = streamed.state_dict()
    assert state["sampler"]["position"] == cached.sampler.position  # decoded-ahead batches not counted
    want = [cached.next() for _ in range(5)]
    fresh = FolderTrainStream(x_l, y_l, ds.images("unlabeled"), labeled_bs=2, unlabeled_bs=3, seed=9, augment=aug,
                              decode_workers=2 - workers)
    fresh.load_state_dict(state)
    assert all(_same(w, fresh.next()) for w in want)
    assert streamed.skipped_files == 0
    # a renamed unlabeled file: the file list's fingerprint refuses the state
    src = png_folder / "unlabeled" / "image" / "u03.png"
    src.rename(src.with_name("u03b.png"))
    other = FolderTrainStream(x_l, y_l, ds.images("unlabeled"), labeled_bs=2, unlabeled_bs=3, seed=9, augment=aug)
    other.set_identity(ds.fingerprint("labeled"), ds.fingerprint("unlabeled"))
    with pytest.raises(DataError, match=r"unlabeled/image: content changed"):
        other.load_state_dict(state)
    for s in (streamed, fresh, other):
        s.close()
    assert _no_decode_threads()


def test_factory_streams_a_large_unlabeled_folder(png_folder, monkeypatch):
    import ucseg_fast.data.factory as F
    cfg = _cfg(root=str(png_folder), format="folder", num_classes=4, img_size=(8, 8), labeled_bs=2, unlabeled_bs=2)
    cached = build_train_stream(cfg, device="cpu", seed=1)
    monkeypatch.setattr(F, "FOLDER_CACHE_MAX_BYTES", 0)
    streamed = build_train_stream(cfg, device="cpu", seed=1)
    assert isinstance(streamed, FolderTrainStream) and isinstance(cached, TrainStream)
    for _ in range(3):
        assert _same(cached.next(), streamed.next())
    state = cached.state_dict()  # the two formats are one
    want = [cached.next() for _ in range(3)]
    streamed.load_state_dict(state)
    assert all(_same(w, streamed.next()) for w in want)
    streamed.close()


def test_load_split_workers_and_ordered_map(png_folder):
    ds = FolderDataset(png_folder, num_classes=4)
    a, _ = ds.load_split("unlabeled", (9, 7), with_labels=False)
    b, _ = ds.load_split("unlabeled", (9, 7), with_labels=False, workers=3)
    assert torch.equal(a, b)
    (png_folder / "unlabeled" / "image" / "u04.png").write_bytes(b"junk")
    (png_folder / "unlabeled" / "image" / "u07.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="u04.png"):  # the first bad file in order, whatever the threads
        ds.load_split("unlabeled", (9, 7), with_labels=False, workers=3)
    assert list(ordered_map(lambda x: x * x, range(50), 3, ahead=4)) == [x * x for x in range(50)]
    assert _no_decode_threads()


def test_resize_before_conversion_is_bit_identical(tmp_path):
    from ucseg_fast.data.ssl4mis import resize_nearest
    p8 = _png(tmp_path / "g.png", 30, (37, 29))
    Image.fromarray((np.arange(37 * 29).reshape(37, 29) * 61 % 65536).astype(np.uint16)).save(tmp_path / "g16.png")
    p3 = _png(tmp_path / "c.png", 60, (21, 33), rgb=True)
    for p, c in ((p8, 1), (tmp_path / "g16.png", 1), (p3, 3)):
        full = decode_image(p, channels=c)
        assert np.array_equal(decode_image(p, channels=c, size=(16, 50)), resize_nearest(full, (16, 50)))
        assert decode_image(p, channels=c, size=(16, 50)).flags.c_contiguous
    assert decode_image(p3, channels=3).flags.c_contiguous


# ---------------------------------------------------------------------------- skipped_files, threads, deps
def test_skipped_files_on_every_stream(synth, manifest, png_folder):
    ds = SSL4MISDataset(synth, num_classes=4)
    assert TrainStream(ds, n_labeled=6, labeled_bs=2, unlabeled_bs=2, seed=0, img_size=(8, 8)).skipped_files == 0
    from ucseg_fast.data import VolumeStream
    vs = VolumeStream.from_arrays([torch.zeros(6, 6, 6)] * 3, [torch.zeros(6, 6, 6, dtype=torch.uint8)] * 3,
                                  n_labeled=2, labeled_bs=1, unlabeled_bs=1, seed=0, patch_size=(4, 4, 4))
    assert vs.skipped_files == 0
    lab = TrainStream(ds, n_labeled=6, labeled_bs=2, unlabeled_bs=0, seed=0, img_size=(8, 8))
    ms = ManifestStream(manifest, size=(8, 8), decode_workers=2)
    s = ManifestTrainStream(lab, ms, 4, dict(NO_AUG), seed=0, rank=0)
    assert s.skipped_files == 0
    s.next()  # 4 images: img03 skipped on the way
    assert s.skipped_files == 1 == getattr(s, "skipped_files", 0)
    s.close()
    fds = FolderDataset(png_folder, num_classes=4)
    x, y = fds.load_split("labeled", (8, 8))
    assert FolderTrainStream(x, y, fds.images("unlabeled"), labeled_bs=2, unlabeled_bs=2, seed=0,
                             decode_workers=0).skipped_files == 0


def test_decode_threads_end_without_close(manifest):
    s = ManifestStream(manifest, size=(8, 8), decode_workers=2)
    s.next_batch(3)
    assert _decode_threads()
    del s
    gc.collect()
    assert _no_decode_threads()


def test_pillow_is_a_declared_dependency():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(d.replace(" ", "").lower().startswith("pillow>=") for d in pyproject["project"]["dependencies"])
