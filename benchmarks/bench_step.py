"""One whole UC-Seg training step (both subnets, UPG, all losses, backward, SGD) at the
ACDC shape (batch 12 labeled + 12 unlabeled, 256x256, 4 classes) on synthetic device data,
in eager, compile and graph modes, and the LA recipe's 3D step (batch 2 + 2, 96³, 2 classes).
Timed as rounds of back-to-back steps with one sync per round (bench_utils.measure, CUDA
events); extra_info: µs per step, img/s, peak memory, card and versions.
On CPU it runs as a smoke test at a tiny shape (compile with the aot_eager backend; graph falls
back to eager with a warning; 3D eager only)."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast.train.bench import build_step

from bench_utils import measure


def _bench_step(benchmark, provenance, on_gpu: bool, *, phase2: bool, mode: str, dims: int,
                bs: int, img: int) -> None:
    nms = True
    if mode == "graph" and on_gpu:
        from ucseg_fast.bench.report import graph_nms
        nms = graph_nms(True)[0]  # graph capture needs sync-free connected components
    step, batch, dev = build_step(labeled_bs=bs, img=img, phase2=phase2, mode=mode, nms=nms,
                                  compile_backend="inductor" if on_gpu else "aot_eager", dims=dims)
    info = dict(provenance, batch=f"{bs}+{bs}", img=img if dims == 2 else f"{img}^3", mode=mode,
                nms=nms, phase=2 if phase2 else 1, dims=dims)
    # back-to-back steps, one sync per round; never captured again (graph mode replays its own)
    last = {}

    def target():
        last["loss"] = step(batch)
        return last["loss"]
    sec = measure(benchmark, target, info, rounds=5, graph=False, warmup=5 if on_gpu else 1)
    assert torch.isfinite(last["loss"])
    benchmark.extra_info["img_per_s"] = 2 * bs / sec
    if on_gpu:
        benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9


@pytest.mark.filterwarnings("ignore:train.step_mode = 'graph' needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "compile", "graph"])
@pytest.mark.parametrize("phase2", [False, True], ids=["phase1", "phase2"])
def test_step(benchmark, provenance, on_gpu, phase2, mode):
    bs, img = (12, 256) if on_gpu else (1, 64)
    _bench_step(benchmark, provenance, on_gpu, phase2=phase2, mode=mode, dims=2, bs=bs, img=img)


@pytest.mark.filterwarnings("ignore:train.step_mode = 'graph' needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "compile", "graph"])
@pytest.mark.parametrize("phase2", [False, True], ids=["phase1", "phase2"])
def test_step_3d(benchmark, provenance, on_gpu, phase2, mode):
    if not on_gpu and mode != "eager":
        pytest.skip("CPU smoke run: the 3D step in eager mode only")
    bs, img = (2, 96) if on_gpu else (1, 32)
    _bench_step(benchmark, provenance, on_gpu, phase2=phase2, mode=mode, dims=3, bs=bs, img=img)
