"""benchmarks/tools/gpu_check.sh + summarize.py: the one prepared GPU check and its Markdown
summary, checked on CPU: summarize.py on synthetic pytest-benchmark JSON / CLI JSON / junit XML
(table contents, ratios against the baseline of the same run, missing stages "not run", failing
tests listed), the script's syntax and plan, and a CPU smoke run of one cheap stage."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "tools" / "gpu_check.sh"
SUMMARIZE = REPO / "benchmarks" / "tools" / "summarize.py"

_spec = importlib.util.spec_from_file_location("gpu_check_summarize", SUMMARIZE)
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# ------------------------------------------------------------------------------ synthetic runs
def bench_json(rows: list[tuple[str, dict, float]]) -> dict:
    """pytest-benchmark --benchmark-json layout: (name, extra_info, median seconds)."""
    return {"machine_info": {"node": "vm"}, "commit_info": {}, "datetime": "2026-11-26T00:00:00",
            "version": "5.3.1",
            "benchmarks": [{"group": None, "name": n, "fullname": f"benchmarks/x.py::{n}", "params": {},
                            "param": None, "extra_info": e, "options": {},
                            "stats": {"min": m, "max": m, "mean": m, "stddev": 0.0, "median": m,
                                      "rounds": 10, "iterations": 10}} for n, e, m in rows]}


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(str(c) for c in r) for r in [header] + rows) + "\n")


def step_json(dims, phase, mode, ms, **kw) -> dict:
    bs = 12 if dims == 2 else 2
    d = {"device": "NVIDIA H100 80GB HBM3", "mode": mode, "phase": phase, "batch": f"{bs}+{bs}",
         "img": 256 if dims == 2 else 96, "dims": dims, "nms": True, "ms_per_step": ms,
         "img_per_s": 2 * bs / (ms / 1e3), "loss": 5.0, "torch": "2.11.0+cu130",
         "gpu_util": 97.0, "gpu_mem_gb": 5.0, "power_w": 600.0, "peak_mem_gb": 3.8}
    d.update(kw)
    return d


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest"
 errors="1" failures="1" skipped="1" tests="4" time="3.0">
<testcase classname="tests.test_a" name="test_ok" file="tests/test_a.py" line="3" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[x-1]" file="tests/test_a.py" line="9" time="0.1">
  <failure message="AssertionError: 1 != 2&#10;more">trace</failure></testcase>
<testcase classname="tests.test_b.TestK" name="test_err" file="tests/test_b.py" line="4" time="0.1">
  <error message="failed on setup with &quot;RuntimeError: CUDA error: an illegal memory access&quot;">x</error></testcase>
<testcase classname="tests.test_c" name="test_skip" file="tests/test_c.py" line="1" time="0.0">
  <skipped type="pytest.skip" message="ACDC subset not found">tests/test_c.py:1: ACDC subset not found</skipped></testcase>
</testsuite></testsuites>
"""


