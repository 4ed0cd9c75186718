"""Markdown summary of a `benchmarks/tools/gpu_check.sh` run (standard library only).

    python benchmarks/tools/summarize.py OUT_DIR            # OUT_DIR/raw/... -> prints, writes OUT_DIR/summary.md
    python benchmarks/tools/summarize.py gpu_check.tar.gz --no-write
    python benchmarks/tools/summarize.py RAW_DIR --write FILE [--key-last]
    python benchmarks/tools/summarize.py --tree-hash [ROOT]  # content hash of the code (compare runs)

Reads what the stages wrote: raw/stages.tsv, env.json, native/status.json + ctest.log,
gpu_tests/junit.xml (or the verbose pytest.log when the XML is missing), step/*.json (CLI JSON of
`ucseg-fast bench step`) + step/runs.tsv and any pytest-benchmark JSON of bench_step,
ops/bench_ops.json, upg/bench_upg.json, curves/curves.json (`ucseg-fast bench curves`),
data/bench_data.json, native_bench/bench_native.json, e2e/dice_vs_time.json. Ratios always compare rows measured in the same run: step modes against
eager of the same dims and phase, ops against `reference_compiled` (CUDA-graph providers against
`reference_compiled_graph` when present) of the same op / shape / dtype / pass, UPG providers
against `compiled`. A stage that left nothing is reported as "not run" (or with its status).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

STAGE_ORDER = ["env", "deps", "native", "gpu_tests", "step", "ops", "upg", "curves", "data", "native_bench",
               "e2e"]
DEFAULT_STAGES = ["env", "native", "gpu_tests", "step", "ops", "upg", "curves", "data"]
MODE_ORDER = {"eager": 0, "compile": 1, "graph": 2}
OPS_PROVIDERS = ["reference_eager", "reference_compiled", "reference_compiled_graph", "ours",
                 "ours_fused", "ours_fused_graph"]
UPG_PROVIDERS = ["eager", "compiled", "fused", "fused_tokens"]
DASH = "–"

# ------------------------------------------------------------------------------------ helpers
_HASH_DIRS = ("ucseg_fast", "benchmarks", "kernels", "tests", "configs")
_HASH_FILES = ("CMakeLists.txt", "pyproject.toml", "Makefile")
_HASH_SKIP_DIRS = {"__pycache__", "results", ".pytest_cache", ".benchmarks"}
_HASH_SKIP_SUFFIX = (".pyc", ".so", ".o")


def tree_hash(root: str | os.PathLike) -> str:
    """sha256 (16 hex) over the code files' relative paths and contents: the same value here and
    on the device machine when the same files travelled (benchmarks/results is left out)."""
    root = Path(root)
    files = [root / f for f in _HASH_FILES if (root / f).is_file()]
    for d in _HASH_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = sorted(n for n in dirnames if n not in _HASH_SKIP_DIRS)
            files += [Path(dirpath) / n for n in filenames if not n.endswith(_HASH_SKIP_SUFFIX)]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def load_json(path: Path):
    """json.load, or the first JSON object in a text with other lines around it; None if none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"^\{", text, re.M):
        try:
            return dec.raw_decode(text[m.start():])[0]
        except ValueError:
            continue
    return None


def read_tsv(path: Path) -> list[dict]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    if not lines:
        return []
    head = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        if line.strip():
            parts = line.split("\t")
            rows.append(dict(zip(head, parts + [""] * (len(head) - len(parts)))))
    return rows


def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def num(x, fmt: str = ".1f") -> str:
    try:
        return DASH if x is None else format(float(x), fmt)
    except (TypeError, ValueError):
        return DASH


def ratio(base, x) -> float | None:
    try:
        return float(base) / float(x) if base and x else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def shape_str(s) -> str:
    return "×".join(str(v) for v in s) if isinstance(s, (list, tuple)) else str(s)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Interrupt|Failure|Exit)\b")
_ERR_WORD = re.compile(r"(Error|Exception|error:|Killed|FAILED)")


