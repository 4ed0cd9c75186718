"""Shared helpers of the benchmark suites: device sync and the shape registry."""
from __future__ import annotations

import torch

# One registry of benchmark shapes: (B, C, *spatial)
SHAPES = {
    "acdc_unlabeled_half": (12, 4, 256, 256),   # ACDC recipe, one half-batch of logits
    "acdc_batch": (24, 4, 256, 256),            # ACDC recipe, the whole batch
    "la_3d": (4, 2, 96, 96, 96),                # 3D recipe (LA), whole batch
    "cpu_smoke": (2, 4, 16, 16),                # tiny shape for CPU smoke runs
}


def sync() -> None:
    """Wait for the device so the timed target measures the work, not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(benchmark, target, info: dict, *, rounds: int = 10, iterations: int = 10,
            warmup: int = 3) -> float | None:
    """The suites' timing protocol: `warmup` untimed calls (Triton JIT / Inductor compile
    stay outside the timing), one call measuring peak memory above the inputs (CUDA), then
    `rounds` x `iterations` timed calls with a device sync inside each. On CPU (smoke runs)
    one round of one call. Writes peak_mem_mb / median_ms into `info`, which it attaches to
    the benchmark's extra_info; returns the median seconds (None with --benchmark-disable)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        target()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        target()
        sync()
        info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    def timed():
        out = target()
        sync()
        return out

    r, i = (rounds, iterations) if cuda else (1, 1)
    benchmark.pedantic(timed, rounds=r, iterations=i, warmup_rounds=1)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    if median is not None:
        info["median_ms"] = median * 1e3
    benchmark.extra_info.update(info)
    return median