@pytest.fixture
def full_run(tmp_path) -> Path:
    """An out dir whose raw/ holds every stage's files (data failed, deps not run)."""
    raw = tmp_path / "out" / "raw"
    raw.mkdir(parents=True)
    (raw / "env.json").write_text(json.dumps({
        "gpu": "NVIDIA H100 80GB HBM3", "nvidia_smi": "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04",
        "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda_runtime": "13.0", "python": "3.12.3",
        "python_exe": "python3", "host": "gpu", "date": "today", "git_rev": "abc123", "git_dirty_files": 0,
        "tree_hash": "0123456789abcdef", "smoke": False, "pytest_benchmark": "plugin",
        "stages": ["deps", "native", "gpu_tests", "step", "ops", "upg", "data"]}))
    write_tsv(raw / "stages.tsv", ["stage", "status", "rc", "seconds", "note"], [
        ["env", "ok", 0, 4, ""], ["native", "ok", 0, 30, "CUDA arch 90-real; library with CUDA kernels loaded: yes"],
        ["gpu_tests", "failed", 1, 80, "1 failed, 1 passed, 1 skipped, 1 error in 3.0s"],
        ["step", "failed", 1, 150, "7 run, 1 failed/timed out, 1 not run (budget)"],
        ["ops", "ok", 0, 50, "30 passed"], ["upg", "ok", 0, 40, "20 passed"],
        ["data", "ok", 0, 12, "3 passed"]])
    (raw / "native").mkdir()
    (raw / "native" / "status.json").write_text(json.dumps({
        "path": "/r/build/native_gpu_check/libucseg_native.so", "loaded": True, "has_cuda": True,
        "reason": None, "cuda_device": True}))
    (raw / "native" / "ctest.log").write_text("100% tests passed, 0 tests failed out of 2\n")
    (raw / "gpu_tests").mkdir()
    (raw / "gpu_tests" / "junit.xml").write_text(JUNIT)
    step = raw / "step"
    step.mkdir()
    for (dims, phase, mode, ms) in [(2, 1, "eager", 100.0), (2, 1, "graph", 50.0), (2, 1, "compile", 80.0),
                                    (2, 2, "eager", 130.0), (3, 1, "eager", 400.0), (3, 1, "graph", 300.0)]:
        text = json.dumps(step_json(dims, phase, mode, ms), indent=1)
        if (dims, mode) == (3, "graph"):
            text = "some log line on stdout\n" + text  # the JSON is found after other output
        (step / f"{dims}d-{mode}-p{phase}.json").write_text(text)
    (step / "3d-eager-p2.log").write_text("Traceback (most recent call last):\n  File x\n"
                                          "StepTimeout: config time limit reached\n")
    (step / "2d-graph-p2.json").write_text("")
    (step / "2d-graph-p2.log").write_text("Traceback (most recent call last):\n  ...\n"
                                          "RuntimeError: CUDA graph capture failed\n")
    write_tsv(step / "runs.tsv", ["config", "status", "rc", "seconds", "note"], [
        ["2d-eager-p1", "ok", 0, 12, ""], ["2d-eager-p2", "ok", 0, 12, ""], ["2d-graph-p1", "ok", 0, 20, ""],
        ["2d-graph-p2", "failed", 1, 15, ""], ["3d-eager-p1", "ok", 0, 20, ""],
        ["3d-graph-p1", "ok", 0, 25, "nms off: graph capture needs the native CC library"],
        ["2d-compile-p1", "ok", 0, 90, ""], ["2d-compile-p2", "skipped", "-", 0, "budget: 3s left in the stage"],
        ["3d-eager-p2", "timeout", 124, 75, ""], ["2d-eagr-p1", "failed", 2, 0, "bad config name"]])
    acdc, la = [12, 4, 256, 256], [2, 2, 96, 96, 96]
    ev = dict(op="evidential_uncertainty", shape=acdc, dtype="bf16", **{"pass": "fwd"})
    cps = dict(op="cps_step", shape=acdc, dtype="bf16", **{"pass": "fwd_bwd"})
    ops = [("test_copy_bandwidth", dict(op="copy", shape=[32, 4, 512, 512], dtype="fp32", provider="torch",
                                        gbps=3000.0, median_ms=0.1), 1e-4),
           ("ev-eager", dict(ev, provider="reference_eager"), 2e-4),
           ("ev-comp", dict(ev, provider="reference_compiled"), 1e-4),
           ("ev-ours", dict(ev, provider="ours", gbps=1500.0, frac_of_copy=0.5, backend_ran="triton"), 5e-5),
           ("cps-comp", dict(cps, provider="reference_compiled"), 4e-4),
           ("cps-comp-graph", dict(cps, provider="reference_compiled_graph"), 2e-4),
           ("cps-ours", dict(cps, provider="ours", gbps=300.0, backend_ran="triton"), 2e-4),
           ("cps-fused-graph", dict(cps, provider="ours_fused_graph", gbps=600.0), 5e-5),
           ("la-eager", dict(ev, shape=la, provider="reference_eager"), 3e-4),
           ("la-ours", dict(ev, shape=la, provider="ours", gbps=900.0, frac_of_copy=0.3), 1e-4)]
    (raw / "ops").mkdir()
    (raw / "ops" / "bench_ops.json").write_text(json.dumps(bench_json(ops)))
    head = dict(op="upg_head", shape=[24, 4, 256, 256], dtype="bf16", pass_="fwd_bwd")
    upg = [("h-eager", dict(head, provider="eager", peak_mem_mb=100.0), 8e-3),
           ("h-comp", dict(head, provider="compiled", peak_mem_mb=50.0), 5e-3),
           ("h-fused", dict(head, provider="fused", peak_mem_mb=25.0, dot_precision="tf32"), 2.5e-3)]
    (raw / "upg").mkdir()
    (raw / "upg" / "bench_upg.json").write_text(json.dumps(bench_json(upg)))
    data = [("test_acdc_torch_cache", dict(provider="torch_cache", workload="acdc", batch=24,
                                           img_size=[256, 256], data="random", samples_per_s=2400.0), 0.01)]
    (raw / "data").mkdir()
    (raw / "data" / "bench_data.json").write_text(json.dumps(bench_json(data)))
    L = [6.0, 6.0, 4.0, 4.0]
    curves = {"config": "acdc_2d", "device": "NVIDIA H100 80GB HBM3", "steps": 4, "batch": "12+12",
              "img_size": [256, 256], "amp": "bf16", "phase2_start": 2,
              "curves": {"oracle": {"ms_per_step": 80.0, "terms": {"L": L}},
                         "fused": {"ms_per_step": 60.0, "terms": {"L": [6.0, 6.0, 4.4, 4.4]}},
                         "oracle_fp32": {"ms_per_step": 150.0, "terms": {"L": [6.0, 6.0, 4.04, 4.04]}}},
              "comparison": {"baseline": "oracle", "noise_variant": "oracle_fp32", "noise_floor": 0.01,
                             "window": 2, "tolerance": 0.02,
                             "variants": {"fused": {"deviation": 0.1, "within": False},
                                          "oracle_fp32": {"deviation": 0.01, "within": True}}}}
    (raw / "curves").mkdir()
    (raw / "curves" / "curves.json").write_text(json.dumps(curves))
    (raw / "e2e").mkdir()
    (raw / "e2e" / "dice_vs_time.json").write_text(json.dumps({
        "config": "acdc_2d", "device": "NVIDIA H100 80GB HBM3", "step_mode": "graph", "batch": "12+12",
        "img_size": [256, 256], "iterations": 300, "train_s": 9.0, "minutes": 3, "best_val_dice": 0.5,
        "best_iteration": 300, "curve": [{"iteration": 300, "train_s": 9.0, "val_dice": 0.5}]}))
    (raw / "e2e" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 0, "val_dice": 0.0},
        {"iteration": 100, "step_ms": 900.0, "data_wait_ms": 50.0, "gpu_util": 10.0},  # warm-up: left out
        {"iteration": 200, "step_ms": 30.0, "data_wait_ms": 0.2, "gpu_util": 96.0},
        {"iteration": 300, "step_ms": 32.0, "data_wait_ms": 0.6, "gpu_util": 94.0}]) + "\nnot json\n")
    return tmp_path / "out"


