"""Evidential (Dirichlet vacuity) uncertainty, fused: u = C / Σ_c (softplus(z_c) + 1).

Math (METHOD.md §6.2): α_c = softplus(z_c) + 1 with PyTorch's threshold 20 (softplus(x) = x
for x > 20), S = Σ_c α_c, u = C / S ∈ (0, 1], shape [B, 1, *spatial], float32.
Backward: ∂u/∂z_c = −C·σ(z_c)/S², σ replaced by exactly 1 for z_c > 20 (PyTorch's softplus
backward); S is recomputed from z, so nothing but the logits is saved.

Traffic per pixel (C classes, logits of e bytes): forward reads C·e, writes 4 bytes; backward
reads C·e + 4 (grad_u), writes C·e. The unfused PyTorch chain (softplus, +1, sum, C/S) moves
≈ 5·C·4 + 12 bytes forward and about twice that backward (softplus, add and sum backward).

Layout: logits [B, C, *spatial] whose spatial dims collapse to one stride (contiguous:
stride_s = 1; channels-last: stride_c = 1, stride_s = C) — read in place, no copy. Each
program owns all C classes of BLOCK_S pixels of one sample; per-sample offsets are int32.
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._triton_utils import (cdiv, check_logits, flat_layout, num_warps_for, out_float_dtype,
                            softplus_f32, softplus_grad_f32, spatial_size, tile_sizes, tl,
                            triton, triton_usable, use_triton)

__all__ = ["evidential_uncertainty", "EvidentialUncertainty"]


@triton.jit
def _evidential_fwd_kernel(z_ptr, u_ptr, S, stride_zb, stride_zc, stride_zs,
                           C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid = (offs_c < C)[:, None] & in_s[None, :]
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                mask=valid, other=0.0).to(tl.float32)
    total = C + tl.sum(tl.where(valid, softplus_f32(z), 0.0), axis=0)
    tl.store(u_ptr + b * S + offs_s, C / total, mask=in_s)


@triton.jit
def _evidential_bwd_kernel(gu_ptr, z_ptr, dz_ptr, S, stride_zb, stride_zc, stride_zs,
                           stride_db, stride_dc, stride_ds,
                           C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid = (offs_c < C)[:, None] & in_s[None, :]
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                mask=valid, other=0.0).to(tl.float32)
    total = C + tl.sum(tl.where(valid, softplus_f32(z), 0.0), axis=0)
    gu = tl.load(gu_ptr + b * S + offs_s, mask=in_s, other=0.0).to(tl.float32)
    coef = -C * gu / (total * total)
    dz = softplus_grad_f32(z) * coef[None, :]
    tl.store(dz_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_s[None, :] * stride_ds,
             dz.to(dz_ptr.dtype.element_ty), mask=valid)


def _grid(B: int, S: int, block_s: int) -> tuple[int, int]:
    return (cdiv(S, block_s), B)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("ucseg::evidential_uncertainty", mutates_args=())
def _evidential_op(logits: torch.Tensor) -> torch.Tensor:
    B, C = logits.shape[:2]
    u = torch.empty((B, 1, *logits.shape[2:]), device=logits.device, dtype=out_float_dtype(logits))
    if not triton_usable(logits):  # any device/dtype: same contract through the reference
        return u.copy_(reference.evidential_uncertainty(logits))
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    block_c, block_s = tile_sizes(C, S)
    _evidential_fwd_kernel[_grid(B, S, block_s)](
        z, u, S, sb, sc, ss, C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=num_warps_for(block_c, block_s))
    return u


@_evidential_op.register_fake
def _(logits: torch.Tensor) -> torch.Tensor:
    B = logits.shape[0]
    return logits.new_empty((B, 1, *logits.shape[2:]), dtype=out_float_dtype(logits))


@torch.library.custom_op("ucseg::evidential_uncertainty_backward", mutates_args=())
def _evidential_bwd_op(grad_u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    dz = torch.empty_like(logits)
    if not triton_usable(logits):
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(reference.evidential_uncertainty(z), z, grad_u)
        return dz.copy_(g)
    B, C = logits.shape[:2]
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    gu = grad_u.reshape(B, S).contiguous()  # [B,1,*S] -> [B,S]; a copy only if strided
    # empty_like keeps a non-overlapping dense layout; if its spatial dims do not collapse
    # (e.g. H/W transposed) flat_layout hands back a copy: write there, then copy back.
    dz_flat, dzb, dzc, dzs = flat_layout(dz)
    block_c, block_s = tile_sizes(C, S)
    _evidential_bwd_kernel[_grid(B, S, block_s)](
        gu, z, dz_flat, S, sb, sc, ss, dzb, dzc, dzs, C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=num_warps_for(block_c, block_s))
    return dz if dz_flat is dz else dz.copy_(dz_flat)


@_evidential_bwd_op.register_fake
def _(grad_u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    (logits,) = inputs
    ctx.save_for_backward(logits)


def _backward(ctx, grad_u: torch.Tensor):
    (logits,) = ctx.saved_tensors
    return _evidential_bwd_op(grad_u, logits)


_evidential_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def evidential_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet vacuity u = C / Σ_c (softplus(z_c) + 1) of logits [B, C, *spatial].

    Returns float32 [B, 1, *spatial] (float64 for float64 inputs); differentiable in logits.
    One read of the logits, one write of u (Triton on CUDA / under TRITON_INTERPRET=1)."""
    check_logits("evidential_uncertainty: logits", logits)
    if not use_triton(logits):
        return reference.evidential_uncertainty(logits)
    return _evidential_op(logits)


class EvidentialUncertainty(nn.Module):
    """nn.Module form of `evidential_uncertainty` (no parameters)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return evidential_uncertainty(logits)
