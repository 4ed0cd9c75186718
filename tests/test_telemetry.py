"""Telemetry: the no-GPU no-op path, window averaging (with a fake NVML), log-field arithmetic."""
from __future__ import annotations

import sys
import types

import pytest

from ucseg_fast.telemetry import GpuSampler, throughput_fields


def test_no_device_is_a_noop():
    s = GpuSampler(None).start()
    assert not s.active and s.sample() is None and s.window() == {}
    s.stop()


def test_missing_driver_is_a_noop(monkeypatch):
    fake = types.ModuleType("pynvml")

    def init():
        raise RuntimeError("NVML Shared Library Not Found")
    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = GpuSampler(0).start()
    assert not s.active and s.window() == {}
    s.stop()


def test_window_averages_samples(monkeypatch):
    readings = iter([(50, 2e9, 200_000), (100, 4e9, 300_000)] + [(0, 0, 0)] * 100)
    cur = {}
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: "h"

    def util(h):
        cur["r"] = next(readings)
        return types.SimpleNamespace(gpu=cur["r"][0])
    fake.nvmlDeviceGetUtilizationRates = util
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=cur["r"][1])
    fake.nvmlDeviceGetPowerUsage = lambda h: cur["r"][2]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = GpuSampler(0)  # not started: drive the sampler by hand
    assert s.active
    for _ in range(2):
        s._sums = [a + b for a, b in zip(s._sums, s.sample())]
        s._n += 1
    w = s.window()
    assert w == pytest.approx({"gpu_util": 75.0, "gpu_mem_gb": 3.0, "power_w": 250.0})
    assert s._n == 0  # the next window starts empty


def test_throughput_fields():
    f = throughput_fields(10, 24, 2.0, 0.5, {"gpu_util": 90.0, "power_w": 400.0})
    assert f["it_per_s"] == pytest.approx(5.0) and f["img_per_s"] == pytest.approx(120.0)
    assert f["step_ms"] == pytest.approx(200.0) and f["data_wait_ms"] == pytest.approx(50.0)
    assert f["img_per_s_per_w"] == pytest.approx(0.3) and f["gpu_util"] == 90.0
    assert "img_per_s_per_w" not in throughput_fields(1, 2, 1.0, 0.0, {})


def test_cuda_index_maps_to_the_nvml_device_of_cuda_visible_devices():
    from ucseg_fast.telemetry import physical_index
    assert physical_index(0, "") == 0 and physical_index(1, "") == 1
    assert physical_index(0, "2,3") == 2 and physical_index(1, "2,3") == 3
    assert physical_index(0, "GPU-abc,GPU-def") == "GPU-abc"
