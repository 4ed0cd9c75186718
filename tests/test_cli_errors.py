"""The CLI's error rule: every user error is one line on stderr, `error: ...`, naming the file,
key or value, with exit code 2, found before any work is done where it can be (the config, the
training preflight, predict's input checks), and nothing is created or changed where it should
not be. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ucseg_fast import preflight
from ucseg_fast.cli import infer, main, user_error_line
from ucseg_fast.config import ConfigError
from ucseg_fast.data.errors import DataError
from ucseg_fast.data.synthetic import write_synthetic_acdc
from ucseg_fast.train.checkpoint import CheckpointError

DEMO = "demo"  # the packaged preset, by name
TINY = ["--data.img_size=[32,32]", "--data.labeled_bs=2", "--data.unlabeled_bs=2",
        "--train.max_iterations=4", "--train.val_every=2", "--train.log_every=1",
        "--train.checkpoint_every=2", "--train.progress=false", "--train.amp='none'",
        "--train.channels_last=false", "--loss.queue_size=16", "--data.labeled_patients=3",
        "--data.augment=false"]


def _write_data(root: Path) -> Path:
    # 14 patients x 2 frames x 2 slices of 32x32, one validation patient (2 volumes)
    return write_synthetic_acdc(root, n_train_patients=14, slices_per_volume=2, n_val=1,
                                n_test=0, size=(32, 32), seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_data(tmp_path_factory.mktemp("errs") / "ACDC")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A tiny run stopped at iteration 2 of 4 (last.json / best.json)."""
    out = tmp_path_factory.mktemp("errs_run") / "run"
    assert main(["train", "--config", DEMO, f"--data.root='{data}'", f"--train.out_dir='{out}'",
                 "--stop-at", "2", *TINY]) == 0
    assert (out / "last.json").is_file()
    return out


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", DEMO, f"--data.root='{data}'", f"--train.out_dir='{out}'",
            *TINY, *extra]


def user_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit code 2 and one stderr line `error: ...` holding `needles`."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("override, needles", [
    ("--train.base_lr=-1", ("train.base_lr", "-1")),
    ("--train.base_lr=nan", ("train.base_lr", "nan")),
    ("--train.momentum=1.0", ("train.momentum", "1.0")),
    ("--train.weight_decay=-0.1", ("train.weight_decay", "-0.1")),
    ("--model.patch_size=0", ("model.patch_size", "0")),
    ("--loss.queue_size=0", ("loss.queue_size", "0")),
    ("--loss.contrast_temperature=0", ("loss.contrast_temperature", "0")),
    ("--loss.gate_span=inf", ("loss.gate_span", "inf")),
    ("--train.max_val_volumes=-1", ("train.max_val_volumes", "-1")),
    ("--train.val_batch_size=0", ("train.val_batch_size", "0")),
    ("--train.graph_warmup=0", ("train.graph_warmup", "0")),
    ("--data.max_image_pixels=0", ("data.max_image_pixels", "0")),
    ("--data.decode_workers=-1", ("data.decode_workers", "-1")),
])
def test_bad_numbers_are_one_line_errors(data, tmp_path, capsys, override, needles):
    out = tmp_path / "out"
    user_error(capsys, _train(data, out, override), *needles)
    assert not out.exists()


def test_unequal_batch_sizes_with_copy_paste(data, tmp_path, capsys):
    out = tmp_path / "out"
    line = user_error(capsys, _train(data, out, "--data.unlabeled_bs=3", "--loss.phase2_start=2"),
                      "data.labeled_bs = 2", "data.unlabeled_bs = 3", "copy-paste")
    assert "loss.phase2_start" in line and not out.exists()


def test_unknown_arguments_exit_2_like_every_input_error(data, tmp_path, capsys):
    user_error(capsys, _train(data, tmp_path / "out", "--stop_at"), "--stop_at")


# ------------------------------------------------------------------------------ presets
def test_unknown_preset_name_lists_the_presets(tmp_path, capsys, monkeypatch):
    from ucseg_fast.config import preset_names
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--config", "acdc2d"], ["demo", "--config", "acdc2d"],
                 ["bench", "e2e", "--config", "acdc2d", "--out", str(tmp_path / "e2e")],
                 ["train", "--config", str(tmp_path / "missing.toml")]):
        line = user_error(capsys, argv, "config file not found", "a preset name: ")
        assert all(n in line for n in preset_names())
    assert list(tmp_path.iterdir()) == []


