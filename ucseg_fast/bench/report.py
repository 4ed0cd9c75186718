"""`ucseg-fast bench report`: how fast the engine is on this card, in one command.

Writes ``DIR/report.md`` and ``DIR/report.json`` and prints the Markdown at the end. Parts, in
order, each with a share of the ``--minutes`` budget (a part's share is taken from what is left,
so time a part does not use goes to the later ones):

* environment — card, memory, driver, torch / Triton / DALI / CUDA / cuDNN versions, package
  version, native library, git revision;
* copy — the device-to-device copy bandwidth (256 MiB buffer), the ceiling every op's GB/s is
  compared with;
* step — the ACDC step (batch 12 + 12, 256², bf16 autocast, channels-last) × step mode (eager /
  compile / graph) × ops (PyTorch modules / fused ops) × phase 1 / 2, then the LA 3D step; the
  step ledger's estimate beside each measured time;
* components — largest-component filtering per backend (native / Triton / PyTorch / scipy);
* ops — the fused ops against their PyTorch references (µs, GB/s, % of copy);
* upg — the UPG fusion head and the whole UPG against the PyTorch modules;
* data — batches/s and img/s of the training stream (torch and DALI backends);
* equality — 20 steps eager vs graph from identical seeds (phase switch at 10): the loss per step;
* e2e — with ``--data``: validation Dice against wall-clock seconds of a run planned to fill
  its share of the budget (proportional schedules, `train.budget`).

Every failure is local: a part (or one measurement) that raises, times out or does not fit the
remaining budget is recorded with its reason and the report goes on; ``report.json`` is
rewritten after every measurement, so a killed run still leaves its results. On CUDA the risky
measurements run in child processes (``python -m ucseg_fast.bench.report --worker ...``) with a
hard timeout: a hang, a crash or a sticky CUDA error ends that child only. Without CUDA every
GPU part says "skipped: no CUDA device"; ``--smoke`` runs the CPU-capable parts at tiny shapes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
DASH = "–"
NO_CUDA = "no CUDA device"

PART_ORDER = ("environment", "copy", "step", "components", "ops", "upg", "data", "equality", "e2e")
PART_TITLES = {
    "environment": "Environment", "copy": "Device copy bandwidth",
    "step": "Training step", "components": "Connected components (largest-component filter)",
    "ops": "Fused ops vs PyTorch references", "upg": "UPG: fusion head and whole UPG",
    "data": "Data throughput", "equality": "Graph vs eager equality",
    "e2e": "Time to Dice",
}
# shares of the budget (of what is left when the part starts)
PART_WEIGHTS = {"copy": 2, "step": 38, "components": 6, "ops": 14, "upg": 9, "data": 8,
                "equality": 11, "e2e": 12}
# a part whose share is below this is skipped (seconds; CUDA / CPU smoke)
PART_MIN_S = {"copy": (8, 0.5), "step": (20, 2), "components": (10, 0.5), "ops": (15, 0.5),
              "upg": (15, 0.5), "data": (10, 0.5), "equality": (25, 2), "e2e": (40, 3)}
CUDA_ONLY = {"equality"}  # no CPU smoke form
FUSED_OVERRIDES = ["--model.upg_head='fused'", "--model.uncertainty='fused'",
                   "--loss.fused_losses=true"]


class BudgetExceeded(RuntimeError):
    """A measurement did not start: the part's share of the budget is spent."""


def _err(e: BaseException, width: int = 240) -> str:
    lines = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {lines[0][:width]}" if lines else type(e).__name__)


# ------------------------------------------------------------------------------ Markdown
def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def num(x, fmt: str = ".1f") -> str:
    try:
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return DASH
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return DASH


def sig(x) -> str:
    """3 significant digits below 100, whole numbers above (GB/s, %)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return DASH
    if not math.isfinite(v):
        return DASH
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def shape_str(s) -> str:
    return "×".join(str(v) for v in s) if isinstance(s, (list, tuple)) else str(s)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Interrupt|Failure|Exit)\b")


def last_error(text: str, width: int = 240) -> str:
    """The last exception line of a log ("XxxError: ..."), else its last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC_LINE.search(ln):
            return ln[:width]
    return lines[-1][:width] if lines else ""


# ------------------------------------------------------------------------------ running
@dataclass
class CallResult:
    rows: list[dict]
    status: str            # ok | failed | timeout
    reason: str | None
    seconds: float


@dataclass
class Ctx:
    """What a part sees: its deadline, where to record, how to run a measurement."""
    name: str
    deadline: float                     # time.time() by which the part must be done
    cuda: bool
    smoke: bool
    isolate: bool
    out: Path
    work: Path                          # scratch folder (synthetic data, child logs)
    data: str | None
    record: dict
    save: Callable[[], None]
    shared: dict = field(default_factory=dict)  # results of earlier parts (copy GB/s, ...)

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, row: dict) -> dict:
        self.record.setdefault("rows", []).append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        self.record.setdefault("notes", []).append(text)

    def call(self, target: str, kwargs: dict, *, label: str, timeout: float | None = None,
             on_row: Callable[[dict], None] | None = None) -> CallResult:
        """Run worker `target` ("module:function", called as fn(emit, deadline, **kwargs)) until
        the part's deadline (or `timeout` seconds, whichever comes first): in a child process
        with a hard kill when isolating, else in this process (the worker itself checks the
        deadline before each measurement). Rows it emitted before failing are kept."""
        deadline = self.deadline if timeout is None else min(self.deadline, time.time() + timeout)
        if self.isolate:
            return run_isolated(target, kwargs, deadline=deadline, work=self.work, label=label,
                                on_row=on_row)
        return run_in_process(target, kwargs, deadline=deadline, on_row=on_row)


def _resolve(target: str) -> Callable:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def run_in_process(target: str, kwargs: dict, *, deadline: float,
                   on_row: Callable[[dict], None] | None = None) -> CallResult:
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
    t0 = time.time()
    try:
        _resolve(target)(emit, deadline, **kwargs)
        return CallResult(rows, "ok", None, time.time() - t0)
    except BudgetExceeded as e:
        return CallResult(rows, "timeout", str(e), time.time() - t0)
    except Exception as e:  # noqa: BLE001 -- recorded; the report goes on
        return CallResult(rows, "failed", _err(e), time.time() - t0)


_GRACE_S = 5.0  # a child gets this long past its deadline to finish the measurement it is in
_RC_BUDGET = 3  # a child's exit status when it stopped at its deadline (BudgetExceeded)


