"""Unlabeled manifests: lazy streaming, sharding (disjoint, complete), exact resume, corrupt files."""
from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from ucseg_fast.data import DataError
from ucseg_fast.data.manifest import ManifestStream


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory):
    p = tmp_path_factory.mktemp("man") / "unlabeled.txt"
    with open(p, "w") as f:
        f.write("# a comment\n")
        for i in range(100_000):
            f.write(f"/archive/p{i // 100:04d}/slice_{i:06d}.png\n")
            if i % 1000 == 0:
                f.write("\n")  # blank lines are not path lines
    return p


def test_streams_lazily(big_manifest):
    s = ManifestStream(big_manifest, size=None)
    tracemalloc.start()
    for _ in range(100_000):
        last = s.next_path()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert last.endswith("slice_099999.png") and s.epoch == 0
    assert peak < 200_000, f"peak {peak} B: the manifest (~3.5 MB of paths) must not be held"
    assert s.next_path().endswith("slice_000000.png") and s.epoch == 1


def test_sharding_disjoint_and_complete(big_manifest):
    world = 3
    shards = []
    for r in range(world):
        s = ManifestStream(big_manifest, rank=r, world_size=world, size=None)
        n = len(range(r, 100_000, world))
        paths = [s.next_path().rsplit("/", 1)[1] for _ in range(n)]
        assert paths[:2] == [f"slice_{r:06d}.png", f"slice_{r + world:06d}.png"]
        assert s.epoch == 0 and s.next_path().endswith(f"slice_{r:06d}.png")  # wraps exactly
        shards.append(set(paths))
    assert sum(len(x) for x in shards) == 100_000
    assert set().union(*shards) == {f"slice_{i:06d}.png" for i in range(100_000)}


def test_resume_exact(big_manifest):
    s = ManifestStream(big_manifest, rank=1, world_size=2, size=None)
    for _ in range(12_345):
        s.next_path()
    state = s.state_dict()
    expect = [s.next_path() for _ in range(50)]
    t = ManifestStream(big_manifest, rank=1, world_size=2, size=None)
    t.load_state_dict(state)
    assert [t.next_path() for _ in range(50)] == expect
    with pytest.raises(ValueError, match="rank 1/2"):
        ManifestStream(big_manifest, rank=0, world_size=2, size=None).load_state_dict(state)


def test_corrupt_files_counted_and_logged(tmp_path, caplog):
    names = []
    for i in range(6):
        p = tmp_path / f"u{i}.png"
        if i in (1, 4):
            p.write_bytes(b"garbage")
        else:
            Image.fromarray(np.full((6, 8), 10 * i, np.uint8)).save(p)
        names.append(p.name)
    (tmp_path / "m.txt").write_text("\n".join(names) + "\nmissing.png\n")
    s = ManifestStream(tmp_path / "m.txt", size=(4, 4))
    with caplog.at_level(logging.WARNING):
        batch = s.next_batch(5)  # u0 u2 u3 u5 (u1, u4, missing skipped) then u0 again
    assert batch.shape == (5, 4, 4) and batch.dtype == np.float32
    assert np.allclose(batch[:, 0, 0], np.array([0, 20, 30, 50, 0]) / 255.0)
    assert s.corrupt_count == 3 and [p.rsplit("/", 1)[1] for p in s.corrupt_files] == ["u1.png", "u4.png", "missing.png"]
    assert "u1.png" in caplog.text and "missing.png" in caplog.text
    state = s.state_dict()
    t = ManifestStream(tmp_path / "m.txt", size=(4, 4))
    t.load_state_dict(state)
    assert t.corrupt_count == 3 and np.array_equal(t.next_batch(2), s.next_batch(2))


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"x")
    (tmp_path / "m.txt").write_text("bad.png\nbad.png\n")
    with pytest.raises(DataError, match="no readable file"):
        ManifestStream(tmp_path / "m.txt").next_image()
    (tmp_path / "e.txt").write_text("# only a comment\n")
    with pytest.raises(DataError, match="names no file"):
        ManifestStream(tmp_path / "e.txt").next_path()
