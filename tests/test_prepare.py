"""`ucseg-fast prepare npy | export`: conversions that round-trip to the HDF5 source."""
from __future__ import annotations

import numpy as np
import pytest

from ucseg_fast.cli import main
from ucseg_fast.data import SSL4MISDataset, write_synthetic_acdc
from ucseg_fast.data.folders import FolderDataset


def test_prepare_npy_and_jpg_export(tmp_path, capsys):
    src = write_synthetic_acdc(tmp_path / "s", n_train_patients=2, slices_per_volume=2, n_val=1, n_test=0,
                               size=(24, 32), seed=0)
    assert main(["prepare", "npy", "--src", str(src), "--out", str(tmp_path / "npy")]) == 0
    ds = SSL4MISDataset(src)
    name = ds.train_slices[3]
    img, lab = ds.read_slice(name)
    assert np.array_equal(np.load(tmp_path / "npy" / "slices" / f"{name}_image.npy"), img)
    assert np.array_equal(np.load(tmp_path / "npy" / "slices" / f"{name}_label.npy"), lab)
    assert (tmp_path / "npy" / "volumes" / f"{ds.volumes('val')[0]}_label.npy").is_file()
    out = tmp_path / "jpg"
    assert main(["prepare", "export", "--src", str(src), "--out", str(out), "--format", "jpg",
                 "--labeled-patients", "1"]) == 0
    assert "labeled 4, unlabeled 4, val 4" in capsys.readouterr().out
    f = FolderDataset(out, num_classes=4)
    p = f.images("labeled")[0]
    assert p.suffix == ".jpg" and f.mask_path(p).suffix == ".png"
    x, y = f.read_pair(p)
    i0, l0 = ds.read_slice(p.stem)
    assert np.array_equal(y, l0)  # masks lossless
    ref = (i0 - i0.min()) / (i0.max() - i0.min())
    assert np.abs(x[0] - ref).mean() < 0.02  # JPEG q95


def test_prepare_errors_are_one_line(tmp_path, capsys):
    assert main(["prepare", "npy", "--out", str(tmp_path / "npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: prepare npy needs --src <SSL4MIS folder>"]
    assert main(["prepare", "npy", "--src", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]
    with pytest.raises(SystemExit) as e:  # prepare takes no config overrides
        main(["prepare", "synthetic", "--out", str(tmp_path / "s"), "--train.max_iterations=3"])
    assert e.value.code == 2 and not (tmp_path / "s").exists()