def run_isolated(target: str, kwargs: dict, *, deadline: float, work: Path, label: str,
                 on_row: Callable[[dict], None] | None = None) -> CallResult:
    """`target` in a child Python process; killed (its whole process group) when it outlives
    the deadline by more than a few seconds. Its rows come back through a JSON-lines file."""
    work.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    rows_file, log_file = work / f"{safe}.rows.jsonl", work / f"{safe}.log"
    rows_file.write_text("")
    cmd = [sys.executable, "-m", "ucseg_fast.bench.report", "--worker", target,
           "--kwargs", json.dumps(kwargs), "--rows", str(rows_file), "--deadline", repr(deadline)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    t0 = time.time()
    status, reason = "ok", None
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time() + _GRACE_S))
            if rc == _RC_BUDGET:
                status = "timeout"
                reason = last_error(log_file.read_text(errors="replace")) or "out of budget"
            elif rc != 0:
                status = "failed"
                reason = last_error(log_file.read_text(errors="replace")) or f"exit status {rc}"
                if rc < 0:
                    reason = f"killed by signal {-rc}" + (f" ({reason})" if reason else "")
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status, reason = "timeout", f"stopped at the budget after {time.time() - t0:.0f} s"
        except BaseException:  # Ctrl-C / SIGTERM of the report: the child must not outlive it
            _kill_group(proc)
            raise
    rows = []
    for line in rows_file.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    for r in rows:
        if on_row is not None:
            on_row(r)
    return CallResult(rows, status, reason, time.time() - t0)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's own session (it and anything it started, e.g. DALI workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="one isolated measurement of `bench report`")
    p.add_argument("--worker", required=True)
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--rows", required=True)
    p.add_argument("--deadline", type=float, required=True)
    a = p.parse_args(argv)
    if a.worker.endswith(":_w_ledger"):
        # the ledger runs the Triton kernels on the CPU, in the interpreter, also on a GPU
        # machine (set before the ops are imported; this child imported none yet)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with open(a.rows, "a") as f:
        def emit(row: dict) -> None:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        try:
            _resolve(a.worker)(emit, a.deadline, **json.loads(a.kwargs))
        except BudgetExceeded as e:
            print(f"BudgetExceeded: {e}", file=sys.stderr)
            return _RC_BUDGET
    return 0


def _check(deadline: float, what: str, need_s: float = 0.0) -> None:
    left = deadline - time.time()
    if left < need_s or left <= 0:
        raise BudgetExceeded(f"out of budget before {what} ({max(left, 0):.0f} s left)")


def _fits(deadline: float, need_s: float) -> bool:
    return deadline - time.time() >= need_s


def _cleanup() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ workers
def _w_selftest(emit, deadline, *, sleep: float = 0.0, fail: bool = False, rows: int = 1) -> None:
    """Emits `rows` rows, then sleeps or raises: checks the isolation machinery (tests)."""
    for i in range(rows):
        emit({"i": i, "pid": os.getpid()})
    if sleep:
        time.sleep(sleep)
    if fail:
        raise RuntimeError("selftest failure")


def _w_copy(emit, deadline, *, nbytes: int | None = None) -> None:
    from .timing import copy_bandwidth
    r = copy_bandwidth(nbytes)
    emit({"status": "ok", **{k: r[k] for k in ("gbps", "us", "nbytes", "bytes_moved", "mode",
                                                "mode_text", "iters", "rounds", "fallback",
                                                "device")}})


def _w_step(emit, deadline, **cfg) -> None:
    from ..train.bench import bench_step
    res = bench_step(**cfg)
    keep = ("device", "mode", "phase", "batch", "img", "dims", "nms", "fused", "ms_per_step",
            "img_per_s", "loss", "peak_mem_gb", "gpu_util", "power_w")
    emit({"status": "ok", **{k: res[k] for k in keep if k in res}})


def _time_row(fn, *, graph: bool, device=None, host_clock: bool = False, rounds: int = 5,
              nbytes: int | None = None, copy_gbps: float | None = None) -> dict:
    from .timing import gbps, time_kernel
    r = time_kernel(fn, rounds=rounds, graph=graph, device=device, host_clock=host_clock,
                    warmup=3 if rounds > 1 else 1)  # one round = a smoke run: one warm-up call
    row = {"us": r["us"], "ms": r["us"] / 1e3, "mode": r["mode"], "iters": r["iters"],
           "rounds": r["rounds"]}
    if r["fallback"]:
        row["fallback"] = r["fallback"]
    if nbytes:
        row["bytes_min"] = int(nbytes)
        row["gbps"] = gbps(nbytes, r["us"])
        if row["gbps"] and copy_gbps:
            row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
    return row


def _w_components(emit, deadline, *, shapes: list[str], rounds: int = 5) -> None:
    import torch

    from .. import native
    from ..ops import components as cc
    from .targets import CC_SHAPES, cc_labels
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    lib = native.load()
    triton_fn = getattr(cc, "largest_component_triton", None)
    for name in shapes:
        shape, C = CC_SHAPES[name]
        base = {"shape_name": name, "shape": list(shape), "classes": C}
        if not _fits(deadline, 1.0):
            emit({**base, "backend": "all", "status": "skipped", "reason": "out of budget"})
            continue
        lab_cpu = cc_labels(shape, C)
        ref = cc.largest_component_scipy(lab_cpu, C)
        lab = lab_cpu.to(dev)
        backends: list[tuple[str, Callable | None, dict, str | None]] = []
        if lib is None:
            backends.append(("native", None, {}, f"not available: {native.unavailable_reason()}"))
        elif cuda and not lib.has_cuda:
            backends.append(("native", None, {}, "not available: library built without CUDA"))
        else:
            backends.append(("native", lambda: lib.largest_component(lab, C),
                             {"graph": True}, None))
        if triton_fn is None:
            backends.append(("triton", None, {}, "not available: no "
                             "ucseg_fast.ops.components.largest_component_triton"))
        elif not cuda:
            backends.append(("triton", None, {}, f"skipped: {NO_CUDA} (not timed under the "
                             "Triton interpreter)"))
        else:
            backends.append(("triton", lambda: triton_fn(lab, C), {"graph": True}, None))
        # the fallback syncs with the host every iteration: eager launches only
        backends.append(("torch", lambda: cc.largest_component_torch(lab, C), {"graph": False}, None))
        # the reference's path: copy to the host, scipy per item and class, copy back
        backends.append(("scipy", lambda: cc.largest_component_scipy(lab, C),
                         {"graph": False, "host_clock": cuda}, None))
        for bname, fn, kw, why in backends:
            row = {**base, "backend": bname}
            if fn is None:
                emit({**row, "status": "skipped" if why.startswith("skipped") else "n/a",
                      "reason": why.removeprefix("skipped: ")})
                continue
            if not _fits(deadline, 1.0):
                emit({**row, "status": "skipped", "reason": "out of budget"})
                continue
            try:
                out = fn()
                row["matches_scipy"] = bool(torch.equal(out.cpu(), ref))
                row.update(_time_row(fn, rounds=rounds, **kw))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 -- one backend failing must not hide the rest
                row.update(status="failed", reason=_err(e))
            emit(row)
        backends.clear()  # the closures hold this shape's tensors
        _cleanup()


