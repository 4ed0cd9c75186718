"""The per-pixel losses of the paper's `fusion` mode (CE or BCE, Dice, AU), fused.

Math (METHOD.md §2.1, §6.5), all in float32, p = softmax(z) for kind "ce" / σ(z) for "bce",
y = the target (one-hot of a class map, or a float one-hot/multi-hot map), N = the counted
pixels: every pixel of a float target; of a class map those whose label is in [0, C) and not
`ignore_index` (F.cross_entropy's rule: an uncounted pixel enters no sum and no mean):
  ce   = Σ_pixels −Σ_c y_c log p_c / N                   (a float all-zero row counts in N)
  bce  = Σ_(pixels,c) (1−y)·z + softplus(−z) / (N·C)      (stable form, as F.bce_with_logits)
  dice = mean over groups g of 1 − (2 I_g + ε)/(Sp_g + Sy_g + ε), I = Σ p·y, Sp = Σ p,
         Sy = Σ y, summed over dims (2, 3) only: g = (b, c) in 2D, (b, c, d) in 3D
         [B, C, H, W, D] — the reference's per-axial-slice Dice (losses.dice_loss)
  au   = Σ_pixels L_AU / N, L_AU as losses.au_loss (α = softplus(z)+1, s = max α/S, u = C/S,
         a = [argmax == target]; λ·a and (1−λ)(1−a) rounded to float32 as the reference does),
         λ a 0-D float32 device tensor (a changed λ is seen by a captured CUDA graph).
Backward, with the upstream grads (g_cls, g_dice, g_au) of the three terms:
  ∂ce/∂z_c   = (p_c Σ_j y_j − y_c)/N;          ∂bce/∂z_c = (σ(z_c) − y_c)/(N·C)
  ∂dice/∂p_c = α_g y_c + β_g, α_g = −2/(G(U+ε)), β_g = (2I+ε)/(G(U+ε)²), U = Sp + Sy, then
               through the softmax Jacobian p_c(δ_cj − p_j) or σ' = p(1−p)
  ∂au/∂z_c   = [∂L/∂s · g_c(δ_cm/S − α_m/S²) − ∂L/∂u · C g_c/S²]/N, g_c = softplus'(z_c)
The backward kernel recomputes p, α, S from the logits; what it reads besides them is the
finalize's [2, C·D] coefficient rows per sample — no [B, C, *S] float tensor is saved.

Kernels: (1) forward sweep, grid (programs, B): each program loops over tiles of one sample
and writes one row [Σcls, Σau, I[C·D], Sp[C·D], Sy[C·D]] of partial sums (no atomics: bitwise
deterministic, identical eager / compiled / graph-replayed); (2) one-program-per-loss finalize
that reduces the rows in a fixed order into the three terms and the Dice α, β; (3) backward
sweep, grid (tiles, B). `fusion_unsup_losses` runs the same three launches for both subnets
against one target: each tile reads the target once and both logit tensors (PAIR).
A tile is [BLOCK_C, BLOCK_R·BLOCK_D]: all classes of BLOCK_R rows (of the collapsed H·W) ×
all D slices (padded to a power of two; D = 1 in 2D), so the per-slice Dice partials are a
reshape + sum of the register accumulators at the end of the sweep.
Traffic per pixel (e bytes per logit, 8-byte labels): forward reads C·e + 8 (pair: 2·C·e + 8);
backward reads C·e + 8, writes C·e (pair: twice the logits). The unfused PyTorch chain
(one_hot, log_softmax, mul, sum, softmax, 3 Dice sums, AU ≈ 15 ops, and their autograd
backward) moves ≈ 40·C·4 bytes per pixel.
Layout: logits [B, C, H, W] or [B, C, H, W, D] whose (H, W) dims collapse to one stride
(contiguous and channels-last both do; read in place); float targets likewise; class maps
[B, *S] any integer dtype (a label outside [0, C) or equal to `ignore_index` is not counted).
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._triton_utils import (TILE_ELEMS, cdiv, check_ignore_index, check_logits, flat_layout,
                            next_pow2, num_warps_for, out_float_dtype, softmax_logp_f32,
                            softplus_f32, softplus_grad_f32, tl, triton, triton_usable, use_triton)

__all__ = ["segmentation_loss_terms", "SegmentationLossTerms", "fusion_unsup_losses",
           "FusionUnsupLosses", "pair_loss_terms", "loss_rows"]

_TARGET_PROGRAMS = 1024  # forward sweep: about 8 programs per SM on H100/H200
_PART_BUDGET = 1 << 18  # max float32 partial-sum elements (3D with large C·D: fewer programs)
_FINALIZE_TILE = 4096  # elements of one [rows, groups] tile of the finalize
_AU_EPS = 1e-10


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_logits(z_ptr, b, sb, sc, sr, sd, offs_c, r, d, valid):
    return tl.load(z_ptr + b * sb + offs_c[:, None] * sc + (r * sr + d * sd)[None, :],
                   mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _load_target(lab_ptr, t_ptr, b, S, D, tb, tc, tr, td, offs_c, r, d, in_j, valid_c,
                 ignore_index, C: tl.constexpr, BLOCK_C: tl.constexpr, TGT_FLOAT: tl.constexpr):
    """(y [BLOCK_C, BLOCK_J] float32, 0 outside; cls [BLOCK_J] int32, the AU target class;
    keep [BLOCK_J], the counted pixels: every in-bounds pixel of a float target; for a class
    map the pixels whose label is in [0, C) and not ignore_index — y = 0 and cls = −1 elsewhere)."""
    valid = valid_c & in_j[None, :]
    if TGT_FLOAT:
        y = tl.load(t_ptr + b * tb + offs_c[:, None] * tc + (r * tr + d * td)[None, :],
                    mask=valid, other=0).to(tl.float32)
        ymax = tl.max(tl.where(valid_c, y, float("-inf")), axis=0)
        # argmax_c y, first index on ties (torch.argmax); an all-zero row gives class 0
        cls = tl.min(tl.where(valid_c & (y == ymax[None, :]), offs_c[:, None], BLOCK_C), axis=0)
        keep = in_j
    else:
        # compared in int64: a uint8 255 or an int64 2**32 + 1 must not wrap into [0, C)
        lab = tl.load(lab_ptr + b * S + r * D + d, mask=in_j, other=-1).to(tl.int64)
        keep = in_j & (lab >= 0) & (lab < C) & (lab != ignore_index)
        cls = tl.where(keep, lab, -1).to(tl.int32)
        y = tl.where(valid & (offs_c[:, None] == cls[None, :]), 1.0, 0.0)
    return y, cls, keep


@triton.jit
def _probs(z, valid_c, KIND_CE: tl.constexpr):
    """(p, per-element classification loss before masking)."""
    if KIND_CE:
        p, logp = softmax_logp_f32(z, valid_c)
        return p, logp
    else:
        p = 1.0 / (1.0 + tl.exp(-z))
        return p, z


@triton.jit
def _au_pixel(z, valid_c, cls, offs_c, lam, eps_au, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-pixel AU pieces: (s, u, m, α_m, S, wa, wi)."""
    alpha = tl.where(valid_c, softplus_f32(z) + 1.0, 0.0)
    S = tl.sum(alpha, axis=0)
    q = alpha / S[None, :]  # divided per element, like the reference (argmax on α/S)
    s = tl.max(q, axis=0)
    m = tl.min(tl.where(valid_c & (q == s[None, :]), offs_c[:, None], BLOCK_C), axis=0)
    u = C / S
    a = m == cls
    wa = tl.where(a, lam, 0.0)
    wi = tl.where(a, 0.0, 1.0 - lam)
    return s, u, m, S, wa, wi


