"""Device timing that measures kernels, not the host.

A device sync after every call times the launch latency and the sync itself: for kernels of a
few microseconds that is most of the number. Here a timed *round* is N back-to-back calls with
no sync between them, bracketed by two CUDA events, and one sync at its end:

* ``graph``  — the N calls captured once in a CUDA graph, a round is one ``replay()``: the GPU
  time of the kernels without any launch overhead (what the trainer's graph mode runs);
* ``events`` — N eager launches between two events: what eager mode achieves, host launch
  overhead included where it exceeds the kernels (also the fallback when capture fails);
* ``host``   — ``time.perf_counter`` around N calls plus one sync, for pipelines that mix host
  and device work (data streams);
* ``cpu``    — ``time.perf_counter`` around N calls on a machine (or tensors) without CUDA.

Warm-up calls run first and stay outside every timing (Triton JIT, cuDNN autotuning, Inductor
compilation); before a capture they run on a side stream, as ``torch.cuda.graph`` requires.
The reported time is the median over rounds of the per-call time.

``copy_bandwidth`` measures the device-to-device copy (read + write bytes) with the same method
on a buffer far larger than L2, so an op's GB/s can be stated as a share of what the card's
memory delivers *in the same run*; ``bytes_moved`` counts the bytes of tensors.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["KernelTimer", "time_kernel", "copy_bandwidth", "bytes_moved", "gbps", "peak_memory",
           "environment", "card_class", "MODE_TEXT"]

MODE_TEXT = {
    "graph": "CUDA-graph replay of N back-to-back calls, timed with CUDA events",
    "events": "N back-to-back eager launches between two CUDA events",
    "host": "host clock around N back-to-back calls and one device sync",
    "cpu": "host clock around N back-to-back calls (CPU)",
}
_ROUND_US = {"cuda": 2000.0, "cpu": 5000.0}  # auto `iters`: aim for rounds this long


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _err(e: BaseException, width: int = 200) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:width] if msg else ''}".rstrip(": ")


class KernelTimer:
    """Times `fn` (no arguments) in rounds of `iters` back-to-back calls.

    Construction warms up (and, for ``graph=True`` on CUDA, captures the graph); each
    `round()` runs one timed round with exactly one sync at its end, so it can also be handed
    to pytest-benchmark as the round target. `result()` summarises the rounds so far.

    `iters=None` picks N from one timed call after the warm-up so that a round lasts about
    2 ms on CUDA (5 ms on CPU), between 1 and `max_iters`. `device` defaults to CUDA when
    available; pass ``"cpu"`` to time host code on a CUDA machine. With ``host_clock=True`` the
    CUDA rounds are timed with ``time.perf_counter`` and one sync (mode ``host``)."""

    def __init__(self, fn: Callable[[], Any], *, iters: int | None = None, warmup: int = 3,
                 graph: bool = True, device=None, host_clock: bool = False,
                 max_iters: int = 100):
        self.fn = fn
        self.cuda = _is_cuda(device)
        self.samples_us: list[float] = []
        self.fallback: str | None = None
        self._graph = None
        if not self.cuda:
            self.mode = "cpu"
        elif host_clock:
            self.mode = "host"
        else:
            self.mode = "graph" if graph else "events"
        if self.mode == "graph":
            self._warmup_side_stream(warmup)
        else:
            for _ in range(max(warmup, 0)):
                fn()
            self._sync()
        self.iters = int(iters) if iters else self._auto_iters(max_iters)
        if self.mode == "graph":
            self._capture()

    # ---------------------------------------------------------------------------- helpers
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _warmup_side_stream(self, warmup: int) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(max(warmup, 1)):
                self.fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()

    def _auto_iters(self, max_iters: int) -> int:
        """One call timed on its own (outside the measurement) sizes the rounds."""
        if self.cuda and self.mode != "host":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self.fn()
            b.record()
            b.synchronize()
            est = a.elapsed_time(b) * 1e3
        else:
            t0 = time.perf_counter()
            self.fn()
            self._sync()
            est = (time.perf_counter() - t0) * 1e6
        target = _ROUND_US["cuda" if self.cuda else "cpu"]
        return int(min(max_iters, max(1, math.ceil(target / max(est, 1e-3)))))

    def _capture(self) -> None:
        g = torch.cuda.CUDAGraph()
        prev = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(g):
                for _ in range(self.iters):
                    self.fn()
            g.replay()  # the first replay uploads the graph: outside the timing
            torch.cuda.synchronize()
            self._graph = g
        except Exception as e:  # noqa: BLE001 -- any capture failure: time eager launches
            del g
            self.fallback = f"graph capture failed ({_err(e)}); timed eager launches instead"
            self.mode = "events"
            try:  # a failed capture_end can leave the capture stream current
                torch.cuda.set_stream(prev)
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 -- reported through the next round's error
                pass

    # ---------------------------------------------------------------------------- rounds
    def round(self) -> float:
        """One timed round; returns (and records) the µs per call."""
        n = self.iters
        if self.mode in ("graph", "events"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if self._graph is not None:
                self._graph.replay()
            else:
                for _ in range(n):
                    self.fn()
            b.record()
            b.synchronize()  # the round's one sync
            us = a.elapsed_time(b) * 1e3 / n
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                self.fn()
            self._sync()
            us = (time.perf_counter() - t0) * 1e6 / n
        self.samples_us.append(us)
        return us

    def result(self) -> dict:
        s = self.samples_us
        return {"us": statistics.median(s) if s else float("nan"),
                "us_min": min(s) if s else float("nan"), "us_rounds": list(s),
                "iters": self.iters, "rounds": len(s), "mode": self.mode,
                "mode_text": MODE_TEXT[self.mode], "fallback": self.fallback}

    def close(self) -> None:
        self._graph = None


def time_kernel(fn: Callable[[], Any], *, iters: int | None = None, warmup: int = 3,
                rounds: int = 5, graph: bool = True, device=None,
                host_clock: bool = False) -> dict:
    """µs per call of `fn` (median of `rounds` rounds of `iters` back-to-back calls).

    Returns ``{"us", "us_min", "us_rounds", "iters", "rounds", "mode", "mode_text",
    "fallback"}``; `mode` is ``graph`` / ``events`` / ``host`` / ``cpu`` (see the module
    docstring) and `fallback` says why a requested graph was not used."""
    timer = KernelTimer(fn, iters=iters, warmup=warmup, graph=graph, device=device,
                        host_clock=host_clock)
    try:
        for _ in range(max(rounds, 1)):
            timer.round()
        return timer.result()
    finally:
        timer.close()


def bytes_moved(*tensors: Any) -> int:
    """Bytes of every tensor in the (nested) arguments: lists, tuples, dicts, named tuples and
    dataclasses; other values count 0. `bytes_moved(inputs,
    outputs)` is the traffic of an op that reads each input and writes each output once."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return sum(walk(getattr(x, f.name)) for f in dataclasses.fields(x))
        return 0
    return sum(walk(t) for t in tensors)