def row_of(md: str, *cells: str) -> str:
    """The one Markdown table row that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [ln for ln in md.splitlines() if ln.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


# ------------------------------------------------------------------------------ summarize.py
def test_summary_of_a_full_run(full_run, capsys):
    assert summarize.main([str(full_run)]) == 0
    md = capsys.readouterr().out
    assert (full_run / "summary.md").read_text() == md

    # header: card, versions, revision, native library
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.11.0+cu130, triton 3.6.0" in md
    assert "git abc123" in md and "CUDA kernels loaded from" in md and "100% tests passed" in md
    assert "SMOKE" not in md

    # GPU tests: counts, failing ids with their messages, skip reasons
    assert "**1 passed, 1 failed, 1 errors, 1 skipped**" in md
    assert "`tests/test_a.py::test_bad[x-1]` (failed): AssertionError: 1 != 2" in md
    assert "`tests/test_b.py::TestK::test_err` (error)" in md and "illegal memory access" in md
    assert "1× ACDC subset not found" in md
    assert "test_ok`" not in md  # passing tests are not listed

    # step: ratios against eager of the same dims and phase
    r = row_of(md, "2D", "1", "graph")
    assert "| 50.0 |" in r and "| 480 |" in r and "2.00×" in r and "| 97 |" in r and "| 3.80 |" in r
    assert "1.25×" in row_of(md, "2D", "1", "compile")
    assert "1.00×" in row_of(md, "2D", "2", "eager")
    r3 = row_of(md, "3D", "1", "graph")
    assert "1.33×" in r3 and "96³" in r3 and "nms off" in r3  # vs the 3D eager step, not the 2D one
    failed = row_of(md, "2D", "2", "graph")
    assert "failed (rc 1" in failed and "RuntimeError: CUDA graph capture failed" in failed
    assert row_of(md, "2D", "2", "compile").endswith("| not run (budget: 3s left in the stage) |")
    assert "timeout (rc 124, 75 s) StepTimeout: config time limit reached" in row_of(md, "3D", "2", "eager")
    assert "configs not understood (want e.g. 2d-eager-p1): 2d-eagr-p1" in md
    # modes in the order eager, compile, graph within one dims/phase
    assert md.index("| 2D | 1 | eager |") < md.index("| 2D | 1 | compile |") < md.index("| 2D | 1 | graph |")

    # ops: providers side by side, × vs the compiled reference, graph providers vs the graph one
    assert "device copy bandwidth: **3000 GB/s**" in md
    ev = row_of(md, "evidential_uncertainty", "12×4×256×256", "bf16", "fwd")
    assert "| 200.0 (0.50×) | 100.0 |" in ev and "| 50.0 (2.00×) |" in ev
    assert "| ours | 1500 | 50 | triton |" in ev
    cps = row_of(md, "cps_step", "12×4×256×256", "bf16", "fwd_bwd")
    assert "| 200.0 (2.00×) |" in cps             # ours vs reference_compiled (400 µs)
    assert "| 50.0 (4.00×) |" in cps and "8.00×" not in cps  # ours_fused_graph vs reference_compiled_graph
    assert "| ours_fused_graph | 600 | 20 |" in cps  # % of copy from the copy row when not recorded
    la = row_of(md, "evidential_uncertainty", "2×2×96×96×96", "bf16", "fwd")
    assert "×)" not in la and "| 100.0 |" in la   # no compiled reference at this shape: no ratio
    assert "| ours | 900 | 30 |" in la

    # UPG: × vs compiled, peak memory per provider
    h = row_of(md, "upg_head", "24×4×256×256", "bf16", "fwd_bwd")
    assert "| 8.000 (0.62×) | 5.000 | 2.500 (2.00×) |" in h and "100 / 50 / 25" in h
    assert "Fused head dot products: tf32 for bf16." in md

    # loss curves: window means, deviation from the baseline, the verdict against the floor
    assert "noise floor 1.00e-02 (`oracle_fp32`); tolerance 2.00e-02" in md
    assert row_of(md, "oracle") == "| oracle | 80.0 | 6.0000 | 4.0000 | – | baseline |"
    assert row_of(md, "fused") == "| fused | 60.0 | 6.0000 | 4.4000 | 1.00e-01 | **no** |"
    assert row_of(md, "oracle_fp32").endswith("| 1.00e-02 | noise floor |")

    # time to accuracy: the data wait per step and GPU utilisation after the first window
    assert ("Training windows after the first (2): step 31.0 ms mean; **data wait per step 0.40 ms "
            "mean, 0.60 ms max** (1.3% of the step); GPU utilisation 95% mean") in md
    assert "best validation Dice **0.5000** at iteration 300" in md

    # data: samples/s and the ratio to the fastest 2D step of the same run (480 img/s)
    d = row_of(md, "acdc", "torch_cache")
    assert "| 2400 |" in d and "5.0×" in d

    # stages: the recorded ones with their status; selected but absent ones "not run"
    assert row_of(md, "deps").startswith("| deps | not run |")
    assert row_of(md, "gpu_tests").startswith("| gpu_tests | failed | 1 |")


def test_key_last_order(full_run, capsys):
    summarize.main([str(full_run), "--key-last"])
    printed = capsys.readouterr().out
    written = (full_run / "summary.md").read_text()
    assert sorted(printed.splitlines()) == sorted(written.splitlines())
    assert printed.index("## Fused ops") < printed.index("# ucseg-fast GPU check") < printed.index("## Training step")
    assert written.index("# ucseg-fast GPU check") < written.index("## Training step") < written.index("## Fused ops")


def test_missing_stages_are_reported_not_run(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "step").mkdir(parents=True)
    (raw / "env.json").write_text(json.dumps({"stages": ["step"], "smoke": True, "gpu": None}))
    write_tsv(raw / "stages.tsv", ["stage", "status", "rc", "seconds", "note"],
              [["env", "ok", 0, 1, ""], ["step", "ok", 0, 3, ""], ["ops", "skipped", "-", 0, "budget: 9s left"],
               ["data", "failed", 1, 4, "2 failed"]])
    (raw / "step" / "2d-eager-p1.json").write_text(json.dumps(step_json(2, 1, "eager", 80.0)))
    assert summarize.main([str(raw), "--no-write"]) == 0
    md = capsys.readouterr().out
    assert not (raw / "summary.md").exists()
    assert "SMOKE RUN" in md
    sections = md.split("\n## ")
    sec = {s.splitlines()[0].split(" (")[0]: s for s in sections[1:]}
    assert "\nnot run" in sec["GPU tests"] and "\nnot run" in sec["UPG"]
    assert "not run (skipped: budget: 9s left)" in sec["Fused ops"]
    assert "no results — stage failed (rc 1" in sec["Data pipelines"]
    assert "| 2D | 1 | eager |" in sec["Training step"]
    assert row_of(md, "native").startswith("| native | not run |")
    assert row_of(md, "gpu_tests").startswith("| gpu_tests | not run |")
    assert "Connected components" not in md and "Time to accuracy" not in md  # optional stages absent


def test_gpu_tests_from_the_log_when_junit_is_missing(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "gpu_tests").mkdir(parents=True)
    (raw / "gpu_tests" / "pytest.log").write_text(
        "collecting ... collected 9 items / 5 deselected / 4 selected\n\n"
        "tests/test_a.py::test_one PASSED                                    [ 25%]\n"
        "tests/test_a.py::test_two[p-1] FAILED                               [ 50%]\n"
        "tests/test_b.py::test_three SKIPPED (needs a CUDA device)           [ 75%]\n"
        "tests/test_b.py::test_four \n"
        "FAILED tests/test_a.py::test_two[p-1] - AssertionError: off by one\n")
    write_tsv(raw / "stages.tsv", ["stage", "status", "rc", "seconds", "note"], [["gpu_tests", "timeout", 124, 110, ""]])
    summarize.main([str(raw), "--no-write"])
    md = capsys.readouterr().out
    assert "**1 passed, 1 failed, 1 errors, 1 skipped**" in md and "verbose log" in md
    assert "`tests/test_a.py::test_two[p-1]` (failed): AssertionError: off by one" in md
    assert "`tests/test_b.py::test_four` (error): pytest stopped while this test ran" in md
    assert "stage timeout (rc 124)" in md


def test_interrupted_test_is_named_next_to_the_junit(tmp_path, capsys):
    """A stage cut by SIGINT writes junit for the finished tests; the log names the one running."""
    raw = tmp_path / "raw"
    (raw / "gpu_tests").mkdir(parents=True)
    (raw / "gpu_tests" / "junit.xml").write_text(JUNIT)
    (raw / "gpu_tests" / "pytest.log").write_text(
        "tests/test_a.py::test_ok PASSED                                    [ 20%]\n"
        "tests/test_d.py::test_hangs \n!!!!!!! KeyboardInterrupt !!!!!!!\n")
    summarize.main([str(raw), "--no-write"])
    md = capsys.readouterr().out
    assert "**1 passed, 1 failed, 2 errors, 1 skipped**" in md and "from the junit XML" in md
    assert "`tests/test_d.py::test_hangs` (error): pytest stopped while this test ran" in md


def test_bench_step_pytest_benchmark_json(tmp_path, capsys):
    """bench_step.py's pytest-benchmark JSON (STEP via pytest) gives the same table."""
    raw = tmp_path / "raw"
    (raw / "step").mkdir(parents=True)
    rows = [("test_step[phase1-eager]", dict(mode="eager", phase=1, batch="12+12", img=256, peak_mem_gb=3.8), 0.1),
            ("test_step[phase1-graph]", dict(mode="graph", phase=1, batch="12+12", img=256, peak_mem_gb=3.9), 0.04),
            ("test_step_3d[phase1-eager]", dict(mode="eager", phase=1, batch="2+2", img="96^3", dims=3), 0.5)]
    (raw / "step" / "bench_step.json").write_text(json.dumps(bench_json(rows)))
    summarize.main([str(raw), "--no-write"])
    md = capsys.readouterr().out
    r = row_of(md, "2D", "1", "graph")
    assert "| 40.0 |" in r and "| 600 |" in r and "2.50×" in r
    assert "| 8 |" in row_of(md, "3D", "1", "eager")  # img/s from batch 2+2 and the median


