#!/usr/bin/env bash
# gpu_check.sh -- the one prepared GPU check of ucseg-fast (DESIGN.md §8): builds the native
# library, runs the GPU test tier and the benchmark suites in stages, each under its own time
# cap inside one global budget, records every log / JSON / junit XML, and prints a Markdown
# summary last (benchmarks/tools/summarize.py).
#
# The device call (run from the lead session; .gpu holds the ACDC subset, git-ignored):
#
#   run(command="bash benchmarks/tools/gpu_check.sh", carry=[".gpu"], timeout_s=590)
#
#   optional: prefix GPU_CHECK_GIT_REV=<sha of HEAD here> (the tree copy may have no .git; the
#   summary also prints a content hash: `python benchmarks/tools/summarize.py --tree-hash .`
#   here gives the same hash for the same files).
#   with a short time-to-accuracy run (3 min of training on .gpu/ACDC) instead of the op suites:
#   run(command="STAGES=native,step,e2e STEP_CONFIGS=2d-eager-p1,2d-graph-p1 E2E_MINUTES=3 bash benchmarks/tools/gpu_check.sh",
#       carry=[".gpu"], timeout_s=590)
#
#   One call uses about 9.5 min of the 15 min device budget plus the machine's start (1-3 min):
#   there is no time for a second full run, so pick STAGES before the call.
#
# Stages, in the order given by STAGES (default: deps,native,gpu_tests,step,ops,upg,curves,data; env
# always runs first). Cap = the stage's default time limit (override: CAP_<STAGE>_S, e.g.
# CAP_STEP_S=240); "expected" = the estimate on an H100 / H200 (not yet measured as a whole):
#
#   stage        cap   expected  what
#   env           20     5-10 s  card (nvidia-smi name,memory.total,driver_version), torch /
#                                triton / CUDA versions, git revision + content hash, packages
#   deps          90      0 s    only when .whl/*.whl or .dali/part.* were carried: offline
#                                pip install --target into a temp dir (DALI: 20-60 s)
#   native        50    20-40 s  cmake + nvcc (this card's arch only) of libucseg_native.so,
#                                ctest; falls back to no native library (and says so) when
#                                cmake / nvcc are missing or the build fails
#   gpu_tests    100    40-90 s  UCSEG_TEST_CUDA=1 pytest -m gpu tests (never stops at the first
#                                failure; junit XML + verbose log; per-test timeout when
#                                pytest-timeout exists)
#   step         190  120-190 s  the training step (`bench_step`, what `ucseg-fast bench step`
#                                runs): ACDC 2D (12+12, 256²) eager / graph x phase 1, 2, the LA
#                                3D step (2+2, 96³) eager / graph x phase 1, 2, then 2D compile
#                                x phase 1, 2; ms/step, img/s, GPU util, power, peak memory.
#                                One Python process runs the configs in turn (torch import and
#                                cuDNN autotuning paid once), a fresh one after a failure;
#                                STEP_RUNNER=cli: one CLI process per config. STEP_CONFIGS
#                                picks (3d-compile-p1/p2 exist, not in the default)
#   ops           80    40-80 s  bench_ops.py at acdc_unlabeled + la_3d (+ large_2d, whose
#                                134 MB copy gives the DRAM copy bandwidth: the smaller tensors
#                                fit in L2), bf16, compiled reference at acdc_unlabeled
#   upg           70    40-70 s  bench_upg.py head + whole UPG at acdc and la_3d, bf16
#   curves       150    60-110 s `bench curves` on .gpu/ACDC, the ACDC recipe: CURVES_STEPS (200)
#                                steps each of the PyTorch UPG in bf16 (the oracle), the fused
#                                UPG in bf16 and the oracle in fp32 (the bf16 noise floor), phase 2
#                                from step CURVES_PHASE2 (100); L window means, fused vs oracle
#                                judged against the floor (issue #7); skipped without ACDC data
#   data          25    10-20 s  bench_data.py (torch backend; DALI rows when importable)
#   native_bench  60    15-30 s  optional: bench_native.py (CC providers, HD95/ASD)
#   e2e       m*60+150           optional (STAGES=...,e2e or E2E_MINUTES=m): `bench e2e
#                                --minutes m` (default 3) on .gpu/ACDC, eager unless
#                                E2E_ARGS="--train.step_mode='graph'"; skipped without ACDC data
#
# Default total: at most BUDGET_S (540 s = 9 min, summary included): a stage starts only with
# at least 15 s of the budget left and is cut at the budget's end; a cut or failed stage never
# stops the run (its rc is recorded). pytest stages are stopped with SIGINT so they still write
# their junit / benchmark JSON.
#
# Knobs (environment): STAGES (or the first argument, or --stages=...), BUDGET_S,
# CAP_<STAGE>_S; STEP_CONFIGS (e.g. "2d-eager-p1,3d-graph-p2"), STEP_RUNNER (inproc|cli),
# STEP_STEPS_2D (20), STEP_STEPS_3D (10), STEP_WARMUP (5), STEP_CONFIG_CAP_S (one limit for
# every config; default 60-200 s by mode); OPS_SHAPES, OPS_DTYPES, OPS_COMPILE_SHAPES, OPS_K;
# UPG_SHAPES, UPG_DTYPES, UPG_K; GPU_TESTS_MARK (gpu), GPU_TESTS_PATHS (tests),
# GPU_TESTS_TIMEOUT (per test, 120); NATIVE_ARCH (default: this card's, e.g. 90-real),
# NATIVE_BUILD_DIR (build/native_gpu_check), NATIVE_LIB_PREBUILT (use this .so, no build);
# E2E_MINUTES, E2E_ARGS; GPU_CHECK_PYTHON, GPU_CHECK_GIT_REV, GPU_CHECK_PACK (0/1),
# GPU_CHECK_FORCE_STUB=1 (the built-in pytest-benchmark stand-in even if the plugin exists).
# Without pytest-benchmark the suites run with that stand-in (plain perf_counter medians);
# without pytest the test and suite stages fail with that reason and the step stage still runs.
#
# Output (${OUT:-./gpu_out}): run.log, summary.md and
#   - on the device ($OUT set; the device returns at most 8 files, 2 folders deep): the raw
#     files are written to a temp dir and packed into gpu_check.tar.gz after every stage
#     (`tar xzf gpu_check.tar.gz` gives raw/; `python benchmarks/tools/summarize.py
#     gpu_check.tar.gz --no-write` re-prints the summary);
#   - locally ($OUT unset): raw/ unpacked beside them.
#   raw/: stages.tsv, env.json, env/*, native/{cmake,build,ctest}.log + status.json,
#   gpu_tests/{junit.xml,pytest.log}, step/<config>.json|.log + runs.tsv,
#   {ops,upg,data,native_bench}/bench_*.json + pytest.log, e2e/*.
#
# CPU smoke / dry run (no GPU, no nvidia-smi needed; tiny shapes, few steps, host-only native
# build, data suite with --benchmark-disable; numbers are NOT benchmarks):
#   GPU_CHECK_SMOKE=1 STAGES=step bash benchmarks/tools/gpu_check.sh
#   bash benchmarks/tools/gpu_check.sh --plan      # print the stage plan and exit
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 2

