"""The gradient-free per-pixel predictions of one UC-Seg step, in one sweep and one finalize.

Math (per pixel, fp32; p = softmax(z) over C, or σ(z) per channel for `binary`):
  maps   m(z) = argmax_c p_c (first index on ties) — or [σ(z_1) ≥ 0.5] for `binary` — of z1 and
         z2 (all B images) and of P_u (P's unlabeled images): what the largest-component
         pseudo-label of P_u and the CCP class masks of z1, z2 start from;
  diff   the reference's gradient-free BCE between the subnets on channel C−1:
         x = clamp(p_a[C−1], 1e-8, 1−1e-7), y = p_b[C−1],
         ℓ = (y − 1)·max(log1p(−x), −100) − y·max(log x, −100), diff_ab = mean over B·S pixels;
  gates  the hard queue gate of each subnet on the labeled half (b < Bl) against y_l:
         mean over c = 1..C−1 of 2|P_c ∩ G_c| / (|P_c| + |G_c| + 0.001) (0 when both empty),
         P_c = {m == c} (binary: [σ(z_1) > 0.5] == c), G_c = {y_l == c}.
The sweep writes the maps and per-program partial sums (Σℓ of both directions, and per class
|P_c ∩ G_c|, |P_c| of each subnet and |G_c|, exact integers in fp32 below 2^24 pixels); a
one-program finalize reduces the rows in a fixed order (deterministic, no atomics) into
stats = [diff1, diff2, gate1, gate2].

Traffic per pixel (C classes, e bytes per logit): reads 2·C·e (+ C·e for P's unlabeled pixels,
+ 8 for labeled pixels' y_l), writes 2 (+1) bytes of uint8 maps. The PyTorch chain it replaces
(2-3 upcasts, softmaxes and argmaxes, two diff BCEs of ~8 ops, the gates' one-hots and sums)
launches ~40 kernels and moves ≈ 12·C·4 bytes a pixel.

Layout: logits [B, C, *S] (2D or 3D) whose spatial dims collapse to one stride (contiguous or
channels-last), read in place; y_l [Bl, *S] any integer dtype; maps contiguous [2B + Bu, *S].
"""
from __future__ import annotations

import torch

from . import reference
from ._triton_utils import (cdiv, check_logits, flat_layout, next_pow2, spatial_size, tl, triton,
                            triton_usable, use_triton)
from .reference import map_dtype

__all__ = ["prediction_stats", "LAUNCHES"]

LAUNCHES = 2  # the sweep and the finalize
_TARGET_PROGRAMS = 2048
_TILE = 2048  # elements of one [BLOCK_C, BLOCK_S] tile


