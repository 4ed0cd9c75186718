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

Modules, in the order a report runs: `runner` (the budget loop, report.json / report.md),
`parts` (what each part measures, planned against its share), `isolation` (a measurement in this
process or in a child with a hard timeout), `workers` (the measurements), `render` (report.md).
"""
from __future__ import annotations

from .isolation import (BudgetExceeded, CallResult, last_error, run_in_process, run_isolated,
                        worker_main)
from .parts import PART_ORDER, PART_TITLES, PARTS, Ctx, graph_nms, step_configs, synthetic_root
from .render import DASH, cell, num, render_markdown, shape_str, sig, table
from .runner import main_report, part_status, run_report
from .workers import NO_CUDA, REPORT_OPS

__all__ = ["BudgetExceeded", "CallResult", "Ctx", "DASH", "NO_CUDA", "PARTS", "PART_ORDER",
           "PART_TITLES", "REPORT_OPS", "cell", "graph_nms", "last_error", "main_report", "num",
           "part_status", "render_markdown", "run_in_process", "run_isolated", "run_report",
           "shape_str", "sig", "step_configs", "synthetic_root", "table", "worker_main"]
