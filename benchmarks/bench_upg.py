"""UPG fusion head: eager `FusionHead` vs torch.compile of it vs the fused recompute op.

Providers: `eager` (FusionHead on cat(A·z1, A·z2), as the model runs it), `compiled` (the same
under torch.compile, GPU only), `fused` (FusedFusionHead.fused(z1, z2, A): Triton sweeps).
Passes: fwd (train mode: batch statistics + running-stat update), bwd (backward only, graph
retained), fwd_bwd. Shapes (B, C, *spatial): `acdc` = the ACDC step (24, 4, 256, 256), `la_3d` =
(4, 2, 96, 96, 96), `tiny` = CPU smoke. extra_info: shape, dtype, provider, pass, card and
versions, median ms, peak memory above the inputs (the number the issue's "a quarter of eager"
bar is about), which backend ran.

GPU: `pytest benchmarks/bench_upg.py --benchmark-only --benchmark-json=r.json`
(UCSEG_BENCH_DTYPES="bf16,fp32", UCSEG_BENCH_UPG_SHAPES="acdc,la_3d");
knobs of the fused op: UCSEG_UPG_BLOCK_S, UCSEG_UPG_DOT=auto|ieee|tf32 (auto: tf32 for bf16,
recorded as extra_info dot_precision), UCSEG_UPG_FWD_PROGRAMS,
UCSEG_UPG_BWD_PROGRAMS. CPU smoke: `pytest benchmarks/bench_upg.py --benchmark-disable`.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from ucseg_fast.models.upg import FusedFusionHead, FusionHead
from ucseg_fast.ops._triton_utils import use_triton
from ucseg_fast.ops.upg_head import dot_precision

from bench_utils import measure

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
UPG_SHAPES = {"acdc": (24, 4, 256, 256), "la_3d": (4, 2, 96, 96, 96), "tiny": (2, 4, 8, 8)}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

if CUDA:
    SHAPE_NAMES = os.environ.get("UCSEG_BENCH_UPG_SHAPES", "acdc,la_3d").split(",")
    DTYPE_NAMES = os.environ.get("UCSEG_BENCH_DTYPES", "bf16,fp32").split(",")
else:
    SHAPE_NAMES, DTYPE_NAMES = ["tiny"], ["fp32"]
PROVIDERS = ["eager", "compiled", "fused"]


def _inputs(shape, dtype):
    B, C, *S = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    fmt = torch.channels_last if len(S) == 2 else torch.channels_last_3d
    z1, z2 = (torch.randn(shape, generator=g, device=DEVICE).mul_(3).to(dtype).contiguous(memory_format=fmt)
              for _ in range(2))
    A = torch.rand((B, 1, *S), generator=g, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    return z1, z2, A


def _provider_fn(provider: str, C: int, dims: int) -> Callable:
    ref = FusionHead(C, spatial_dims=dims).to(DEVICE).train()
    if provider == "fused":
        fus = FusedFusionHead(C, spatial_dims=dims).to(DEVICE).train()
        fus.load_state_dict(ref.state_dict())
        return fus.fused

    def eager(z1, z2, A):
        return ref(torch.cat([A * z1, A * z2], 1))

    if provider == "eager":
        return eager
    torch._dynamo.reset()
    return torch.compile(eager, dynamic=False)


def _target(fn: Callable, ins: list[torch.Tensor], pass_: str, dtype: torch.dtype) -> Callable:
    """The timed call of one pass: fwd (no grad), bwd (backward only, graph retained) or
    fwd_bwd; under bf16 autocast on CUDA for bf16 inputs."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA and dtype == torch.bfloat16 \
        else torch.autocast("cpu", enabled=False)

    def fwd():
        with autocast:
            return fn(*ins)

    if pass_ == "fwd":
        def target():
            with torch.no_grad():
                return fwd()
    elif pass_ == "bwd":
        P = fwd()
        gP = torch.ones_like(P)

        def target():
            return torch.autograd.grad(P, ins, gP, retain_graph=True)
    else:
        def target():
            P = fwd()
            return torch.autograd.grad(P, ins, torch.ones_like(P))
    return target


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_upg_head(benchmark, provenance, shape_name, dtype_name, pass_, provider):
    if provider == "compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    shape, dtype = UPG_SHAPES[shape_name], _DTYPES[dtype_name]
    z1, z2, A = _inputs(shape, dtype)
    ins = [t.requires_grad_(pass_ != "fwd") for t in (z1, z2, A)]
    target = _target(_provider_fn(provider, shape[1], len(shape) - 2), ins, pass_, dtype)
    info = dict(provenance, op="upg_head", shape=list(shape), dtype=dtype_name, provider=provider,
                pass_=pass_, backend_ran=("triton" if use_triton(z1) else "torch-sweeps")
                if provider == "fused" else "torch")
    if provider == "fused":
        info["dot_precision"] = dot_precision(z1)
    measure(benchmark, target, info, rounds=10, iterations=5)


def test_smoke_fused_equals_eager_once():
    """The benchmark's fused and eager providers compute the same P on the smoke shape."""
    z1, z2, A = _inputs(UPG_SHAPES["tiny"], torch.float32)
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
WHOLE_PROVIDERS = ["eager", "compiled", "fused_tokens"]
_UPG_ARGS = {2: dict(embed_dim=96, heads=8, dim_head=64), 3: dict(embed_dim=1024, heads=8, dim_head=128)}
WHOLE_SHAPES = {"acdc": (24, 4, 256, 256), "la_3d": (4, 2, 96, 96, 96), "tiny": (1, 2, 16, 16)}
WHOLE_SHAPE_NAMES = [n for n in SHAPE_NAMES if n in WHOLE_SHAPES]


def _whole_fn(provider: str, shape) -> Callable:
    from ucseg_fast.models.upg import UPG, evidential_uncertainty_torch
    B, C, *S = shape
    upg = UPG(C, tuple(S), 16, head_impl="fused" if provider == "fused_tokens" else "torch",
              **_UPG_ARGS[len(S)]).to(DEVICE).train()
    if provider == "fused_tokens":
        return lambda z1, z2: upg.forward_fused_tokens(z1, z2)[3]

    def eager(z1, z2):
        return upg(evidential_uncertainty_torch(z1), evidential_uncertainty_torch(z2), z1, z2)[1]

    if provider == "eager":
        return eager
    torch._dynamo.reset()
    return torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("provider", WHOLE_PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape_name", WHOLE_SHAPE_NAMES)
def test_upg_whole(benchmark, provenance, shape_name, dtype_name, pass_, provider):
    if provider == "compiled" and not CUDA:
        pytest.skip("torch.compile provider is GPU-only (Inductor on CPU costs ~30 s per graph)")
    shape, dtype = WHOLE_SHAPES[shape_name], _DTYPES[dtype_name]
    z1, z2, _ = _inputs(shape, dtype)
    ins = [t.requires_grad_(pass_ != "fwd") for t in (z1, z2)]
    target = _target(_whole_fn(provider, shape), ins, pass_, dtype)
    info = dict(provenance, op="upg_whole", shape=list(shape), dtype=dtype_name,
                provider=provider, pass_=pass_)
    if provider == "fused_tokens":
        info["dot_precision"] = dot_precision(z1)
    measure(benchmark, target, info, rounds=10, iterations=5)
