"""Fused ops vs their PyTorch reference: providers side by side, one timed target per test.

Providers: `reference_eager` (ops/reference.py as written), `reference_compiled` (the same under
torch.compile, GPU only: Inductor on CPU costs ~30 s per graph), `ours` (the fused Triton ops),
`ours_fused` (cps_step only: cross_pseudo_label_loss). Passes: fwd, bwd (backward only, graph
retained), fwd_bwd. `cps_step` is the whole cross-pseudo-supervision chain of both subnets
(entropy pseudo-labels + two masked CE+Dice losses, forward+backward). The targets, their inputs
and minimal bytes live in `ucseg_fast.bench.targets` (shared with `ucseg-fast bench report`).

Timing (bench_utils.measure): on CUDA every target is captured as N back-to-back calls in one
CUDA graph and timed by replay with CUDA events (the kernels, not the launch overhead); set
UCSEG_BENCH_TIMING=events to time N eager launches between events instead. extra_info: µs per
call, timing mode, shape, dtype, provider, which backend ran, minimal bytes, GB/s against them,
% of the device-to-device copy bandwidth measured once in the same session (256 MiB buffer),
peak memory, card and versions. Small working sets can stay in L2 across back-to-back calls,
so % of copy above 100 means L2 hits.

GPU: `pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=r.json`, then
`python benchmarks/bench_ops.py r.json` prints the Markdown table. Shapes: UCSEG_BENCH_SHAPES
(comma-separated names of OP_SHAPES, or "all"); dtypes: UCSEG_BENCH_DTYPES ("bf16,fp32");
compiled-reference shapes: UCSEG_BENCH_COMPILE_SHAPES (default acdc_unlabeled, or "all").
CPU smoke: `pytest benchmarks/bench_ops.py --benchmark-disable` (tiny shape, each target once).
"""
from __future__ import annotations

import os

import pytest
import torch

from ucseg_fast.bench.targets import CPS_PROVIDERS, OP_SHAPES, PROVIDERS, op_target

from bench_utils import measure

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GRAPH = os.environ.get("UCSEG_BENCH_TIMING", "graph") != "events"


def _selection() -> tuple[list[str], list[str]]:
    if not CUDA:
        return ["tiny"], ["fp32"]
    shapes = os.environ.get("UCSEG_BENCH_SHAPES", "acdc_unlabeled,large_2d")
    names = [n for n in OP_SHAPES if n != "tiny"] if shapes == "all" else shapes.split(",")
    unknown = [n for n in names if n not in OP_SHAPES]
    if unknown:
        raise ValueError(f"UCSEG_BENCH_SHAPES: unknown shape names {unknown}; known {list(OP_SHAPES)}")
    return names, os.environ.get("UCSEG_BENCH_DTYPES", "bf16").split(",")


SHAPE_NAMES, DTYPE_NAMES = _selection()
# Inductor compiles cost ~10 s per graph: compiled providers only at these shapes by default
_COMPILE_SHAPES = os.environ.get("UCSEG_BENCH_COMPILE_SHAPES", "acdc_unlabeled").split(",")


def _skip_provider(provider: str, shape_name: str) -> None:
    if provider == "reference_compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    if provider == "reference_compiled" and shape_name not in _COMPILE_SHAPES and _COMPILE_SHAPES != ["all"]:
        pytest.skip(f"compiled provider not selected for {shape_name} (UCSEG_BENCH_COMPILE_SHAPES)")


def _bench(benchmark, op, shape_name, dtype_name, provider, pass_):
    _skip_provider(provider, shape_name)
    t = op_target(op, OP_SHAPES[shape_name], dtype_name, provider, pass_, device=DEVICE)
    info = dict(t.info, shape_name=shape_name)
    measure(benchmark, t.fn, info, nbytes=t.nbytes, graph=GRAPH)