def test_train_without_config_says_it_uses_the_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ACDC here: the preflight stops it, nothing is written
    assert main(["train"]) == 2
    cap = capsys.readouterr()
    assert "built-in defaults (the acdc_2d recipe)" in cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "data.root = 'data/ACDC'" in lines[0], cap.err
    assert list(tmp_path.iterdir()) == []


def test_demo_of_a_preset_it_has_no_data_for(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_error(capsys, ["demo", "--config", "la_3d"], "la_3d", "--data.root=")
    user_error(capsys, ["demo", f"--data.root='{tmp_path / 'nowhere'}'"], "data.root",
               "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda: DataError("x.h5: not a readable HDF5 file"),
    lambda: ConfigError("demo.toml: unknown key 'train.foo'\n(known: a, b)"),
    lambda: CheckpointError("last.json: not found"),
    lambda: preflight.PreflightError("data.root = 'x' does not exist"),
    lambda: FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/no/such/file"),
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/disk/file"),
])
def test_user_errors_are_one_line(make):
    line = user_error_line(make())
    assert line and "\n" not in line


def test_bugs_are_not_user_errors():
    assert user_error_line(RuntimeError("a bug")) is None
    assert user_error_line(OSError(errno.EIO, "I/O error")) is None
    assert user_error_line(KeyError("k")) is None


# ------------------------------------------------------------------------------ preflight
def test_more_labeled_patients_than_the_list_has(data, tmp_path, capsys):
    out = tmp_path / "out"
    user_error(capsys, _train(data, out, "--data.labeled_patients=70"),
               "data.labeled_patients = 70", "train_slices.list", "14 patients")
    assert not out.exists()
    user_error(capsys, _train(data, out, "--data.labeled_patients=14"),
               "data.labeled_patients = 14", "no unlabeled data")
    assert not out.exists()


def test_cuda_device_without_cuda(data, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    user_error(capsys, _train(data, out, "--train.device=cuda"),
               "train.device = 'cuda'", "CUDA is not available")
    user_error(capsys, _train(data, out, "--train.device=gpu"), "train.device = 'gpu'")
    assert not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    user_error(capsys, _train(data, out, "--train.device=cuda:3"),
               "train.device = 'cuda:3'", "1 CUDA device")
    assert not out.exists()


def test_inference_device_is_checked(run, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    user_error(capsys, ["eval", "--checkpoint", str(run / "last.json"), "--device", "cuda",
                        "--out", str(tmp_path / "ev")], "--device = 'cuda'")
    assert not (tmp_path / "ev").exists()


def test_data_root_is_a_file_a_loop_or_missing(data, tmp_path, capsys):
    out = tmp_path / "out"
    f = tmp_path / "root.txt"
    f.write_text("not a folder")
    user_error(capsys, _train(f, out), "data.root", "root.txt", "is a file")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    user_error(capsys, _train(loop, out), "data.root", "symbolic-link loop")
    user_error(capsys, _train(tmp_path / "nowhere", out), "nowhere", "does not exist")
    assert not out.exists()


def test_missing_list_file(data, tmp_path, capsys):
    root = tmp_path / "ACDC"
    shutil.copytree(data, root)
    (root / "val.list").unlink()
    out = tmp_path / "out"
    user_error(capsys, _train(root, out), "val.list", "does not exist")
    (root / "train_slices.list").unlink()
    user_error(capsys, _train(root, out), "train_slices.list", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only file system"),
                                          (errno.ENOSPC, "the disk is full"),
                                          (errno.EACCES, "Permission denied")])
def test_unwritable_output_folder(data, tmp_path, capsys, monkeypatch, code, needle):
    def refuse(folder):
        raise OSError(code, os.strerror(code), str(folder))
    monkeypatch.setattr(preflight, "_write_probe", refuse)
    out = tmp_path / "a" / "out"
    user_error(capsys, _train(data, out), "train.out_dir", str(out), needle)
    assert not (tmp_path / "a").exists()  # the folders the check made are gone again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        user_error(capsys, _train(data, ro / "out"), "train.out_dir", str(ro / "out"))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_output_folder_is_a_file(data, tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    user_error(capsys, _train(data, f), "train.out_dir", "is a file")
    assert f.read_text() == "x"


def test_disk_full_during_training_is_a_user_error(data, tmp_path, capsys, monkeypatch):
    from ucseg_fast.train import Trainer
    victim = str(tmp_path / "out" / "last.json")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), victim)
    monkeypatch.setattr(Trainer, "train", full)
    user_error(capsys, _train(data, tmp_path / "out"), victim, os.strerror(errno.ENOSPC))


