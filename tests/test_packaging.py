"""The installed layout: the wheel carries the presets and `py.typed`, every preset loads by
name, and the command line works from the wheel's files alone in an empty directory (the demo
reads and writes under the current directory only, nothing relative to the source tree)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ucseg_fast.config import load_config, preset_names, preset_path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ucseg_fast"
PRESETS = sorted(p.name for p in (PKG / "presets").glob("*.toml"))
#: a demo small enough for a CPU test: 2 iterations of 32x32, one validation volume
TINY_DEMO = ["--train.max_iterations=2", "--train.val_every=2", "--train.log_every=1",
             "--train.checkpoint_every=2", "--train.progress=false",
             "--data.img_size=[32,32]", "--data.labeled_bs=2", "--data.unlabeled_bs=2",
             "--data.augment=false", "--loss.queue_size=16", "--train.max_val_volumes=1"]


def _copy_source(dst: Path) -> Path:
    """The files a wheel is built from, without build outputs (a shared tree may hold some)."""
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    shutil.copytree(PKG, dst / "ucseg_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_source(base / "src")
    out = base / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("ucseg_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_presets_types_and_the_cli(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert PRESETS, "no presets in the source tree"
    for p in PRESETS:
        assert f"ucseg_fast/presets/{p}" in names, p
    assert "ucseg_fast/py.typed" in names
    for mod in ("__init__", "__main__", "common", "train", "infer", "bench", "demo", "prepare"):
        assert f"ucseg_fast/cli/{mod}.py" in names, mod
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/")) for n in names)
    assert re.search(r"^ucseg-fast\s*=\s*ucseg_fast\.cli:main$", entry, re.M), entry
    requires = [ln.split(":", 1)[1].strip().lower() for ln in meta.splitlines()
                if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    for dep in ("torch", "numpy", "scipy", "h5py", "safetensors", "pillow"):
        assert any(r.startswith(dep) for r in requires), (dep, requires)


def test_every_preset_loads_by_name():
    assert preset_names() == [p[:-5] for p in PRESETS]
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.name == name and cfg.recipe in ("multiclass_2d", "binary_2d", "binary_3d")
        assert load_config(f"{name}.toml") == cfg  # with its suffix too
        assert load_config(preset_path(name)) == cfg  # and by its path


def test_cli_sources_name_no_path_of_the_source_tree():
    for f in sorted((PKG / "cli").glob("*.py")):
        text = f.read_text()
        for needle in ("__file__", "parents[", "configs/", "REPO", "shared/"):
            assert needle not in text, (f.name, needle)


def test_demo_from_the_wheel_in_an_empty_directory(wheel, tmp_path):
    """The wheel's files alone (installed into a folder first on the path), run from an empty
    directory: the demo writes its synthetic set and its run under that directory only."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--no-compile", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = sorted(str(p.relative_to(site)) for p in site.rglob("*"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1",
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    where = subprocess.run([sys.executable, "-c", "import ucseg_fast; print(ucseg_fast.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    run = subprocess.run([sys.executable, "-m", "ucseg_fast.cli", "demo", *TINY_DEMO],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "synthetic cardiac-like data at" in run.stdout
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["demo", "synthetic_acdc"]
    assert (work / "runs" / "synthetic_acdc" / "train_slices.list").is_file()
    best = json.loads((work / "runs" / "demo" / "best.json").read_text())
    assert best["config"]["data"]["root"] == "runs/synthetic_acdc"
    assert best["iteration"] == 2
    # nothing written into the installed package
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*")) == before
    # presets by name and the help from the installed package, any directory
    helped = subprocess.run([sys.executable, "-m", "ucseg_fast.cli", "train", "--config",
                             "acdc_2d", "--help"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and all(n in helped.stdout for n in preset_names())