def last_error(path: Path, width: int = 150) -> str:
    """The last exception line of a log ("XxxError: ..."), else the last line naming an error,
    else its last non-empty line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for pattern in (_EXC_LINE, _ERR_WORD):
        for ln in reversed(lines):
            if pattern.search(ln):
                return ln[:width]
    return lines[-1][:width] if lines else ""


def e2e_speed(path: Path) -> str | None:
    """One line from the trainer's metrics.jsonl (log windows): step time, the data wait per step
    and GPU utilisation over the windows after the first (cuDNN autotuning / graph capture)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    recs = []
    for ln in lines:
        try:
            r = json.loads(ln)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step_ms"), (int, float)):
            recs.append(r)
    if len(recs) > 1:
        recs = recs[1:]
    if not recs:
        return None

    def stat(key):
        v = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return (sum(v) / len(v), max(v)) if v else None
    step, wait, util = stat("step_ms"), stat("data_wait_ms"), stat("gpu_util")
    out = f"Training windows after the first ({len(recs)}): step {step[0]:.1f} ms mean"
    if wait:
        out += (f"; **data wait per step {wait[0]:.2f} ms mean, {wait[1]:.2f} ms max** "
                f"({100 * wait[0] / max(step[0], 1e-9):.1f}% of the step)")
    if util:
        out += f"; GPU utilisation {util[0]:.0f}% mean"
    return out