def test_a_bug_keeps_its_traceback(data, tmp_path, monkeypatch):
    from ucseg_fast.train import Trainer

    def bug(self, *a, **k):
        raise RuntimeError("an engine bug")
    monkeypatch.setattr(Trainer, "train", bug)
    with pytest.raises(RuntimeError, match="an engine bug"):
        main(_train(data, tmp_path / "out"))
    with pytest.raises(OSError):  # an OSError that is not the user's disk: a bug too
        def io_bug(self, *a, **k):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(Trainer, "train", io_bug)
        main(_train(data, tmp_path / "out2"))


def test_preflight_runs_before_any_data_is_loaded(data, tmp_path, capsys, monkeypatch):
    import ucseg_fast.train as train_pkg

    class NoTrainer:
        def __init__(self, *a, **k):
            raise AssertionError("the Trainer must not be built")
    monkeypatch.setattr(train_pkg, "Trainer", NoTrainer)
    user_error(capsys, _train(data, tmp_path / "out", "--data.labeled_patients=70"),
               "data.labeled_patients")


# ------------------------------------------------------------------------------ resume
def test_resume_checkpoint_missing(data, tmp_path, capsys):
    out = tmp_path / "out"
    user_error(capsys, _train(data, out, "--resume", str(tmp_path / "nope.json")),
               "nope.json", "not found")
    assert not out.exists()


def test_resume_sidecar_missing_a_key(run, data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    meta = json.loads((out / "last.json").read_text())
    del meta["optimizer"]
    (out / "last.json").write_text(json.dumps(meta))
    before = _snapshot(out)
    user_error(capsys, _train(data, out, "--resume", str(out / "last.json")),
               "last.json", "optimizer")
    assert _snapshot(out) == before


@pytest.mark.parametrize("key", ["config", "tensors_file"])
def test_inference_sidecar_missing_a_key(run, tmp_path, capsys, key):
    ck = tmp_path / "ck"
    shutil.copytree(run, ck)
    meta = json.loads((ck / "best.json").read_text())
    del meta[key]
    (ck / "best.json").write_text(json.dumps(meta))
    user_error(capsys, ["eval", "--checkpoint", str(ck / "best.json"), "--out",
                        str(tmp_path / "ev")], "best.json", key)
    np.save(tmp_path / "x.npy", np.zeros((2, 32, 32), np.float32))
    user_error(capsys, ["predict", "--checkpoint", str(ck / "best.json"), "--input",
                        str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.npy")],
               "best.json", key)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "p.npy").exists()


def test_resume_on_a_shortened_slice_list(tmp_path, capsys):
    root = _write_data(tmp_path / "ACDC")
    out = tmp_path / "run"
    assert main(_train(root, out, "--stop-at", "2")) == 0
    capsys.readouterr()
    lst = root / "train_slices.list"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:-4]) + "\n")  # the last patient's slices gone
    before = _snapshot(out)
    line = user_error(capsys, _train(root, out, "--resume", str(out / "last.json")))
    assert "last.json" in line or "train_slices.list" in line
    assert _snapshot(out) == before


