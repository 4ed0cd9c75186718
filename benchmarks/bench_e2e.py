"""Time to accuracy: `bench_e2e` trains the ACDC recipe within a wall-clock budget (validation
included) and records validation Dice against time (JSON + PNG). On a GPU: the full recipe for
UCSEG_E2E_MINUTES (default 10) minutes; on CPU a smoke run at a tiny size (img 32, batch 1+1)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ucseg_fast.config import load_config
from ucseg_fast.train.bench import bench_e2e

REPO = Path(__file__).resolve().parents[1]
ACDC = Path(os.environ.get("UCSEG_DATA", REPO.parent / "shared" / "data")) / "ACDC"


def test_e2e(benchmark, provenance, on_gpu, tmp_path):
    if not (ACDC / "train_slices.list").exists():
        pytest.skip(f"ACDC subset not found at {ACDC}")
    if on_gpu:
        minutes = float(os.environ.get("UCSEG_E2E_MINUTES", "10"))
        over, val_every = [f"--data.root='{ACDC}'", "--train.progress=false"], 200
    else:
        minutes, val_every = 0.05, 2
        over = [f"--data.root='{ACDC}'", "--data.img_size=[32,32]", "--data.labeled_bs=1",
                "--data.unlabeled_bs=1", "--train.max_iterations=4", "--train.amp='none'",
                "--train.channels_last=false", "--train.max_val_volumes=1",
                "--loss.queue_size=16", "--train.progress=false", "--loss.phase2_start=2"]
    cfg = load_config("acdc_2d", over)
    res = benchmark.pedantic(bench_e2e, args=(cfg,), kwargs=dict(
        minutes=minutes, out_dir=tmp_path, val_every=val_every, log=lambda s: None),
        rounds=1, iterations=1)
    saved = json.loads((tmp_path / "dice_vs_time.json").read_text())
    first = saved["curve"][0]
    assert first["iteration"] == 0 and first["train_s"] == 0.0 and first["wall_s"] >= first["val_s"] > 0
    for clock in ("train_s", "wall_s"):
        times = [c[clock] for c in saved["curve"]]
        assert times == sorted(times)
    assert saved["iterations"] >= 1 and 0.0 < saved["val_share"] < 1.0
    assert all(0.0 <= c["val_dice"] <= 1.0 for c in saved["curve"])
    assert (tmp_path / "dice_vs_time.png").stat().st_size > 1000
    benchmark.extra_info.update(provenance)
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "curve"})
    benchmark.extra_info["curve"] = res["curve"]
    if on_gpu:
        torch.cuda.synchronize()