def bench_rows(path: Path) -> list[dict]:
    """pytest-benchmark JSON -> rows: extra_info + name + params + median_ms (stats median)."""
    data = load_json(path)
    rows = []
    for b in (data or {}).get("benchmarks", []) if isinstance(data, dict) else []:
        r = dict(b.get("extra_info") or {})
        r["_name"] = b.get("name", "")
        r["_params"] = b.get("params") or {}
        st = b.get("stats") or {}
        if st.get("median") is not None:
            r["median_ms"] = 1e3 * float(st["median"])
            r["_rounds"] = st.get("rounds")
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------ the run
class Run:
    def __init__(self, raw: Path, raw_name: str | None = None):
        self.raw = raw
        self.raw_name = raw_name or str(raw)
        self.env = load_json(raw / "env.json") or {}
        self.stages = {r["stage"]: r for r in read_tsv(raw / "stages.tsv") if r.get("stage")}

    def stage_line(self, name: str, results_hint: str) -> str:
        """What to say when a section has no results."""
        st = self.stages.get(name)
        if st is None:
            return "not run"
        note = f": {st['note']}" if st.get("note") else ""
        if st.get("status") == "skipped":
            return f"not run (skipped{note})"
        if st.get("status") == "ok":
            smoke = " (smoke runs time nothing: --benchmark-disable)" if self.env.get("smoke") else ""
            return f"no timed results — stage ok (rc 0, {st.get('seconds')} s){note}{smoke}; see {results_hint}"
        return f"no results — stage {st.get('status')} (rc {st.get('rc')}, {st.get('seconds')} s){note}; see {results_hint}"

    # -------------------------------------------------------------------- header and stages
    def header(self) -> list[str]:
        e = self.env
        out = ["# ucseg-fast GPU check", ""]
        if not e:
            out.append("- environment: not recorded (env stage missing)")
        else:
            card = e.get("gpu") or "no CUDA device"
            smi = e.get("nvidia_smi")
            out.append(f"- card: {card}" + (f" (nvidia-smi: {smi})" if smi else ""))
            out.append(f"- torch {e.get('torch')}, triton {e.get('triton')}, CUDA {e.get('cuda_runtime')}, "
                       f"python {e.get('python')} ({e.get('python_exe')}), host {e.get('host')}, {e.get('date')}")
            rev = e.get("git_rev") or "unknown (no .git there; pass GPU_CHECK_GIT_REV)"
            dirty = e.get("git_dirty_files")
            out.append(f"- code: git {rev}" + (f" ({dirty} changed files)" if dirty else "")
                       + f"; tree hash {e.get('tree_hash')}; pytest-benchmark: {e.get('pytest_benchmark')}")
        out.append("- native CC library: " + self.native_line())
        if e.get("smoke"):
            out.append("- **SMOKE RUN** (GPU_CHECK_SMOKE=1: tiny shapes on CPU): the numbers below are not benchmarks")
        return out

    def native_line(self) -> str:
        st = load_json(self.raw / "native" / "status.json")
        stage = self.stages.get("native")
        if not st:
            return "status unknown (native stage not run)" if stage is None else \
                f"status unknown; native stage {stage.get('status')}: {stage.get('note')}"
        if st.get("has_cuda") and st.get("cuda_device"):
            s = f"CUDA kernels loaded from {st.get('path')}"
        elif st.get("loaded"):
            s = f"loaded without CUDA kernels ({st.get('path')}): connected components use the PyTorch fallback on the GPU"
        else:
            s = f"not available ({st.get('reason')}): connected components use the PyTorch fallback"
        ctest = self.raw / "native" / "ctest.log"
        if ctest.is_file():
            m = re.search(r"\d+% tests passed.*", ctest.read_text(errors="replace"))
            s += f"; ctest: {m.group(0).strip() if m else last_error(ctest)}"
        if stage and stage.get("note"):
            s += f"; stage: {stage.get('status')} — {stage.get('note')}"
        return s

    def stage_table(self) -> list[str]:
        selected = set(self.env.get("stages") or []) | {"env"}
        names = [s for s in STAGE_ORDER if s in self.stages or s in selected or s in DEFAULT_STAGES]
        names += [s for s in self.stages if s not in names]
        rows = []
        for s in names:
            st = self.stages.get(s)
            if st is None:
                rows.append([s, "not run", DASH, DASH, "not selected" if s not in selected else ""])
            else:
                rows.append([s, st.get("status"), st.get("rc"), st.get("seconds"), st.get("note", "")])
        return ["## Stages", ""] + table(["stage", "status", "rc", "s", "note"], rows)

    # -------------------------------------------------------------------- GPU tests
    def gpu_tests(self) -> list[str]:
        out = ["## GPU tests (`UCSEG_TEST_CUDA=1 pytest -m gpu tests`)", ""]
        d = self.raw / "gpu_tests"
        junit, logf = d / "junit.xml", d / "pytest.log"
        cases = parse_junit(junit) if junit.is_file() else None
        source = "junit XML"
        if cases is None and logf.is_file():
            cases = parse_pytest_log(logf)
            source = "verbose log (junit XML missing: pytest ended early)"
        if cases is None:
            return out + [self.stage_line("gpu_tests", "raw/gpu_tests/pytest.log")]
        if source == "junit XML" and logf.is_file():  # an interrupted run: the test it was in
            seen = {c["id"] for c in cases}
            cases += [c for c in parse_pytest_log(logf) or []
                      if c["id"] not in seen and c["message"].startswith("pytest stopped")]
        counts = Counter(c["outcome"] for c in cases)
        out.append(f"**{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                   f"{counts['skipped']} skipped** ({len(cases)} tests, from the {source})")
        st = self.stages.get("gpu_tests")
        if st and st.get("status") not in ("ok", None):
            out += ["", f"stage {st['status']} (rc {st['rc']}): {st.get('note', '')}"]
        bad = [c for c in cases if c["outcome"] in ("failed", "error")]
        if bad:
            out += ["", "failing:"]
            out += [f"- `{c['id']}` ({c['outcome']}): {c['message']}" for c in bad]
        skips = Counter(c["message"] for c in cases if c["outcome"] == "skipped")
        if skips:
            out += ["", "skip reasons: " + "; ".join(f"{n}× {m}" for m, n in skips.most_common(6))]
        return out

    # -------------------------------------------------------------------- step
    def step_results(self) -> tuple[dict, dict]:
        """({(dims, phase, mode): result}, {config: runs.tsv row})."""
        d = self.raw / "step"
        res: dict = {}
        runs = {r["config"]: r for r in read_tsv(d / "runs.tsv") if r.get("config")}
        if not d.is_dir():
            return res, runs
        for f in sorted(d.glob("*.json")):
            data = load_json(f)
            if isinstance(data, dict) and "benchmarks" in data:  # pytest-benchmark (bench_step.py)
                for r in bench_rows(f):
                    if r.get("median_ms") is None or "mode" not in r:
                        continue
                    dims = int(r.get("dims", 2))
                    bs = sum(int(v) for v in str(r.get("batch", "0+0")).split("+") if v.isdigit())
                    key = (dims, int(r.get("phase", 1)), r["mode"])
                    res.setdefault(key, {
                        "ms_per_step": r["median_ms"], "batch": r.get("batch"), "img": r.get("img"),
                        "img_per_s": r.get("img_per_s") or (bs / (r["median_ms"] / 1e3) if bs else None),
                        "peak_mem_gb": r.get("peak_mem_gb"), "nms": r.get("nms"), "dims": dims,
                        "_src": f"pytest-benchmark {f.name}"})
            elif isinstance(data, dict) and "ms_per_step" in data:  # CLI JSON
                key = (int(data.get("dims", 2)), int(data.get("phase", 1)), data.get("mode"))
                res[key] = dict(data, _src=f.name)
        return res, runs

    def step(self) -> list[str]:
        out = ["## Training step (`ucseg-fast bench step`: synthetic device data, bf16 autocast)", ""]
        res, runs = self.step_results()
        rows, keys = [], set(res)
        failed = {}
        for cfg, r in runs.items():
            m = re.match(r"([23])d-(eager|compile|graph)-p([12])$", cfg)
            if m and r.get("status") != "ok":
                key = (int(m.group(1)), int(m.group(3)), m.group(2))
                failed[key] = r
                keys.add(key)
        odd = [cfg for cfg in runs if not re.match(r"([23])d-(eager|compile|graph)-p([12])$", cfg)]
        if not keys:
            return out + [self.stage_line("step", "raw/step/")] + \
                ([f"configs not understood: {', '.join(odd)}"] if odd else [])
        for key in sorted(keys, key=lambda k: (k[0], k[1], MODE_ORDER.get(k[2], 9))):
            dims, phase, mode = key
            r = res.get(key)
            if r is None:
                fr = failed[key]
                cfg = f"{dims}d-{mode}-p{phase}"
                why = fr.get("note") or ""
                if fr.get("status") == "skipped":
                    what = f"not run ({why})" if why else "not run"
                else:
                    err = last_error(self.raw / "step" / f"{cfg}.log")
                    if err and err not in why:
                        why = (why + "; " if why else "") + err
                    what = f"{fr.get('status')} (rc {fr.get('rc')}, {fr.get('seconds')} s) {why}".strip()
                rows.append([f"{dims}D", phase, mode] + [DASH] * 8 + [what])
                continue
            eager = res.get((dims, phase, "eager"))
            sp = ratio(eager.get("ms_per_step") if eager else None, r.get("ms_per_step"))
            img = r.get("img")
            img = f"{img}{'³' if dims == 3 else '²'}" if isinstance(img, int) else (img or DASH)
            note = (runs.get(f"{dims}d-{mode}-p{phase}") or {}).get("note", "")
            util = r.get("gpu_util")
            peak, before = r.get("peak_mem_gb"), r.get("alloc_before_gb")
            if peak is not None and before:  # in-process runner: this config's own peak
                peak = peak - before
                if before > 0.05:
                    note = (note + "; " if note else "") + f"{before:.2f} GB held before this config"
            rows.append([f"{dims}D", phase, mode, r.get("batch", DASH), img, num(r.get("ms_per_step")),
                         num(r.get("img_per_s"), ".0f"), num(util, ".0f") if util is not None else DASH,
                         num(r.get("power_w"), ".0f"), num(peak, ".2f"),
                         f"{sp:.2f}×" if sp else DASH, note])
        out += table(["dims", "phase", "mode", "batch", "img", "ms/step", "img/s", "GPU util %",
                      "power W", "peak GB", "× vs eager", "note"], rows)
        if odd:
            out += ["", f"configs not understood (want e.g. 2d-eager-p1): {', '.join(odd)}"]
        dev = next((r.get("device") for r in res.values() if r.get("device")), None)
        out += ["", f"device: {dev or DASH}; × vs eager = eager ms/step of the same dims and phase in this run "
                     "/ this ms/step (> 1: faster)"]
        return out

    # -------------------------------------------------------------------- ops
    def ops(self) -> list[str]:
        out = ["## Fused ops (`bench_ops.py`)", ""]
        rows = bench_rows(self.raw / "ops" / "bench_ops.json")
        timed = [r for r in rows if r.get("median_ms") is not None]
        if not timed:
            return out + [self.stage_line("ops", "raw/ops/pytest.log")]
        copy = next((r for r in timed if r.get("op") == "copy"), None)
        copy_gbps = (copy or {}).get("gbps")
        if copy:
            out.append(f"device copy bandwidth: **{num(copy_gbps, '.0f')} GB/s** (read + write, "
                       f"{shape_str(copy.get('shape'))} {copy.get('dtype')}, {num(copy['median_ms'] * 1e3)} µs)")
            out.append("")
        groups: dict = {}
        for r in timed:
            if r.get("op") == "copy":
                continue
            key = (r.get("op"), shape_str(r.get("shape")), r.get("dtype"), r.get("pass", r.get("pass_", "")))
            groups.setdefault(key, {})[r.get("provider")] = r
        provs = [p for p in OPS_PROVIDERS if any(p in g for g in groups.values())]
        provs += sorted({p for g in groups.values() for p in g} - set(provs), key=str)
        trows = []
        for key, g in groups.items():
            cells = []
            for p in provs:
                r = g.get(p)
                if r is None:
                    cells.append(DASH)
                    continue
                base = ops_baseline(p, g)
                x = ratio(base["median_ms"], r["median_ms"]) if base is not None and base is not r else None
                cells.append(f"{r['median_ms'] * 1e3:.1f}" + (f" ({x:.2f}×)" if x else ""))
            ours = [r for p, r in g.items() if p and not str(p).startswith("reference")]
            best = min(ours, key=lambda r: r["median_ms"]) if ours else None
            if best is not None:
                frac = best.get("frac_of_copy")
                if frac is None and best.get("gbps") and copy_gbps:
                    frac = best["gbps"] / copy_gbps
                extra = [best.get("provider"), num(best.get("gbps"), ".0f"),
                         num(100 * frac, ".0f") if frac is not None else DASH]
            else:
                extra = [DASH] * 3
            extra.append((g.get("ours") or {}).get("backend_ran", DASH))
            trows.append(list(key) + cells + extra)
        out += table(["op", "shape", "dtype", "pass"] + [f"{p} µs" for p in provs]
                     + ["fastest ours", "GB/s", "% of copy", "`ours` ran"], trows)
        out += ["", "(×) = reference_compiled median / provider median, same op, shape, dtype and pass in this "
                    "run (> 1: faster); CUDA-graph providers (`*_graph`) against reference_compiled_graph. "
                    "GB/s over the op's minimal bytes; % of the copy bandwidth measured in the same run."]
        return out

    # -------------------------------------------------------------------- UPG
    def upg(self) -> list[str]:
        out = ["## UPG (`bench_upg.py`: fusion head and the whole UPG)", ""]
        rows = [r for r in bench_rows(self.raw / "upg" / "bench_upg.json") if r.get("median_ms") is not None]
        if not rows:
            return out + [self.stage_line("upg", "raw/upg/pytest.log")]
        groups: dict = {}
        for r in rows:
            key = (r.get("op"), shape_str(r.get("shape")), r.get("dtype"), r.get("pass_", r.get("pass", "")))
            groups.setdefault(key, {})[r.get("provider")] = r
        provs = [p for p in UPG_PROVIDERS if any(p in g for g in groups.values())]
        provs += sorted({p for g in groups.values() for p in g} - set(provs), key=str)
        trows = []
        for key, g in groups.items():
            base = g.get("compiled")
            cells, peaks = [], []
            for p in provs:
                r = g.get(p)
                if r is None:
                    cells.append(DASH)
                    peaks.append(DASH)
                    continue
                x = ratio(base["median_ms"], r["median_ms"]) if base is not None and r is not base else None
                cells.append(f"{r['median_ms']:.3f}" + (f" ({x:.2f}×)" if x else ""))
                peaks.append(num(r.get("peak_mem_mb"), ".0f"))
            trows.append(list(key) + cells + [" / ".join(peaks)])
        out += table(["op", "shape", "dtype", "pass"] + [f"{p} ms" for p in provs]
                     + ["peak MB (" + " / ".join(provs) + ")"], trows)
        out += ["", "(×) = compiled median / provider median, same op, shape, dtype and pass in this run "
                    "(> 1: faster); peak MB above the inputs."]
        precs = sorted({(str(r.get("dtype")), str(r["dot_precision"])) for r in rows if r.get("dot_precision")})
        if precs:
            out.append("Fused head dot products: " + ", ".join(f"{p} for {d}" for d, p in precs) + ".")
        return out

    # -------------------------------------------------------------------- data
    def data(self) -> list[str]:
        out = ["## Data pipelines (`bench_data.py`)", ""]
        rows = [r for r in bench_rows(self.raw / "data" / "bench_data.json") if r.get("median_ms") is not None]
        if not rows:
            return out + [self.stage_line("data", "raw/data/pytest.log")]
        res, _ = self.step_results()
        step_ips = max((r.get("img_per_s") or 0 for (dims, _, _), r in res.items() if dims == 2), default=0)
        trows = []
        for r in rows:
            sps = r.get("samples_per_s") or (r.get("batch", 0) / (r["median_ms"] / 1e3) if r.get("batch") else None)
            x = ratio(sps, step_ips) if step_ips else None
            trows.append([r.get("workload"), r.get("provider"), num(sps, ".0f"), num(r["median_ms"], ".2f"),
                          r.get("batch", DASH), shape_str(r.get("img_size", DASH)), r.get("data", DASH),
                          f"{x:.1f}×" if x else DASH])
        out += table(["workload", "provider", "samples/s", "ms/batch", "batch", "img", "data",
                      "× fastest 2D step"], trows)
        if step_ips:
            out += ["", f"× fastest 2D step = samples/s / the fastest 2D training step's img/s in this run "
                        f"({step_ips:.0f} img/s); the bar is ≥ 3×."]
        return out

    # -------------------------------------------------------------------- optional stages
    def native_bench(self) -> list[str] | None:
        f = self.raw / "native_bench" / "bench_native.json"
        if not f.is_file() and "native_bench" not in self.stages:
            return None
        out = ["## Connected components / surface distances (`bench_native.py`)", ""]
        rows = [r for r in bench_rows(f) if r.get("median_ms") is not None]
        if not rows:
            return out + [self.stage_line("native_bench", "raw/native_bench/pytest.log")]
        out += table(["workload", "op", "provider", "median ms", "rounds"],
                     [[r.get("workload"), r.get("op"), r.get("provider"), num(r["median_ms"], ".3f"),
                       r.get("_rounds", DASH)] for r in rows])
        return out

    def curves(self) -> list[str] | None:
        f = self.raw / "curves" / "curves.json"
        if not f.is_file() and "curves" not in self.stages:
            return None
        out = ["## Loss curves of variants (`bench curves`: fused UPG vs the PyTorch modules)", ""]
        d = load_json(f)
        if not isinstance(d, dict) or not isinstance(d.get("comparison"), dict):
            return out + [self.stage_line("curves", "raw/curves/curves.log")]
        c = d["comparison"]
        w = c.get("window") or 1
        floor = c.get("noise_floor")
        out.append(f"{d.get('config')} on {d.get('device')}, {d.get('steps')} steps, batch {d.get('batch')}, "
                   f"img {shape_str(d.get('img_size'))}, amp {d.get('amp')}, phase 2 from {d.get('phase2_start')}; "
                   f"L means over {w}-step windows relative to `{c.get('baseline')}`; noise floor "
                   + (f"{floor:.2e} (`{c.get('noise_variant')}`)" if isinstance(floor, (int, float)) else "none")
                   + f"; tolerance {num(c.get('tolerance'), '.2e')}")
        rows = []
        for name, cv in (d.get("curves") or {}).items():
            L = (cv.get("terms") or {}).get("L") or []
            wm = [sum(L[i:i + w]) / w for i in range(0, len(L) - w + 1, w)] or ([sum(L) / len(L)] if L else [])
            v = (c.get("variants") or {}).get(name)
            verdict = ("baseline" if v is None else "noise floor" if name == c.get("noise_variant")
                       else "yes" if v.get("within") else "**no**")
            rows.append([name, num(cv.get("ms_per_step"), ".1f"), num(wm[0], ".4f") if wm else DASH,
                         num(wm[-1], ".4f") if wm else DASH,
                         DASH if v is None else num(v.get("deviation"), ".2e"), verdict])
        out += [""] + table(["variant", "ms/step", "L first window", "L last window",
                             "max rel. deviation of L", "within"], rows)
        return out

    def e2e(self) -> list[str] | None:
        f = self.raw / "e2e" / "dice_vs_time.json"
        if not f.is_file() and "e2e" not in self.stages:
            return None
        out = ["## Time to accuracy (`bench e2e`)", ""]
        d = load_json(f)
        if not isinstance(d, dict):
            return out + [self.stage_line("e2e", "raw/e2e/e2e.log")]
        out.append(f"{d.get('config')} on {d.get('device')}, step mode {d.get('step_mode')}, batch {d.get('batch')}, "
                   f"img {shape_str(d.get('img_size'))}: {d.get('iterations')} iterations in "
                   f"{num(d.get('train_s'))} s of training ({d.get('minutes')} min budget); best validation Dice "
                   f"**{num(d.get('best_val_dice'), '.4f')}** at iteration {d.get('best_iteration')}")
        speed = e2e_speed(self.raw / "e2e" / "metrics.jsonl")
        if speed:
            out += ["", speed]
        curve = d.get("curve") or []
        if curve:
            out += [""] + table(["iteration", "train s", "val Dice"],
                                [[c.get("iteration"), num(c.get("train_s")), num(c.get("val_dice"), ".4f")]
                                 for c in curve[-8:]])
        return out

    def markdown(self, key_last: bool = False) -> str:
        """The summary; `key_last`: the per-op tables first and the header, stages, GPU tests and
        step table last (a console that keeps only the end of the output keeps those)."""
        key = [self.header, self.stage_table, self.gpu_tests, self.step]
        rest = [self.ops, self.upg, self.curves, self.data, self.native_bench, self.e2e]
        parts = rest + key if key_last else key + rest
        out: list[str] = []
        for fn in parts:
            try:
                lines = fn()
            except Exception as e:  # noqa: BLE001 -- one broken file must not hide the rest
                lines = [f"## {fn.__name__}", "", f"could not summarize: {type(e).__name__}: {e}"]
            if lines:
                out += lines + [""]
        out.append(f"raw files: {self.raw_name}")
        return "\n".join(out) + "\n"


def ops_baseline(provider: str, group: dict):
    if str(provider).endswith("_graph") and "reference_compiled_graph" in group:
        return group["reference_compiled_graph"]
    return group.get("reference_compiled")


# ------------------------------------------------------------------------------------ pytest results
def _first_line(s: str | None, width: int = 160) -> str:
    s = (s or "").strip()
    return s.splitlines()[0][:width] if s else ""


def parse_junit(path: Path) -> list[dict] | None:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    cases = []
    for tc in root.iter("testcase"):
        name, cls, file = tc.get("name", ""), tc.get("classname", ""), tc.get("file")
        if file:
            mod = file[:-3].replace("/", ".") if file.endswith(".py") else file
            rest = cls[len(mod) + 1:] if cls.startswith(mod + ".") else ""
            tid = f"{file}::{rest + '::' if rest else ''}{name}"
        else:
            tid = f"{cls}::{name}" if cls else name
        outcome, msg = "passed", ""
        for tag, oc in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = tc.find(tag)
            if el is not None:
                outcome = oc
                msg = _first_line(el.get("message") or el.text)
                break
        cases.append({"id": tid, "outcome": outcome, "message": msg})
    return cases


_LOG_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_LOG_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                "XFAIL": "skipped", "XPASS": "passed"}