def gbps(nbytes: float | None, us: float | None) -> float | None:
    """GB/s (1e9 bytes per second) of `nbytes` moved in `us` microseconds."""
    if not nbytes or not us or not math.isfinite(us) or us <= 0:
        return None
    return nbytes / us / 1e3


def copy_bandwidth(nbytes: int | None = None, device=None, *, rounds: int = 5) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of an `nbytes` buffer, GB/s counted
    as read + write (2 × nbytes per call), timed like `time_kernel` (graph replay on CUDA).

    Default size: 256 MiB on CUDA (far beyond any L2, so it is the DRAM bandwidth), 16 MiB on
    CPU. Returns ``{"gbps", "us", "nbytes", "bytes_moved", "mode", "device", ...}``."""
    cuda = _is_cuda(device)
    dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    if nbytes is None:
        nbytes = (256 if cuda else 16) * 2**20
    src = torch.empty(int(nbytes), dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    res = time_kernel(lambda: dst.copy_(src), rounds=rounds, warmup=2, graph=True, device=dev)
    moved = 2 * int(nbytes)
    res.update(nbytes=int(nbytes), bytes_moved=moved, gbps=gbps(moved, res["us"]),
               device=torch.cuda.get_device_name(dev) if cuda else "cpu")
    return res


def peak_memory(fn: Callable[[], Any]) -> float | None:
    """MB allocated at the peak of one call of `fn` above what was allocated before it (CUDA;
    None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------ environment
def card_class(name: str | None) -> str:
    """"H100" / "H200" for those cards (any variant), else the name itself ("cpu" without one)."""
    if not name:
        return "cpu"
    up = name.upper()
    for c in ("H200", "H100"):
        if c in up:
            return c
    return name


def _git_revision(repo: Path) -> dict:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"git": None}
        st = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                             "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        dirty = (len([ln for ln in st.stdout.splitlines() if ln.strip()])
                 if st.returncode == 0 else None)
        return {"git": rev.stdout.strip(), "git_changed_files": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git": None}


def environment(*, git: bool = True) -> dict:
    """Card, driver, versions, native library: what a benchmark number depends on.

    Safe without CUDA, pynvml, Triton or DALI (their entries are then None)."""
    import ucseg_fast
    env: dict[str, Any] = {"package": ucseg_fast.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "host": platform.node(),
                           "cuda": torch.version.cuda, "triton_interpret":
                           os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from nvidia import dali
        env["dali"] = dali.__version__
    except Exception:  # noqa: BLE001 -- absent or broken install: no version
        env["dali"] = None
    try:
        cudnn = torch.backends.cudnn
        env["cudnn"] = cudnn.version() if cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        env["cudnn"] = None
    env["gpu"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1),
                   sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        try:
            import pynvml
            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        except Exception:  # noqa: BLE001 -- no NVML: the driver stays unknown
            env["driver"] = None
    env["card"] = card_class(env["gpu"])
    try:
        from .. import native
        lib = native.load()
        env["native"] = {"loaded": lib is not None,
                         "cuda_kernels": bool(lib is not None and lib.has_cuda),
                         "reason": native.unavailable_reason()}
    except Exception as e:  # noqa: BLE001
        env["native"] = {"loaded": False, "cuda_kernels": False, "reason": _err(e)}
    if git:
        env.update(_git_revision(Path(__file__).resolve().parents[2]))
    return env
