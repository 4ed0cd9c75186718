"""Evidential (Dirichlet vacuity) uncertainty, fused: u = C / Σ_c (softplus(z_c) + 1).

Math (docs/method.md §6.2): α_c = softplus(z_c) + 1 with PyTorch's threshold 20 (softplus(x) = x
for x > 20), S = Σ_c α_c, u = C / S ∈ (0, 1], float32.
Backward: ∂u/∂z_c = −C·σ(z_c)/S², σ replaced by exactly 1 for z_c > 20 (PyTorch's softplus
backward); S is recomputed from z, so nothing but the logits is saved.

Two output layouts, same kernels (a constexpr switch):
* pixel layout (default): u [B, 1, *spatial];
* token layout (`patch_size=p`, docs/method.md §6.2/§6.7): u written directly as the contiguous
  patch tokens [B, N, p^d] the cross-attention's patch embedding reads — exactly
  `Patchify(p)(u_pixel)` (tokens row-major over the patch grid, features row-major inside a
  patch). The kernel computes each pixel's token offset (`token_nf`), so the separate
  reshape/permute/reshape copy of Patchify (a read and a write of [B, N, p^d]) disappears.
  The backward reads the gradient in token layout and writes dz in z's layout.

Traffic per pixel (C classes, logits of e bytes): forward reads C·e, writes 4 bytes; backward
reads C·e + 4 (grad_u), writes C·e — in both layouts. The unfused PyTorch chain (softplus, +1,
sum, C/S) moves ≈ 5·C·4 + 12 bytes forward and about twice that backward (softplus, add and
sum backward); token layout through PyTorch adds the Patchify copy (8 bytes per pixel, and the
same again in the backward). Each program walks BLOCK_S pixels in row-major order (coalesced
logit reads); the token-layout stores/loads of u come in contiguous runs of p values.

Layout: logits [B, C, *spatial] whose spatial dims collapse to one stride (contiguous:
stride_s = 1; channels-last: stride_c = 1, stride_s = C) — read in place, no copy. Each
program owns all C classes of BLOCK_S pixels of one sample; per-sample offsets are int32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import reference
from ._triton_utils import (cdiv, check_logits, flat_layout, num_warps_for, out_float_dtype,
                            softplus_f32, softplus_grad_f32, spatial_size, tile_sizes, tl,
                            triton, triton_usable, use_triton)

__all__ = ["evidential_uncertainty", "EvidentialUncertainty", "token_geometry", "patchify_map",
           "unpatchify_map"]


# --------------------------------------------------------------------------- token layout
def token_geometry(spatial: Sequence[int], patch_size: int, where: str) -> tuple[int, int, int, int, int, int]:
    """(H, W, GH, GW, N, PV) of the patch-token layout of a map with `spatial` dims (1 to 3; the
    kernels see them as (D, H, W) with missing leading dims 1): GH = H/p, GW = W/p tokens per
    row/plane, N tokens, PV = p^d features per token. ValueError (naming the shape) if a spatial
    size is not a multiple of p."""
    # plain loops, no generators: this also runs while torch.compile traces the public API
    spatial = tuple(spatial)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{where}: patch_size must be a positive int, got {patch_size!r}")
    d = len(spatial)
    if not 1 <= d <= 3:
        raise ValueError(f"{where}: token layout needs 1 to 3 spatial dims, got spatial size {spatial}")
    n_tokens = 1
    for s in spatial:
        if s % patch_size:
            raise ValueError(f"{where}: spatial size {spatial} is not a multiple of patch size {patch_size}")
        n_tokens = n_tokens * (s // patch_size)
    H = spatial[-2] if d >= 2 else 1
    W = spatial[-1]
    return H, W, H // patch_size if d >= 2 else 1, W // patch_size, n_tokens, patch_size ** d


def patchify_map(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 1, *S] -> contiguous tokens [B, N, p^d] (= models.upg.Patchify for one channel)."""
    B, _, *S = x.shape
    d, p = len(S), patch_size
    inter, n_tokens = [], 1
    for s in S:
        inter += [s // p, p]
        n_tokens = n_tokens * (s // p)
    perm = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.reshape(B, *inter).permute(perm).reshape(B, n_tokens, p ** d)


def unpatchify_map(t: torch.Tensor, spatial: Sequence[int], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify_map`: tokens [B, N, p^d] -> [B, 1, *spatial]."""
    B, d, p = t.shape[0], len(spatial), patch_size
    g = [s // p for s in spatial]
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    return t.reshape(B, *g, *([p] * d)).permute(perm).reshape(B, 1, *spatial)


@triton.jit
def token_nf(s, H, W, GH, GW, PATCH: tl.constexpr):
    """(token n, feature f) of the pixel with row-major spatial index s of a (D, H, W) map
    (D, H = 1 for fewer dims): n row-major over the patch grid, f row-major in the patch."""
    w = s % W
    t = s // W
    h = t % H
    dd = t // H
    n = ((dd // PATCH) * GH + h // PATCH) * GW + w // PATCH
    f = ((dd % PATCH) * PATCH + h % PATCH) * PATCH + w % PATCH
    return n, f


@triton.jit
def _u_offsets(offs_s, H, W, GH, GW, PATCH: tl.constexpr, PV: tl.constexpr, TOKENS: tl.constexpr):
    """Per-sample offset of u for pixels offs_s: s itself, or n·p^d + f in token layout."""
    if TOKENS:
        n, f = token_nf(offs_s, H, W, GH, GW, PATCH)
        off = n * PV + f
    else:
        off = offs_s
    return off


@triton.jit
def _evidential_fwd_kernel(z_ptr, u_ptr, S, stride_zb, stride_zc, stride_zs, H, W, GH, GW,
                           C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                           PATCH: tl.constexpr, PV: tl.constexpr, TOKENS: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid = (offs_c < C)[:, None] & in_s[None, :]
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                mask=valid, other=0.0).to(tl.float32)
    total = C + tl.sum(tl.where(valid, softplus_f32(z), 0.0), axis=0)
    u_off = _u_offsets(offs_s, H, W, GH, GW, PATCH, PV, TOKENS)
    tl.store(u_ptr + b * S + u_off, C / total, mask=in_s)


@triton.jit
def _evidential_bwd_kernel(gu_ptr, z_ptr, dz_ptr, S, stride_zb, stride_zc, stride_zs,
                           stride_db, stride_dc, stride_ds, H, W, GH, GW,
                           C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                           PATCH: tl.constexpr, PV: tl.constexpr, TOKENS: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid = (offs_c < C)[:, None] & in_s[None, :]
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                mask=valid, other=0.0).to(tl.float32)
    total = C + tl.sum(tl.where(valid, softplus_f32(z), 0.0), axis=0)
    u_off = _u_offsets(offs_s, H, W, GH, GW, PATCH, PV, TOKENS)
    gu = tl.load(gu_ptr + b * S + u_off, mask=in_s, other=0.0).to(tl.float32)
    coef = -C * gu / (total * total)
    dz = softplus_grad_f32(z) * coef[None, :]
    tl.store(dz_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_s[None, :] * stride_ds,
             dz.to(dz_ptr.dtype.element_ty), mask=valid)


def _grid(B: int, S: int, block_s: int) -> tuple[int, int]:
    return (cdiv(S, block_s), B)


def _launch_fwd(logits: torch.Tensor, u: torch.Tensor, patch: int) -> torch.Tensor:
    """u (pixel layout for patch 0, contiguous tokens otherwise) from the logits, in place."""
    B, C = logits.shape[:2]
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    H, W, GH, GW, _, PV = token_geometry(logits.shape[2:], patch, "evidential_uncertainty") if patch else (1,) * 6
    block_c, block_s = tile_sizes(C, S)
    _evidential_fwd_kernel[_grid(B, S, block_s)](
        z, u, S, sb, sc, ss, H, W, GH, GW, C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        PATCH=max(1, patch), PV=PV, TOKENS=bool(patch), num_warps=num_warps_for(block_c, block_s))
    return u


def _launch_bwd(grad_u: torch.Tensor, logits: torch.Tensor, patch: int) -> torch.Tensor:
    """dz in the layout of empty_like(logits) from grad_u (pixel layout or tokens)."""
    dz = torch.empty_like(logits)
    B, C = logits.shape[:2]
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    H, W, GH, GW, _, PV = token_geometry(logits.shape[2:], patch, "evidential_uncertainty") if patch else (1,) * 6
    gu = grad_u.reshape(B, S).contiguous()  # [B,1,*S] or [B,N,PV] -> [B,S]; a copy only if strided
    # empty_like keeps a non-overlapping dense layout; if its spatial dims do not collapse
    # (e.g. H/W transposed) flat_layout hands back a copy: write there, then copy back.
    dz_flat, dzb, dzc, dzs = flat_layout(dz)
    block_c, block_s = tile_sizes(C, S)
    _evidential_bwd_kernel[_grid(B, S, block_s)](
        gu, z, dz_flat, S, sb, sc, ss, dzb, dzc, dzs, H, W, GH, GW, C=C, BLOCK_C=block_c,
        BLOCK_S=block_s, PATCH=max(1, patch), PV=PV, TOKENS=bool(patch),
        num_warps=num_warps_for(block_c, block_s))
    return dz if dz_flat is dz else dz.copy_(dz_flat)


def _reference_grad(grad_u: torch.Tensor, logits: torch.Tensor, patch: int) -> torch.Tensor:
    """dz = −C·softplus'(z)·grad_u/S² in PyTorch (the custom op's off-Triton path). Written out,
    not through autograd: an op's implementation runs below the autograd dispatch key, where
    enable_grad() records nothing. softplus' = σ(z), exactly 1 above PyTorch's threshold 20."""
    z = logits.to(out_float_dtype(logits))
    C = z.shape[1]
    if patch:
        grad_u = unpatchify_map(grad_u, logits.shape[2:], patch)
    total = C + torch.nn.functional.softplus(z).sum(1, keepdim=True)
    sg = torch.where(z > 20, torch.ones_like(z), torch.sigmoid(z))
    return torch.empty_like(logits).copy_(sg * (-C * grad_u.to(z.dtype) / (total * total)))


# --------------------------------------------------------------------------- custom ops
def _kernels_run(logits: torch.Tensor) -> bool:
    """Launch the kernels (an empty input takes the reference: no zero-size grid)."""
    return triton_usable(logits) and logits.numel() > 0


@torch.library.custom_op("ucseg::evidential_uncertainty", mutates_args=())
def _evidential_op(logits: torch.Tensor) -> torch.Tensor:
    B = logits.shape[0]
    u = torch.empty((B, 1, *logits.shape[2:]), device=logits.device, dtype=out_float_dtype(logits))
    if not _kernels_run(logits):  # any device/dtype: same contract through the reference
        return u.copy_(reference.evidential_uncertainty(logits))
    return _launch_fwd(logits, u, 0)


@_evidential_op.register_fake
def _(logits: torch.Tensor) -> torch.Tensor:
    B = logits.shape[0]
    return logits.new_empty((B, 1, *logits.shape[2:]), dtype=out_float_dtype(logits))


@torch.library.custom_op("ucseg::evidential_uncertainty_backward", mutates_args=())
def _evidential_bwd_op(grad_u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if not _kernels_run(logits):
        return _reference_grad(grad_u, logits, 0)
    return _launch_bwd(grad_u, logits, 0)


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


@torch.library.custom_op("ucseg::evidential_uncertainty_tokens", mutates_args=())
def _evidential_tokens_op(logits: torch.Tensor, patch_size: int) -> torch.Tensor:
    """u in patch-token layout: contiguous [B, N, p^d] = Patchify(p)(u [B, 1, *S])."""
    n_tok, pv = token_geometry(logits.shape[2:], patch_size, "evidential_uncertainty")[4:]
    u = torch.empty((logits.shape[0], n_tok, pv), device=logits.device, dtype=out_float_dtype(logits))
    if not _kernels_run(logits):
        return u.copy_(patchify_map(reference.evidential_uncertainty(logits), patch_size))
    return _launch_fwd(logits, u, patch_size)


@_evidential_tokens_op.register_fake
def _(logits: torch.Tensor, patch_size: int) -> torch.Tensor:
    n_tok, pv = token_geometry(logits.shape[2:], patch_size, "evidential_uncertainty")[4:]
    return logits.new_empty((logits.shape[0], n_tok, pv), dtype=out_float_dtype(logits))


@torch.library.custom_op("ucseg::evidential_uncertainty_tokens_backward", mutates_args=())
def _evidential_tokens_bwd_op(grad_u: torch.Tensor, logits: torch.Tensor, patch_size: int) -> torch.Tensor:
    """dz (layout of empty_like(logits)) from the gradient of the token-layout u [B, N, p^d]."""
    if not _kernels_run(logits):
        return _reference_grad(grad_u, logits, patch_size)
    return _launch_bwd(grad_u, logits, patch_size)


@_evidential_tokens_bwd_op.register_fake
def _(grad_u: torch.Tensor, logits: torch.Tensor, patch_size: int) -> torch.Tensor:
    return torch.empty_like(logits)


def _setup_context_tokens(ctx, inputs, output) -> None:
    logits, patch_size = inputs
    ctx.save_for_backward(logits)
    ctx.patch_size = patch_size


def _backward_tokens(ctx, grad_u: torch.Tensor):
    (logits,) = ctx.saved_tensors
    return _evidential_tokens_bwd_op(grad_u, logits, ctx.patch_size), None


_evidential_tokens_op.register_autograd(_backward_tokens, setup_context=_setup_context_tokens)


# --------------------------------------------------------------------------- public API
def evidential_uncertainty(logits: torch.Tensor, *, patch_size: int | None = None) -> torch.Tensor:
    """Dirichlet vacuity u = C / Σ_c (softplus(z_c) + 1) of logits [B, C, *spatial].

    Returns float32 (float64 for float64 inputs), differentiable in logits:
    * `patch_size=None`: [B, 1, *spatial];
    * `patch_size=p`: the contiguous patch tokens [B, N, p^d] that the cross-attention's patch
      embedding reads, equal to `Patchify(p)(u)` (tokens row-major over the patch grid, features
      row-major inside a patch), written directly by the kernel (no Patchify copy); the backward
      takes the gradient in that layout. ValueError if a spatial size is not a multiple of p.
    One read of the logits, one write of u (Triton on CUDA / under TRITON_INTERPRET=1; else the
    PyTorch reference, followed by the Patchify copy in token layout)."""
    check_logits("evidential_uncertainty: logits", logits)
    if patch_size is not None:
        token_geometry(logits.shape[2:], patch_size, "evidential_uncertainty")
    if not use_triton(logits):
        u = reference.evidential_uncertainty(logits)
        return u if patch_size is None else patchify_map(u, patch_size)
    if patch_size is None:
        return _evidential_op(logits)
    return _evidential_tokens_op(logits, int(patch_size))


class EvidentialUncertainty(nn.Module):
    """nn.Module form of `evidential_uncertainty` (no parameters); `patch_size` as there."""

    def __init__(self, patch_size: int | None = None) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return evidential_uncertainty(logits, patch_size=self.patch_size)