def parse_pytest_log(path: Path) -> list[dict] | None:
    """`pytest -v` per-test lines (+ the short summary's messages) when no junit XML exists."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    cases: dict[str, dict] = {}
    running = None  # a test line without an outcome: the test pytest was in when it stopped
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m:
            tid, oc = m.group(1).strip(), _LOG_OUTCOME[m.group(2)]
            prev = cases.get(tid)
            if prev is None or oc in ("failed", "error"):  # setup ok + teardown error
                cases[tid] = {"id": tid, "outcome": oc, "message": ""}
            running = None
        elif re.match(r"^\S+\.py::\S", line):
            running = line.split()[0]
    if running and running not in cases:
        cases[running] = {"id": running, "outcome": "error",
                          "message": "pytest stopped while this test ran (timeout, crash or kill)"}
    for line in text.splitlines():
        m = re.match(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", line)
        if m and m.group(2) in cases:
            cases[m.group(2)]["message"] = (m.group(3) or "")[:160]
    if not cases:
        last = [ln for ln in text.splitlines() if ln.strip()]
        cases["(no test ran)"] = {"id": "(no test ran)", "outcome": "error",
                                  "message": last[-1][:160] if last else "empty log"}
    return list(cases.values())


# ------------------------------------------------------------------------------------ main
def find_raw(path: Path, tmp: Path) -> tuple[Path, Path]:
    """(raw dir, default summary.md target) for an out dir, a raw dir or a .tar.gz bundle (which
    is unpacked into `tmp`)."""
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            try:
                tf.extractall(tmp, filter="data")
            except TypeError:  # Python < 3.12 without extraction filters
                tf.extractall(tmp)  # noqa: S202 -- our own bundle
        raw = tmp / "raw" if (tmp / "raw").is_dir() else tmp
        return raw, path.parent / "summary.md"
    if (path / "raw").is_dir():
        return path / "raw", path / "summary.md"
    return path, path / "summary.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", help="gpu_check output dir, its raw/ dir, or gpu_check.tar.gz")
    p.add_argument("--write", metavar="FILE", help="write the Markdown here (default PATH/summary.md)")
    p.add_argument("--no-write", action="store_true", help="only print")
    p.add_argument("--raw-name", help="how the summary names where the raw files are")
    p.add_argument("--key-last", action="store_true",
                   help="print the op tables first and the header / stages / tests / step last "
                        "(the written file keeps the natural order)")
    p.add_argument("--tree-hash", action="store_true", help="print the code's content hash of PATH (default .)")
    a = p.parse_args(argv)
    if a.tree_hash:
        print(tree_hash(a.path or "."))
        return 0
    if not a.path:
        p.error("PATH is required")
    path = Path(a.path)
    if not path.exists():
        print(f"summarize.py: {path} does not exist", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_summary.") as tmp:
        raw, target = find_raw(path, Path(tmp))
        name = a.raw_name or (f"{path} (raw/ inside)" if path.is_file() else None)
        run = Run(raw, name)
        md = run.markdown()
        sys.stdout.write(run.markdown(key_last=True) if a.key_last else md)
    if not a.no_write:
        out = Path(a.write) if a.write else target
        try:
            out.write_text(md)
        except OSError as e:
            print(f"summarize.py: could not write {out}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
