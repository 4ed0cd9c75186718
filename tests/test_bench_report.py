"""`ucseg-fast bench report` on CPU: the smoke run writes report.md / report.json with every
part present (run, skipped with a reason, or failed with a reason), a part that raises is
recorded and the rest goes on, the budget is respected, the child-process isolation (hard
timeout, crash) works, and the GPU parts' code paths (rendering of GPU rows, the ledger column,
the equality worker) are exercised without a GPU."""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from ucseg_fast.bench import report
from ucseg_fast.bench.report import isolation, parts, render, workers
from ucseg_fast.cli import main

ALLOWED = {"ok", "partial", "skipped", "failed", "timeout"}
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


def _load(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _ctx(tmp_path, *, seconds: float, smoke=True, cuda=False, isolate=False) -> report.Ctx:
    rec: dict = {"rows": [], "notes": []}
    return report.Ctx(name="t", deadline=time.time() + seconds, cuda=cuda, smoke=smoke,
                      isolate=isolate, out=tmp_path, work=tmp_path / "work", data=None,
                      record=rec, save=lambda: None, shared={})


@needs_no_cuda
def test_cli_smoke_report_has_every_part(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["bench", "report", "--out", str(out), "--smoke", "--minutes", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# ucseg-fast bench report") and "report.json" in printed
    rep = _load(out)
    # the budget holds: parts start only inside it (one measurement may end a little after)
    assert rep["finished"] and rep["smoke"] and rep["elapsed_s"] <= 75
    assert list(rep["parts"]) == list(report.PART_ORDER)
    for name, rec in rep["parts"].items():
        assert rec["status"] in ALLOWED, name
        if rec["status"] != "ok":
            assert rec.get("reason"), name
        for r in rec.get("rows", []):  # every row measured, or says why not
            if r.get("status", "ok") != "ok":
                assert r.get("reason"), (name, r)
    parts = rep["parts"]

    def measured(name):  # rows of a part, less those a busy machine pushed out of the budget
        return [r for r in parts[name]["rows"]
                if not str(r.get("reason", "")).startswith("out of budget")]
    assert parts["environment"]["env"]["torch"] == torch.__version__
    assert parts["equality"]["status"] == "skipped"
    assert parts["equality"]["reason"].startswith("no CUDA device")
    assert parts["e2e"]["status"] == "skipped" and "--data" in parts["e2e"]["reason"]
    assert parts["copy"]["rows"][0]["gbps"] > 0
    steps = [r for r in measured("step") if r["status"] == "ok"]
    assert {(r["mode"], r["ops"], r["phase"]) for r in steps} <= {("eager", "torch", 1),
                                                                  ("eager", "torch", 2)}
    assert steps and all(r["ms_per_step"] > 0 for r in steps)
    for r in steps:  # beside each measured step: the ledger's estimate, or why there is none
        assert "ledger_est_ms" in r or r["ledger"].startswith("ledger unavailable")
    skipped = [r for r in measured("step") if r["status"] != "ok"]
    assert skipped and all(r["reason"].startswith("no CUDA device") for r in skipped)
    cc = [r for r in measured("components") if r["status"] == "ok"]
    assert {r["backend"] for r in cc} >= {"torch", "scipy"} and all(r["matches_scipy"] for r in cc)
    ops_rows = measured("ops")
    assert ops_rows and all(r["status"] == "ok" and r["us"] > 0 for r in ops_rows)
    assert {r["op"] for r in ops_rows} <= {op for op, _ in report.REPORT_OPS}
    assert all(r["provider"] == "reference_eager" for r in ops_rows)  # no interpreter timings
    assert all(r["status"] == "ok" for r in measured("upg"))
    data = {r["backend"]: r for r in measured("data")}
    assert all(r["status"] in ("ok", "n/a") for r in data.values())
    assert all(r["img_per_s"] > 0 for r in data.values() if r["status"] == "ok")
    md = (out / "report.md").read_text()
    for title in report.PART_TITLES.values():
        assert f"## {title}" in md
    assert "smoke run" in md and "skipped: no CUDA device" in md


def test_failing_part_is_recorded_and_the_rest_continues(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("boom in components")

    def quick(ctx):
        ctx.add({"status": "ok", "what": ctx.name})
    monkeypatch.setitem(report.PARTS, "components", boom)
    for name in ("step", "ops", "upg", "copy", "equality"):
        monkeypatch.setitem(report.PARTS, name, quick)
    out = tmp_path / "rep"
    rep = report.run_report(out, smoke=True, minutes=1, isolate=False, log=lambda s: None)
    comp = rep["parts"]["components"]
    assert comp["status"] == "failed" and comp["reason"] == "RuntimeError: boom in components"
    assert "boom in components" in comp["traceback"]
    assert rep["parts"]["data"]["status"] == "ok"  # the parts after it ran
    assert rep["parts"]["ops"]["rows"] == [{"status": "ok", "what": "ops"}]
    saved = _load(out)
    assert saved["parts"]["components"]["status"] == "failed" and saved["finished"]
    assert "**failed**: RuntimeError: boom in components" in (out / "report.md").read_text()


def test_tiny_budget_skips_parts_with_a_reason(tmp_path):
    out = tmp_path / "rep"
    t0 = time.time()
    assert main(["bench", "report", "--out", str(out), "--smoke", "--minutes", "0.01"]) == 0
    assert time.time() - t0 < 20
    parts = _load(out)["parts"]
    assert parts["environment"]["status"] == "ok"
    for name in ("copy", "step", "components", "ops", "upg", "data"):
        if torch.cuda.is_available() and name not in parts:
            continue
        # skipped as a whole, or started with a sliver of time: a row may fit, the rest is
        # skipped with the reason (how much fits depends on the machine's load)
        assert parts[name]["status"] in ("skipped", "partial"), name
        assert "out of budget" in parts[name]["reason"], name


@needs_no_cuda
def test_without_cuda_and_without_smoke_gpu_parts_say_why(tmp_path):
    rep = report.run_report(tmp_path / "rep", minutes=1, log=lambda s: None)
    for name, rec in rep["parts"].items():
        if name == "environment":
            assert rec["status"] == "ok"
        elif name == "e2e":
            assert rec["status"] == "skipped" and "--data" in rec["reason"]
        else:
            assert rec["status"] == "skipped" and rec["reason"].startswith("no CUDA device"), name


def test_step_part_checks_the_budget_before_each_config(tmp_path):
    ctx = _ctx(tmp_path, seconds=0.3)
    parts._part_step(ctx)
    rows = ctx.record["rows"]
    assert len(rows) == len(report.step_configs(False, True))
    eager2d = [r for r in rows if r["mode"] == "eager" and r["ops"] == "torch" and r["dims"] == 2]
    assert eager2d and all(r["status"] == "skipped" and r["reason"].startswith("out of budget")
                           for r in eager2d)
    assert report.part_status(ctx.record) == "skipped"


def test_step_part_puts_the_ledger_estimate_beside_each_row(tmp_path, monkeypatch):
    seen = []

    class Ledger:
        def __init__(self, cfg, card):
            self.cfg, self.card = cfg, card

        def to_dict(self):
            fused = self.cfg.model.upg_head == "fused"
            return {"card": {"name": f"{self.card} datasheet"}, "phases": {
                "1": {"kernels": 100 + fused, "est_ms": 1.5, "eager_ms": 4.0},
                "2": {"kernels": 200 + fused, "est_ms": 2.5}}}

    def step_ledger(cfg, *, card):
        seen.append((cfg.model.upg_head, cfg.model.uncertainty, cfg.loss.fused_losses,
                     cfg.train.step_mode, card, cfg.spec.dims))
        return Ledger(cfg, card)
    monkeypatch.setitem(sys.modules, "ucseg_fast.bench.ledger",
                        types.SimpleNamespace(step_ledger=step_ledger))

    def fake_step(emit, deadline, **cfg):
        emit({"status": "ok", "ms_per_step": 10.0 if cfg["mode"] == "eager" else 5.0,
              "img_per_s": 2 * cfg["labeled_bs"] / 0.01, "device": "fake"})
    monkeypatch.setattr(workers, "w_step", fake_step)
    monkeypatch.setattr(parts, "graph_nms", lambda cuda: (True, None))
    # the CUDA plan (in this process, with the step faked): every config measured
    ctx = _ctx(tmp_path, seconds=3600, smoke=False, cuda=True)
    ctx.shared["env"] = {"card": "H100"}
    parts._part_step(ctx)
    rows = ctx.record["rows"]
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    # graph / compile rows: the one-graph estimate; eager rows: the eager bound when given
    got = {(r["ops"], r["phase"], r["mode"] == "eager", r["ledger_est_ms"], r["ledger_kernels"])
           for r in rows}
    assert got == {("torch", 1, True, 4.0, 100), ("torch", 1, False, 1.5, 100),
                   ("torch", 2, True, 2.5, 200), ("torch", 2, False, 2.5, 200),
                   ("fused", 1, True, 4.0, 101), ("fused", 1, False, 1.5, 101),
                   ("fused", 2, True, 2.5, 201), ("fused", 2, False, 2.5, 201)}
    # one ledger per (recipe, ops), after the measurements
    assert sorted(seen) == sorted([("torch", "torch", False, "eager", "H100", 2),
                                   ("fused", "fused", True, "eager", "H100", 2),
                                   ("torch", "torch", False, "eager", "H100", 3)])
    md = render._render_step(ctx.record, {"parts": {}})
    assert any("1.50 (100 kernels)" in line and "2.00×" in line for line in md)
    assert any("H100 datasheet" in line for line in md)


def test_ledger_failure_is_a_reason_not_an_error(monkeypatch):
    def broken(cfg, *, card):
        raise KeyError("no such card")
    monkeypatch.setitem(sys.modules, "ucseg_fast.bench.ledger",
                        types.SimpleNamespace(step_ledger=broken))
    assert workers.ledger_estimate(2, False, "cpu", True) == {"error": "KeyError: 'no such card'"}


def test_isolated_worker_ok_crash_and_hard_timeout(tmp_path, monkeypatch):
    work = tmp_path / "w"
    target = "ucseg_fast.bench.report.workers:w_selftest"
    got = []
    res = report.run_isolated(target, {"rows": 2}, deadline=time.time() + 60, work=work,
                              label="ok", on_row=got.append)
    assert res.status == "ok" and len(res.rows) == 2 and got == res.rows
    assert res.rows[0]["pid"] != os.getpid()
    res = report.run_isolated(target, {"fail": True}, deadline=time.time() + 60, work=work,
                              label="fail")
    assert res.status == "failed" and "selftest failure" in res.reason and len(res.rows) == 1
    monkeypatch.setattr(isolation, "_GRACE_S", 0.2)
    t0 = time.time()
    res = report.run_isolated(target, {"sleep": 60}, deadline=time.time() + 2, work=work,
                              label="hang")
    assert res.status == "timeout" and "budget" in res.reason
    assert time.time() - t0 < 15


def test_in_process_worker_statuses():
    target = "ucseg_fast.bench.report.workers:w_selftest"
    ok = report.run_in_process(target, {"rows": 3}, deadline=time.time() + 5)
    assert ok.status == "ok" and len(ok.rows) == 3
    bad = report.run_in_process(target, {"fail": True}, deadline=time.time() + 5)
    assert bad.status == "failed" and bad.reason == "RuntimeError: selftest failure"
    late = report.run_in_process("ucseg_fast.bench.report.workers:w_data",
                                 {"root": "/nonexistent", "dataset": "x", "backend": "torch",
                                  "smoke": True}, deadline=time.time() - 1)
    assert late.status == "timeout" and late.reason.startswith("out of budget")


def test_equality_worker_runs_on_cpu(tmp_path):
    """The GPU part's worker, eager vs eager on CPU: identical seeds give identical losses."""
    from ucseg_fast.data.synthetic import write_synthetic_acdc
    root = write_synthetic_acdc(tmp_path / "acdc", n_train_patients=5, slices_per_volume=4,
                                n_val=1, n_test=0, size=(64, 64))
    rows = []
    tiny = ["--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
            "--data.labeled_patients=3", "--train.amp='none'", "--train.channels_last=false",
            "--loss.queue_size=16", "--train.max_val_volumes=1"]
    workers.w_equality(rows.append, time.time() + 120, root=str(root), out=str(tmp_path / "o"),
                       steps=3, switch=1, modes=("eager", "eager"), nms=True, overrides=tiny)
    runs = [r for r in rows if r["kind"] == "run"]
    cmp_ = next(r for r in rows if r["kind"] == "compare")
    assert len(runs) == 2 and all(r["phase2_from"] == 1 for r in runs)
    assert runs[0]["losses"] == runs[1]["losses"] and cmp_["max_rel_diff"] == 0.0
    assert cmp_["identical_steps"] == 3


def test_render_markdown_of_gpu_results():
    """A report as a CUDA run leaves it: ratios and tables are computed from the rows."""
    step_row = dict(dims=2, ops="torch", phase=1, batch="12+12", img=256, status="ok")
    rep = {"started": "now", "minutes": 8, "elapsed_s": 400, "finished": True, "smoke": False,
           "parts": {
               "environment": {"status": "ok", "title": "Environment", "env": {
                   "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gb": 85.0, "sm_count": 132,
                   "capability": "9.0", "driver": "580", "package": "0.1.0", "torch": "2.13",
                   "triton": "3.7.1", "dali": None, "cuda": "13.0", "cudnn": 91000,
                   "python": "3.12", "git": "abc", "host": "h",
                   "native": {"loaded": True, "cuda_kernels": True, "reason": None}}},
               "copy": {"status": "ok", "title": "Device copy bandwidth", "rows": [
                   {"gbps": 3000.0, "us": 179.0, "nbytes": 2**28, "mode_text": "graph"}]},
               "step": {"status": "partial", "reason": "1 of 3 rows not measured",
                        "title": "Training step", "rows": [
                            dict(step_row, mode="eager", ms_per_step=60.0, img_per_s=400.0,
                                 peak_mem_gb=5.0, ledger_est_ms=30.0, ledger_kernels=900),
                            dict(step_row, mode="graph", ms_per_step=30.0, img_per_s=800.0),
                            dict(step_row, mode="compile", status="timeout",
                                 reason="stopped at the budget after 60 s")]},
               "ops": {"status": "ok", "title": "Fused ops", "rows": [
                   {"op": "cps_step", "pass": "fwd_bwd", "shape_name": "a", "shape": [12, 4, 256, 256],
                    "dtype": "bf16", "provider": "reference_eager", "us": 400.0, "gbps": 300.0,
                    "pct_copy": 10.0, "mode": "graph", "status": "ok"},
                   {"op": "cps_step", "pass": "fwd_bwd", "shape_name": "a", "shape": [12, 4, 256, 256],
                    "dtype": "bf16", "provider": "ours", "us": 100.0, "gbps": 1200.0,
                    "pct_copy": 40.0, "mode": "graph", "status": "ok"}]},
               "equality": {"status": "ok", "title": "Graph vs eager equality", "data": "synthetic",
                            "rows": [
                                {"kind": "run", "mode": "eager", "runner_mode": "eager",
                                 "phase2_from": 1, "losses": [1.0, 2.0]},
                                {"kind": "run", "mode": "graph", "runner_mode": "graph",
                                 "phase2_from": 1, "losses": [1.0, 2.0002]},
                                {"kind": "compare", "rel_diff": [0.0, 1e-4], "max_rel_diff": 1e-4,
                                 "identical_steps": 1}]},
               "e2e": {"status": "ok", "title": "Time to Dice", "rows": [
                   {"config": "acdc_2d", "device": "H100", "step_mode": "graph", "batch": "12+12",
                    "iterations": 500, "train_s": 30.0, "best_val_dice": 0.8, "best_iteration": 400,
                    "out_dir": "x", "curve": [{"iteration": 0, "train_s": 0.0, "val_dice": 0.1}]}]},
           }}
    md = report.render_markdown(rep)
    assert md.startswith("# ucseg-fast bench report — NVIDIA H100 80GB HBM3")
    assert "| 2D | graph | torch | 1 | 12+12 | 256² | 30.00 | 800 | – | 2.00× |" in md
    assert "30.00 (900 kernels)" in md and "timeout: stopped at the budget after 60 s" in md
    assert "| cps_step | fwd_bwd | 12×4×256×256 | bf16 | ours | 100.0 | 1200 | 40 |" in md
    assert "4.00×" in md and "**3000 GB/s**" in md
    assert "max relative difference of L **1.00e-04**" in md
    assert "best validation Dice **0.8000**" in md
    assert "| components | not run |" in md  # a part missing from the record is said so


def test_step_configs_put_the_important_rows_first():
    cfgs = report.step_configs(True, False)
    assert len(cfgs) == 16
    first = [(c["dims"], c["mode"], c["fused"], c["phase2"]) for c in cfgs[:4]]
    assert first == [(2, "eager", False, False), (2, "graph", False, False),
                     (2, "eager", True, False), (2, "graph", True, False)]
    modes = [c["mode"] for c in cfgs]
    assert modes.index("compile") > max(i for i, c in enumerate(cfgs) if c["dims"] == 2
                                        and c["mode"] != "compile")
    assert all(c["labeled_bs"] == (12 if c["dims"] == 2 else 2) for c in cfgs)


def test_ledger_config_matches_the_measured_step():
    """The ledger is asked about the step that was measured (recipe, batch, size, ops, nms)."""
    for dims, fused in ((2, False), (2, True), (3, False)):
        cfg = workers.ledger_config(dims, fused, smoke=False, nms=False)
        assert cfg.spec.dims == dims
        assert cfg.data.img_size == ((256, 256) if dims == 2 else (96, 96, 96))
        assert cfg.data.labeled_bs == cfg.data.unlabeled_bs == (12 if dims == 2 else 2)
        ops = "fused" if fused else "torch"
        assert (cfg.model.upg_head, cfg.model.uncertainty) == (ops, ops)
        assert cfg.loss.fused_losses is fused and cfg.loss.nms is False
    assert workers.ledger_config(2, False, smoke=True, nms=True).data.img_size == (32, 32)