def _timed_target(emit, row: dict, build: Callable, info_keys: tuple[str, ...],
                  copy_gbps: float | None, rounds: int) -> None:
    """Build a benchmark target, time it under graph replay (GB/s and % of copy), emit the row
    (a failure is recorded in the row; the table goes on)."""
    from .timing import peak_memory
    try:
        t = build()
        row.update({k: t.info.get(k) for k in info_keys if k in t.info})
        row.update(_time_row(t.fn, graph=True, nbytes=t.nbytes, copy_gbps=copy_gbps,
                             rounds=rounds))
        row["peak_mb"] = peak_memory(t.fn)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- recorded; the report goes on
        row.update(status="failed", reason=_err(e))
    emit(row)
    _cleanup()


# the op table of the report: (op, pass)
REPORT_OPS = (("evidential_uncertainty", "fwd"), ("evidential_uncertainty", "fwd_bwd"),
              ("entropy_pseudo_label", "fwd"), ("pseudo_label_loss", "fwd_bwd"),
              ("cps_step", "fwd_bwd"), ("fusion_unsup_losses", "fwd_bwd"),
              ("segmentation_loss_terms", "fwd_bwd"))


def _w_ops(emit, deadline, *, shapes: list[str], dtype: str, copy_gbps: float | None,
           fused: bool, compiled: bool, rounds: int = 5) -> None:
    """The fused ops against their references: graph timing of every target; the compiled
    references last (Inductor compiles cost seconds each), while the budget allows."""
    from .targets import OP_SHAPES, op_target

    def one(op, pass_, shape_name, provider):
        row = {"op": op, "pass": pass_, "shape_name": shape_name,
               "shape": list(OP_SHAPES[shape_name]), "dtype": dtype, "provider": provider}
        if not _fits(deadline, 1.0):
            emit({**row, "status": "skipped", "reason": "out of budget"})
            return
        _timed_target(emit, row, lambda: op_target(op, OP_SHAPES[shape_name], dtype, provider,
                                                  pass_), ("backend_ran",), copy_gbps, rounds)

    for shape_name in shapes:
        for op, pass_ in REPORT_OPS:
            provs = ["reference_eager"] + (["ours"] if fused else [])
            if fused and op == "cps_step":
                provs.append("ours_fused")
            for p in provs:
                one(op, pass_, shape_name, p)
    if compiled:
        for shape_name in shapes:
            for op, pass_ in REPORT_OPS:
                one(op, pass_, shape_name, "reference_compiled")


def _w_upg(emit, deadline, *, head_shapes: list[str], whole_shapes: list[str], dtype: str,
           copy_gbps: float | None, fused: bool, compiled: bool, rounds: int = 5) -> None:
    from .targets import UPG_SHAPES, WHOLE_SHAPES, upg_head_target, upg_whole_target

    def one(part, shape_name, provider, pass_="fwd_bwd"):
        shapes, build = ((UPG_SHAPES, upg_head_target) if part == "head"
                         else (WHOLE_SHAPES, upg_whole_target))
        row = {"op": f"upg_{part}", "pass": pass_, "shape_name": shape_name,
               "shape": list(shapes[shape_name]), "dtype": dtype, "provider": provider}
        if not _fits(deadline, 1.0):
            emit({**row, "status": "skipped", "reason": "out of budget"})
            return
        _timed_target(emit, row, lambda: build(shapes[shape_name], dtype, provider, pass_),
                      ("backend_ran", "dot_precision"), copy_gbps, rounds)

    plan = []
    for s in head_shapes:
        plan += [("head", s, "eager")] + ([("head", s, "fused")] if fused else [])
    for s in whole_shapes:
        plan += [("whole", s, "eager")] + ([("whole", s, "fused_tokens")] if fused else [])
    if compiled:
        plan += [("head", s, "compiled") for s in head_shapes]
        plan += [("whole", s, "compiled") for s in whole_shapes]
    for part, s, p in plan:
        one(part, s, p)


def _data_config(root: str, backend: str, smoke: bool, extra: list[str] | None = None):
    from ..config import load_config
    ov = [f"--data.root='{root}'", f"--data.backend='{backend}'"]
    if smoke:
        ov += ["--data.img_size=[32,32]", "--data.labeled_bs=2", "--data.unlabeled_bs=2",
               "--data.labeled_patients=3"]
    return load_config(REPO / "configs" / "acdc_2d.toml", ov + list(extra or []))


def _w_data(emit, deadline, *, root: str, dataset: str, backend: str, smoke: bool) -> None:
    import torch

    from ..data.factory import build_train_stream
    cfg = _data_config(root, backend, smoke)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    row = {"dataset": dataset, "backend": backend, "img": list(cfg.data.img_size), "device": dev,
           "batch": f"{cfg.data.labeled_bs}+{cfg.data.unlabeled_bs}"}
    if backend == "dali":
        from ..data.dali import dali_unavailable_reason
        why = dali_unavailable_reason()
        if why:
            emit({**row, "status": "n/a", "reason": f"not available: {why}"})
            return
    _check(deadline, f"the {backend} stream")
    stream = build_train_stream(cfg.data, device=dev, seed=0)
    stream.next()  # the first batch (pipeline build, cache upload) outside the timing
    r = _time_row(stream.next, graph=False, host_clock=True, rounds=5)
    n = cfg.data.labeled_bs + cfg.data.unlabeled_bs
    sec = r["us"] / 1e6
    emit({**row, "status": "ok", "batches_per_s": 1.0 / sec, "img_per_s": n / sec,
          "ms_per_batch": r["ms"], "mode": r["mode"], "iters": r["iters"], "rounds": r["rounds"]})