@triton.jit
def _tile_partials(z, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls, acc_au, acc_i, acc_p,
                   C: tl.constexpr, BLOCK_C: tl.constexpr, KIND_CE: tl.constexpr,
                   HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr):
    """Add one tile's partial sums over its counted pixels `keep`."""
    valid = valid_c & keep[None, :]
    p, aux = _probs(z, valid_c, KIND_CE)
    if KIND_CE:
        acc_cls += tl.where(keep, -tl.sum(y * aux, axis=0), 0.0)
    else:
        # (1−y)·z + softplus(−z) in the stable form max(−z, 0) + log1p(e^−|z|)
        e = tl.exp(-tl.abs(z))
        l1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
        el = (1.0 - y) * z + tl.maximum(-z, 0.0) + l1p
        acc_cls += tl.sum(tl.where(valid, el, 0.0), axis=0)
    if HAS_DICE:
        pm = tl.where(valid, p, 0.0)
        acc_i += pm * y
        acc_p += pm
    if HAS_AU:
        s, u, m, S, wa, wi = _au_pixel(z, valid_c, cls, offs_c, lam, eps_au, C, BLOCK_C)
        au = wa * (-s * tl.log(1.0 - u + eps_au)) + wi * (-(1.0 - s) * tl.log(u + eps_au))
        acc_au += tl.where(keep, au, 0.0)
    return acc_cls, acc_au, acc_i, acc_p


@triton.jit
def _store_row(row, acc_cls, acc_au, acc_n, acc_i, acc_p, acc_y, offs_c, offs_d,
               C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_DICE: tl.constexpr):
    """Row [Σcls, Σau, n, I[c, d], Sp[c, d], Sy[c, d]] of the partial-sum buffer; n (the
    counted pixels, int32) is stored bit for bit in its float32 slot (exact at any count)."""
    tl.store(row, tl.sum(acc_cls, axis=0))
    tl.store(row + 1, tl.sum(acc_au, axis=0))
    tl.store(row + 2, tl.sum(acc_n, axis=0).to(tl.float32, bitcast=True))
    if HAS_DICE:
        G1: tl.constexpr = C * D
        cd = offs_c[:, None] * D + offs_d[None, :]
        m = (offs_c < C)[:, None] & (offs_d < D)[None, :]
        # the tile's pixel axis is (row, slice): summing over rows leaves per-slice sums
        tl.store(row + 3 + cd, tl.sum(tl.reshape(acc_i, [BLOCK_C, BLOCK_R, BLOCK_D]), axis=1), mask=m)
        tl.store(row + 3 + G1 + cd, tl.sum(tl.reshape(acc_p, [BLOCK_C, BLOCK_R, BLOCK_D]), axis=1),
                 mask=m)
        tl.store(row + 3 + 2 * G1 + cd,
                 tl.sum(tl.reshape(acc_y, [BLOCK_C, BLOCK_R, BLOCK_D]), axis=1), mask=m)


