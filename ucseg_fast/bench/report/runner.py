"""`run_report`: every part of `bench report` within the ``--minutes`` budget, report.json
rewritten after every measurement and report.md after every part.

Each part gets a share of the budget, taken from what is left when it starts (its weight over
the weights of the parts still to run), so time a part does not use goes to the later ones; a
part whose share is below its minimum is skipped with the reason. A part that raises or runs
out of time is recorded with its reason and the report goes on. Without CUDA every GPU part is
skipped ("no CUDA device") unless it is a smoke run, which runs the CPU-capable parts at tiny
shapes.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .isolation import BudgetExceeded, error_line
from .parts import PART_ORDER, PART_TITLES, PARTS, Ctx
from .render import render_markdown
from .workers import NO_CUDA

# shares of the budget (of what is left when the part starts)
PART_WEIGHTS = {"copy": 2, "step": 38, "components": 6, "ops": 14, "upg": 9, "data": 8,
                "equality": 11, "e2e": 12}
# a part whose share is below this is skipped (seconds; CUDA / CPU smoke)
PART_MIN_S = {"copy": (8, 0.5), "step": (20, 2), "components": (10, 0.5), "ops": (15, 0.5),
              "upg": (15, 0.5), "data": (10, 0.5), "equality": (25, 2), "e2e": (40, 3)}
CUDA_ONLY = {"equality"}  # no CPU smoke form


def _benign(row: dict) -> bool:
    """Not measured because it does not apply here (not available / no CUDA device)."""
    return row.get("status") == "n/a" or (row.get("status") == "skipped"
                                          and str(row.get("reason", "")).startswith(NO_CUDA))


def part_status(rec: dict) -> str:
    """A part's status from its rows: ok, partial, skipped, timeout or failed (rows that do not
    apply here do not count)."""
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


def _rows_reason(rec: dict) -> str | None:
    """Why a part is not ok: how many of its rows were not measured, and the first reasons."""
    bad = [r for r in rec.get("rows", []) if r.get("status") not in (None, "ok") and not _benign(r)]
    if not bad:
        return None
    reasons = list(dict.fromkeys(f"{r['status']}: {r.get('reason')}" for r in bad))
    return f"{len(bad)} of {len(rec['rows'])} rows not measured ({'; '.join(reasons[:3])})"


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
                rec["status"] = part_status(rec)
                if rec["status"] != "ok":
                    rec["reason"] = _rows_reason(rec)
            except BudgetExceeded as e:
                rec.update(status="timeout", reason=str(e))
            except Exception as e:  # noqa: BLE001 -- recorded; the report goes on
                rec.update(status="failed", reason=error_line(e),
                           traceback=traceback.format_exc(limit=6)[-2000:])
            rec["seconds"] = round(time.time() - t0, 1)
            save()
            _atomic_write(out / "report.md", render_markdown(rep))
        rep["finished"] = True
        save()
    md = render_markdown(rep)
    _atomic_write(out / "report.md", md)
    return rep


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


def main_report(out: str, data: str | None, minutes: float, smoke: bool) -> int:
    """The CLI's `bench report`: run, then print report.md."""
    run_report(out, data=data, minutes=minutes, smoke=smoke)
    md = (Path(out) / "report.md").read_text()
    print(md)
    print(f"wrote {Path(out) / 'report.md'} and {Path(out) / 'report.json'}")
    return 0