def _w_equality(emit, deadline, *, root: str, out: str, steps: int = 20, switch: int = 10,
                modes: tuple[str, ...] = ("eager", "graph", "eager"), nms: bool = True,
                overrides: list[str] | None = None) -> None:
    """`steps` training steps of the ACDC recipe per mode, from identical seeds (same weights,
    batches and copy-paste draws), phase 2 from step `switch`: the total loss L per step. The
    third run (eager again) is the run-to-run noise of eager itself."""
    import torch

    from ..config import load_config
    from ..train import Trainer
    losses: list[list[float]] = []
    phase2_from: list[int | None] = []
    for i, mode in enumerate(modes):
        _check(deadline, f"the {mode} run")
        ov = [f"--data.root='{root}'", f"--loss.phase2_start={switch}",
              f"--train.step_mode='{mode}'", f"--train.out_dir='{out}/run{i}_{mode}'",
              "--train.progress=false", f"--loss.nms={'true' if nms else 'false'}",
              *(overrides or [])]
        cfg = load_config(REPO / "configs" / "acdc_2d.toml", ov)
        tr = Trainer(cfg, log=lambda s: None)
        Ls, p2 = [], None
        for t in range(steps):
            terms = tr.step(tr.stream.next(), t)
            if p2 is None and "mix1" in terms:
                p2 = t
            Ls.append(float(terms["L"]))  # sync-ok: equality check, not a timing
            del terms  # graph mode: views of the graph's static outputs
        losses.append(Ls)
        phase2_from.append(p2)
        emit({"kind": "run", "mode": mode, "run": i, "runner_mode": tr.runner.mode,
              "phase2_from": p2, "losses": Ls})
        del tr
        _cleanup()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def rel(a, b):
        return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    if len(losses) >= 2:
        d = rel(losses[1], losses[0])
        emit({"kind": "compare", "a": modes[1], "b": modes[0], "rel_diff": d,
              "max_rel_diff": max(d) if d else None,
              "identical_steps": sum(x == y for x, y in zip(losses[1], losses[0]))})
    if len(losses) >= 3:
        d = rel(losses[2], losses[0])
        emit({"kind": "noise", "a": modes[2], "b": modes[0], "rel_diff": d,
              "max_rel_diff": max(d) if d else None,
              "identical_steps": sum(x == y for x, y in zip(losses[2], losses[0]))})


def _w_e2e(emit, deadline, *, root: str, minutes: float, out: str, smoke: bool,
           step_mode: str | None = None) -> None:
    """The ACDC preset as the engine trains it by default (its step mode unless `step_mode`)."""
    from ..config import load_config
    from ..train.bench import bench_e2e
    ov = [f"--data.root='{root}'", "--train.progress=false"]
    if step_mode:
        ov.append(f"--train.step_mode='{step_mode}'")
    val_every = None  # planned from the budget (train.budget)
    if smoke:
        val_every = 2
        ov += ["--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
               "--train.max_iterations=4", "--train.amp='none'", "--train.channels_last=false",
               "--train.max_val_volumes=1", "--loss.queue_size=16", "--loss.phase2_start=2"]
    else:
        ov += ["--train.max_val_volumes=8"]
    cfg = load_config(REPO / "configs" / "acdc_2d.toml", ov)
    res = bench_e2e(cfg, minutes=minutes, out_dir=out, val_every=val_every, log=lambda s: None)
    emit({"status": "ok", **res, "out_dir": out})


# ------------------------------------------------------------------------------ parts
def _part_environment(ctx: Ctx) -> None:
    from .timing import environment
    env = environment()
    ctx.record["env"] = env
    ctx.shared["env"] = env


def _part_copy(ctx: Ctx) -> None:
    nbytes = (4 * 2**20) if ctx.smoke and not ctx.cuda else None
    res = ctx.call("ucseg_fast.bench.report:_w_copy", {"nbytes": nbytes}, label="copy")
    for r in res.rows:
        ctx.add(r)
        ctx.shared["copy_gbps"] = r.get("gbps")
    if res.status != "ok":
        raise RuntimeError(res.reason or res.status)


def _ledger_config(dims: int, fused: bool, smoke: bool, nms: bool):
    """The Config of the measured step: `train.bench.step_config` when it exists, else the
    recipe's preset with the same batch, size, ops and nms."""
    bs, img = (1, 32) if smoke else ((2, 96) if dims == 3 else (12, 256))
    from ..train import bench as train_bench
    step_config = getattr(train_bench, "step_config", None)
    if step_config is not None:
        return step_config(labeled_bs=bs, img=img, nms=nms, dims=dims, fused=fused)
    from ..config import apply_overrides, load_config
    cfg = load_config(REPO / "configs" / ("la_3d.toml" if dims == 3 else "acdc_2d.toml"))
    ops = FUSED_OVERRIDES if fused else ["--model.upg_head='torch'",
                                         "--model.uncertainty='torch'", "--loss.fused_losses=false"]
    side = ",".join([str(img)] * dims)
    return apply_overrides(cfg, [*ops, f"--data.img_size=[{side}]", f"--data.labeled_bs={bs}",
                                 f"--data.unlabeled_bs={bs}",
                                 f"--loss.nms={'true' if nms else 'false'}"])


def _ledger(dims: int, fused: bool, card: str, smoke: bool, *, nms: bool = True) -> dict:
    """The step ledger's per-phase estimate of a measured step config, or {"error": reason}."""
    try:
        from .ledger import step_ledger
        d = step_ledger(_ledger_config(dims, fused, smoke, nms), card=card).to_dict()
        return {"card": d.get("card"), "phases": d.get("phases", {})}
    except Exception as e:  # noqa: BLE001 -- another module's estimate; never fatal here
        return {"error": _err(e)}


def step_configs(cuda: bool, smoke: bool) -> list[dict]:
    """The step table's configurations, most important first (what runs when the budget is
    short): 2D eager/graph × ops × phase, the 3D step, then compile."""
    if smoke:
        base2, base3 = dict(labeled_bs=1, img=32), dict(labeled_bs=1, img=32)
        steps, warm = 1, 1
    else:
        base2, base3 = dict(labeled_bs=12, img=256), dict(labeled_bs=2, img=96)
        steps, warm = 20, 5
    out = []

    def add(dims, mode, fused, phase2):
        b = base3 if dims == 3 else base2
        out.append(dict(dims=dims, mode=mode, fused=fused, phase2=phase2, steps=steps,
                        warmup=warm, **b))
    for phase2 in (False, True):
        for fused in (False, True):
            for mode in ("eager", "graph"):
                add(2, mode, fused, phase2)
    for mode in ("eager", "graph"):
        add(3, mode, False, False)
    for fused in (False, True):
        add(2, "compile", fused, False)
    for mode in ("eager", "graph"):
        add(3, mode, False, True)
    for fused in (False, True):
        add(2, "compile", fused, True)
    return out


# rough seconds a step config needs on a GPU (process start, cuDNN autotune, compile), and the
# most it may take before it is stopped
_STEP_NEED_S = {"eager": 12, "graph": 15, "compile": 60}
_STEP_CAP_S = {"eager": 90, "graph": 120, "compile": 300}


def graph_nms(cuda: bool) -> tuple[bool, str | None]:
    """(loss.nms, why off): the largest-component rule stays on unless graph mode cannot
    capture it here; then it is off in every mode, so the modes compare the same step."""
    if not cuda:
        return True, None
    import torch
    try:
        from ..train.step import check_graph_capturable
        check_graph_capturable(nms=True, device=torch.device("cuda"), world_size=1,
                               optimizer="foreach")
    except Exception as e:  # noqa: BLE001 -- ValueError names the option; anything else: off too
        return False, (str(e).splitlines() or [type(e).__name__])[0]
    return True, None