@triton.jit
def _fl_fwd_kernel(z1_ptr, z2_ptr, lab_ptr, t_ptr, lam_ptr, part_ptr, R, n_tiles, eps_au,
                   ignore_index, s1b, s1c, s1r, s1d, s2b, s2c, s2r, s2d, tb, tc, tr, td,
                   C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, KIND_CE: tl.constexpr,
                   TGT_FLOAT: tl.constexpr, HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr,
                   PAIR: tl.constexpr):
    BLOCK_J: tl.constexpr = BLOCK_R * BLOCK_D
    W: tl.constexpr = 3 + 3 * C * D
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    S = R * D
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    valid_c = (offs_c < C)[:, None]
    j = tl.arange(0, BLOCK_J)
    jr = j // BLOCK_D
    d = j % BLOCK_D
    lam = 0.0
    if HAS_AU:
        lam = tl.load(lam_ptr).to(tl.float32)
    acc_n = tl.zeros([BLOCK_J], tl.int32)
    acc_cls1 = tl.zeros([BLOCK_J], tl.float32)
    acc_au1 = tl.zeros([BLOCK_J], tl.float32)
    acc_i1 = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    acc_p1 = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    acc_cls2 = tl.zeros([BLOCK_J], tl.float32)
    acc_au2 = tl.zeros([BLOCK_J], tl.float32)
    acc_i2 = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    acc_p2 = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    acc_y = tl.zeros([BLOCK_C, BLOCK_J], tl.float32)
    for t in range(pid, n_tiles, n_prog):
        r = t * BLOCK_R + jr
        in_j = (r < R) & (d < D)
        valid = valid_c & in_j[None, :]
        y, cls, keep = _load_target(lab_ptr, t_ptr, b, S, D, tb, tc, tr, td, offs_c, r, d, in_j,
                                    valid_c, ignore_index, C, BLOCK_C, TGT_FLOAT)
        acc_n += keep.to(tl.int32)
        if HAS_DICE:
            acc_y += y
        z1 = _load_logits(z1_ptr, b, s1b, s1c, s1r, s1d, offs_c, r, d, valid)
        acc_cls1, acc_au1, acc_i1, acc_p1 = _tile_partials(
            z1, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls1, acc_au1, acc_i1, acc_p1,
            C, BLOCK_C, KIND_CE, HAS_DICE, HAS_AU)
        if PAIR:
            z2 = _load_logits(z2_ptr, b, s2b, s2c, s2r, s2d, offs_c, r, d, valid)
            acc_cls2, acc_au2, acc_i2, acc_p2 = _tile_partials(
                z2, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls2, acc_au2, acc_i2, acc_p2,
                C, BLOCK_C, KIND_CE, HAS_DICE, HAS_AU)
    _store_row(part_ptr + (b * n_prog + pid) * W, acc_cls1, acc_au1, acc_n, acc_i1, acc_p1, acc_y,
               offs_c, offs_d, C, D, BLOCK_C, BLOCK_R, BLOCK_D, HAS_DICE)
    if PAIR:
        _store_row(part_ptr + ((n_b + b) * n_prog + pid) * W, acc_cls2, acc_au2, acc_n, acc_i2,
                   acc_p2, acc_y, offs_c, offs_d, C, D, BLOCK_C, BLOCK_R, BLOCK_D, HAS_DICE)