def test_overwrite_starts_over(run, data, tmp_path, capsys):
    import inspect

    from ucseg_fast.train import Trainer
    if "overwrite" not in inspect.signature(Trainer).parameters:
        pytest.skip("Trainer(overwrite=...) not there yet")
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _snapshot(out)
    user_error(capsys, _train(data, out), str(out), "--overwrite")
    assert _snapshot(out) == before
    assert main(_train(data, out, "--overwrite", "--train.max_iterations=2")) == 0
    meta = json.loads((out / "last.json").read_text())
    assert meta["iteration"] == 2 and meta["config"]["train"]["max_iterations"] == 2


def test_demo_replaces_its_own_run(tmp_path, capsys, monkeypatch):
    """`demo` trains into its own runs/demo (under the current directory) with overwrite=True
    (a second `make demo` works) and says that it replaces the previous demo run."""
    import ucseg_fast.train as train_pkg
    _write_data(tmp_path / "runs" / "synthetic_acdc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    seen = {}

    class Stop(Exception):
        pass

    class FakeTrainer:
        def __init__(self, cfg, **kw):
            seen.update(kw, out_dir=cfg.train.out_dir)
            raise Stop
    monkeypatch.setattr(train_pkg, "Trainer", FakeTrainer)
    with pytest.raises(Stop):
        main(["demo"])
    assert seen == {"overwrite": True, "out_dir": "runs/demo"}
    assert "replaces the previous demo run" in capsys.readouterr().out
    seen.clear()
    with pytest.raises(Stop):  # another folder is only cleared when asked
        main(["demo", f"--train.out_dir='{tmp_path / 'mine'}'"])
    assert seen["overwrite"] is False


# ------------------------------------------------------------------------------ predict
def _predict(run: Path, src: Path, out: Path) -> list[str]:
    return ["predict", "--checkpoint", str(run / "last.json"), "--input", str(src),
            "--output", str(out)]


@pytest.fixture
def no_inference(monkeypatch):
    """predict's checks must all come before the model runs."""
    def ran(*a, **k):
        raise AssertionError("the model ran")
    monkeypatch.setattr(infer, "predict_array", ran)


@pytest.mark.parametrize("name, array, needles", [
    ("complex.npy", np.ones((2, 32, 32), np.complex64), ("complex64", "np.abs")),
    ("bool.npy", np.ones((2, 32, 32), bool), ("dtype bool",)),
    ("str.npy", np.array([["a", "b"], ["c", "d"]]), ("<U1",)),
    ("nan.npy", np.full((2, 32, 32), np.nan, np.float32), ("all 2048 values are NaN",)),
    ("inf.npy", np.where(np.eye(32)[None] > 0, np.inf, 1.0).repeat(2, 0), ("64 of 2048",)),
    ("four.npy", np.zeros((2, 2, 32, 32), np.float32), ("(2, 2, 32, 32)",)),
    ("empty.npy", np.zeros((0, 32, 32), np.float32), ("empty",)),
])
def test_predict_refuses_bad_arrays(run, tmp_path, capsys, no_inference, name, array, needles):
    src = tmp_path / name
    np.save(src, array)
    out = tmp_path / "pred" / "p.npy"
    user_error(capsys, _predict(run, src, out), name, *needles)
    assert not out.exists() and not out.parent.exists()


def test_predict_refuses_object_npy(run, tmp_path, capsys, no_inference):
    src = tmp_path / "obj.npy"
    np.save(src, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    user_error(capsys, _predict(run, src, tmp_path / "p.npy"), "obj.npy", "object")


def test_predict_casts_integer_images(run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 3, (2, 32, 32)).astype(np.int64)
    np.save(tmp_path / "int.npy", ints)
    np.save(tmp_path / "float.npy", ints.astype(np.float32))
    assert main(_predict(run, tmp_path / "int.npy", tmp_path / "a" / "b" / "pi.npy")) == 0
    assert main(_predict(run, tmp_path / "float.npy", tmp_path / "pf.npy")) == 0
    assert np.array_equal(np.load(tmp_path / "a" / "b" / "pi.npy"), np.load(tmp_path / "pf.npy"))


def test_predict_output_folder_checked_first(run, tmp_path, capsys, no_inference, monkeypatch):
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((2, 32, 32), np.float32))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    user_error(capsys, _predict(run, src, blocker / "sub" / "p.npy"), "--output", "file")
    assert blocker.read_text() == "x"
    user_error(capsys, _predict(run, src, tmp_path), "--output", "is a folder")

    def refuse(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    monkeypatch.setattr(preflight, "_write_probe", refuse)
    user_error(capsys, _predict(run, src, tmp_path / "new" / "p.npy"), "--output",
               "read-only file system")
    assert not (tmp_path / "new").exists()
    # checked before the input: a missing input is not what is reported
    user_error(capsys, _predict(run, tmp_path / "missing.npy", tmp_path / "new" / "p.npy"),
               "read-only")


def test_predict_output_suffix_and_missing_input(run, tmp_path, capsys, no_inference):
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((2, 32, 32), np.float32))
    user_error(capsys, _predict(run, src, tmp_path / "p.png"), "--output", "p.png")
    user_error(capsys, _predict(run, tmp_path / "missing.npy", tmp_path / "p.npy"),
               "--input", "missing.npy", "does not exist")


def test_predict_refuses_4d_nifti(run, tmp_path, capsys, no_inference):
    nib = pytest.importorskip("nibabel")
    src = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 2, 3), np.float32), np.eye(4)), str(src))
    user_error(capsys, _predict(run, src, tmp_path / "p.nii.gz"), "series.nii.gz",
               "(32, 32, 2, 3)", "extract one volume")
    one = tmp_path / "one.nii.gz"  # one frame is squeezed, not refused
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 2, 1), np.float32), np.eye(4)), str(one))
    with pytest.raises(AssertionError, match="the model ran"):
        main(_predict(run, one, tmp_path / "p.nii.gz"))