def test_summary_from_the_packed_bundle(full_run, tmp_path, capsys):
    bundle = tmp_path / "gpu_check.tar.gz"
    with tarfile.open(bundle, "w:gz") as tf:
        tf.add(full_run / "raw", arcname="raw")
    summarize.main([str(bundle), "--no-write", "--raw-name", "the bundle"])
    md = capsys.readouterr().out
    assert "| 50.0 (4.00×) |" in md and "raw files: the bundle" in md
    assert not (tmp_path / "summary.md").exists()


def test_tree_hash(tmp_path):
    (tmp_path / "ucseg_fast" / "__pycache__").mkdir(parents=True)
    (tmp_path / "ucseg_fast" / "a.py").write_text("x = 1\n")
    h = summarize.tree_hash(tmp_path)
    (tmp_path / "ucseg_fast" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("numbers")
    assert summarize.tree_hash(tmp_path) == h  # caches and results do not count
    (tmp_path / "ucseg_fast" / "a.py").write_text("x = 2\n")
    assert summarize.tree_hash(tmp_path) != h


# ------------------------------------------------------------------------------ gpu_check.sh
@needs_bash
def test_script_syntax_and_plan():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("STAGES", "BUDGET_S", "OUT")}
    plan = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0
    for stage in ("deps", "native", "gpu_tests", "step", "ops", "upg", "curves", "data"):
        assert f"  {stage} cap " in plan.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "native,nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr
    head = SCRIPT.read_text().split("set -o pipefail")[0]
    assert 'run(command="bash benchmarks/tools/gpu_check.sh", carry=[".gpu"], timeout_s=590)' in head


