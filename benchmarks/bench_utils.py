"""Shared helpers of the benchmark suites: the timing protocol, the session's copy bandwidth,
device sync and the shape registry.

Timing (`measure`): rounds of N back-to-back calls with no sync between them and one sync per
round (`ucseg_fast.bench.timing`): CUDA-graph replay timed with CUDA events by default, eager
launches between events with ``graph=False``, the host clock for data pipelines
(``host_clock=True``), the host clock on CPU. pytest-benchmark's statistics are per call (a
round of N calls counts as N iterations); `extra_info` records µs per call, the timing mode, GB/s
over the op's minimal bytes and its share of the device copy bandwidth measured once in the same
session, the card and versions.
"""
from __future__ import annotations

import torch

from ucseg_fast.bench.timing import KernelTimer, copy_bandwidth, environment, gbps, peak_memory

# One registry of benchmark shapes: (B, C, *spatial)
SHAPES = {
    "acdc_unlabeled_half": (12, 4, 256, 256),   # ACDC recipe, one half-batch of logits
    "acdc_batch": (24, 4, 256, 256),            # ACDC recipe, the whole batch
    "la_3d": (4, 2, 96, 96, 96),                # 3D recipe (LA), whole batch
    "cpu_smoke": (2, 4, 16, 16),                # tiny shape for CPU smoke runs
}

_SESSION: dict = {}


def sync() -> None:
    """Wait for the device (once per round, never inside a timed call)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def session_environment() -> dict:
    """Card, driver and versions, read once per session (a copy: callers may add keys)."""
    if "env" not in _SESSION:
        _SESSION["env"] = environment()
    return dict(_SESSION["env"])


def session_copy_bandwidth() -> dict:
    """The device-to-device copy bandwidth (256 MiB buffer on CUDA, 16 MiB on CPU), measured on
    the first call of the session and reused: every op's "% of copy" compares against it."""
    if "copy" not in _SESSION:
        _SESSION["copy"] = copy_bandwidth()
    return _SESSION["copy"]


def provenance_info() -> dict:
    """The extra_info fields every benchmark records."""
    e = session_environment()
    return {"gpu": e.get("gpu"), "card": e.get("card"), "driver": e.get("driver"),
            "torch": e.get("torch"), "triton": e.get("triton"), "cuda": e.get("cuda"),
            "cudnn": e.get("cudnn"), "dali": e.get("dali"), "package": e.get("package"),
            "git": e.get("git"), "python": e.get("python"), "host": e.get("host")}


def measure(benchmark, target, info: dict, *, rounds: int = 10, iterations: int | None = None,
            warmup: int = 3, graph: bool = True, host_clock: bool = False,
            nbytes: int | None = None) -> float:
    """Time `target` (no arguments) and record the result in `benchmark.extra_info`.

    CUDA: `warmup` untimed calls (JIT / autotuning / compilation stay outside), one eager call
    measuring the peak memory above the inputs, then `rounds` rounds of `iterations` calls (None:
    sized to ~2 ms per round) with one sync per round. CPU (smoke runs): one warm-up call and one
    round of one call. With --benchmark-disable pytest-benchmark runs one round, which is still
    timed. `nbytes` (the op's minimal traffic) adds GB/s and % of the session's copy bandwidth.
    Returns the median seconds per call."""
    cuda = torch.cuda.is_available()
    timer = KernelTimer(target, iters=iterations if cuda else 1, warmup=warmup if cuda else 1,
                        graph=graph and not host_clock, host_clock=host_clock)
    if cuda:
        info["peak_mem_mb"] = peak_memory(target)
    try:
        # no warm-up rounds here: the timer warmed up (and captured) already
        benchmark.pedantic(timer.round, rounds=rounds if cuda else 1, iterations=1)
    finally:
        timer.close()
    res = timer.result()
    stats = getattr(benchmark, "stats", None)
    if stats is not None and timer.iters > 1:  # per call, like pytest-benchmark's iterations
        stats.iterations = timer.iters
        stats.stats.data[:] = [d / timer.iters for d in stats.stats.data]
    info.update(us_per_call=res["us"], median_ms=res["us"] / 1e3, timing=res["mode"],
                timing_text=res["mode_text"], calls_per_round=res["iters"],
                rounds_timed=res["rounds"])
    if res["fallback"]:
        info["timing_fallback"] = res["fallback"]
    if nbytes:
        info["bytes_min"] = int(nbytes)
        info["gbps"] = gbps(nbytes, res["us"])
        copy = session_copy_bandwidth()
        info["copy_gbps"] = copy["gbps"]
        if info["gbps"] and copy["gbps"]:
            info["pct_of_copy"] = 100.0 * info["gbps"] / copy["gbps"]
    for k, v in provenance_info().items():
        info.setdefault(k, v)
    benchmark.extra_info.update(info)
    return res["us"] / 1e6