def test_predict_refuses_nifti_that_is_not_gzip(run, tmp_path, capsys, no_inference):
    nib = pytest.importorskip("nibabel")
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 2), np.float32), np.eye(4)), str(plain))
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(plain.read_bytes())
    user_error(capsys, _predict(run, fake, tmp_path / "p.nii.gz"), "fake.nii.gz", "gzip")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header"))
    user_error(capsys, _predict(run, bad, tmp_path / "p.nii.gz"), "broken.nii.gz")
    assert not (tmp_path / "p.nii.gz").exists()


def test_predict_refuses_complex_and_nan_nifti(run, tmp_path, capsys, no_inference):
    nib = pytest.importorskip("nibabel")
    c = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 2), np.complex64), np.eye(4)), str(c))
    user_error(capsys, _predict(run, c, tmp_path / "p.nii.gz"), "c.nii.gz", "complex64")
    n = tmp_path / "n.nii.gz"
    arr = np.ones((32, 32, 2), np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(n))
    user_error(capsys, _predict(run, n, tmp_path / "p.nii.gz"), "n.nii.gz", "1 of 2048")


def test_predict_h5_without_image(run, tmp_path, capsys, no_inference):
    import h5py
    src = tmp_path / "x.h5"
    with h5py.File(src, "w") as f:
        f["label"] = np.zeros((2, 32, 32), np.uint8)
    user_error(capsys, _predict(run, src, tmp_path / "p.npy"), "x.h5", "'image'")
    src.write_bytes(b"not hdf5")
    user_error(capsys, _predict(run, src, tmp_path / "p.npy"), "x.h5", "HDF5")


# ------------------------------------------------------------------------------ eval
def test_eval_outputs_and_options_checked_first(run, tmp_path, capsys, monkeypatch):
    import ucseg_fast.eval.protocol as protocol

    def ran(*a, **k):
        raise AssertionError("the evaluation ran")
    monkeypatch.setattr(protocol, "evaluate", ran)
    ck = ["eval", "--checkpoint", str(run / "last.json")]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    user_error(capsys, [*ck, "--out", str(blocker)], "--out", "is a file")
    user_error(capsys, [*ck, "--out", str(tmp_path / "ev"), "--figure", str(blocker / "f.png")],
               "--figure", "file")
    user_error(capsys, [*ck, "--out", str(tmp_path / "ev"), "--max-volumes", "-1"],
               "--max-volumes = -1")
    user_error(capsys, [*ck, "--out", str(tmp_path / "ev"), "--batch-size", "0"],
               "--batch-size = 0")
    assert not (tmp_path / "ev").exists()
