"""ucseg_fast.bench.timing on CPU: the host-clock path gives sane numbers, the helpers count
bytes right, and the CUDA control flow (side-stream warm-up, one capture of N calls, one replay
and one sync per round, eager-events fallback when capture fails) runs against a fake
`torch.cuda` so it is checked without a GPU."""
from __future__ import annotations

import sys
import time
import types
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from ucseg_fast.bench import timing


def test_time_kernel_cpu_is_sane():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    r = timing.time_kernel(fn, iters=3, warmup=2, rounds=4)
    assert r["mode"] == "cpu" and r["fallback"] is None
    assert r["iters"] == 3 and r["rounds"] == 4 and len(r["us_rounds"]) == 4
    assert len(calls) == 2 + 3 * 4  # warm-up + rounds x iters, nothing else
    assert 1900 <= r["us_min"] <= r["us"] < 50_000  # sleep(2 ms) per call
    assert r["mode_text"] == timing.MODE_TEXT["cpu"]


def test_time_kernel_auto_iters_sizes_rounds():
    x = torch.randn(64, 64)
    r = timing.time_kernel(lambda: x @ x, warmup=1, rounds=3)
    assert 1 <= r["iters"] <= 100 and r["us"] > 0
    slow = timing.time_kernel(lambda: time.sleep(0.01), warmup=0, rounds=1)
    assert slow["iters"] == 1  # one 10 ms call already exceeds the ~5 ms CPU round


def test_kernel_timer_rounds_feed_result():
    t = timing.KernelTimer(lambda: None, iters=5, warmup=0)
    assert t.mode == "cpu"
    us = [t.round() for _ in range(3)]
    res = t.result()
    assert res["us_rounds"] == us and res["rounds"] == 3 and res["us"] >= 0


def test_bytes_moved_and_gbps():
    a = torch.zeros(10, dtype=torch.float32)
    b = torch.zeros(4, 4, dtype=torch.bfloat16)
    PL = namedtuple("PL", "labels mask")
    pl = PL(torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.bool))
    assert timing.bytes_moved(a) == 40
    assert timing.bytes_moved([a, b], {"x": a}) == 40 + 32  # the same tensor counts once
    assert timing.bytes_moved(pl, None, 3, "s") == 64 + 8
    assert timing.gbps(2e9, 1e6) == pytest.approx(2.0)
    assert timing.gbps(None, 5.0) is None and timing.gbps(10, float("nan")) is None


def test_copy_bandwidth_cpu():
    r = timing.copy_bandwidth(2**20, "cpu", rounds=2)
    assert r["mode"] == "cpu" and r["device"] == "cpu"
    assert r["nbytes"] == 2**20 and r["bytes_moved"] == 2 * 2**20
    assert r["gbps"] > 0 and r["us"] > 0


def test_peak_memory_without_cuda_is_none():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert timing.peak_memory(lambda: torch.zeros(3)) is None


def test_card_class_and_environment():
    assert timing.card_class("NVIDIA H100 80GB HBM3") == "H100"
    assert timing.card_class("NVIDIA H200") == "H200"
    assert timing.card_class("NVIDIA A100-SXM4-40GB") == "NVIDIA A100-SXM4-40GB"
    assert timing.card_class(None) == "cpu"
    env = timing.environment(git=False)
    for k in ("package", "torch", "triton", "dali", "cuda", "cudnn", "gpu", "card", "native"):
        assert k in env
    assert set(env["native"]) == {"loaded", "cuda_kernels", "reason"}
    if not torch.cuda.is_available():
        assert env["gpu"] is None and env["card"] == "cpu"


# ------------------------------------------------------------------------------ fake CUDA
class _FakeCuda:
    """Just enough of torch.cuda to drive timing's CUDA branches: events read the host clock,
    a graph records how often it was replayed, syncs are counted."""

    def __init__(self):
        self.syncs = 0
        self.capturing = False
        self.replays = 0
        self.side_stream_calls = 0
        self.in_side_stream = False
        self.elapsed_ms = None  # a fixed event time (ms) instead of the host clock

    def install(self, mp):
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = time.perf_counter()

            def elapsed_time(self, other):
                if fake.elapsed_ms is not None:
                    return fake.elapsed_ms
                return (other.t - self.t) * 1e3

            def synchronize(self):
                fake.syncs += 1

        class Stream:
            def wait_stream(self, other):
                pass

        class _StreamCtx:
            def __init__(self, s):
                pass

            def __enter__(self):
                fake.in_side_stream = True

            def __exit__(self, *a):
                fake.in_side_stream = False

        class CUDAGraph:
            def replay(self):
                fake.replays += 1

        class _GraphCtx:
            def __init__(self, g):
                pass

            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *a):
                fake.capturing = False

        def synchronize(device=None):
            fake.syncs += 1

        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "Event", Event)
        mp.setattr(torch.cuda, "Stream", Stream)
        mp.setattr(torch.cuda, "stream", _StreamCtx)
        mp.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        mp.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        mp.setattr(torch.cuda, "graph", _GraphCtx)
        mp.setattr(torch.cuda, "synchronize", synchronize)
        mp.setattr(torch.cuda, "set_stream", lambda s: None)
        return self


