"""One whole UC-Seg training step (both subnets, UPG, all losses, backward, SGD) at the
ACDC shape (batch 12 labeled + 12 unlabeled, 256x256, 4 classes) on synthetic device data,
in eager, compile and graph modes, and the LA recipe's 3D step (batch 2 + 2, 96³, 2 classes).
On CPU it runs as a smoke test at a tiny shape (compile with the aot_eager backend; graph falls
back to eager with a warning; 3D eager only)."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast.train.bench import build_step

from bench_utils import sync


def _bench_step(benchmark, provenance, on_gpu: bool, *, phase2: bool, mode: str, dims: int,
                bs: int, img: int) -> None:
    nms = True
    if mode == "graph" and on_gpu:
        from ucseg_fast.ops.components import _native_cuda
        nms = _native_cuda() is not None  # graph capture needs the native CC library
    step, batch, dev = build_step(labeled_bs=bs, img=img, phase2=phase2, mode=mode, nms=nms,
                                  compile_backend="inductor" if on_gpu else "aot_eager", dims=dims)
    for _ in range(5 if on_gpu else 1):
        step(batch)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def target():
        loss = step(batch)
        sync()
        return loss

    loss = benchmark(target)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(provenance)
    benchmark.extra_info.update({"batch": f"{bs}+{bs}", "img": img if dims == 2 else f"{img}^3",
                                 "mode": mode, "nms": nms, "phase": 2 if phase2 else 1,
                                 "dims": dims})
    if on_gpu:
        benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if benchmark.stats is not None:
            benchmark.extra_info["img_per_s"] = 2 * bs / benchmark.stats.stats.median


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