# --------------------------------------------------------------------------- copy bandwidth
def test_copy_bandwidth(benchmark, copy_bw):
    """The session's device-to-device copy (256 MiB on CUDA, far beyond L2): the GB/s ceiling
    every op's "% of copy" refers to. Recorded as its own row."""
    src = torch.empty(copy_bw["nbytes"], device=DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    info = {"op": "copy", "shape": [copy_bw["nbytes"]], "dtype": "uint8", "provider": "torch",
            "pass": "fwd", "session_copy_gbps": copy_bw["gbps"]}
    measure(benchmark, lambda: dst.copy_(src), info, nbytes=copy_bw["bytes_moved"], graph=GRAPH)
    assert info["us_per_call"] > 0


# --------------------------------------------------------------------------- per op
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_evidential_uncertainty(benchmark, shape_name, dtype_name, pass_, provider):
    _bench(benchmark, "evidential_uncertainty", shape_name, dtype_name, provider, pass_)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_entropy_pseudo_label(benchmark, shape_name, dtype_name, provider):
    _bench(benchmark, "entropy_pseudo_label", shape_name, dtype_name, provider, "fwd")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_pseudo_label_loss(benchmark, shape_name, dtype_name, pass_, provider):
    _bench(benchmark, "pseudo_label_loss", shape_name, dtype_name, provider, pass_)


@pytest.mark.parametrize("provider", CPS_PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_cps_step(benchmark, shape_name, dtype_name, provider):
    """Both subnets: entropy pseudo-labels, masked CE + Dice for each subnet, forward+backward.
    `ours` chains the three fused ops; `ours_fused` is cross_pseudo_label_loss (3 launches)."""
    _bench(benchmark, "cps_step", shape_name, dtype_name, provider, "fwd_bwd")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_fusion_unsup_losses(benchmark, shape_name, dtype_name, provider):
    """Fusion mode, unlabeled half: both subnets' CE + Dice against one pseudo-label map,
    forward+backward. `ours` = fusion_unsup_losses (forward sweep + finalize + one backward)."""
    _bench(benchmark, "fusion_unsup_losses", shape_name, dtype_name, provider, "fwd_bwd")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_segmentation_loss_terms(benchmark, shape_name, dtype_name, provider):
    """Fusion mode, labeled half: CE + Dice + AU (λ a device scalar) of one logit map,
    forward+backward (×3 per step in the reference: z1, z2 and P)."""
    _bench(benchmark, "segmentation_loss_terms", shape_name, dtype_name, provider, "fwd_bwd")


def summarize(json_path: str) -> str:
    """Markdown table of a `--benchmark-json` file of this suite (speed-up vs the compiled
    reference of the same op/shape/dtype/pass; % of the copy bandwidth of the same session)."""
    import json

    from ucseg_fast.bench.report import num, shape_str, sig, table

    rows = [b["extra_info"] | {"name": b["name"]} for b in json.load(open(json_path))["benchmarks"]]
    key = lambda r: (r.get("op"), str(r.get("shape")), r.get("dtype"), r.get("pass"))  # noqa: E731
    compiled = {key(r): r["us_per_call"] for r in rows if r.get("provider") == "reference_compiled"}
    first = rows[0] if rows else {}
    out = [f"card: {first.get('gpu') or 'cpu'}; torch {first.get('torch')}, triton "
           f"{first.get('triton')}; copy bandwidth {num(first.get('copy_gbps'), '.0f')} GB/s; "
           f"timing: {first.get('timing_text', '?')}", ""]
    body = []
    for r in rows:
        ref = compiled.get(key(r))
        us = r.get("us_per_call")
        speed = f"{ref / us:.2f}" if ref and us else ""
        body.append([r.get("op"), shape_str(r.get("shape")), r.get("dtype"), r.get("pass", ""),
                     r.get("provider"), num(us), sig(r.get("gbps")), sig(r.get("pct_of_copy")),
                     num(r.get("peak_mem_mb")), speed, r.get("timing", "")])
    out += table(["op", "shape", "dtype", "pass", "provider", "µs/call", "GB/s", "% of copy",
                  "peak MB", "× vs compiled", "timing"], body)
    return "\n".join(out)


if __name__ == "__main__":  # python benchmarks/bench_ops.py results.json
    import sys

    print(summarize(sys.argv[1]))