def _w_ledger(emit, deadline, *, combos: list, card: str, smoke: bool, nms: bool) -> None:
    """The step ledger of each (dims, fused) in `combos`, one row each, while time is left."""
    for dims, fused in combos:
        if not _fits(deadline, 0.5):
            emit({"dims": dims, "fused": fused, "error": "out of budget"})
            continue
        emit({"dims": dims, "fused": fused, **_ledger(dims, fused, card, smoke, nms=nms)})


def _fill_ledger(row: dict, led: dict | None, why: str | None) -> None:
    if led is None or "error" in led:
        row["ledger"] = f"ledger unavailable: {(led or {}).get('error') or why or 'no result'}"
        return
    ph = (led.get("phases") or {}).get(str(row["phase"])) or {}
    # graph / compile rows: the one-CUDA-graph estimate; eager rows: the eager lower bound
    est = ph.get("eager_ms") if row["mode"] == "eager" and ph.get("eager_ms") is not None \
        else ph.get("est_ms")
    card = led.get("card")
    row.update(ledger_est_ms=est, ledger_kernels=ph.get("kernels"),
               ledger_card=card.get("name") if isinstance(card, dict) else card)


def _part_step(ctx: Ctx) -> None:
    env = ctx.shared.get("env") or {}
    card = env.get("card") or "cpu"
    nms, nms_note = graph_nms(ctx.cuda)
    ctx.record["nms"] = nms
    if nms_note:
        ctx.note(f"loss.nms off in every step row (the same pseudo-label rule in every mode): "
                 f"{nms_note}")
    # the ledger (CPU work) runs after the measurements, never beside them; time kept for it
    reserve = min(60.0, 0.2 * max(ctx.left(), 0.0)) if ctx.cuda else 0.0
    measured: list[dict] = []
    for c in step_configs(ctx.cuda, ctx.smoke):
        row = {"dims": c["dims"], "mode": c["mode"], "ops": "fused" if c["fused"] else "torch",
               "phase": 2 if c["phase2"] else 1, "batch": f"{c['labeled_bs']}+{c['labeled_bs']}",
               "img": c["img"], "nms": nms}
        if not ctx.cuda and (c["mode"] != "eager" or c["fused"] or c["dims"] == 3):
            why = NO_CUDA if c["mode"] != "eager" else \
                f"{NO_CUDA} (the CPU smoke run times the 2D eager step with the PyTorch modules)"
            ctx.add({**row, "status": "skipped", "reason": why})
            continue
        need = _STEP_NEED_S[c["mode"]] if ctx.cuda else 1.0
        left = ctx.left() - reserve
        if left < need:
            ctx.add({**row, "status": "skipped",
                     "reason": f"out of budget ({max(left, 0):.0f} s left, needs ~{need} s)"})
            continue
        kw = dict(c, nms=nms, device="cuda" if ctx.cuda else "cpu")
        label = f"step_{c['dims']}d_{c['mode']}_{row['ops']}_p{row['phase']}"
        res = ctx.call("ucseg_fast.bench.report:_w_step", kw, label=label,
                       timeout=min(_STEP_CAP_S[c["mode"]], left) if ctx.cuda else None)
        got = next((r for r in res.rows if r.get("status") == "ok"), None)
        if got is not None:
            row.update({k: got.get(k) for k in ("ms_per_step", "img_per_s", "peak_mem_gb",
                                                "gpu_util", "loss", "device")})
            row["status"] = "ok"
            measured.append(row)
        else:
            row.update(status=res.status if res.status != "ok" else "failed",
                       reason=res.reason or "no result")
        row["seconds"] = round(res.seconds, 1)
        ctx.add(row)
    combos = sorted({(r["dims"], r["ops"] == "fused") for r in measured})
    if not combos:
        return
    res = ctx.call("ucseg_fast.bench.report:_w_ledger",
                   {"combos": [list(k) for k in combos], "card": card, "smoke": ctx.smoke,
                    "nms": nms}, label="ledger")
    got = {(r["dims"], r["fused"]): r for r in res.rows}
    for row in measured:
        _fill_ledger(row, got.get((row["dims"], row["ops"] == "fused")), res.reason)
    ctx.save()


def _rounds(ctx: Ctx) -> int:
    return 1 if ctx.smoke else 5


def _component_shapes(ctx: Ctx) -> list[str]:
    return ["tiny_2d", "tiny_3d"] if ctx.smoke else ["acdc_half", "acdc_batch", "la_3d"]


def _part_components(ctx: Ctx) -> None:
    res = ctx.call("ucseg_fast.bench.report:_w_components",
                   {"shapes": _component_shapes(ctx), "rounds": _rounds(ctx)},
                   label="components", on_row=ctx.add)
    _finish_call(ctx, res)


def _finish_call(ctx: Ctx, res: CallResult) -> None:
    if res.status != "ok":
        ctx.add({"status": res.status, "reason": res.reason, "what": "the rest of this part"})


def _part_ops(ctx: Ctx) -> None:
    fused = ctx.cuda
    if not fused:
        ctx.note("CPU smoke run: the PyTorch references only (the fused Triton ops are timed on "
                 "CUDA, never under the interpreter)")
    shapes = ["tiny"] if ctx.smoke else ["acdc_unlabeled", "la_3d"]
    dtype = "bf16" if ctx.cuda else "fp32"
    res = ctx.call("ucseg_fast.bench.report:_w_ops",
                   {"shapes": shapes, "dtype": dtype, "copy_gbps": ctx.shared.get("copy_gbps"),
                    "fused": fused, "compiled": ctx.cuda, "rounds": _rounds(ctx)},
                   label="ops", on_row=ctx.add)
    _finish_call(ctx, res)


def _part_upg(ctx: Ctx) -> None:
    fused = ctx.cuda
    if not fused:
        ctx.note("CPU smoke run: the PyTorch modules only")
    shapes = ["tiny"] if ctx.smoke else ["acdc", "la_3d"]
    res = ctx.call("ucseg_fast.bench.report:_w_upg",
                   {"head_shapes": shapes, "whole_shapes": shapes,
                    "dtype": "bf16" if ctx.cuda else "fp32",
                    "copy_gbps": ctx.shared.get("copy_gbps"), "fused": fused,
                    "compiled": ctx.cuda, "rounds": _rounds(ctx)}, label="upg", on_row=ctx.add)
    _finish_call(ctx, res)


def synthetic_root(ctx: Ctx) -> Path:
    """An ACDC-like SSL4MIS set in the scratch folder, written once per report."""
    root = ctx.work / "synthetic_acdc"
    if not (root / "train_slices.list").exists():
        from ..data.synthetic import write_synthetic_acdc
        if ctx.smoke:
            write_synthetic_acdc(root, n_train_patients=5, slices_per_volume=4, n_val=1, n_test=0,
                                 size=(64, 64), seed=0)
        else:
            write_synthetic_acdc(root, n_train_patients=14, seed=0)
    return root