def _smoke(tmp_path, **env_over) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "device_out"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STAGES", "STEP_", "CAP_", "BUDGET_S", "GPU_CHECK_", "E2E_"))}
    env.update(GPU_CHECK_SMOKE="1", OUT=str(out), GPU_CHECK_PYTHON=sys.executable, **env_over)
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    return res, out


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


@needs_bash
@pytest.mark.skipif(not _has_torch(), reason="needs torch")
def test_smoke_run_step_stage(tmp_path):
    """GPU_CHECK_SMOKE=1 with $OUT set (device mode): tiny eager steps on CPU in the in-process
    runner, one config made to crash its process (GPU_CHECK_STEP_FAIL=...:crash) so a fresh
    process runs the rest; the files the device returns (at most 8, packed); summary last."""
    res, out = _smoke(tmp_path, STAGES="step", STEP_CONFIGS="2d-eager-p1,2d-graph-p1,2d-eager-p2",
                      GPU_CHECK_STEP_FAIL="2d-graph-p1:crash")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.tar.gz", "run.log", "summary.md"]
    md = (out / "summary.md").read_text()
    # printed with the key sections last (the device returns the output's end); the file in order
    tail = res.stdout[res.stdout.rindex("## Fused ops"):]
    assert "# ucseg-fast GPU check" in tail and tail.rstrip().endswith(md.rstrip().splitlines()[-1])
    assert tail.index("## Stages") < tail.index("## Training step")
    assert md.index("## Training step") < md.index("## Fused ops")
    assert "SMOKE RUN" in md and "| step | failed | 1 |" in md and "2 ok, 1 failed" in md
    assert "| 2D | 1 | eager | 1+1 | 32² |" in md and "| 2D | 2 | eager | 1+1 | 32² |" in md
    assert "crashed (rc 3" in row_of(md, "2D", "1", "graph")
    with tarfile.open(out / "gpu_check.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"raw/stages.tsv", "raw/env.json", "raw/step/2d-eager-p1.json", "raw/step/2d-eager-p2.json",
            "raw/step/runs.tsv", "raw/step/driver.1.log", "raw/step/driver.2.log", "raw/summary.md"} <= names


