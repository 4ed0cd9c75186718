"""Fused ops vs their PyTorch reference: providers side by side, one timed target per test.

Providers: `reference_eager` (ops/reference.py as written), `reference_compiled` (the same under
torch.compile, GPU only: Inductor on CPU costs ~30 s per graph), `ours` (the fused Triton ops).
Passes: fwd, bwd (backward only, graph retained), fwd_bwd. `cps_step` is the whole
cross-pseudo-supervision chain of both subnets (entropy pseudo-labels + two masked CE+Dice
losses, forward+backward) — the number the README quotes.

extra_info: shape, dtype, device name, torch/triton versions, which backend ran, the minimal
bytes the op must move, GB/s against them, the fraction of the device-to-device copy bandwidth
measured in the same run (test_copy_bandwidth runs first), peak memory.

GPU: `pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=r.json`, then
`python benchmarks/bench_ops.py r.json` prints the markdown table. Shapes: UCSEG_BENCH_SHAPES
(comma-separated names of OP_SHAPES, or "all"); dtypes: UCSEG_BENCH_DTYPES ("bf16,fp32");
compiled-reference shapes: UCSEG_BENCH_COMPILE_SHAPES (default acdc_unlabeled, or "all").
CPU smoke: `pytest benchmarks/bench_ops.py --benchmark-disable` (tiny shape, each target once).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import pytest
import torch

from ucseg_fast import ops
from ucseg_fast.ops import reference
from ucseg_fast.ops._triton_utils import use_triton

from bench_utils import measure

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# One registry of op shapes (B, C, *spatial).
OP_SHAPES = {
    "acdc_unlabeled": (12, 4, 256, 256),  # ACDC recipe: the unlabeled half-batch of logits
    "large_2d": (32, 4, 512, 512),
    "la_3d": (2, 2, 96, 96, 96),
    "big_3d": (2, 14, 128, 128, 128),
    "tiny": (2, 4, 16, 16),  # CPU smoke
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
PROVIDERS = ["reference_eager", "reference_compiled", "ours"]
_COPY_GBPS: dict[str, float] = {}


def _provenance() -> dict:
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _logits(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    z = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).mul_(3).to(dtype)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return z.contiguous(memory_format=fmt)  # the trainer's layout


# Inductor compiles cost ~10 s per graph: compiled providers only at these shapes by default
_COMPILE_SHAPES = os.environ.get("UCSEG_BENCH_COMPILE_SHAPES", "acdc_unlabeled").split(",")


def _skip_provider(provider: str, shape_name: str) -> None:
    if provider == "reference_compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    if provider == "reference_compiled" and shape_name not in _COMPILE_SHAPES and _COMPILE_SHAPES != ["all"]:
        pytest.skip(f"compiled provider not selected for {shape_name} (UCSEG_BENCH_COMPILE_SHAPES)")


def _fn(provider: str, ours: Callable, ref: Callable) -> Callable:
    if provider == "ours":
        return ours
    if provider == "reference_eager":
        return ref
    torch._dynamo.reset()  # fresh cache: no recompile-limit fallback across parametrizations
    return torch.compile(ref, dynamic=False)


def _run(benchmark, target: Callable, bytes_moved: int, info: dict):
    info.update(_provenance())
    info["bytes_min"] = bytes_moved
    median = measure(benchmark, target, info)
    if median is not None:
        info["gbps"] = bytes_moved / median / 1e9
        copy = _COPY_GBPS.get(DEVICE)
        if copy:
            info["copy_gbps"] = copy
            info["frac_of_copy"] = info["gbps"] / copy
    benchmark.extra_info.update(info)


def _info(name, shape, dtype_name, provider, pass_, z) -> dict:
    return {"op": name, "shape": list(shape), "dtype": dtype_name, "provider": provider,
            "pass": pass_, "backend_ran": ("triton" if use_triton(z) else "reference")
            if provider == "ours" else "torch"}


# --------------------------------------------------------------------------- copy bandwidth
def test_copy_bandwidth(benchmark):
    """Device-to-device copy of the largest selected logits tensor: the GB/s ceiling."""
    shape = max((OP_SHAPES[n] for n in SHAPE_NAMES), key=math.prod)
    src = torch.empty(shape, device=DEVICE, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    info = {"op": "copy", "shape": list(shape), "dtype": "fp32", "provider": "torch"}
    _run(benchmark, lambda: dst.copy_(src), nbytes, info)
    if benchmark.stats is not None:
        _COPY_GBPS[DEVICE] = nbytes / benchmark.stats.stats.median / 1e9


# --------------------------------------------------------------------------- per op
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_evidential_uncertainty(benchmark, shape_name, dtype_name, pass_, provider):
    _skip_provider(provider, shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    z = _logits(shape, dtype).requires_grad_(pass_ != "fwd")
    fn = _fn(provider, ops.evidential_uncertainty, reference.evidential_uncertainty)
    N, C, e = math.prod(shape) // shape[1], shape[1], z.element_size()
    fwd_bytes, bwd_bytes = N * C * e + N * 4, 2 * N * C * e + N * 4
    grad_u = torch.ones((shape[0], 1, *shape[2:]), device=DEVICE)
    if pass_ == "fwd":
        target, nbytes = (lambda: fn(z)), fwd_bytes
    elif pass_ == "bwd":
        u = fn(z)
        target, nbytes = (lambda: torch.autograd.grad(u, z, grad_u, retain_graph=True)), bwd_bytes
    else:
        target, nbytes = (lambda: torch.autograd.grad(fn(z), z, grad_u)), fwd_bytes + bwd_bytes
    _run(benchmark, target, nbytes, _info("evidential_uncertainty", shape, dtype_name, provider, pass_, z))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_entropy_pseudo_label(benchmark, shape_name, dtype_name, provider):
    _skip_provider(provider, shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    za, zb = _logits(shape, dtype, 0), _logits(shape, dtype, 1)
    thr = torch.tensor(0.9, device=DEVICE)
    fn = _fn(provider, ops.entropy_pseudo_label, reference.entropy_pseudo_label)
    N, C, e = math.prod(shape) // shape[1], shape[1], za.element_size()
    nbytes = 2 * N * C * e + N * (8 + 1 + 4)
    _run(benchmark, lambda: fn(za, zb, thr), nbytes,
         _info("entropy_pseudo_label", shape, dtype_name, provider, "fwd", za))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_pseudo_label_loss(benchmark, shape_name, dtype_name, pass_, provider):
    _skip_provider(provider, shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    z = _logits(shape, dtype).requires_grad_(pass_ != "fwd")
    pl = reference.entropy_pseudo_label(z.detach(), _logits(shape, dtype, 1), 0.9)
    ours = lambda x: ops.pseudo_label_loss(x, pl.labels, pl.mask, dice_weight=1.0)  # noqa: E731
    ref = lambda x: reference.pseudo_label_loss(x, pl.labels, pl.mask, dice_weight=1.0)  # noqa: E731
    fn = _fn(provider, ours, ref)
    N, C, e = math.prod(shape) // shape[1], shape[1], z.element_size()
    fwd_bytes, bwd_bytes = N * C * e + 9 * N, 2 * N * C * e + 9 * N
    if pass_ == "fwd":
        target, nbytes = (lambda: fn(z)), fwd_bytes
    elif pass_ == "bwd":
        loss = fn(z)
        target, nbytes = (lambda: torch.autograd.grad(loss, z, retain_graph=True)), bwd_bytes
    else:
        target, nbytes = (lambda: torch.autograd.grad(fn(z), z)), fwd_bytes + bwd_bytes
    _run(benchmark, target, nbytes, _info("pseudo_label_loss", shape, dtype_name, provider, pass_, z))


CPS_PROVIDERS = ["reference_eager", "reference_compiled", "reference_compiled_graph", "ours",
                 "ours_fused", "ours_fused_graph"]


def _cuda_graph(fn: Callable) -> Callable:
    """Capture fn (static inputs) after a warm-up on a side stream; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