PLAN_ONLY=0
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,/^set -o pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --plan) PLAN_ONLY=1 ;;
    --stages=*) STAGES=${a#*=} ;;
    -*) echo "gpu_check.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    *) STAGES=$a ;;
  esac
done

SMOKE=${GPU_CHECK_SMOKE:-0}
[[ "$SMOKE" == 1 ]] || SMOKE=0
# CPU smoke runs share small machines: one intra-op thread avoids oversubscription stalls
[[ "$SMOKE" == 1 ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
E2E_MINUTES=${E2E_MINUTES:-}
STAGES=${STAGES:-deps,native,gpu_tests,step,ops,upg,curves,data}
if [[ -n "$E2E_MINUTES" && "$E2E_MINUTES" != 0 && ",$STAGES," != *",e2e,"* ]]; then
  STAGES="$STAGES,e2e"
fi
E2E_MINUTES=${E2E_MINUTES:-3}
[[ "$E2E_MINUTES" == 0 ]] && E2E_MINUTES=3
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-20}     # kept for the summary and the final pack
MIN_STAGE_S=${MIN_STAGE_S:-15}
KNOWN_STAGES="env deps native gpu_tests step ops upg curves data native_bench e2e"

declare -A DEFAULT_CAP=([env]=20 [deps]=90 [native]=50 [gpu_tests]=100 [step]=190 [ops]=80
                        [upg]=70 [curves]=150 [data]=25 [native_bench]=60 [e2e]=$(( ${E2E_MINUTES%.*} * 60 + 150 )))
cap_of() {  # stage -> cap in seconds (CAP_<STAGE>_S overrides)
  local v="CAP_${1^^}_S"
  echo "${!v:-${DEFAULT_CAP[$1]}}"
}

IFS=',' read -r -a STAGE_LIST <<< "$STAGES"
for s in "${STAGE_LIST[@]}"; do
  if [[ " $KNOWN_STAGES " != *" $s "* ]]; then
    echo "gpu_check.sh: unknown stage '$s' (known: $KNOWN_STAGES)" >&2; exit 2
  fi
done

if [[ "$PLAN_ONLY" == 1 ]]; then
  echo "plan (budget ${BUDGET_S}s, smoke=$SMOKE):"
  echo "  env cap $(cap_of env)s"
  for s in "${STAGE_LIST[@]}"; do [[ "$s" == env ]] || echo "  $s cap $(cap_of "$s")s"; done
  exit 0
fi

# ------------------------------------------------------------------------------ output folders
OUT_DIR=${OUT:-./gpu_out}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PACK=${GPU_CHECK_PACK:-}
if [[ -z "$PACK" ]]; then [[ -n "${OUT:-}" ]] && PACK=1 || PACK=0; fi
TMPW=$(mktemp -d /tmp/gpu_check.XXXXXX)
if [[ "$PACK" == 1 ]]; then RAW="$TMPW/raw"; else RAW="$OUT_DIR/raw"; fi
rm -rf "$OUT_DIR/raw" "$OUT_DIR/summary.md" "$OUT_DIR/run.log" "$OUT_DIR/gpu_check.tar.gz"
mkdir -p "$RAW"
RUNLOG="$OUT_DIR/run.log"
: > "$RUNLOG"
printf 'stage\tstatus\trc\tseconds\tnote\n' > "$RAW/stages.tsv"

log() { printf '%s\n' "$*" | tee -a "$RUNLOG"; }
show_tail() {  # file [n]: the last lines of a log, indented, to stdout and run.log
  [[ -s "$1" ]] || return 0
  tail -n "${2:-3}" "$1" | cut -c1-220 | sed 's/^/    | /' | tee -a "$RUNLOG"
}

pack() {  # raw/ -> $OUT_DIR/gpu_check.tar.gz (device mode), huge logs truncated first
  [[ "$PACK" == 1 ]] || return 0
  local f
  while IFS= read -r f; do
    { head -c 1000000 "$f"; printf '\n... [truncated by gpu_check.sh] ...\n'; tail -c 1000000 "$f"; } > "$f.cut" \
      && mv "$f.cut" "$f"
  done < <(find "$RAW" -type f -size +4M 2>/dev/null)
  tar -czf "$OUT_DIR/.gpu_check.tar.gz.tmp" -C "$TMPW" raw 2>/dev/null \
    && mv "$OUT_DIR/.gpu_check.tar.gz.tmp" "$OUT_DIR/gpu_check.tar.gz"
}

# ------------------------------------------------------------------------------ python
pick_python() {
  if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then echo "$GPU_CHECK_PYTHON"; return; fi
  local c
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo python3
}
PY=$(pick_python)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# pytest via pytest.main with SIGINT restored: a stage cut by `timeout -s INT` still writes its
# junit XML / benchmark JSON, also when the caller started us with SIGINT ignored.
PYTEST_MAIN='import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main())'
have_py_module() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

HAVE_PYTEST=0; have_py_module pytest && HAVE_PYTEST=1
HAVE_PLUGIN=0; have_py_module pytest_benchmark && HAVE_PLUGIN=1
BENCH_PLUGIN_ARGS=()
if [[ "$HAVE_PYTEST" == 1 && ( "$HAVE_PLUGIN" == 0 || "${GPU_CHECK_FORCE_STUB:-0}" == 1 ) ]]; then
  # Stand-in for pytest-benchmark: the `benchmark` fixture the suites use (call, pedantic,
  # extra_info, stats.stats.median) and --benchmark-json in pytest-benchmark's layout.
  mkdir -p "$TMPW/stub"
  cat > "$TMPW/stub/ucseg_benchstub.py" <<'PYSTUB'
"""gpu_check.sh's stand-in for pytest-benchmark (plain perf_counter timing, median of rounds)."""
import datetime
import json
import statistics
import time

import pytest

_ROWS = []


def pytest_addoption(parser):
    g = parser.getgroup("benchmark (gpu_check stand-in)")
    g.addoption("--benchmark-json", dest="benchmark_json", default=None)
    g.addoption("--benchmark-disable", dest="benchmark_disable", action="store_true", default=False)
    g.addoption("--benchmark-only", dest="benchmark_only", action="store_true", default=False)


class _Stats:
    def __init__(self, data):
        s = sorted(data)
        self.data, self.min, self.max, self.rounds = list(data), s[0], s[-1], len(s)
        self.mean, self.median = statistics.fmean(s), statistics.median(s)
        self.stddev = statistics.stdev(s) if len(s) > 1 else 0.0
        self.stats = self


class _Bench:
    def __init__(self, disabled):
        self.disabled, self.extra_info, self.stats, self.iterations = disabled, {}, None, 1

    def _time(self, fn, args, kwargs, rounds, iterations, warmup):
        out = None
        for _ in range(warmup):
            out = fn(*args, **kwargs)
        data = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(iterations):
                out = fn(*args, **kwargs)
            data.append((time.perf_counter() - t) / iterations)
        self.stats, self.iterations = _Stats(data), iterations
        return out

    def __call__(self, fn, *args, **kwargs):
        if self.disabled:
            return fn(*args, **kwargs)
        out = fn(*args, **kwargs)
        data, t_end = [], time.perf_counter() + 1.0
        while len(data) < 5 or (time.perf_counter() < t_end and len(data) < 10000):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            data.append(time.perf_counter() - t)
        self.stats = _Stats(data)
        return out

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0,
                 iterations=1):
        kwargs = kwargs or {}
        if self.disabled:
            return target(*args, **kwargs)
        return self._time(target, args, kwargs, rounds, iterations, warmup_rounds)