def _part_data(ctx: Ctx) -> None:
    sets = [("synthetic ACDC-like", str(synthetic_root(ctx)))]
    if ctx.data:
        sets.append((f"--data {ctx.data}", ctx.data))
    for name, root in sets:
        for backend in ("torch", "dali"):
            if ctx.left() < (8 if ctx.isolate else 0.5):
                ctx.add({"dataset": name, "backend": backend, "status": "skipped",
                         "reason": "out of budget"})
                continue
            res = ctx.call("ucseg_fast.bench.report:_w_data",
                           {"root": root, "dataset": name, "backend": backend, "smoke": ctx.smoke},
                           label=f"data_{backend}_{len(ctx.record.get('rows', []))}")
            if res.rows:
                for r in res.rows:
                    ctx.add(r)
            else:
                ctx.add({"dataset": name, "backend": backend,
                         "status": res.status if res.status != "ok" else "failed",
                         "reason": res.reason or "no result"})


def _part_equality(ctx: Ctx) -> None:
    root = ctx.data or str(synthetic_root(ctx))
    nms, why = graph_nms(ctx.cuda)
    if why:
        ctx.note(f"loss.nms off in both modes: {why}")
    tiny = (["--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
             "--data.labeled_patients=3", "--loss.queue_size=16"] if ctx.smoke else [])
    res = ctx.call("ucseg_fast.bench.report:_w_equality",
                   {"root": root, "out": str(ctx.work / "equality"), "nms": nms,
                    "overrides": tiny}, label="equality", on_row=ctx.add)
    ctx.record["data"] = "--data" if ctx.data else "synthetic ACDC-like"
    _finish_call(ctx, res)


def _part_e2e(ctx: Ctx) -> None:
    share_min = max(ctx.left(), 0) / 60.0
    # training time; process start, data loading and validation come on top
    minutes = round(max(0.05, 0.4 * share_min), 3)
    out = str(ctx.out / "e2e")
    res = ctx.call("ucseg_fast.bench.report:_w_e2e",
                   {"root": ctx.data, "minutes": minutes, "out": out, "smoke": ctx.smoke},
                   label="e2e", on_row=ctx.add)
    _finish_call(ctx, res)


PARTS: dict[str, Callable[[Ctx], None]] = {
    "environment": _part_environment, "copy": _part_copy, "step": _part_step,
    "components": _part_components, "ops": _part_ops, "upg": _part_upg, "data": _part_data,
    "equality": _part_equality, "e2e": _part_e2e,
}


def _benign(row: dict) -> bool:
    """Not measured because it does not apply here (not available / no CUDA device)."""
    return row.get("status") == "n/a" or (row.get("status") == "skipped"
                                          and str(row.get("reason", "")).startswith(NO_CUDA))


def _part_status(rec: dict) -> str:
    rows = [r for r in rec.get("rows", []) if "status" in r and not _benign(r)]
    if not rows:
        return "ok"
    sts = {r["status"] for r in rows}
    if sts <= {"ok", "n/a"}:
        return "ok"
    if "ok" in sts:
        return "partial"
    if sts <= {"skipped", "n/a"}:
        return "skipped"
    return "timeout" if "timeout" in sts and "failed" not in sts else "failed"


