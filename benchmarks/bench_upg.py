"""UPG fusion head: eager `FusionHead` vs torch.compile of it vs the fused recompute op, and the
whole UPG part.

Head providers: `eager` (FusionHead on cat(A·z1, A·z2), as the model runs it), `compiled` (the
same under torch.compile, GPU only), `fused` (FusedFusionHead.fused(z1, z2, A): Triton sweeps).
Passes: fwd (train mode: batch statistics + running-stat update), bwd (backward only, graph
retained), fwd_bwd. Shapes (B, C, *spatial): `acdc` = the ACDC step (24, 4, 256, 256), `la_3d` =
(4, 2, 96, 96, 96), `tiny` = CPU smoke. The targets live in `ucseg_fast.bench.targets` (shared
with `ucseg-fast bench report`).

Timing (bench_utils.measure): CUDA-graph replay of N back-to-back calls timed with CUDA events
(UCSEG_BENCH_TIMING=events: eager launches between events). extra_info: µs per call, timing
mode, shape, dtype, provider, pass, card and versions, peak memory above the inputs, which
backend ran, minimal bytes, GB/s and % of the session's copy bandwidth.

GPU: `pytest benchmarks/bench_upg.py --benchmark-only --benchmark-json=r.json`
(UCSEG_BENCH_DTYPES="bf16,fp32", UCSEG_BENCH_UPG_SHAPES="acdc,la_3d");
the fused op's dot precision: UCSEG_UPG_DOT=auto|ieee|tf32 (auto: tf32 for bf16, recorded as
extra_info dot_precision); its launch geometry follows the shape and the card's SM count
(ops/upg_head_kernels.py header). CPU smoke: `pytest benchmarks/bench_upg.py --benchmark-disable`.
"""
from __future__ import annotations

import os

import pytest
import torch

from ucseg_fast.bench.targets import (UPG_HEAD_PROVIDERS, UPG_SHAPES, UPG_WHOLE_PROVIDERS,
                                      WHOLE_SHAPES, upg_head_target, upg_inputs,
                                      upg_whole_target)
from ucseg_fast.models.upg import FusedFusionHead, FusionHead

from bench_utils import measure

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GRAPH = os.environ.get("UCSEG_BENCH_TIMING", "graph") != "events"

if CUDA:
    SHAPE_NAMES = os.environ.get("UCSEG_BENCH_UPG_SHAPES", "acdc,la_3d").split(",")
    DTYPE_NAMES = os.environ.get("UCSEG_BENCH_DTYPES", "bf16,fp32").split(",")
else:
    SHAPE_NAMES, DTYPE_NAMES = ["tiny"], ["fp32"]
PROVIDERS = list(UPG_HEAD_PROVIDERS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_upg_head(benchmark, provenance, shape_name, dtype_name, pass_, provider):
    if provider == "compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    t = upg_head_target(UPG_SHAPES[shape_name], dtype_name, provider, pass_, device=DEVICE)
    info = dict(provenance, **t.info, pass_=pass_, shape_name=shape_name)
    measure(benchmark, t.fn, info, rounds=10, nbytes=t.nbytes, graph=GRAPH)


def test_smoke_fused_equals_eager_once():
    """The benchmark's fused and eager providers compute the same P on the smoke shape."""
    z1, z2, A = upg_inputs(UPG_SHAPES["tiny"], "fp32", DEVICE)
    ref = FusionHead(4).to(DEVICE).train()
    fus = FusedFusionHead(4).to(DEVICE).train()
    fus.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fus.fused(z1, z2, A), ref(torch.cat([A * z1, A * z2], 1)),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# The whole UPG part (the 8.0 ms eager / 5.1 ms compiled at the ACDC shape): both
# subnets' evidential uncertainty, the cross-attention block and the fusion head, from the
# logits z1, z2 to P. `eager` / `compiled`: UPG.forward on the PyTorch uncertainty (the
# reference's modules); `fused_tokens`: UPG.forward_fused_tokens (u written as patch tokens,
# fused head reading A's tokens, attention GEMMs on cuBLAS).
# ------------------------------------------------------------------------------------------
WHOLE_PROVIDERS = list(UPG_WHOLE_PROVIDERS)
WHOLE_SHAPE_NAMES = [n for n in SHAPE_NAMES if n in WHOLE_SHAPES]


@pytest.mark.parametrize("provider", WHOLE_PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", WHOLE_SHAPE_NAMES)
def test_upg_whole(benchmark, provenance, shape_name, dtype_name, pass_, provider):
    if provider == "compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    t = upg_whole_target(WHOLE_SHAPES[shape_name], dtype_name, provider, pass_, device=DEVICE)
    info = dict(provenance, **t.info, pass_=pass_, shape_name=shape_name)
    measure(benchmark, t.fn, info, rounds=10, nbytes=t.nbytes, graph=GRAPH)