def test_graph_branch_captures_once_and_replays_per_round(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    log = []

    def fn():
        log.append("capture" if fake.capturing else "side" if fake.in_side_stream else "eager")

    t = timing.KernelTimer(fn, iters=7, warmup=2, graph=True)
    assert t.mode == "graph" and t.fallback is None
    assert log == ["side", "side"] + ["capture"] * 7  # warm-up on a side stream, N captured
    syncs0, replays0 = fake.syncs, fake.replays
    assert replays0 == 1  # the upload replay, outside the timing
    for _ in range(4):
        t.round()
    assert fake.replays - replays0 == 4 and fake.syncs - syncs0 == 4  # one replay + one sync
    assert len(log) == 9  # replays run no Python
    r = t.result()
    assert r["mode"] == "graph" and r["rounds"] == 4 and r["iters"] == 7


def test_graph_capture_failure_falls_back_to_events(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    calls = []

    def fn():
        if fake.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        calls.append(1)

    r = timing.time_kernel(fn, iters=5, warmup=1, rounds=3, graph=True)
    assert r["mode"] == "events"
    assert "graph capture failed" in r["fallback"] and "RuntimeError" in r["fallback"]
    assert len(calls) == 1 + 5 * 3  # warm-up, then eager launches in every round


def test_events_branch_has_one_sync_per_round(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    n = []
    t = timing.KernelTimer(lambda: n.append(1), iters=10, warmup=3, graph=False)
    assert t.mode == "events"
    s0 = fake.syncs
    for _ in range(5):
        t.round()
    assert fake.syncs - s0 == 5 and len(n) == 3 + 50


def test_host_clock_branch(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    t = timing.KernelTimer(lambda: None, iters=4, warmup=0, host_clock=True)
    assert t.mode == "host"
    s0 = fake.syncs
    t.round()
    assert fake.syncs - s0 == 1


def test_auto_iters_on_cuda_branch(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    fake.elapsed_ms = 0.5
    t = timing.KernelTimer(lambda: None, warmup=0, graph=False)
    assert t.iters == 4  # 0.5 ms per call: rounds of ~2 ms
    fake.elapsed_ms = 1e-4
    assert timing.KernelTimer(lambda: None, warmup=0, graph=False).iters == 100  # capped


# ------------------------------------------------------------------------------ the suites' measure
class _FakeBenchmark:
    """pytest-benchmark's pedantic protocol: per-round durations land in stats.stats.data."""

    def __init__(self):
        self.extra_info: dict = {}
        self.stats = types.SimpleNamespace(iterations=1, stats=types.SimpleNamespace(data=[]))

    def pedantic(self, target, rounds=1, iterations=1, warmup_rounds=0):
        for _ in range(warmup_rounds):
            target()
        for _ in range(rounds):
            t0 = time.perf_counter()
            target()
            self.stats.stats.data.append(time.perf_counter() - t0)


def test_benchmark_measure_times_rounds_and_records_per_call(monkeypatch):
    """benchmarks/bench_utils.measure on the (faked) CUDA path: graph timing, one replay and one
    sync per round, pytest-benchmark stats per call, GB/s and % of the session's copy."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_utils
    finally:
        sys.path.pop(0)
    fake = _FakeCuda().install(monkeypatch)
    fake.elapsed_ms = 1.0  # every round: 1 ms of "GPU" time
    for name, value in (("reset_peak_memory_stats", lambda: None),
                        ("memory_allocated", lambda: 0),
                        ("max_memory_allocated", lambda: 3 * 2**20)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setitem(bench_utils._SESSION, "env", {"gpu": "Fake H100", "card": "H100",
                                                      "torch": torch.__version__})
    monkeypatch.setitem(bench_utils._SESSION, "copy", {"gbps": 1000.0, "nbytes": 2**28,
                                                       "bytes_moved": 2**29})
    calls = []
    bench = _FakeBenchmark()
    info = {"op": "x"}
    sec = bench_utils.measure(bench, lambda: calls.append(fake.capturing), info, rounds=6,
                              iterations=10, warmup=2, nbytes=10**6)
    assert calls.count(True) == 10  # captured once: 10 calls in one graph
    assert fake.replays == 1 + 6  # the upload replay, then one per round
    assert sec == pytest.approx(1e-4)  # 1 ms per round of 10 calls
    ei = bench.extra_info
    assert ei["timing"] == "graph" and ei["us_per_call"] == pytest.approx(100.0)
    assert ei["calls_per_round"] == 10 and ei["rounds_timed"] == 6
    assert ei["gbps"] == pytest.approx(10.0) and ei["pct_of_copy"] == pytest.approx(1.0)
    assert ei["copy_gbps"] == 1000.0 and ei["gpu"] == "Fake H100" and ei["peak_mem_mb"] == 3.0
    assert bench.stats.iterations == 10 and len(bench.stats.stats.data) == 6