@pytest.fixture
def benchmark(request):
    b = _Bench(request.config.getoption("benchmark_disable"))
    yield b
    if b.stats is not None:
        cs = getattr(request.node, "callspec", None)
        st = {k: getattr(b.stats, k) for k in ("min", "max", "mean", "stddev", "median", "rounds")}
        st.update(iterations=b.iterations, data=b.stats.data)
        _ROWS.append({"group": None, "name": request.node.name, "fullname": request.node.nodeid,
                      "params": dict(cs.params) if cs else None, "param": cs.id if cs else None,
                      "extra_info": b.extra_info, "options": {"stub": True}, "stats": st})


def pytest_sessionfinish(session):
    path = session.config.getoption("benchmark_json")
    if path:
        with open(path, "w") as f:
            json.dump({"machine_info": {}, "commit_info": {}, "benchmarks": _ROWS,
                       "datetime": datetime.datetime.now().isoformat(),
                       "version": "gpu_check-stub"}, f, indent=1, default=str)
PYSTUB
  export PYTHONPATH="$PYTHONPATH:$TMPW/stub"
  BENCH_PLUGIN_ARGS=(-p ucseg_benchstub)
  [[ "$HAVE_PLUGIN" == 1 ]] && BENCH_PLUGIN_ARGS=(-p no:benchmark -p ucseg_benchstub)
fi

# Real data: tests, bench_data and bench_e2e read $UCSEG_DATA/ACDC (a carried .gpu/ACDC copy).
if [[ -z "${UCSEG_DATA:-}" && -f .gpu/ACDC/train_slices.list ]]; then
  export UCSEG_DATA="$REPO/.gpu"
fi
cleanup() {
  rm -rf "$TMPW/e2e_run" "$TMPW/curves_run" 2>/dev/null
}
trap cleanup EXIT

# ------------------------------------------------------------------------------ time keeping
T_START=$SECONDS
DEADLINE=$(( T_START + BUDGET_S - RESERVE_S ))
STAGE_END=$DEADLINE
left() { echo $(( STAGE_END - SECONDS )); }          # seconds left in the current stage
# tmo_run SECS [timeout options] -- cmd...: `timeout` with SECS bounded by the stage's end
tmo_run() {
  local want=$1; shift
  local opts=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
  shift
  local l; l=$(left)
  (( want > l )) && want=$l
  (( want < 1 )) && return 124
  timeout "${opts[@]}" "$want" "$@"
}

STAGE_NOTE=""
STAGE_STATUS=""
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$RAW/stages.tsv"; }

run_stage() {  # name function
  local name=$1 fn=$2 cap remaining t0 rc status
  cap=$(cap_of "$name")
  remaining=$(( DEADLINE - SECONDS ))
  (( cap > remaining )) && cap=$remaining
  local min=$MIN_STAGE_S; [[ "$name" == env ]] && min=5
  if (( cap < min )); then
    log "== $name: not run (budget: ${remaining}s left)"
    record "$name" skipped - 0 "budget: ${remaining}s left of ${BUDGET_S}s"
    pack; return
  fi
  STAGE_NOTE=""; STAGE_STATUS=""
  STAGE_END=$(( SECONDS + cap ))
  t0=$SECONDS
  log "== $name (cap ${cap}s, $(( DEADLINE - SECONDS ))s of the budget left)"
  "$fn"; rc=$?
  if [[ -n "$STAGE_STATUS" ]]; then status=$STAGE_STATUS
  elif (( rc == 0 )); then status=ok
  elif (( rc == 124 || rc == 137 )); then status=timeout
  else status=failed; fi
  log "   $name: $status (rc $rc, $(( SECONDS - t0 ))s)${STAGE_NOTE:+ -- $STAGE_NOTE}"
  record "$name" "$status" "$rc" "$(( SECONDS - t0 ))" "$STAGE_NOTE"
  STAGE_END=$DEADLINE
  pack
}

