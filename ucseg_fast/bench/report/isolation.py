"""Running one measurement of `bench report` so that its failure stays local.

A worker is a function `fn(emit, deadline, **kwargs)` named "module:function": it emits result
rows (JSON-able dicts) and checks the deadline before each measurement (`check_budget`,
`fits`), raising `BudgetExceeded` when its share of the budget is spent. `run_in_process` calls
it here; `run_isolated` runs it in a child Python process (`python -m ucseg_fast.bench.report
--worker ...`, whose side is `worker_main`) and kills the child's whole process group when it
outlives the deadline by more than a few seconds: a hang, a crash or a sticky CUDA error ends
that child only. Either way the result is a `CallResult` (ok | failed | timeout, with a reason)
holding the rows emitted before any failure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_ROOT = Path(__file__).resolve().parents[3]  # the folder that holds the ucseg_fast package


class BudgetExceeded(RuntimeError):
    """A measurement did not start: the part's share of the budget is spent."""


def error_line(e: BaseException, width: int = 240) -> str:
    """'XxxError: the first line of its message', for a row's or a part's reason."""
    lines = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {lines[0][:width]}" if lines else type(e).__name__)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Interrupt|Failure|Exit)\b")


def last_error(text: str, width: int = 240) -> str:
    """The last exception line of a log ("XxxError: ..."), else its last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC_LINE.search(ln):
            return ln[:width]
    return lines[-1][:width] if lines else ""


@dataclass
class CallResult:
    """What a worker call left: its rows, how it ended and why, how long it ran."""
    rows: list[dict]
    status: str            # ok | failed | timeout
    reason: str | None
    seconds: float


def _resolve(target: str) -> Callable:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def run_in_process(target: str, kwargs: dict, *, deadline: float,
                   on_row: Callable[[dict], None] | None = None) -> CallResult:
    """`target` in this process; the worker itself checks the deadline."""
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
        return CallResult(rows, "failed", error_line(e), time.time() - t0)


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
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
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


def worker_main(argv: list[str]) -> int:
    """The child side of `run_isolated`: run the worker, append its rows to the rows file."""
    p = argparse.ArgumentParser(description="one isolated measurement of `bench report`")
    p.add_argument("--worker", required=True)
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--rows", required=True)
    p.add_argument("--deadline", type=float, required=True)
    a = p.parse_args(argv)
    if a.worker.endswith(":w_ledger"):
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


def check_budget(deadline: float, what: str, need_s: float = 0.0) -> None:
    """BudgetExceeded unless `need_s` seconds are left before `deadline`."""
    left = deadline - time.time()
    if left < need_s or left <= 0:
        raise BudgetExceeded(f"out of budget before {what} ({max(left, 0):.0f} s left)")


def fits(deadline: float, need_s: float) -> bool:
    """Whether `need_s` seconds are left before `deadline`."""
    return deadline - time.time() >= need_s


def free_memory() -> None:
    """Collect garbage and give cached CUDA memory back, between measurements."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