@triton.jit
def _probs(z, valid_c, BINARY: tl.constexpr):
    if BINARY:
        return 1.0 / (1.0 + tl.exp(-z))
    z = tl.where(valid_c, z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _map(p, valid_c, offs_c, BLOCK_C: tl.constexpr, BINARY: tl.constexpr, STRICT: tl.constexpr):
    """Per-pixel class of a probability tile: argmax (first index), or the binary rule."""
    if BINARY:
        fg = tl.sum(tl.where(offs_c[:, None] == 1, p, 0.0), axis=0)
        if STRICT:
            return (fg > 0.5).to(tl.int32)
        return (fg >= 0.5).to(tl.int32)
    pm = tl.where(valid_c, p, -1.0)
    mx = tl.max(pm, axis=0)
    return tl.min(tl.where(pm == mx[None, :], offs_c[:, None], BLOCK_C), axis=0)


@triton.jit
def _last(p, offs_c, C: tl.constexpr):
    return tl.sum(tl.where(offs_c[:, None] == C - 1, p, 0.0), axis=0)


@triton.jit
def _bce(x, y):
    x = tl.minimum(tl.maximum(x, 1e-8), 1.0 - 1e-7)
    return (y - 1.0) * tl.maximum(tl.log(1.0 - x), -100.0) - y * tl.maximum(tl.log(x), -100.0)


@triton.jit
def _pred_sweep(z1_ptr, z2_ptr, p_ptr, y_ptr, map_ptr, part_ptr,
                S, B, Bl, n_tiles, tiles_per_prog, n_prog,
                s1b, s1c, s1s, s2b, s2c, s2s, spb, spc, sps,
                C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                NS: tl.constexpr, BINARY: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)  # [0, B): z1 / z2 of image b; [B, B + Bu): P of image Bl + b − B
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = offs_c[:, None] < C
    cls = offs_c[:, None]
    acc_d1 = tl.zeros([BLOCK_S], tl.float32)
    acc_d2 = tl.zeros([BLOCK_S], tl.float32)
    acc_i1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_p1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_i2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_p2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_y = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    t0 = pid * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    b64 = b.to(tl.int64)
    for t in range(t0, t1):
        offs_s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        m2 = valid_c & in_s[None, :]
        if b < B:
            z1 = tl.load(z1_ptr + b64 * s1b + cls * s1c + offs_s[None, :] * s1s, mask=m2,
                         other=0.0).to(tl.float32)
            z2 = tl.load(z2_ptr + b64 * s2b + cls * s2c + offs_s[None, :] * s2s, mask=m2,
                         other=0.0).to(tl.float32)
            p1 = _probs(z1, valid_c, BINARY)
            p2 = _probs(z2, valid_c, BINARY)
            k1 = _map(p1, valid_c, offs_c, BLOCK_C, BINARY, False)
            k2 = _map(p2, valid_c, offs_c, BLOCK_C, BINARY, False)
            tl.store(map_ptr + b64 * S + offs_s, k1.to(map_ptr.dtype.element_ty), mask=in_s)
            tl.store(map_ptr + (b64 + B) * S + offs_s, k2.to(map_ptr.dtype.element_ty), mask=in_s)
            x1 = _last(p1, offs_c, C)
            x2 = _last(p2, offs_c, C)
            acc_d1 += tl.where(in_s, _bce(x1, x2), 0.0)
            acc_d2 += tl.where(in_s, _bce(x2, x1), 0.0)
            if b < Bl:
                y = tl.load(y_ptr + b64 * S + offs_s, mask=in_s, other=-1).to(tl.int32)
                g1 = _map(p1, valid_c, offs_c, BLOCK_C, BINARY, True)
                g2 = _map(p2, valid_c, offs_c, BLOCK_C, BINARY, True)
                yc = (cls == y[None, :]) & m2
                h1 = (cls == g1[None, :]) & m2
                h2 = (cls == g2[None, :]) & m2
                acc_y += yc.to(tl.float32)
                acc_p1 += h1.to(tl.float32)
                acc_p2 += h2.to(tl.float32)
                acc_i1 += (h1 & yc).to(tl.float32)
                acc_i2 += (h2 & yc).to(tl.float32)
        else:
            bp = (Bl + b - B).to(tl.int64)
            zp = tl.load(p_ptr + bp * spb + cls * spc + offs_s[None, :] * sps, mask=m2,
                         other=0.0).to(tl.float32)
            kp = _map(_probs(zp, valid_c, BINARY), valid_c, offs_c, BLOCK_C, BINARY, False)
            tl.store(map_ptr + (b64 + B) * S + offs_s, kp.to(map_ptr.dtype.element_ty), mask=in_s)
    row = part_ptr + (b64 * n_prog + pid) * NS
    tl.store(row, tl.sum(acc_d1, axis=0))
    tl.store(row + 1, tl.sum(acc_d2, axis=0))
    cmask = offs_c < C
    tl.store(row + 2 + offs_c, tl.sum(acc_i1, axis=1), mask=cmask)
    tl.store(row + 2 + C + offs_c, tl.sum(acc_p1, axis=1), mask=cmask)
    tl.store(row + 2 + 2 * C + offs_c, tl.sum(acc_i2, axis=1), mask=cmask)
    tl.store(row + 2 + 3 * C + offs_c, tl.sum(acc_p2, axis=1), mask=cmask)
    tl.store(row + 2 + 4 * C + offs_c, tl.sum(acc_y, axis=1), mask=cmask)


@triton.jit
def _pred_finalize(part_ptr, out_ptr, n_rows, inv_n, C: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_R: tl.constexpr, NS: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    d1 = tl.zeros([BLOCK_R], tl.float32)
    d2 = tl.zeros([BLOCK_R], tl.float32)
    i1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    p1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    i2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    p2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    yy = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + offs_r
        rm = rows < n_rows
        base = part_ptr + rows.to(tl.int64) * NS
        d1 += tl.load(base, mask=rm, other=0.0)
        d2 += tl.load(base + 1, mask=rm, other=0.0)
        m2 = rm[:, None] & cmask[None, :]
        col = base[:, None] + offs_c[None, :]
        i1 += tl.load(col + 2, mask=m2, other=0.0)
        p1 += tl.load(col + 2 + C, mask=m2, other=0.0)
        i2 += tl.load(col + 2 + 2 * C, mask=m2, other=0.0)
        p2 += tl.load(col + 2 + 3 * C, mask=m2, other=0.0)
        yy += tl.load(col + 2 + 4 * C, mask=m2, other=0.0)
    tl.store(out_ptr, tl.sum(d1, axis=0) * inv_n)
    tl.store(out_ptr + 1, tl.sum(d2, axis=0) * inv_n)
    ys = tl.sum(yy, axis=0)
    fgc = (offs_c >= 1) & cmask
    for k in tl.static_range(2):
        if k == 0:
            inter = tl.sum(i1, axis=0)
            ps = tl.sum(p1, axis=0)
        else:
            inter = tl.sum(i2, axis=0)
            ps = tl.sum(p2, axis=0)
        den = ps + ys
        d = tl.where(fgc & (den > 0.0), 2.0 * inter / (den + 1e-3), 0.0)
        tl.store(out_ptr + 2 + k, tl.sum(d, axis=0) / (C - 1))


def _launch(z1, z2, P, y_l, Bl: int, binary: bool):
    B, C = z1.shape[:2]
    S = spatial_size(z1)
    Bu = 0 if P is None else P.shape[0] - Bl
    maps = torch.empty((2 * B + Bu, *z1.shape[2:]), dtype=map_dtype(C), device=z1.device)
    a, *sa = flat_layout(z1)
    bb, *sb = flat_layout(z2)
    if P is not None:
        pp, *sp = flat_layout(P)
    else:
        pp, sp = a, sa
    y = y_l.reshape(y_l.shape[0], -1).contiguous() if (y_l is not None and Bl) else maps
    block_c = next_pow2(C)
    block_s = min(max(16, _TILE // block_c), max(16, next_pow2(S)))
    n_tiles = cdiv(S, block_s)
    per_img = max(1, min(n_tiles, _TARGET_PROGRAMS // max(1, B + Bu)))
    tiles_per_prog = cdiv(n_tiles, per_img)
    n_prog = cdiv(n_tiles, tiles_per_prog)
    NS = 2 + 5 * C
    part = torch.empty(((B + Bu) * n_prog, NS), dtype=torch.float32, device=z1.device)
    _pred_sweep[(n_prog, B + Bu)](
        a, bb, pp, y, maps, part, S, B, Bl, n_tiles, tiles_per_prog, n_prog, *sa, *sb, *sp,
        C=C, BLOCK_C=block_c, BLOCK_S=block_s, NS=NS, BINARY=binary,
        num_warps=8 if block_c * block_s >= 4096 else 4)
    stats = torch.empty(4, dtype=torch.float32, device=z1.device)
    _pred_finalize[(1,)](part, stats, (B + Bu) * n_prog, 1.0 / (B * S), C=C, BLOCK_C=block_c,
                         BLOCK_R=64, NS=NS, num_warps=4)
    return maps, stats


@torch.library.custom_op("ucseg::prediction_stats", mutates_args=())
def _pred_op(z1: torch.Tensor, z2: torch.Tensor, P: torch.Tensor | None, y_l: torch.Tensor | None,
             Bl: int, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not triton_usable(z1):
        P_u = P[Bl:] if P is not None else None
        return reference.prediction_stats(z1, z2, P_u, y_l, binary=binary)
    return _launch(z1, z2, P, y_l, Bl, binary)


@_pred_op.register_fake
def _(z1, z2, P, y_l, Bl, binary):
    B, C = z1.shape[:2]
    Bu = 0 if P is None else P.shape[0] - Bl
    return (z1.new_empty((2 * B + Bu, *z1.shape[2:]), dtype=map_dtype(C)),
            z1.new_empty(4, dtype=torch.float64 if z1.dtype == torch.float64 else torch.float32))


def prediction_stats(z1: torch.Tensor, z2: torch.Tensor, P: torch.Tensor | None = None,
                     y_l: torch.Tensor | None = None, *, binary: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, stats) of one step — see `reference.prediction_stats` for the definition.

    z1, z2: [B, C, *S] logits of the two subnets (any float dtype, detached or not: nothing is
    differentiated); P: the fused logits of the whole batch [B, C, *S] (its unlabeled images
    b ≥ Bl get a map) or None; y_l: [Bl, *S] int class map of the labeled images (the first
    Bl of the batch; gates are 0 without it). Two launches on CUDA, no host synchronisation."""
    check_logits("prediction_stats: z1", z1)
    if z2.shape != z1.shape:
        raise ValueError(f"prediction_stats: z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} differ")
    if binary and z1.shape[1] != 2:
        raise ValueError(f"prediction_stats: binary needs C = 2 channels, got {tuple(z1.shape)}")
    Bl = 0 if y_l is None else y_l.shape[0]
    if y_l is not None and (tuple(y_l.shape[1:]) != tuple(z1.shape[2:]) or Bl > z1.shape[0]):
        raise ValueError(f"prediction_stats: y_l {tuple(y_l.shape)} does not match the labeled "
                         f"images of z1 {tuple(z1.shape)}")
    if P is not None and P.shape != z1.shape:
        raise ValueError(f"prediction_stats: P {tuple(P.shape)} must have z1's shape "
                         f"{tuple(z1.shape)}")
    z1, z2 = z1.detach(), z2.detach()
    P = P.detach() if P is not None else None
    if not use_triton(z1):
        return reference.prediction_stats(z1, z2, P[Bl:] if P is not None else None, y_l,
                                          binary=binary)
    return _pred_op(z1, z2, P, y_l, Bl, bool(binary))