@pytest.mark.parametrize("provider", CPS_PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_cps_step(benchmark, shape_name, dtype_name, provider):
    """Both subnets: entropy pseudo-labels, masked CE + Dice for each subnet, forward+backward.
    `ours` chains the three fused ops; `ours_fused` is cross_pseudo_label_loss (3 launches);
    `*_graph` replays the step from a captured CUDA graph (what the trainer does)."""
    if provider.endswith("_graph") and not CUDA:
        pytest.skip("CUDA graph providers need a GPU")
    _skip_provider(provider.removesuffix("_graph"), shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    za = _logits(shape, dtype, 0).requires_grad_(True)
    zb = _logits(shape, dtype, 1).requires_grad_(True)
    thr = torch.tensor(0.9, device=DEVICE)

    def chain(epl, loss):
        def step(a, b, t):
            pl = epl(a.detach(), b.detach(), t)
            return (loss(a, pl.labels, pl.mask, dice_weight=1.0)
                    + loss(b, pl.labels, pl.mask, dice_weight=1.0))
        return step

    def fused(a, b, t):
        out = ops.cross_pseudo_label_loss(a, b, t, dice_weight=1.0)
        return out.loss_a + out.loss_b

    ref = chain(reference.entropy_pseudo_label, reference.pseudo_label_loss)
    base = provider.removesuffix("_graph")
    if base == "ours_fused":
        fn = fused
    else:
        fn = _fn(base, chain(ops.entropy_pseudo_label, ops.pseudo_label_loss), ref)
    target = lambda: torch.autograd.grad(fn(za, zb, thr), (za, zb))  # noqa: E731
    if provider.endswith("_graph"):
        target = _cuda_graph(target)
    N, C, e = math.prod(shape) // shape[1], shape[1], za.element_size()
    # the fused minimum: fwd reads both logits, writes labels+mask+uncertainty (13 B/pixel);
    # bwd reads both logits + labels + mask, writes both gradients
    nbytes = (2 * N * C * e + 13 * N) + (4 * N * C * e + 9 * N)
    _run(benchmark, target, nbytes, _info("cps_step", shape, dtype_name, provider, "fwd_bwd", za))



def _fusion_targets(shape, dtype):
    """Hard pseudo-label class map of the unlabeled half (argmax of a third logit map)."""
    return _logits(shape, dtype, 2).argmax(1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_fusion_unsup_losses(benchmark, shape_name, dtype_name, provider):
    """Fusion mode, unlabeled half: both subnets' CE + Dice against one pseudo-label map,
    forward+backward. `ours` = fusion_unsup_losses (forward sweep + finalize + one backward)."""
    _skip_provider(provider, shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    z1 = _logits(shape, dtype, 0).requires_grad_(True)
    z2 = _logits(shape, dtype, 1).requires_grad_(True)
    Y = _fusion_targets(shape, dtype)

    def total(pair):
        return sum(t["ce"] + t["dice"] for t in pair)

    ours = lambda a, b: total(ops.fusion_unsup_losses(a, b, Y))  # noqa: E731
    ref = lambda a, b: total(reference.fusion_unsup_losses(a, b, Y))  # noqa: E731
    fn = _fn(provider, ours, ref)
    N, C, e = math.prod(shape) // shape[1], shape[1], z1.element_size()
    # minimum: fwd reads both logits + labels; bwd reads them again and writes both gradients
    nbytes = (2 * N * C * e + 8 * N) + (4 * N * C * e + 8 * N)
    target = lambda: torch.autograd.grad(fn(z1, z2), (z1, z2))  # noqa: E731
    _run(benchmark, target, nbytes,
         _info("fusion_unsup_losses", shape, dtype_name, provider, "fwd_bwd", z1))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_segmentation_loss_terms(benchmark, shape_name, dtype_name, provider):
    """Fusion mode, labeled half: CE + Dice + AU (λ a device scalar) of one logit map,
    forward+backward (×3 per step in the reference: z1, z2 and P)."""
    _skip_provider(provider, shape_name)
    shape, dtype = OP_SHAPES[shape_name], _DTYPES[dtype_name]
    z = _logits(shape, dtype, 0).requires_grad_(True)
    Y = _fusion_targets(shape, dtype)
    lam = torch.tensor(0.3, device=DEVICE)

    def total(t):
        return t["ce"] + t["au"] + t["dice"]

    ours = lambda x: total(ops.segmentation_loss_terms(x, Y, lam=lam))  # noqa: E731
    ref = lambda x: total(reference.segmentation_loss_terms(x, Y, lam=lam))  # noqa: E731
    fn = _fn(provider, ours, ref)
    N, C, e = math.prod(shape) // shape[1], shape[1], z.element_size()
    nbytes = (N * C * e + 8 * N) + (2 * N * C * e + 8 * N)
    target = lambda: torch.autograd.grad(fn(z), z)  # noqa: E731
    _run(benchmark, target, nbytes,
         _info("segmentation_loss_terms", shape, dtype_name, provider, "fwd_bwd", z))


def summarize(json_path: str) -> str:
    """Markdown table of a `--benchmark-json` file of this suite (speed-up vs the compiled
    reference of the same op/shape/dtype/pass)."""
    import json

    rows = [b["extra_info"] | {"name": b["name"]} for b in json.load(open(json_path))["benchmarks"]]
    key = lambda r: (r.get("op"), str(r.get("shape")), r.get("dtype"), r.get("pass"))  # noqa: E731
    compiled = {key(r): r["median_ms"] for r in rows if r.get("provider") == "reference_compiled"}
    dev = next((r["device"] for r in rows if "device" in r), "?")
    out = [f"device: {dev}; torch {rows[0].get('torch')}, triton {rows[0].get('triton')}", "",
           "| op | shape | dtype | pass | provider | median µs | GB/s | % of copy | peak MB | × vs compiled |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = compiled.get(key(r))
        speed = f"{ref / r['median_ms']:.2f}" if ref and "median_ms" in r else ""
        out.append(f"| {r.get('op')} | {r.get('shape')} | {r.get('dtype')} | {r.get('pass', '')} | "
                   f"{r.get('provider')} | {r.get('median_ms', float('nan')) * 1e3:.1f} | "
                   f"{r.get('gbps', float('nan')):.0f} | {100 * r.get('frac_of_copy', float('nan')):.0f} | "
                   f"{r.get('peak_mem_mb', float('nan')):.1f} | {speed} |")
    return "\n".join(out)


if __name__ == "__main__":  # python benchmarks/bench_ops.py results.json
    import sys

    print(summarize(sys.argv[1]))