# ------------------------------------------------------------------------------ the report
def run_report(out: str | Path, *, data: str | None = None, minutes: float = 8.0,
               smoke: bool = False, isolate: bool | None = None,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Run every part within `minutes`; write report.md / report.json into `out`; return the
    report dict. `isolate` (default: on CUDA) runs the measurements in child processes."""
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    isolate = cuda if isolate is None else isolate
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    budget_s = max(0.0, float(minutes) * 60.0)
    end = t_start + budget_s - min(10.0, 0.03 * budget_s)  # leave time to write the report
    rep: dict[str, Any] = {
        "schema": 1, "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "budget_s": budget_s, "minutes": minutes, "smoke": smoke, "data": data,
        "cuda": cuda, "isolated": isolate, "finished": False, "parts": {}}
    shared: dict = {}

    def save() -> None:
        rep["elapsed_s"] = round(time.time() - t_start, 1)
        _atomic_write(out / "report.json", json.dumps(_finite(rep), indent=1, default=str))

    skip: dict[str, str] = {}
    for name in PART_ORDER:
        if name == "environment":
            continue
        if name == "e2e" and not data:
            skip[name] = "needs --data ROOT (a dataset in the SSL4MIS layout) for the Dice curve"
        elif not cuda and (not smoke or name in CUDA_ONLY):
            skip[name] = NO_CUDA + ("" if smoke else
                                    " (run with --smoke for the CPU smoke run at tiny shapes)")
    with tempfile.TemporaryDirectory(prefix="ucseg_bench_report.") as tmp:
        work = Path(tmp)
        for i, name in enumerate(PART_ORDER):
            rec: dict[str, Any] = {"title": PART_TITLES[name], "rows": [], "notes": []}
            rep["parts"][name] = rec
            if name in skip:
                rec.update(status="skipped", reason=skip[name], seconds=0.0)
                save()
                continue
            if name == "environment":
                deadline = time.time() + 60
                share = None
            else:
                later = [n for n in PART_ORDER[i:] if n not in skip and n != "environment"]
                left = end - time.time()
                share = max(0.0, left) * PART_WEIGHTS[name] / sum(PART_WEIGHTS[n] for n in later)
                deadline = time.time() + share
                rec["budget_s"] = round(share, 1)
                need = PART_MIN_S[name][0 if cuda else 1]
                if share < need:
                    rec.update(status="skipped", seconds=0.0,
                               reason=f"out of budget (share {share:.0f} s of the "
                                      f"{budget_s / 60:g} min, needs ≥ {need} s)")
                    save()
                    continue
            log(f"bench report: {name}" + (f" (budget {share:.0f} s)" if share else ""))
            rec["status"] = "running"
            save()
            ctx = Ctx(name=name, deadline=deadline, cuda=cuda, smoke=smoke, isolate=isolate,
                      out=out, work=work, data=data, record=rec, save=save, shared=shared)
            t0 = time.time()
            try:
                PARTS[name](ctx)
                rec["status"] = _part_status(rec)
                if rec["status"] != "ok":
                    rec["reason"] = _rows_reason(rec)
            except BudgetExceeded as e:
                rec.update(status="timeout", reason=str(e))
            except Exception as e:  # noqa: BLE001 -- recorded; the report goes on
                rec.update(status="failed", reason=_err(e),
                           traceback=traceback.format_exc(limit=6)[-2000:])
            rec["seconds"] = round(time.time() - t0, 1)
            save()
            _atomic_write(out / "report.md", render_markdown(rep))
        rep["finished"] = True
        save()
    md = render_markdown(rep)
    _atomic_write(out / "report.md", md)
    return rep


def _rows_reason(rec: dict) -> str | None:
    bad = [r for r in rec.get("rows", []) if r.get("status") not in (None, "ok") and not _benign(r)]
    if not bad:
        return None
    reasons = list(dict.fromkeys(f"{r['status']}: {r.get('reason')}" for r in bad))
    return f"{len(bad)} of {len(rec['rows'])} rows not measured ({'; '.join(reasons[:3])})"


def _finite(x):
    """NaN / inf -> None, so report.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ rendering
def _status_line(rec: dict) -> str | None:
    st = rec.get("status")
    if st in ("ok", None):
        return None
    s = f"**{st}**"
    if rec.get("reason"):
        s += f": {rec['reason']}"
    return s


def _row_note(r: dict) -> str:
    if r.get("status") not in (None, "ok"):
        return f"{r['status']}: {r.get('reason') or ''}".strip()
    return r.get("fallback") or ""


def _render_environment(rec: dict, rep: dict) -> list[str]:
    e = rec.get("env") or {}
    nat = e.get("native") or {}
    if nat.get("cuda_kernels"):
        native = "loaded, with CUDA kernels"
    elif nat.get("loaded"):
        native = "loaded, host code only (no CUDA kernels)"
    else:
        native = f"not loaded ({nat.get('reason')})"
    card = e.get("gpu") or "no CUDA device"
    if e.get("gpu"):
        card += (f", {e.get('gpu_memory_gb')} GB, {e.get('sm_count')} SMs, compute capability "
                 f"{e.get('capability')}, driver {e.get('driver') or 'unknown'}")
    git = e.get("git") or "unknown (not a git checkout)"
    if e.get("git_changed_files"):
        git += f" ({e['git_changed_files']} changed files)"
    return [f"- card: {card}",
            f"- ucseg-fast {e.get('package')}, torch {e.get('torch')}, Triton {e.get('triton')}, "
            f"DALI {e.get('dali') or 'not installed'}, CUDA {e.get('cuda')}, cuDNN "
            f"{e.get('cudnn')}, Python {e.get('python')}",
            f"- native library: {native}",
            f"- git revision: {git}; host {e.get('host')}"]


def _render_copy(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if r.get("gbps")]
    if not rows:
        return []
    r = rows[0]
    return [f"**{num(r['gbps'], '.0f')} GB/s** (read + write) for `dst.copy_(src)` of "
            f"{r['nbytes'] / 2**20:.0f} MiB, {num(r['us'])} µs per copy; {r.get('mode_text')}"
            + (f"; {r['fallback']}" if r.get("fallback") else "") + ". Every \"% of copy\" below "
            "compares with this number."]


def _render_step(rec: dict, rep: dict) -> list[str]:
    rows = rec.get("rows", [])
    if not rows:
        return []
    eager = {(r["dims"], r["ops"], r["phase"]): r.get("ms_per_step") for r in rows
             if r.get("mode") == "eager" and r.get("status") == "ok"}
    body = []
    for r in rows:
        base = eager.get((r["dims"], r["ops"], r["phase"]))
        x = (f"{base / r['ms_per_step']:.2f}×" if base and r.get("ms_per_step")
             and r["mode"] != "eager" else DASH)
        img = f"{r['img']}{'³' if r['dims'] == 3 else '²'}"
        led = r.get("ledger_est_ms")
        ledger = (f"{num(led, '.2f')} ({r.get('ledger_kernels')} kernels)" if led is not None
                  else DASH)
        body.append([f"{r['dims']}D", r["mode"], r["ops"], r["phase"], r["batch"], img,
                     num(r.get("ms_per_step"), ".2f"), num(r.get("img_per_s"), ".0f"),
                     num(r.get("peak_mem_gb"), ".2f"), x, ledger, _row_note(r)])
    out = table(["dims", "mode", "ops", "phase", "batch", "img", "ms/step", "img/s", "peak GB",
                 "× vs eager", "ledger est. ms", "note"], body)
    led_err = next((r["ledger"] for r in rows if r.get("ledger")), None)
    out += ["", "ops: `torch` = the PyTorch modules, `fused` = the fused ops (evidential "
            "uncertainty, UPG head, losses). Synthetic device data, bf16 autocast and "
            "channels-last on CUDA; ms/step = back-to-back steps with one sync at the end "
            "(`ucseg_fast.train.bench.bench_step`); × vs eager = eager ms/step of the same dims, "
            "ops and phase / this one."]
    if led_err:
        out.append(f"Ledger estimates: {led_err}")
    else:
        card = next((r.get("ledger_card") for r in rows if r.get("ledger_card")), None)
        if card:
            out.append(f"Ledger: the `ucseg_fast.bench.ledger` estimate for {card}: one CUDA "
                       "graph for graph / compile rows, the eager lower bound for eager rows.")
    return out


def _render_components(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "backend" in r]
    if not rows:
        return []
    body = [[shape_str(r.get("shape")), r.get("classes"), r["backend"], num(r.get("ms"), ".3f"),
             r.get("mode", DASH), {True: "yes", False: "**no**"}.get(r.get("matches_scipy"), DASH),
             _row_note(r)] for r in rows]
    return table(["labels", "classes", "backend", "ms/call", "timing", "same as scipy", "note"],
                 body) + ["", "Per batch item and class, the largest fully connected component "
                          "(the pseudo-label `nms` rule) of realistic pseudo-labels (smooth "
                          "class fields + 2 % speckle). `scipy` includes the copies to the host "
                          "and back (the reference's path); the PyTorch fallback syncs every "
                          "iteration, so it is timed as eager launches."]


def _op_table(rows: list[dict], ref_provider: str) -> list[str]:
    refs = {(r["op"], r["pass"], r["shape_name"]): r.get("us") for r in rows
            if r.get("provider") == ref_provider and r.get("status") == "ok"}
    body = []
    for r in rows:
        ref = refs.get((r["op"], r["pass"], r["shape_name"]))
        x = (f"{ref / r['us']:.2f}×" if ref and r.get("us") and r["provider"] != ref_provider
             else DASH)
        body.append([r["op"], r["pass"], shape_str(r.get("shape")), r.get("dtype"), r["provider"],
                     num(r.get("us")), sig(r.get("gbps")), sig(r.get("pct_copy")),
                     num(r.get("peak_mb"), ".0f"), x, r.get("mode", DASH), _row_note(r)])
    return table(["op", "pass", "shape", "dtype", "provider", "µs/call", "GB/s", "% of copy",
                  "peak MB", f"× vs {ref_provider}", "timing", "note"], body)


def _render_ops(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "op" in r]
    if not rows:
        return []
    return _op_table(rows, "reference_eager") + [
        "", "GB/s over the op's minimal bytes (each input read and each output written once per "
        "pass); % of copy against the copy bandwidth above. Working sets that fit in L2 can stay "
        "there across back-to-back calls, so more than 100 % means L2 hits. `cps_step`: both "
        "subnets' entropy pseudo-labels + masked CE + Dice, forward + backward; `ours_fused` is "
        "`cross_pseudo_label_loss`."]


def _render_upg(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "op" in r]
    if not rows:
        return []
    out = _op_table(rows, "eager")
    precs = sorted({f"{r['dot_precision']} ({r['dtype']})" for r in rows if r.get("dot_precision")})
    out += ["", "`upg_head`: the fusion head on (z1, z2, A), train mode; `upg_whole`: both "
            "subnets' uncertainty + cross-attention + head, logits to P (`fused_tokens`: "
            "UPG.forward_fused_tokens). Forward + backward."]
    if precs:
        out.append("Fused head dot products: " + ", ".join(precs) + ".")
    return out


def _render_data(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "backend" in r]
    if not rows:
        return []
    step = (rep["parts"].get("step") or {}).get("rows", [])
    fastest = max((r.get("img_per_s") or 0 for r in step if r.get("dims") == 2
                   and r.get("status") == "ok"), default=0)
    body = []
    for r in rows:
        ips = r.get("img_per_s")
        body.append([r.get("dataset"), r["backend"], r.get("batch", DASH),
                     shape_str(r.get("img", DASH)), num(r.get("batches_per_s"), ".1f"),
                     num(ips, ".0f"), f"{ips / fastest:.1f}×" if ips and fastest else DASH,
                     _row_note(r)])
    out = table(["data", "backend", "batch", "img", "batches/s", "img/s",
                 "× fastest 2D step", "note"], body)
    out += ["", "Training batches (augmented, on the training device) from "
            "`ucseg_fast.data.factory.build_train_stream`, back-to-back with one sync per round."
            + (f" × fastest 2D step = img/s / the fastest 2D step's img/s above ({fastest:.0f})."
               if fastest else "")]
    return out


def _render_equality(rec: dict, rep: dict) -> list[str]:
    rows = rec.get("rows", [])
    runs = [r for r in rows if r.get("kind") == "run"]
    if not runs:
        return []
    cmp_ = next((r for r in rows if r.get("kind") == "compare"), None)
    noise = next((r for r in rows if r.get("kind") == "noise"), None)
    out = [f"{len(runs[0]['losses'])} steps of the ACDC recipe on {rec.get('data', 'the data')}, "
           f"phase 2 from step {runs[0].get('phase2_from')}, identical seeds per run."]
    if cmp_:
        out.append(f"- graph vs eager: max relative difference of L "
                   f"**{num(cmp_['max_rel_diff'], '.2e')}** ({cmp_['identical_steps']} of "
                   f"{len(cmp_['rel_diff'])} steps bit-identical)")
    if noise:
        out.append(f"- eager vs eager (run-to-run noise): {num(noise['max_rel_diff'], '.2e')} "
                   f"({noise['identical_steps']} bit-identical)")
    for r in runs:
        if r.get("runner_mode") != r.get("mode"):
            out.append(f"- note: the {r['mode']} run ran as {r.get('runner_mode')}")
    if cmp_:
        out += [""] + table(["step", "L eager", "L graph", "rel. diff"],
                            [[t, f"{a:.6f}", f"{b:.6f}", num(d, ".1e")] for t, (a, b, d) in
                             enumerate(zip(runs[0]["losses"], runs[1]["losses"], cmp_["rel_diff"]))])
    return out


def _render_e2e(rec: dict, rep: dict) -> list[str]:
    r = next((r for r in rec.get("rows", []) if r.get("curve") is not None), None)
    if r is None:
        return []
    out = [f"{r.get('config')} on {r.get('device')}, step mode {r.get('step_mode')}, batch "
           f"{r.get('batch')}: {r.get('iterations')} iterations in {num(r.get('wall_s'))} s "
           f"({num(r.get('train_s'))} s of steps, validation "
           f"{num(100 * (r.get('val_share') or 0), '.0f')} %); best validation Dice "
           f"**{num(r.get('best_val_dice'), '.4f')}** at "
           f"iteration {r.get('best_iteration')} (curve: `{r.get('out_dir')}/dice_vs_time.png`)", ""]
    out += table(["iteration", "wall s", "train s", "val Dice"],
                 [[c.get("iteration"), num(c.get("wall_s")), num(c.get("train_s")),
                   num(c.get("val_dice"), ".4f")] for c in r["curve"]])
    return out


RENDERERS = {"environment": _render_environment, "copy": _render_copy, "step": _render_step,
             "components": _render_components, "ops": _render_ops, "upg": _render_upg,
             "data": _render_data, "equality": _render_equality, "e2e": _render_e2e}


def render_markdown(rep: dict) -> str:
    env = (rep["parts"].get("environment") or {}).get("env") or {}
    card = env.get("gpu") or "CPU (no CUDA device)"
    out = [f"# ucseg-fast bench report — {card}", "",
           f"{rep.get('started')}; budget {rep.get('minutes')} min, "
           f"{rep.get('elapsed_s', 0):.0f} s used"
           + ("; **smoke run (tiny shapes): the numbers are not benchmarks**"
              if rep.get("smoke") else "")
           + ("" if rep.get("finished") else "; **incomplete (still running or stopped)**"), ""]
    summary = []
    for name in PART_ORDER:
        rec = rep["parts"].get(name)
        if rec is None:
            summary.append([name, "not run", DASH, DASH, ""])
            continue
        summary.append([name, rec.get("status"), num(rec.get("budget_s"), ".0f"),
                        num(rec.get("seconds"), ".0f"), rec.get("reason") or ""])
    out += table(["part", "status", "budget s", "used s", "reason"], summary) + [""]
    for name in PART_ORDER:
        rec = rep["parts"].get(name)
        if rec is None:
            continue
        out += [f"## {rec.get('title', name)}", ""]
        st = _status_line(rec)
        try:
            body = RENDERERS[name](rec, rep)
        except Exception as e:  # noqa: BLE001 -- one odd record must not hide the rest
            body = [f"could not render: {_err(e)}"]
        if st:
            out += [st, ""]
        out += [f"- {n}" for n in rec.get("notes", [])]
        if rec.get("notes"):
            out.append("")
        if body:
            out += body + [""]
        elif not st:
            out += ["no results", ""]
    return "\n".join(out).rstrip() + "\n"


def main_report(out: str, data: str | None, minutes: float, smoke: bool) -> int:
    """The CLI's `bench report`: run, then print report.md."""
    run_report(out, data=data, minutes=minutes, smoke=smoke)
    md = (Path(out) / "report.md").read_text()
    print(md)
    print(f"wrote {Path(out) / 'report.md'} and {Path(out) / 'report.json'}")
    return 0


if __name__ == "__main__":  # the child side of run_isolated
    sys.exit(_worker_main(sys.argv[1:]))