# ------------------------------------------------------------------------------ stages
stage_env() {
  mkdir -p "$RAW/env"
  if command -v nvidia-smi >/dev/null 2>&1; then
    tmo_run 15 -k 5 -- nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RAW/env/gpu.csv" 2>&1
    tmo_run 15 -k 5 -- nvidia-smi --query-gpu=compute_cap --format=csv,noheader > "$RAW/env/compute_cap.txt" 2>/dev/null
    tmo_run 15 -k 5 -- nvidia-smi > "$RAW/env/nvidia-smi.txt" 2>&1
  else
    echo "nvidia-smi not found" > "$RAW/env/gpu.csv"
  fi
  local t p
  { for t in nvcc cmake ninja; do
      p=$(command -v $t || { [[ $t == nvcc && -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; })
      if [[ -n "$p" ]]; then echo "$t: $p: $("$p" --version 2>&1 | grep -m1 -E 'release|version|^[0-9]')"; else echo "$t: missing"; fi
    done; } > "$RAW/env/tools.txt" 2>&1
  local rev dirty
  rev=$(git rev-parse HEAD 2>/dev/null) || rev=""
  dirty=""; [[ -n "$rev" ]] && dirty=$(git status --porcelain 2>/dev/null | wc -l)
  GC_GIT_REV="${rev:-${GPU_CHECK_GIT_REV:-}}" GC_GIT_DIRTY="$dirty" GC_STAGES="$STAGES" GC_SMOKE="$SMOKE" \
  GC_BUDGET="$BUDGET_S" GC_PY="$PY" GC_PLUGIN="$HAVE_PLUGIN" GC_STUB="${#BENCH_PLUGIN_ARGS[@]}" \
  GC_RAW="$RAW" GC_REPO="$REPO" \
    tmo_run 40 -k 5 -- "$PY" - > "$RAW/env/env_py.log" 2>&1 <<'PYENV'
import importlib.util, json, os, platform, socket, sys, time
raw = os.environ["GC_RAW"]
env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(),
       "python": platform.python_version(), "python_exe": os.environ.get("GC_PY"),
       "smoke": os.environ.get("GC_SMOKE") == "1", "stages": os.environ.get("GC_STAGES", "").split(","),
       "budget_s": int(os.environ.get("GC_BUDGET", "0")),
       "git_rev": os.environ.get("GC_GIT_REV") or None,
       "git_dirty_files": int(os.environ["GC_GIT_DIRTY"]) if os.environ.get("GC_GIT_DIRTY") else None,
       "pytest_benchmark": "plugin" if os.environ.get("GC_STUB") == "0" else "gpu_check stand-in"}
try:
    sys.path.insert(0, os.path.join(os.environ["GC_REPO"], "benchmarks", "tools"))
    from summarize import tree_hash
    env["tree_hash"] = tree_hash(os.environ["GC_REPO"])
except Exception as e:  # noqa: BLE001
    env["tree_hash"] = f"error: {e}"
try:
    lines = open(os.path.join(raw, "env", "gpu.csv")).read().strip().splitlines()
    env["nvidia_smi"] = lines[1] if len(lines) > 1 else (lines[0] if lines else None)
except OSError:
    env["nvidia_smi"] = None
env["tools"] = open(os.path.join(raw, "env", "tools.txt")).read().strip().splitlines()
for mod in ("pytest", "pytest_benchmark", "pytest_timeout", "triton", "nvidia.dali", "pynvml",
            "nibabel", "skimage", "medpy", "matplotlib", "h5py", "scipy"):
    try:
        env.setdefault("modules", {})[mod] = importlib.util.find_spec(mod) is not None
    except Exception:  # noqa: BLE001 (a parent package missing)
        env.setdefault("modules", {})[mod] = False
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda_runtime"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count)
except Exception as e:  # noqa: BLE001
    env["torch"] = f"error: {e}"
try:
    import triton
    env["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    env["triton"] = None
json.dump(env, open(os.path.join(raw, "env.json"), "w"), indent=1)
print(json.dumps({k: env.get(k) for k in ("gpu", "nvidia_smi", "torch", "triton", "git_rev", "tree_hash")}))
PYENV
  local rc=$?
  show_tail "$RAW/env/env_py.log" 2
  log "   python: $PY; pytest: $HAVE_PYTEST; pytest-benchmark: $HAVE_PLUGIN${BENCH_PLUGIN_ARGS:+ (using the stand-in)}; UCSEG_DATA=${UCSEG_DATA:-unset}"
  return $rc
}

stage_deps() {
  mkdir -p "$RAW/deps"
  local wheels=() site="$TMPW/site" rc=0
  if compgen -G ".dali/part.*" >/dev/null; then
    mkdir -p "$TMPW/dali_whl"
    if cat .dali/part.* | tar -x -C "$TMPW/dali_whl" 2>> "$RAW/deps/install.log"; then
      wheels+=("$TMPW"/dali_whl/*.whl)
    else
      STAGE_NOTE=".dali parts incomplete (tar failed); "
    fi
  fi
  compgen -G ".whl/*.whl" >/dev/null && wheels+=(.whl/*.whl)
  if [[ ${#wheels[@]} == 0 ]]; then
    STAGE_STATUS=skipped; STAGE_NOTE="${STAGE_NOTE}nothing carried (.whl/*.whl, .dali/part.*)"; return 0
  fi
  tmo_run 600 -k 10 -- "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "${wheels[@]}" >> "$RAW/deps/install.log" 2>&1; rc=$?
  if (( rc == 0 )); then
    export PYTHONPATH="$PYTHONPATH:$site"
    STAGE_NOTE="${STAGE_NOTE}installed ${#wheels[@]} wheels into $site"
  fi
  show_tail "$RAW/deps/install.log"
  return $rc
}

NATIVE_STATUS_DONE=0
native_status() {  # -> raw/native/status.json; sets NATIVE_CUDA=1 when the CUDA kernels load
  mkdir -p "$RAW/native"
  tmo_run 60 -k 5 -- "$PY" - > "$RAW/native/status.json" 2> "$RAW/native/status.log" <<'PYNAT'
import json
import torch
from ucseg_fast import native
lib = native.load()
print(json.dumps({"path": str(native.library_path()), "loaded": lib is not None,
                  "has_cuda": bool(lib is not None and lib.has_cuda),
                  "reason": native.unavailable_reason(), "cuda_device": torch.cuda.is_available()}))
PYNAT
  NATIVE_CUDA=0
  grep -q '"has_cuda": true' "$RAW/native/status.json" 2>/dev/null && grep -q '"cuda_device": true' "$RAW/native/status.json" && NATIVE_CUDA=1
  NATIVE_STATUS_DONE=1
}

stage_native() {
  mkdir -p "$RAW/native"
  if [[ -n "${NATIVE_LIB_PREBUILT:-}" ]]; then
    export UCSEG_NATIVE_LIB=$(cd "$(dirname "$NATIVE_LIB_PREBUILT")" && pwd)/$(basename "$NATIVE_LIB_PREBUILT")
    native_status; STAGE_NOTE="prebuilt $UCSEG_NATIVE_LIB (has CUDA: $NATIVE_CUDA)"; return 0
  fi
  if ! command -v cmake >/dev/null 2>&1; then
    native_status; STAGE_STATUS=skipped; STAGE_NOTE="cmake missing: no native library (PyTorch fallback)"; return 0
  fi
  local nvcc cuda_flag=() arch gen=() B rc
  nvcc=$(command -v nvcc || true)
  [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  if [[ "$SMOKE" == 1 || "${NATIVE_CUDA_BUILD:-1}" == 0 ]]; then
    cuda_flag=(-DUCSEG_WITH_CUDA=OFF); STAGE_NOTE="host-only build (smoke); "
  elif [[ -z "$nvcc" ]]; then
    native_status; STAGE_STATUS=skipped; STAGE_NOTE="nvcc missing: no native CUDA library (PyTorch fallback)"; return 0
  else
    export CUDACXX="$nvcc"
    arch=${NATIVE_ARCH:-}
    if [[ -z "$arch" ]]; then
      arch=$(head -n1 "$RAW/env/compute_cap.txt" 2>/dev/null | tr -d ' .\r')
      [[ "$arch" =~ ^[0-9]+$ ]] && arch="${arch}-real" || arch="80-real;90-real"
    fi
    cuda_flag=(-DCMAKE_CUDA_ARCHITECTURES="$arch"); STAGE_NOTE="CUDA arch $arch; "
  fi
  B=${NATIVE_BUILD_DIR:-build/native_gpu_check}
  [[ "$B" == /* ]] || B="$REPO/$B"
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  if [[ -f "$B/CMakeCache.txt" ]]; then  # a cache from another checkout / generator: start over
    if ! grep -q "^CMAKE_HOME_DIRECTORY:INTERNAL=$REPO\$" "$B/CMakeCache.txt" \
       || { [[ ${#gen[@]} -gt 0 ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$B/CMakeCache.txt"; }; then
      rm -rf "$B"
    fi
  fi
  tmo_run 60 -k 5 -- cmake -S . -B "$B" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" \
    > "$RAW/native/cmake.log" 2>&1; rc=$?
  if (( rc == 0 )); then
    tmo_run 600 -k 5 -- cmake --build "$B" -j "$(nproc)" > "$RAW/native/build.log" 2>&1; rc=$?
  fi
  if (( rc == 0 )) && [[ -f "$B/libucseg_native.so" ]]; then
    export UCSEG_NATIVE_LIB="$B/libucseg_native.so"
    tmo_run 60 -k 5 -- ctest --test-dir "$B" --output-on-failure > "$RAW/native/ctest.log" 2>&1
    local crc=$?
    show_tail "$RAW/native/ctest.log" 2
    (( crc != 0 )) && { STAGE_NOTE="${STAGE_NOTE}ctest rc $crc; "; rc=$crc; }
  else
    STAGE_NOTE="${STAGE_NOTE}build failed: PyTorch fallback for CC; "
    show_tail "$RAW/native/build.log" 5; show_tail "$RAW/native/cmake.log" 3
  fi
  native_status
  STAGE_NOTE="${STAGE_NOTE}library with CUDA kernels loaded: $([[ $NATIVE_CUDA == 1 ]] && echo yes || echo no)"
  return $rc
}

stage_gpu_tests() {
  mkdir -p "$RAW/gpu_tests"
  [[ "$HAVE_PYTEST" == 1 ]] || { STAGE_NOTE="pytest missing on this machine"; return 127; }
  local extra=() rc
  have_py_module pytest_timeout && extra+=(--timeout="${GPU_TESTS_TIMEOUT:-120}")
  local paths; read -r -a paths <<< "${GPU_TESTS_PATHS:-tests}"
  UCSEG_TEST_CUDA=1 tmo_run 100000 -s INT -k 10 -- "$PY" -c "$PYTEST_MAIN" -m "${GPU_TESTS_MARK:-gpu}" \
    "${paths[@]}" -v -rfEs -p no:cacheprovider -o junit_family=xunit1 \
    --junitxml="$RAW/gpu_tests/junit.xml" "${extra[@]}" > "$RAW/gpu_tests/pytest.log" 2>&1; rc=$?
  show_tail "$RAW/gpu_tests/pytest.log" 1
  STAGE_NOTE=$(tail -n 1 "$RAW/gpu_tests/pytest.log" | tr -d '=' | sed 's/^ *//;s/ *$//' | cut -c1-150)
  return $rc
}

STEP_DEFAULT="2d-eager-p1,2d-eager-p2,2d-graph-p1,2d-graph-p2,3d-eager-p1,3d-eager-p2,3d-graph-p1,3d-graph-p2,2d-compile-p1,2d-compile-p2"
STEP_SMOKE_DEFAULT="2d-eager-p1,2d-eager-p2,2d-graph-p1,2d-compile-p1,3d-eager-p1"
step_cap() {  # dims-mode -> seconds one config may take (warm-up, compile and timed steps)
  [[ -n "${STEP_CONFIG_CAP_S:-}" ]] && { echo "$STEP_CONFIG_CAP_S"; return; }
  case "$1" in
    2-eager) echo 60 ;; 2-graph) echo 75 ;; 2-compile) echo 180 ;;
    3-eager) echo 75 ;; 3-graph) echo 90 ;; *) echo 200 ;;
  esac
}
set_step_status() {  # config status rc seconds note
  printf '%s\t%s\t%s\t%s\n' "$2" "$3" "$4" "${5//$'\t'/ }" > "$RAW/step/$1.status"
}