@triton.jit
def _fl_finalize_kernel(part_ptr, coef_ptr, loss_ptr, B, n_rows, n_groups, eps,
                        G1: tl.constexpr, CLS_PER_PIXEL: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_G: tl.constexpr, HAS_DICE: tl.constexpr):
    """Program k: fixed-order reduction of loss k's [B, n_rows, 3 + 3·G1] partials into
    loss[k] = (cls, dice, au) and coef[k] = [1/n_cls, 1/n_pix, then [B, 2, G1] (Dice α_g, β_g)]
    for the backward. n = the counted pixels (max 1: nothing counted gives 0, not NaN), n_cls
    = CLS_PER_PIXEL·n (CE: 1, BCE: C terms a pixel), n_pix = n (AU)."""
    W: tl.constexpr = 3 + 3 * G1
    k = tl.program_id(0).to(tl.int64)
    part_ptr += k * B * n_rows * W
    coef_ptr += k * (2 + B * 2 * G1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    acc_cls = tl.zeros([BLOCK_P], tl.float32)
    acc_au = tl.zeros([BLOCK_P], tl.float32)
    acc_n = tl.zeros([BLOCK_P], tl.int64)
    total_rows = B * n_rows
    for r0 in range(0, total_rows, BLOCK_P):
        r = r0 + offs_p
        m = r < total_rows
        acc_cls += tl.load(part_ptr + r * W, mask=m, other=0.0)
        acc_au += tl.load(part_ptr + r * W + 1, mask=m, other=0.0)
        acc_n += tl.load(part_ptr + r * W + 2, mask=m, other=0.0).to(tl.int32, bitcast=True).to(tl.int64)
    dice_acc = tl.zeros([BLOCK_G], tl.float32)
    if HAS_DICE:
        for b in range(B):
            for g0 in range(0, G1, BLOCK_G):
                g = g0 + offs_g
                gm = g < G1
                ai = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
                ap = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
                ay = tl.zeros([BLOCK_P, BLOCK_G], tl.float32)
                for r0 in range(0, n_rows, BLOCK_P):
                    r = r0 + offs_p
                    m2 = (r < n_rows)[:, None] & gm[None, :]
                    row = part_ptr + (b * n_rows + r)[:, None] * W + 3 + g[None, :]
                    ai += tl.load(row, mask=m2, other=0.0)
                    ap += tl.load(row + G1, mask=m2, other=0.0)
                    ay += tl.load(row + 2 * G1, mask=m2, other=0.0)
                inter2 = 2.0 * tl.sum(ai, axis=0) + eps
                den = (tl.sum(ap, axis=0) + tl.sum(ay, axis=0)) + eps
                dice_acc += tl.where(gm, 1.0 - inter2 / den, 0.0)
                crow = coef_ptr + 2 + b * 2 * G1 + g
                tl.store(crow, -2.0 / (n_groups * den), mask=gm)
                tl.store(crow + G1, inter2 / (n_groups * den * den), mask=gm)
    n_pix = tl.maximum(tl.sum(acc_n, axis=0), 1)
    n_cls = n_pix * CLS_PER_PIXEL
    tl.store(loss_ptr + 3 * k, tl.sum(acc_cls, axis=0) / n_cls.to(tl.float32))
    tl.store(loss_ptr + 3 * k + 1, tl.sum(dice_acc, axis=0) / n_groups)
    tl.store(loss_ptr + 3 * k + 2, tl.sum(acc_au, axis=0) / n_pix.to(tl.float32))
    # the backward's 1/n as float32(1/n computed in float64), the rounding the host's
    # 1.0 / n (a Python float passed as a float32 argument) had
    tl.store(coef_ptr, (1.0 / n_cls.to(tl.float64)).to(tl.float32))
    tl.store(coef_ptr + 1, (1.0 / n_pix.to(tl.float64)).to(tl.float32))


@triton.jit
def _grad_tile(z, y, cls, keep, valid_c, offs_c, d, coef_row, g_ptr, lam, eps_au, inv_cls, inv_pix,
               C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, KIND_CE: tl.constexpr,
               HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr):
    """g_cls·∂cls/∂z + g_dice·∂dice/∂z + g_au·∂au/∂z of one tile (0 outside the counted
    pixels `keep`: an uncounted pixel enters no term)."""
    valid = valid_c & keep[None, :]
    p, _ = _probs(z, valid_c, KIND_CE)
    if KIND_CE:
        dz = (p * tl.sum(y, axis=0)[None, :] - y) * (tl.load(g_ptr).to(tl.float32) * inv_cls)
    else:
        dz = (p - y) * (tl.load(g_ptr).to(tl.float32) * inv_cls)
    if HAS_DICE:
        cd = offs_c[:, None] * D + d[None, :]
        a_g = tl.load(coef_row + cd, mask=valid, other=0.0)
        b_g = tl.load(coef_row + C * D + cd, mask=valid, other=0.0)
        dp = tl.where(valid, a_g * y + b_g, 0.0) * tl.load(g_ptr + 1).to(tl.float32)
        if KIND_CE:
            dz += p * (dp - tl.sum(dp * p, axis=0)[None, :])
        else:
            dz += dp * p * (1.0 - p)
    if HAS_AU:
        s, u, m, S, wa, wi = _au_pixel(z, valid_c, cls, offs_c, lam, eps_au, C, BLOCK_C)
        lu = tl.log(1.0 - u + eps_au)
        lv = tl.log(u + eps_au)
        dl_ds = -wa * lu + wi * lv
        dl_du = wa * s / (1.0 - u + eps_au) - wi * (1.0 - s) / (u + eps_au)
        inv_s = 1.0 / S
        g_c = softplus_grad_f32(z)
        is_m = offs_c[:, None] == m[None, :]
        ds = g_c * (tl.where(is_m, inv_s[None, :], 0.0) - (s * inv_s)[None, :])
        du = g_c * (-C * inv_s * inv_s)[None, :]
        g_au = tl.load(g_ptr + 2).to(tl.float32) * inv_pix
        dz += (dl_ds[None, :] * ds + dl_du[None, :] * du) * g_au
    return tl.where(valid, dz, 0.0)


@triton.jit
def _fl_bwd_kernel(g_ptr, z1_ptr, z2_ptr, lab_ptr, t_ptr, lam_ptr, coef_ptr, dz1_ptr, dz2_ptr,
                   R, eps_au, ignore_index,
                   s1b, s1c, s1r, s1d, s2b, s2c, s2r, s2d, tb, tc, tr, td,
                   d1b, d1c, d1r, d1d, d2b, d2c, d2r, d2d,
                   C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, KIND_CE: tl.constexpr,
                   TGT_FLOAT: tl.constexpr, HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr,
                   PAIR: tl.constexpr):
    BLOCK_J: tl.constexpr = BLOCK_R * BLOCK_D
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    S = R * D
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = (offs_c < C)[:, None]
    j = tl.arange(0, BLOCK_J)
    r = pid * BLOCK_R + j // BLOCK_D
    d = j % BLOCK_D
    in_j = (r < R) & (d < D)
    valid = valid_c & in_j[None, :]
    lam = 0.0
    if HAS_AU:
        lam = tl.load(lam_ptr).to(tl.float32)
    y, cls, keep = _load_target(lab_ptr, t_ptr, b, S, D, tb, tc, tr, td, offs_c, r, d, in_j,
                                valid_c, ignore_index, C, BLOCK_C, TGT_FLOAT)
    # coef of loss k: [1/n_cls, 1/n_pix, then [B, 2, C·D]] (the finalize's layout)
    K_STRIDE = 2 + n_b * 2 * C * D
    z1 = _load_logits(z1_ptr, b, s1b, s1c, s1r, s1d, offs_c, r, d, valid)
    dz1 = _grad_tile(z1, y, cls, keep, valid_c, offs_c, d, coef_ptr + 2 + b * 2 * C * D, g_ptr,
                     lam, eps_au, tl.load(coef_ptr), tl.load(coef_ptr + 1), C, D, BLOCK_C,
                     KIND_CE, HAS_DICE, HAS_AU)
    tl.store(dz1_ptr + b * d1b + offs_c[:, None] * d1c + (r * d1r + d * d1d)[None, :],
             dz1.to(dz1_ptr.dtype.element_ty), mask=valid)
    if PAIR:
        z2 = _load_logits(z2_ptr, b, s2b, s2c, s2r, s2d, offs_c, r, d, valid)
        coef2 = coef_ptr + K_STRIDE
        dz2 = _grad_tile(z2, y, cls, keep, valid_c, offs_c, d, coef2 + 2 + b * 2 * C * D,
                         g_ptr + 3, lam, eps_au, tl.load(coef2), tl.load(coef2 + 1), C, D,
                         BLOCK_C, KIND_CE, HAS_DICE, HAS_AU)
        tl.store(dz2_ptr + b * d2b + offs_c[:, None] * d2c + (r * d2r + d * d2d)[None, :],
                 dz2.to(dz2_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- launchers
def _rd_layout(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(t', stride_b, stride_c, stride_r, stride_d): element (b, c, r, d) of the tensor viewed
    as [B, C, H·W, D] (D = 1 in 2D) sits at b·sb + c·sc + r·sr + d·sd. Contiguous and
    channels-last qualify without a copy; (H, W) that do not collapse are copied once."""
    if t.dim() == 4:
        t, sb, sc, ss = flat_layout(t)
        return t, sb, sc, ss, 0
    dims = [(n, s) for n, s in zip(t.shape[2:4], t.stride()[2:4]) if n != 1]
    if len(dims) == 2 and dims[0][1] != dims[1][1] * dims[1][0]:
        t = t.contiguous()
        dims = [(n, s) for n, s in zip(t.shape[2:4], t.stride()[2:4]) if n != 1]
    sr = dims[-1][1] if dims else 1
    return t, t.stride(0), t.stride(1), sr, t.stride(4)


def _geometry(t: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(R, D, BLOCK_C, BLOCK_R, BLOCK_D, n_tiles) of logits [B, C, H, W(, D)]."""
    C = t.shape[1]
    R = t.shape[2] * t.shape[3]
    D = t.shape[4] if t.dim() == 5 else 1
    block_c, block_d = next_pow2(C), next_pow2(D)
    block_r = max(1, TILE_ELEMS // (block_c * block_d))
    block_r = min(next_pow2(block_r), next_pow2(R))
    block_r = max(block_r, 16 // block_d if block_d < 16 else 1)  # at least 16 pixels a tile
    return R, D, block_c, block_r, block_d, cdiv(R, block_r)


def _targets(z: torch.Tensor, target: torch.Tensor):
    """(labels [B, S] or None, float target or None, its (sb, sc, sr, sd), TGT_FLOAT)."""
    if target.dim() == z.dim():
        t = target.view(torch.uint8) if target.dtype == torch.bool else target
        t, *strides = _rd_layout(t)
        return None, t, tuple(strides), True
    lab = target.reshape(z.shape[0], -1).contiguous()  # the kernel reads dense [B, S]
    return lab, None, (0, 0, 0, 0), False


def _coef_shape(z: torch.Tensor, K: int) -> tuple[int, ...]:
    """coef [K, 2 + B·2·C·D] float32: per loss, 1/n_cls and 1/n_pix (the backward's scales of
    the CE|BCE and AU terms, from the counted pixels), then the Dice α, β rows [B, 2, C·D]."""
    D = z.shape[4] if z.dim() == 5 else 1
    return (K, 2 + z.shape[0] * 2 * z.shape[1] * D)


def _kernels_run(z: torch.Tensor) -> bool:
    """The custom ops launch the kernels; an empty input (B = 0 or no pixel) takes the
    reference (0 for every term, as there), and so does what Triton cannot run."""
    return triton_usable(z) and z.numel() > 0


def _launch_fwd(z1, z2, target, lam, kind, dice, eps, ignore_index):
    K = 1 if z2 is None else 2
    B, C = z1.shape[:2]
    losses = z1.new_empty((K, 3), dtype=torch.float32)
    coef = (z1.new_empty if dice else z1.new_zeros)(_coef_shape(z1, K), dtype=torch.float32)
    R, D, block_c, block_r, block_d, n_tiles = _geometry(z1)
    W = 3 + 3 * C * D
    per_sample = max(1, min(_TARGET_PROGRAMS // B, _PART_BUDGET // (K * B * W)))
    n_prog = cdiv(n_tiles, cdiv(n_tiles, per_sample))
    a, *sa = _rd_layout(z1)
    bb, *sbb = _rd_layout(z2) if z2 is not None else (a, *sa)
    lab, tgt, st, tgt_float = _targets(a, target)
    part = a.new_empty((K, B, n_prog, W), dtype=torch.float32)
    dummy = lab if lab is not None else tgt
    _fl_fwd_kernel[(n_prog, B)](
        a, bb, dummy if lab is None else lab, dummy if tgt is None else tgt,
        lam if lam is not None else losses, part, R, n_tiles, _AU_EPS, ignore_index, *sa, *sbb, *st,
        C=C, D=D, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_D=block_d, KIND_CE=(kind == "ce"),
        TGT_FLOAT=tgt_float, HAS_DICE=dice, HAS_AU=lam is not None, PAIR=z2 is not None,
        num_warps=num_warps_for(K * block_c, block_r * block_d))
    n_groups = float(B * C * D)
    G1 = C * D
    block_g = min(next_pow2(G1), max(16, _FINALIZE_TILE // 4))
    block_p = max(2, min(next_pow2(B * n_prog), _FINALIZE_TILE // block_g))
    _fl_finalize_kernel[(K,)](
        part, coef, losses, B, n_prog, n_groups, float(eps), G1=G1,
        CLS_PER_PIXEL=1 if kind == "ce" else C, BLOCK_P=block_p, BLOCK_G=block_g, HAS_DICE=dice, num_warps=8)
    return losses.to(out_float_dtype(z1)), coef


def _launch_bwd(grad, z1, z2, target, lam, coef, kind, dice, ignore_index):
    B, C = z1.shape[:2]
    R, D, block_c, block_r, block_d, n_tiles = _geometry(z1)
    a, *sa = _rd_layout(z1)
    bb, *sbb = _rd_layout(z2) if z2 is not None else (a, *sa)
    # written in the (collapsible) layout the kernel reads; copied into empty_like(z) below
    # only for a layout whose (H, W) dims do not collapse (the input was copied too)
    dz1 = torch.empty_like(a)
    dz2 = torch.empty_like(bb) if z2 is not None else dz1
    lab, tgt, st, tgt_float = _targets(a, target)
    dummy = lab if lab is not None else tgt
    _fl_bwd_kernel[(n_tiles, B)](
        grad.to(torch.float32).contiguous(), a, bb, dummy if lab is None else lab,
        dummy if tgt is None else tgt, lam if lam is not None else coef, coef, dz1, dz2, R,
        _AU_EPS, ignore_index, *sa, *sbb, *st, *_rd_layout(dz1)[1:],
        *_rd_layout(dz2)[1:], C=C, D=D, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_D=block_d,
        KIND_CE=(kind == "ce"), TGT_FLOAT=tgt_float, HAS_DICE=dice, HAS_AU=lam is not None,
        PAIR=z2 is not None, num_warps=num_warps_for(block_c, block_r * block_d))
    return _like(dz1, z1), (_like(dz2, z2) if z2 is not None else None)


def _like(dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dz in the strides of empty_like(z) (what the fake kernel promises); a copy only when z's
    (H, W) dims do not collapse."""
    out = torch.empty_like(z)
    return dz if out.stride() == dz.stride() else out.copy_(dz)


# --------------------------------------------------------------------------- custom ops
def _ref_losses(z1, z2, target, lam, kind, dice, eps, ignore_index=-100) -> torch.Tensor:
    """[K, 3] (cls, dice, au) through the plain-PyTorch reference (zeros for absent terms)."""
    rows = []
    for z in (z1, z2) if z2 is not None else (z1,):
        t = reference.segmentation_loss_terms(z, target, kind=kind, lam=lam, dice=dice, eps=eps,
                                              ignore_index=ignore_index)
        zero = t[kind].new_zeros(())
        rows.append(torch.stack([t[kind], t.get("dice", zero), t.get("au", zero)]))
    return torch.stack(rows)


@torch.library.custom_op("ucseg::segmentation_loss_terms", mutates_args=())
def _fl_op(z1: torch.Tensor, z2: torch.Tensor | None, target: torch.Tensor,
           lam: torch.Tensor | None, kind: str, dice: bool, eps: float, ignore_index: int = -100
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (losses [K, 3] = (cls, dice, au) per logit tensor, coef [K, 2 + B·2·C·D] float32,
    what the backward reads (`_coef_shape`); non-differentiable). K = 2 when z2 is given."""
    if not _kernels_run(z1):  # the backward recomputes through the reference; coef unused
        K = 1 if z2 is None else 2
        return (_ref_losses(z1, z2, target, lam, kind, dice, eps, ignore_index),
                z1.new_zeros(_coef_shape(z1, K), dtype=torch.float32))
    return _launch_fwd(z1, z2, target, lam, kind, dice, eps, ignore_index)


@_fl_op.register_fake
def _(z1, z2, target, lam, kind, dice, eps, ignore_index=-100):
    K = 1 if z2 is None else 2
    return (z1.new_empty((K, 3), dtype=out_float_dtype(z1)),
            z1.new_empty(_coef_shape(z1, K), dtype=torch.float32))


@torch.library.custom_op("ucseg::segmentation_loss_terms_backward", mutates_args=())
def _fl_bwd_op(grad: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor | None,
               target: torch.Tensor, lam: torch.Tensor | None, coef: torch.Tensor, kind: str,
               dice: bool, eps: float, ignore_index: int = -100) -> list[torch.Tensor]:
    if not _kernels_run(z1):
        # torch.func, not enable_grad + autograd.grad: an op's implementation runs below the
        # autograd dispatch key, where enable_grad() records nothing
        xs = [z.detach() for z in (z1, z2) if z is not None]
        ref, vjp = torch.func.vjp(
            lambda *zs: _ref_losses(zs[0], zs[1] if len(zs) > 1 else None, target, lam, kind,
                                    dice, eps, ignore_index), *xs)
        gs = vjp(grad.to(ref.dtype))
        return [torch.empty_like(x).copy_(g) for x, g in zip(xs, gs)]
    dz1, dz2 = _launch_bwd(grad, z1, z2, target, lam, coef, kind, dice, ignore_index)
    return [dz1] if z2 is None else [dz1, dz2]


@_fl_bwd_op.register_fake
def _(grad, z1, z2, target, lam, coef, kind, dice, eps, ignore_index=-100):
    return [torch.empty_like(z) for z in (z1, z2) if z is not None]


def _setup_context(ctx, inputs, output) -> None:
    z1, z2, target, lam, kind, dice, eps, ignore_index = inputs
    _, coef = output
    ctx.save_for_backward(z1, z2, target, lam, coef)
    ctx.kind, ctx.dice, ctx.eps, ctx.ignore_index = kind, dice, eps, ignore_index
    ctx.mark_non_differentiable(coef)
    ctx.set_materialize_grads(False)  # no zero-filled grad for coef (a launch saved)


def _backward(ctx, grad_losses: torch.Tensor | None, grad_coef: torch.Tensor | None):
    if grad_losses is None:
        return None, None, None, None, None, None, None, None
    z1, z2, target, lam, coef = ctx.saved_tensors
    dz = _fl_bwd_op(grad_losses, z1, z2, target, lam, coef, ctx.kind, ctx.dice, ctx.eps,
                    ctx.ignore_index)
    return dz[0], (dz[1] if z2 is not None else None), None, None, None, None, None, None


_fl_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _check(op: str, logits: torch.Tensor, target: torch.Tensor, kind: str,
           lam: torch.Tensor | float | None, eps: float, ignore_index: int = -100
           ) -> torch.Tensor | None:
    check_logits(f"{op}: logits", logits)
    check_ignore_index(op, ignore_index)
    if logits.dim() not in (4, 5):
        raise ValueError(f"{op}: logits must be [B, C, H, W] or [B, C, H, W, D] (Dice sums dims "
                         f"(2, 3)), got shape {tuple(logits.shape)}")
    if kind not in ("ce", "bce"):
        raise ValueError(f"{op}: kind must be 'ce' or 'bce', got {kind!r}")
    if isinstance(eps, torch.Tensor):
        raise TypeError(f"{op}: eps must be a Python number (a kernel constant)")
    B, C = logits.shape[:2]
    cls_shape = (B, *logits.shape[2:])
    if tuple(target.shape) == cls_shape:
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f"{op}: a class-map target must be an integer tensor, got {target.dtype}")
    elif tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"{op}: target must be a class map {cls_shape} or a one-hot/multi-hot "
                         f"map {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{op}: target on {target.device}, logits on {logits.device}")
    if lam is None:
        return None
    if not isinstance(lam, torch.Tensor):
        # an H2D copy per call and not CUDA-graph safe: pass a 0-D device tensor in the step
        return torch.tensor(float(lam), dtype=torch.float32, device=logits.device)
    if lam.dim() != 0 or lam.device != logits.device:
        raise ValueError(f"{op}: lam must be a 0-D tensor on {logits.device}, got shape "
                         f"{tuple(lam.shape)} on {lam.device}")
    return lam.to(torch.float32)


def _as_terms(row: torch.Tensor, kind: str, dice: bool, au: bool) -> dict[str, torch.Tensor]:
    cls_t, dice_t, au_t = row.unbind(0)
    terms = {kind: cls_t}
    if dice:
        terms["dice"] = dice_t
    if au:
        terms["au"] = au_t
    return terms


def segmentation_loss_terms(logits: torch.Tensor, target: torch.Tensor, *, kind: str = "ce",
                            lam: torch.Tensor | float | None = None, dice: bool = True,
                            eps: float = 1e-5, ignore_index: int = -100
                            ) -> dict[str, torch.Tensor]:
    """The fusion-mode loss terms of one logit map in one fused forward and one backward.

    logits [B, C, H, W(, D)] (fp32/fp16/bf16, contiguous or channels-last; float64 runs the
    reference exactly); target: an int class map [B, *S], or a float one-hot/multi-hot map
    [B, C, *S] (the reference's nms=0 targets); lam: λ_t as a 0-D float32 device tensor, or
    None for no AU term. Returns {kind: CE|BCE, 'dice' (if dice), 'au' (if lam)} — 0-D float32
    tensors equal to losses.ce_loss/bce_loss, dice_loss(probs) (per axial slice in 3D) and
    au_loss, each differentiable in logits.

    Class map: a pixel labelled `ignore_index` or outside [0, C) (255, −1, ...) is not
    counted — it adds nothing to any term (CE/BCE, the Dice sums I, Σp, Σy, AU) and the CE/BCE
    and AU means run over the counted pixels, as `F.cross_entropy(..., ignore_index=...)`.
    No counted pixel (or B = 0): CE/BCE and AU are 0 with zero gradient (torch gives NaN).
    Float map: every pixel counts; an all-zero row is a real target (CE 0, in the mean)."""
    op = "segmentation_loss_terms"
    lam_t = _check(op, logits, target, kind, lam, eps, ignore_index)
    if not use_triton(logits):
        return reference.segmentation_loss_terms(logits, target, kind=kind, lam=lam_t, dice=dice,
                                                 eps=eps, ignore_index=ignore_index)
    losses, _ = _fl_op(logits, None, target, lam_t, kind, bool(dice), float(eps), ignore_index)
    return _as_terms(losses[0], kind, dice, lam_t is not None)


def loss_rows(z1: torch.Tensor, z2: torch.Tensor | None, target: torch.Tensor, *,
              kind: str = "ce", lam: torch.Tensor | float | None = None, dice: bool = True,
              eps: float = 1e-5, ignore_index: int = -100, op: str = "loss_rows",
              names: tuple[str, str] = ("z1", "z2")) -> torch.Tensor:
    """The loss terms of one or two logit maps against ONE target as one differentiable tensor
    [K, 3] = (cls, dice, au) per map (0 for an absent term; K = 2 with z2): one forward sweep
    (+ finalize) and one backward sweep for both maps. What a training step stacks into its
    vector of terms directly (no per-term select, no select_backward in the backward).
    `ignore_index` and out-of-range labels: as `segmentation_loss_terms`."""
    lam_t = _check(op, z1, target, kind, lam, eps, ignore_index)
    if z2 is not None:
        a, b = names
        check_logits(f"{op}: {b}", z2)
        if z2.shape != z1.shape or z2.dtype != z1.dtype or z2.device != z1.device:
            raise ValueError(f"{op}: {a} {z1.dtype} {tuple(z1.shape)} and {b} {z2.dtype} "
                             f"{tuple(z2.shape)} must match in shape, dtype and device")
    if not use_triton(z1):
        return _ref_losses(z1, z2, target, lam_t, kind, dice, eps, ignore_index)
    return _fl_op(z1, z2, target, lam_t, kind, bool(dice), float(eps), ignore_index)[0]


def pair_loss_terms(z1: torch.Tensor, z2: torch.Tensor, target: torch.Tensor, *,
                    kind: str = "ce", lam: torch.Tensor | float | None = None,
                    dice: bool = True, eps: float = 1e-5, ignore_index: int = -100,
                    op: str = "pair_loss_terms",
                    names: tuple[str, str] = ("z1", "z2")
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`segmentation_loss_terms` of two logit maps against ONE target in one forward sweep
    (+ finalize) and one backward sweep: the target is read once per tile for both. Equals
    (segmentation_loss_terms(z1, target, ...), segmentation_loss_terms(z2, target, ...)); with
    `lam` both get their AU term (the two subnets' labeled terms of a UC-Seg step)."""
    if z2 is None:
        raise ValueError(f"{op}: z2 is required (one map: segmentation_loss_terms)")
    rows = loss_rows(z1, z2, target, kind=kind, lam=lam, dice=dice, eps=eps,
                     ignore_index=ignore_index, op=op, names=names)
    au = lam is not None
    return _as_terms(rows[0], kind, dice, au), _as_terms(rows[1], kind, dice, au)


def fusion_unsup_losses(z1_u: torch.Tensor, z2_u: torch.Tensor, Y_u: torch.Tensor, *,
                        kind: str = "ce", eps: float = 1e-5, ignore_index: int = -100
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both subnets' unsupervised {kind, 'dice'} terms against ONE pseudo-label Y_u (class map
    [B, *S] or one-hot [B, C, *S]) in one forward sweep (+ finalize) and one backward sweep:
    the target is read once per tile for both subnets. Equals
    (losses.unsup_terms(z1_u, Y, kind), losses.unsup_terms(z2_u, Y, kind)) when every pixel
    counts; `ignore_index` and out-of-range labels as in `segmentation_loss_terms`."""
    return pair_loss_terms(z1_u, z2_u, Y_u, kind=kind, eps=eps, ignore_index=ignore_index,
                           op="fusion_unsup_losses", names=("z1_u", "z2_u"))


class SegmentationLossTerms(nn.Module):
    """nn.Module form of `segmentation_loss_terms`; λ_t is a 0-D float32 buffer updated in place
    by `set_lambda` (captured CUDA graphs see the new value). `use_au=False` drops the AU term.

        crit = SegmentationLossTerms("ce", lam=0.01, ignore_index=255).cuda()
        terms = crit(logits, labels)  # {'ce', 'dice', 'au'}
        crit.set_lambda(lam_t)        # in place, once per step"""

    lam: torch.Tensor

    def __init__(self, kind: str = "ce", dice: bool = True, use_au: bool = True,
                 lam: float = 0.01, eps: float = 1e-5, ignore_index: int = -100) -> None:
        super().__init__()
        check_ignore_index("SegmentationLossTerms", ignore_index)
        self.kind, self.dice, self.use_au, self.eps = kind, bool(dice), bool(use_au), float(eps)
        self.ignore_index = int(ignore_index)
        self.register_buffer("lam", torch.tensor(float(lam)), persistent=False)

    @torch.no_grad()
    def set_lambda(self, value: float | torch.Tensor) -> None:
        self.lam.fill_(value)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return segmentation_loss_terms(logits, target, kind=self.kind,
                                       lam=self.lam if self.use_au else None, dice=self.dice,
                                       eps=self.eps, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, dice={self.dice}, use_au={self.use_au}, eps={self.eps}, "
                f"ignore_index={self.ignore_index}")


class FusionUnsupLosses(nn.Module):
    """nn.Module form of `fusion_unsup_losses` (no parameters)."""

    def __init__(self, kind: str = "ce", eps: float = 1e-5, ignore_index: int = -100) -> None:
        super().__init__()
        check_ignore_index("FusionUnsupLosses", ignore_index)
        self.kind, self.eps, self.ignore_index = kind, float(eps), int(ignore_index)

    def forward(self, z1_u: torch.Tensor, z2_u: torch.Tensor, Y_u: torch.Tensor):
        return fusion_unsup_losses(z1_u, z2_u, Y_u, kind=self.kind, eps=self.eps,
                                   ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, eps={self.eps}, ignore_index={self.ignore_index}"
