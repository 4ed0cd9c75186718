"""GPU telemetry off the hot path: a pynvml (nvidia-ml-py) sampler thread.

Every `interval_s` (0.5 s) a daemon thread reads GPU utilisation %, used memory and power of one
device through NVML and adds them to running sums; the Trainer calls `window()` at log time to
get the means since the last call. NVML queries the driver, not the CUDA stream, so sampling
never synchronises or slows the training step. Without nvidia-ml-py, a driver or a GPU,
`GpuSampler` is a no-op and `window()` returns {} (the log then has no GPU fields).
"""
from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["GpuSampler", "throughput_fields"]


def physical_index(cuda_index: int, visible: str | None = None) -> int | str:
    """NVML numbers GPUs in physical order, CUDA after CUDA_VISIBLE_DEVICES: map the CUDA
    index to the NVML one (an int), or to the UUID / PCI id string the variable names."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return cuda_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        return cuda_index
    e = entries[cuda_index]
    return int(e) if e.isdigit() else e


def _nvml_handle(pynvml: Any, cuda_index: int) -> Any:
    ident = physical_index(cuda_index)
    if isinstance(ident, int):
        return pynvml.nvmlDeviceGetHandleByIndex(ident)
    if ident.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(ident)
    return pynvml.nvmlDeviceGetHandleByPciBusId(ident)


class GpuSampler:
    def __init__(self, device_index: int | None = 0, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._nvml: Any = None
        self._handle: Any = None
        self._lock = threading.Lock()
        self._sums = [0.0, 0.0, 0.0]
        self._n = 0
        self._power_ok = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device_index is None:
            return
        try:
            import pynvml  # nvidia-ml-py
            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, int(device_index))
            self._nvml = pynvml
        except Exception:  # no package, no driver, no such device: telemetry is optional
            self._nvml = self._handle = None

    @property
    def active(self) -> bool:
        return self._handle is not None

    def start(self) -> GpuSampler:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ucseg-gpu-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
            self._thread = None

    def sample(self) -> tuple[float, float, float] | None:
        """(util %, memory GB, power W) now, or None when inactive / the query fails."""
        if not self.active:
            return None
        nv, h = self._nvml, self._handle
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = nv.nvmlDeviceGetMemoryInfo(h).used / 1e9
        except Exception:
            return None
        power = float("nan")
        if self._power_ok:
            try:
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0  # mW -> W
            except Exception:  # some boards / MIG slices do not report power
                self._power_ok = False
        return util, mem, power

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            s = self.sample()
            if s is None:
                continue
            with self._lock:
                for i, v in enumerate(s):
                    self._sums[i] += v
                self._n += 1

    def window(self) -> dict[str, float]:
        """Means since the previous call: gpu_util, gpu_mem_gb, power_w ({} when inactive or
        no sample landed in the window, e.g. a window shorter than the interval)."""
        with self._lock:
            n, sums = self._n, self._sums
            self._sums, self._n = [0.0, 0.0, 0.0], 0
        if n == 0:
            s = self.sample()
            if s is None:
                return {}
            n, sums = 1, list(s)
        out = {"gpu_util": sums[0] / n, "gpu_mem_gb": sums[1] / n}
        if sums[2] == sums[2]:  # not NaN
            out["power_w"] = sums[2] / n
        return out

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def throughput_fields(iterations: int, images_per_iteration: int, seconds: float,
                      data_wait_s: float, gpu: dict[str, float]) -> dict[str, float]:
    """The JSONL speed fields of one log window: it_per_s, img_per_s, step_ms (wall time per
    iteration, data wait included), data_wait_ms (per iteration, time spent getting the next
    batch), and img_per_s_per_w when the window has a power reading."""
    seconds = max(seconds, 1e-9)
    ips = iterations / seconds
    out = {"it_per_s": ips, "img_per_s": ips * images_per_iteration,
           "step_ms": 1000.0 * seconds / max(iterations, 1),
           "data_wait_ms": 1000.0 * data_wait_s / max(iterations, 1)}
    out.update(gpu)
    if gpu.get("power_w", 0.0) > 0:
        out["img_per_s_per_w"] = out["img_per_s"] / gpu["power_w"]
    return out