# STEP_RUNNER=inproc (default): one Python process runs the configs one after another (torch
# import, cuDNN autotuning and the Triton cache are paid once), each under SIGALRM; after a
# failed or timed-out config the process exits and a fresh one takes the remaining configs, and
# a config left "running" (crash, kill) is recorded as such. STEP_RUNNER=cli: one
# `python -m ucseg_fast.cli bench step` process per config (full isolation, slower).
step_inproc() {
  local launches=0 rc c todo
  while :; do
    todo=()
    for c in "${cfgs[@]}"; do [[ -f "$RAW/step/$c.status" ]] || todo+=("$c"); done
    (( ${#todo[@]} == 0 )) && break
    if (( $(left) < MIN_STAGE_S || launches >= 12 )); then
      for c in "${todo[@]}"; do set_step_status "$c" skipped - 0 "budget: $(left)s left in the stage"; done
      break
    fi
    launches=$((launches + 1))
    GC_STEP_END=$(( $(date +%s) + $(left) )) GC_SMOKE=$SMOKE GC_NATIVE_CUDA=$NATIVE_CUDA \
      tmo_run 100000 -k 10 -- "$PY" - "$(IFS=,; echo "${todo[*]}")" "$RAW/step" \
      > "$RAW/step/driver.$launches.log" 2>&1 <<'PYSTEP'
import gc, json, os, signal, sys, time, traceback
cfgs, outdir = sys.argv[1].split(","), sys.argv[2]
end = float(os.environ["GC_STEP_END"])
smoke = os.environ.get("GC_SMOKE") == "1"
native_cuda = os.environ.get("GC_NATIVE_CUDA") == "1"
inject = os.environ.get("GPU_CHECK_STEP_FAIL", "")  # test hook: CFG (raise) or CFG:crash (exit)
CAPS = {"2-eager": 60, "2-graph": 75, "2-compile": 180, "3-eager": 75, "3-graph": 90, "3-compile": 200}
if os.environ.get("STEP_CONFIG_CAP_S"):
    CAPS = dict.fromkeys(CAPS, int(os.environ["STEP_CONFIG_CAP_S"]))
import torch
from ucseg_fast.train.bench import bench_step


class StepTimeout(Exception):
    pass


def on_alarm(*_):
    raise StepTimeout("config time limit reached")


signal.signal(signal.SIGALRM, on_alarm)


def status(cfg, st, rc, secs, note=""):
    with open(os.path.join(outdir, cfg + ".status"), "w") as f:
        f.write(f"{st}\t{rc}\t{secs}\t{note}\n")


cuda = torch.cuda.is_available()
for cfg in cfgs:
    dims, mode, phase = int(cfg[0]), cfg.split("-")[1], int(cfg[-1])
    left = end - time.time()
    if left < 15:
        status(cfg, "skipped", "-", 0, f"budget: {left:.0f}s left in the stage")
        continue
    note, nms = "", True
    if mode == "graph" and not native_cuda:
        nms, note = False, "nms off: graph capture needs the native CC library"
    kw = dict(mode=mode, dims=dims, phase2=phase == 2, nms=nms, device="auto",
              compile_backend="aot_eager" if smoke else "inductor")
    if smoke:
        kw.update(labeled_bs=1, img=32, steps=2, warmup=1)
    else:
        kw.update(labeled_bs=2 if dims == 3 else 12, img=96 if dims == 3 else 256,
                  steps=int(os.environ.get(f"STEP_STEPS_{dims}D", 10 if dims == 3 else 20)),
                  warmup=int(os.environ.get("STEP_WARMUP", 5)))
    status(cfg, "running", "-", 0, note)
    t0 = time.time()
    base = torch.cuda.memory_allocated() if cuda else 0
    signal.alarm(max(1, int(min(CAPS[f"{dims}-{mode}"], left))))
    ok = False
    try:
        if inject == cfg:
            raise RuntimeError("injected failure (GPU_CHECK_STEP_FAIL)")
        if inject == cfg + ":crash":
            os._exit(3)
        res = bench_step(**kw)
        signal.alarm(0)
        res.update(runner="inproc", seconds=round(time.time() - t0, 1), alloc_before_gb=base / 1e9)
        with open(os.path.join(outdir, cfg + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        status(cfg, "ok", 0, round(time.time() - t0), note)
        ok = True
        print(f"{cfg}: {res['ms_per_step']:.1f} ms/step", flush=True)
    except BaseException as e:  # noqa: BLE001 -- recorded, then a fresh process goes on
        signal.alarm(0)
        with open(os.path.join(outdir, cfg + ".log"), "a") as f:
            traceback.print_exc(file=f)
        timed_out = isinstance(e, StepTimeout)
        status(cfg, "timeout" if timed_out else "failed", 124 if timed_out else 1,
               round(time.time() - t0), (note + "; " if note else "") + f"{type(e).__name__}: {e}"[:200])
    if not ok:
        sys.exit(3)
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
PYSTEP
    rc=$?
    for c in "${todo[@]}"; do
      if [[ -f "$RAW/step/$c.status" ]] && [[ "$(cut -f1 "$RAW/step/$c.status")" == running ]]; then
        if (( rc == 124 || rc == 137 )); then
          set_step_status "$c" timeout "$rc" - "stage time limit reached (process killed)"
        else
          set_step_status "$c" crashed "$rc" - "the process died (rc $rc) while this config ran"
        fi
      fi
    done
  done
}

step_cli() {
  local cfg dims mode phase args t0 rc note st
  for cfg in "${cfgs[@]}"; do
    [[ -f "$RAW/step/$cfg.status" ]] && continue
    if (( $(left) < MIN_STAGE_S )); then set_step_status "$cfg" skipped - 0 "budget: $(left)s left in the stage"; continue; fi
    [[ "$cfg" =~ ^([23])d-(eager|compile|graph)-p([12])$ ]]
    dims=${BASH_REMATCH[1]}; mode=${BASH_REMATCH[2]}; phase=${BASH_REMATCH[3]}
    args=(bench step --mode "$mode" --dims "$dims")
    [[ "$phase" == 2 ]] && args+=(--phase2)
    note=""
    if [[ "$SMOKE" == 1 ]]; then
      args+=(--batch 1 --img 32 --steps 2 --warmup 1 --compile-backend aot_eager)
    else
      local n=${STEP_STEPS_2D:-20}; [[ "$dims" == 3 ]] && n=${STEP_STEPS_3D:-10}
      args+=(--steps "$n" --warmup "${STEP_WARMUP:-5}")
    fi
    if [[ "$mode" == graph && "$NATIVE_CUDA" != 1 ]]; then
      args+=(--no-nms); note="nms off: graph capture needs the native CC library"
    fi
    t0=$SECONDS
    tmo_run "$(step_cap "$dims-$mode")" -k 10 -- "$PY" -m ucseg_fast.cli "${args[@]}" \
      > "$RAW/step/$cfg.json" 2> "$RAW/step/$cfg.log"; rc=$?
    st=ok; (( rc == 124 || rc == 137 )) && st=timeout; (( rc != 0 && rc != 124 && rc != 137 )) && st=failed
    set_step_status "$cfg" "$st" "$rc" "$(( SECONDS - t0 ))" "$note"
  done
}

stage_step() {
  mkdir -p "$RAW/step"
  [[ "$NATIVE_STATUS_DONE" == 1 ]] || native_status
  local configs c nok=0 nbad=0 nskip=0 st
  local -a cfgs
  if [[ "$SMOKE" == 1 ]]; then configs=${STEP_CONFIGS:-$STEP_SMOKE_DEFAULT}; else configs=${STEP_CONFIGS:-$STEP_DEFAULT}; fi
  IFS=',' read -r -a cfgs <<< "$configs"
  rm -f "$RAW"/step/*.status
  for c in "${cfgs[@]}"; do
    [[ "$c" =~ ^([23])d-(eager|compile|graph)-p([12])$ ]] \
      || set_step_status "$c" failed 2 0 "bad config name (want e.g. 2d-eager-p1)"
  done
  if [[ "${STEP_RUNNER:-inproc}" == cli ]]; then step_cli; else step_inproc; fi
  printf 'config\tstatus\trc\tseconds\tnote\n' > "$RAW/step/runs.tsv"
  for c in "${cfgs[@]}"; do
    st=$(cut -f1 "$RAW/step/$c.status" 2>/dev/null || echo missing)
    printf '%s\t%s\n' "$c" "$(cat "$RAW/step/$c.status" 2>/dev/null || printf 'missing\t-\t0\t')" >> "$RAW/step/runs.tsv"
    case "$st" in ok) nok=$((nok + 1)) ;; skipped) nskip=$((nskip + 1)) ;; *) nbad=$((nbad + 1)) ;; esac
    log "   step $c: $(cut -f1,3 "$RAW/step/$c.status" 2>/dev/null | tr '\t' ' ')s $(grep -o '"ms_per_step": [0-9.]*' "$RAW/step/$c.json" 2>/dev/null)"
  done
  STAGE_NOTE="$nok ok, $nbad failed/timed out, $nskip not run (budget); runner ${STEP_RUNNER:-inproc}; native CC: $([[ $NATIVE_CUDA == 1 ]] && echo yes || echo no)"
  (( nbad > 0 || nskip > 0 )) && return 1
  return 0
}

pytest_bench() {  # dir file [pytest args...]: one benchmark suite -> raw/<dir>/bench_<x>.json
  local dir=$1 file=$2; shift 2
  mkdir -p "$RAW/$dir"
  [[ "$HAVE_PYTEST" == 1 ]] || { STAGE_NOTE="pytest missing on this machine"; return 127; }
  local json="$RAW/$dir/$(basename "$file" .py).json" rc
  tmo_run 100000 -s INT -k 10 -- "$PY" -c "$PYTEST_MAIN" "$file" "${BENCH_PLUGIN_ARGS[@]}" -p no:cacheprovider \
    -rfEs --benchmark-json="$json" "$@" > "$RAW/$dir/pytest.log" 2>&1; rc=$?
  show_tail "$RAW/$dir/pytest.log" 1
  STAGE_NOTE=$(tail -n 1 "$RAW/$dir/pytest.log" | tr -d '=' | sed 's/^ *//;s/ *$//' | cut -c1-150)
  return $rc
}

stage_ops() {
  local k=(); [[ -n "${OPS_K:-}" ]] && k=(-k "$OPS_K")
  UCSEG_BENCH_SHAPES=${OPS_SHAPES:-acdc_unlabeled,la_3d,large_2d} UCSEG_BENCH_DTYPES=${OPS_DTYPES:-bf16} \
  UCSEG_BENCH_COMPILE_SHAPES=${OPS_COMPILE_SHAPES:-acdc_unlabeled} \
    pytest_bench ops benchmarks/bench_ops.py --benchmark-only "${k[@]}"
}

stage_upg() {
  local k=(); [[ -n "${UPG_K:-}" ]] && k=(-k "$UPG_K")
  UCSEG_BENCH_UPG_SHAPES=${UPG_SHAPES:-acdc,la_3d} UCSEG_BENCH_DTYPES=${UPG_DTYPES:-bf16} \
    pytest_bench upg benchmarks/bench_upg.py --benchmark-only "${k[@]}"
}

stage_curves() {
  mkdir -p "$RAW/curves"
  local acdc="${UCSEG_DATA:-$REPO/../shared/data}/ACDC" over=() rc steps=${CURVES_STEPS:-200}
  if [[ ! -f "$acdc/train_slices.list" ]]; then
    STAGE_STATUS=skipped; STAGE_NOTE="no ACDC copy at $acdc (carry .gpu/ACDC)"; return 0
  fi
  over=(--loss.phase2_start="${CURVES_PHASE2:-100}")
  if [[ "$SMOKE" == 1 ]]; then  # CPU: the fused kernels run in the interpreter, 2 tiny steps
    over=(--data.img_size='[32,32]' --data.labeled_bs=1 --data.unlabeled_bs=1 --train.amp="'none'"
          --train.channels_last=false --loss.queue_size=16 --loss.phase2_start=1 --window 1)
    steps=2
  fi
  # exit 1 = a variant outside the tolerance: the files and the table still come back
  tmo_run 100000 -k 20 -- "$PY" -m ucseg_fast.cli bench curves --config configs/acdc_2d.toml --steps "$steps" \
    --out "$TMPW/curves_run" --data.root="'$acdc'" --train.out_dir="'$TMPW/curves_run/run'" "${over[@]}" \
    > "$RAW/curves/curves.log" 2>&1; rc=$?
  cp "$TMPW/curves_run/curves.json" "$TMPW/curves_run/curves.png" "$RAW/curves/" 2>/dev/null
  show_tail "$RAW/curves/curves.log" 8
  STAGE_NOTE="$steps steps per variant on $acdc"
  (( rc == 1 )) && STAGE_NOTE="$STAGE_NOTE; fused NOT within tolerance"
  return $rc
}

stage_data() {
  local mode=(--benchmark-only)
  [[ "$SMOKE" == 1 ]] && mode=(--benchmark-disable)   # CPU: tiny sizes, each target once
  pytest_bench data benchmarks/bench_data.py "${mode[@]}"
}

stage_native_bench() {
  [[ "$NATIVE_STATUS_DONE" == 1 ]] || native_status
  local mode=(--benchmark-only)
  [[ "$SMOKE" == 1 ]] && mode=(--benchmark-disable)
  pytest_bench native_bench benchmarks/bench_native.py "${mode[@]}"
}

stage_e2e() {
  mkdir -p "$RAW/e2e"
  local acdc="${UCSEG_DATA:-$REPO/../shared/data}/ACDC" over=() rc
  if [[ ! -f "$acdc/train_slices.list" ]]; then
    STAGE_STATUS=skipped; STAGE_NOTE="no ACDC copy at $acdc (carry .gpu/ACDC)"; return 0
  fi
  if [[ "$SMOKE" == 1 ]]; then
    over=(--data.img_size='[32,32]' --data.labeled_bs=1 --data.unlabeled_bs=1 --train.max_iterations=4
          --train.amp="'none'" --train.channels_last=false --train.max_val_volumes=1 --loss.queue_size=16
          --loss.phase2_start=2 --val-every 2)
  fi
  local minutes=$E2E_MINUTES; [[ "$SMOKE" == 1 ]] && minutes=0.05
  tmo_run 100000 -k 20 -- "$PY" -m ucseg_fast.cli bench e2e --config configs/acdc_2d.toml --minutes "$minutes" \
    --out "$TMPW/e2e_run" --data.root="'$acdc'" --train.progress=false "${over[@]}" ${E2E_ARGS:-} \
    > "$RAW/e2e/e2e.log" 2>&1; rc=$?
  cp "$TMPW/e2e_run/dice_vs_time.json" "$TMPW/e2e_run/dice_vs_time.png" "$RAW/e2e/" 2>/dev/null
  cp "$TMPW/e2e_run/run/metrics.jsonl" "$RAW/e2e/" 2>/dev/null
  show_tail "$RAW/e2e/e2e.log" 3
  STAGE_NOTE="$minutes min of training on $acdc"
  return $rc
}

# ------------------------------------------------------------------------------ main
log "gpu_check.sh: stages env,$STAGES; budget ${BUDGET_S}s; smoke=$SMOKE; out $OUT_DIR$([[ $PACK == 1 ]] && echo " (packed: gpu_check.tar.gz)")"
run_stage env stage_env
for s in "${STAGE_LIST[@]}"; do
  [[ "$s" == env ]] && continue
  run_stage "$s" "stage_$s"
done

log "== summary ($(( SECONDS - T_START ))s elapsed)"
if [[ "$PACK" == 1 ]]; then SUMMARY_TARGET="$OUT_DIR/summary.md"; else SUMMARY_TARGET="$RAW/../summary.md"; fi
RAW_NAME="$RAW"; [[ "$PACK" == 1 ]] && RAW_NAME="$OUT_DIR/gpu_check.tar.gz (tar xzf: raw/)"
# printed with the header, stages, GPU tests and step table last: the device returns only the
# end of the output (summary.md, in the natural order, comes back whole)
timeout -k 5 30 "$PY" benchmarks/tools/summarize.py "$RAW" --write "$SUMMARY_TARGET" --raw-name "$RAW_NAME" --key-last > "$TMPW/summary.out" 2> "$TMPW/summary.err"
src=$?
if (( src != 0 )) || [[ ! -s "$TMPW/summary.out" ]]; then
  { echo "summarize.py failed (rc $src):"; tail -n 5 "$TMPW/summary.err"; echo; echo "stages:"; column -t -s $'\t' "$RAW/stages.tsv" 2>/dev/null || cat "$RAW/stages.tsv"; } > "$TMPW/summary.out"
  cp "$TMPW/summary.out" "$SUMMARY_TARGET" 2>/dev/null
fi
cp "$SUMMARY_TARGET" "$RAW/summary.md" 2>/dev/null
cat "$TMPW/summary.out" >> "$RUNLOG"
pack
cat "$TMPW/summary.out"
rm -rf "$TMPW"
exit 0