@needs_bash
@pytest.mark.skipif(not _has_torch(), reason="needs torch")
def test_budget_skips_stages_without_aborting(tmp_path):
    res, out = _smoke(tmp_path, STAGES="step,ops", BUDGET_S="30")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (out / "summary.md").read_text()
    assert row_of(md, "env").startswith("| env | ok |")
    for stage in ("step", "ops"):
        assert row_of(md, stage).startswith(f"| {stage} | skipped |") and "budget" in row_of(md, stage)


@needs_bash
@pytest.mark.skipif(not _has_torch(), reason="needs torch")
def test_smoke_run_curves_stage(tmp_path):
    """The curves stage on CPU: `bench curves` (2 tiny steps, oracle and fused UPG) on the ACDC
    subset, its JSON packed and its table in the summary."""
    from conftest import ACDC_ROOT
    if not (ACDC_ROOT / "train_slices.list").exists() and not (REPO / ".gpu" / "ACDC").exists():
        pytest.skip(f"ACDC subset not found at {ACDC_ROOT}")
    res, out = _smoke(tmp_path, STAGES="curves", UCSEG_DATA=str(ACDC_ROOT.parent))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (out / "summary.md").read_text()
    assert row_of(md, "curves").startswith("| curves | ok | 0 |"), md
    assert "| oracle |" in md and row_of(md, "fused").endswith("| yes |")
    with tarfile.open(out / "gpu_check.tar.gz") as tf:
        assert {"raw/curves/curves.json", "raw/curves/curves.png", "raw/curves/curves.log"} <= set(tf.getnames())
