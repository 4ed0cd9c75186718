"""The segmentation losses as one fused kernel family: CE or BCE, soft Dice and AU per pixel.

The ops built on it: `pseudo_loss.py` (pseudo_label_loss, cross_pseudo_label_loss) and
`fusion_loss.py` (segmentation_loss_terms, loss_rows, fusion_unsup_losses). Every call is three
launches, for one logit tensor or two against one target: a forward sweep writing per-program
partial sums, a fixed-order finalize writing the loss terms and the backward's coefficients,
and a backward sweep writing the logits' gradients. What differs between the ops is a constexpr.

Math (docs/method.md §2.1, §6.5), all in float32. z the logits of one pixel, p = softmax(z)
(KIND_CE) or σ(z) (BCE), y the target: the one-hot of a class map, or a float one-hot /
multi-hot map (TGT_FLOAT). The counted pixels, m = 1: every pixel of a float target; of a class
map those whose label is in [0, C), is not `ignore_index` (compared in int64: a uint8 255 or an
int64 2**32 + 1 never wraps into [0, C)) and that the mask keeps (HAS_MASK). An uncounted pixel
enters no sum and no mean (F.cross_entropy's ignore_index rule). N = Σ m, counted exactly (int32).
  cls  = CE:  Σ m·(−Σ_c y_c log p_c) / max(1, N)               (a float all-zero row counts in N)
         BCE: Σ m·Σ_c [(1−y_c)·z_c + softplus(−z_c)] / (max(1, N)·C)
              in the stable form max(−z, 0) + log1p(e^−|z|), as F.binary_cross_entropy_with_logits
  dice = mean over the G groups g of 1 − (2 I_g + ε)/(Sp_g + Sy_g + ε), I = Σ m·p·y, Sp = Σ m·p,
         Sy = Σ m·y over the pixels of g: g = (b, c); per-slice Dice (logits [B, C, H, W, D] of
         `fusion_loss`) g = (b, c, d), sums over (H, W) only — the reference's per-axial-slice Dice
  au   = Σ m·L_AU / max(1, N), L_AU as losses.au_loss (α = softplus(z) + 1, S = Σ_c α_c,
         s = max_c α_c/S, u = C/S, a = [argmax_c α_c == target]; λ·a and (1−λ)(1−a) rounded to
         float32 as the reference does), λ a 0-D float32 device tensor (HAS_AU)
Per logit tensor k the finalize writes (cls, dice, au), or with SUM_TERMS the one loss
cls + w·dice (w = dice_weight, `pseudo_label_loss`).
SELECT (`cross_pseudo_label_loss`): the target is not read but computed in the forward sweep from
both logit tensors by the rule of `entropy_pseudo_label` (`pseudo_label_tile`: label = argmax of
the lower-entropy or the mean softmax, m = [max p ≥ threshold], uncertainty = its normalised
entropy), and written out: the caller's pseudo-labels, and the class map and mask the backward
reads.
Backward, with the upstream grads (g_cls, g_dice, g_au) of loss k (SUM_TERMS: g_cls = g_dice = g):
  ∂cls/∂z_c  = m·(p_c Σ_j y_j − y_c)/N (CE);   m·(σ(z_c) − y_c)/(N·C) (BCE)
  ∂dice/∂p_c = m·(α_g y_c + β_g), α_g = −2w/(G(U_g+ε)), β_g = w(2I_g+ε)/(G(U_g+ε)²),
               U = Sp + Sy (w = 1 without SUM_TERMS), then through the softmax Jacobian
               p_c(δ_cj − p_j), or σ' = p(1−p)
  ∂au/∂z_c   = m·[∂L/∂s · g_c(δ_cm/S − α_m/S²) − ∂L/∂u · C g_c/S²]/N, g_c = softplus'(z_c)
The backward recomputes p, α, S from the logits and reads besides them only the target (and
mask) and the finalize's coefficients: no [B, C, *S] float tensor is saved.

Kernels
  `_loss_fwd_kernel`, grid (P, B): program (j, b) loops over tiles j, j + P, … of sample b and
    writes one row [Σcls, Σau, n, I[G1], Sp[G1], Sy[G1]] per logit tensor (G1 = C·D groups a
    sample; n, the counted pixels, an int32 stored bit for bit in its float32 slot). No atomics:
    bitwise deterministic, identical eager / compiled / graph-replayed.
  `_loss_finalize_kernel`, grid (K,): program k reduces loss k's [B, P, 3 + 3·G1] rows in a fixed
    order into its terms and coef[k] = [1/n_cls, 1/n_pix, then per sample α[G1], β[G1]]
    (n_cls = N for CE, N·C for BCE; n_pix = N); α, β are 0 without Dice (a defined output).
  `_loss_bwd_kernel`, grid (tiles, B): one tile each, the gradients of all K logit tensors.
  PAIR (K = 2): two logit tensors against one target, which each tile reads once.
A tile is [BLOCK_C, BLOCK_R·BLOCK_D]: all classes of BLOCK_R rows × all D slices (padded to a
power of two; D = 1 but for per-slice Dice), so per-slice partials are a reshape + sum of the
register accumulators at the end of the sweep.

Launch geometry, computed per call from the shapes (nothing read from the environment):
  BLOCK_C = next_pow2(C) (a pixel's whole softmax in registers), BLOCK_D = next_pow2(D), BLOCK_R
  rows so that a tile holds ~`TILE_ELEMS` = 2048 elements and at least 16 pixels; 8 warps from
  4096 tile elements (PAIR: twice the tile) up, else 4 (`num_warps_for`).
  Forward programs per sample: ⌈tiles / ⌈tiles / (8·SMs / B)⌉⌉, about 8 programs per SM in all,
  each over the same number of tiles, and at most 2^18 partial floats (3D with a large C·D);
  SMs = the device's multiprocessor count (`sm_count`; 128 under the CPU interpreter).
  Finalize: [BLOCK_B, BLOCK_R, BLOCK_G] tiles of ~4096 elements (`_FINALIZE_TILE`), 8 warps.

Traffic per pixel (e bytes a logit; l bytes of target: 8 for an int64 class map, C·4 for a
float32 map; 1-byte mask):
  forward reads C·e + l (+ 1 with a mask; PAIR 2·C·e + l); SELECT reads 2·C·e and writes 13
  (int64 label, mask, float32 uncertainty); backward reads C·e + l (+ 1) and writes C·e (PAIR:
  twice the logits). The unfused PyTorch chain (one_hot, log_softmax, mul, sum, softmax, three
  Dice sums, AU ≈ 15 ops, and the autograd backward of each) moves ≈ 30–40·C·4 bytes.

Layout: logits [B, C, *S] seen as [B, C, R, D], element (b, c, r, d) at b·sb + c·sc + r·sr + d·sd:
R = the spatial dims collapsed to one stride and D = 1 (sd = 0), or for per-slice Dice R = H·W and
D the last dim. Contiguous and channels-last collapse and are read in place; any other layout is
copied once. A float target likewise; class maps (any integer dtype) and masks are read dense
[B, S] (a strided view is copied once). Gradients are written in the layout of `empty_like(z)`.
"""
from __future__ import annotations

import math

import torch

from . import _triton_utils as tu
from ._triton_utils import (cdiv, flat_layout, next_pow2, num_warps_for, sm_count, softmax_logp_f32,
                            softplus_f32, softplus_grad_f32, spatial_size, tl, triton)
from .entropy import pseudo_label_tile

PROGRAMS_PER_SM = 8  # forward sweep programs, all samples together
_PART_BUDGET = 1 << 18  # max float32 partial-sum elements (3D with large C·D: fewer programs)
_FINALIZE_TILE = 4096  # elements of one [samples, rows, groups] tile of the finalize
AU_EPS = 1e-10


# --------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_logits(z_ptr, b, sb, sc, sr, sd, offs_c, r, d, valid):
    return tl.load(z_ptr + b * sb + offs_c[:, None] * sc + (r * sr + d * sd)[None, :],
                   mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _load_target(lab_ptr, t_ptr, mask_ptr, b, S, D, tb, tc, tr, td, offs_c, r, d, in_j, valid_c,
                 ignore_index, C: tl.constexpr, BLOCK_C: tl.constexpr, TGT_FLOAT: tl.constexpr,
                 HAS_MASK: tl.constexpr):
    """(y [BLOCK_C, BLOCK_J] float32, 0 outside the counted pixels; cls [BLOCK_J] int32, the AU
    target class, −1 outside them; keep [BLOCK_J], the counted pixels)."""
    valid = valid_c & in_j[None, :]
    if TGT_FLOAT:
        y = tl.load(t_ptr + b * tb + offs_c[:, None] * tc + (r * tr + d * td)[None, :],
                    mask=valid, other=0).to(tl.float32)
        ymax = tl.max(tl.where(valid_c, y, float("-inf")), axis=0)
        # argmax_c y, first index on ties (torch.argmax); an all-zero row gives class 0
        cls = tl.min(tl.where(valid_c & (y == ymax[None, :]), offs_c[:, None], BLOCK_C), axis=0)
        keep = in_j
    else:
        pix = b * S + r * D + d
        lab = tl.load(lab_ptr + pix, mask=in_j, other=-1).to(tl.int64)
        keep = in_j & (lab >= 0) & (lab < C) & (lab != ignore_index)
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + pix, mask=in_j, other=0) != 0)
        cls = tl.where(keep, lab, -1).to(tl.int32)
        y = tl.where(valid & (offs_c[:, None] == cls[None, :]), 1.0, 0.0)
    return y, cls, keep


@triton.jit
def _probs(z, valid_c, KIND_CE: tl.constexpr):
    """(p, log p) for CE; (σ(z), z) for BCE (the second is what the classification term reads)."""
    if KIND_CE:
        p, logp = softmax_logp_f32(z, valid_c)
        return p, logp
    else:
        return 1.0 / (1.0 + tl.exp(-z)), z


@triton.jit
def _au_pixel(z, valid_c, cls, offs_c, lam, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-pixel AU pieces: (s, u, m, S, wa, wi)."""
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
def _tile_partials(z, p, aux, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls, acc_au, acc_i,
                   acc_p, C: tl.constexpr, BLOCK_C: tl.constexpr, KIND_CE: tl.constexpr,
                   HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr):
    """Add one tile's partial sums over its counted pixels `keep` ((p, aux) from `_probs`)."""
    valid = valid_c & keep[None, :]
    if KIND_CE:
        acc_cls += tl.where(keep, -tl.sum(y * aux, axis=0), 0.0)
    else:
        e = tl.exp(-tl.abs(z))
        l1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
        el = (1.0 - y) * z + tl.maximum(-z, 0.0) + l1p
        acc_cls += tl.sum(tl.where(valid, el, 0.0), axis=0)
    if HAS_DICE:
        pm = tl.where(valid, p, 0.0)
        acc_i += pm * y
        acc_p += pm
    if HAS_AU:
        s, u, m, S, wa, wi = _au_pixel(z, valid_c, cls, offs_c, lam, C, BLOCK_C)
        au = wa * (-s * tl.log(1.0 - u + eps_au)) + wi * (-(1.0 - s) * tl.log(u + eps_au))
        acc_au += tl.where(keep, au, 0.0)
    return acc_cls, acc_au, acc_i, acc_p


@triton.jit
def _store_row(row, acc_cls, acc_au, acc_n, acc_i, acc_p, acc_y, offs_c, offs_d,
               C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_DICE: tl.constexpr):
    """Row [Σcls, Σau, n, I[c, d], Sp[c, d], Sy[c, d]] of the partial-sum buffer."""
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


# --------------------------------------------------------------------------- forward sweep
@triton.jit
def _loss_fwd_kernel(z1_ptr, z2_ptr, lab_ptr, t_ptr, mask_ptr, lam_ptr, thr_ptr, lab_out_ptr,
                     keep_out_ptr, unc_out_ptr, part_ptr, R, n_tiles, eps_au, ignore_index, inv_log_c,
                     s1b, s1c, s1r, s1d, s2b, s2c, s2r, s2d, tb, tc, tr, td,
                     C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, KIND_CE: tl.constexpr,
                     TGT_FLOAT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DICE: tl.constexpr,
                     HAS_AU: tl.constexpr, PAIR: tl.constexpr, SELECT: tl.constexpr,
                     MEAN: tl.constexpr):
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
    thr = 0.0
    if SELECT:
        thr = tl.load(thr_ptr).to(tl.float32)
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
        z1 = _load_logits(z1_ptr, b, s1b, s1c, s1r, s1d, offs_c, r, d, valid)
        if SELECT:  # the pseudo-labels of both subnets, from the softmaxes the losses reuse
            z2 = _load_logits(z2_ptr, b, s2b, s2c, s2r, s2d, offs_c, r, d, valid)
            label, keep, h, p1, aux1, p2, aux2 = pseudo_label_tile(z1, z2, valid_c, thr, inv_log_c,
                                                                   MEAN)
            pix = b * S + r
            tl.store(lab_out_ptr + pix, label.to(tl.int64), mask=in_j)
            tl.store(keep_out_ptr + pix, keep.to(tl.uint8), mask=in_j)
            tl.store(unc_out_ptr + pix, h, mask=in_j)
            keep = keep & in_j
            cls = tl.where(keep, label, -1)
            y = tl.where(valid & (offs_c[:, None] == cls[None, :]), 1.0, 0.0)
        else:
            y, cls, keep = _load_target(lab_ptr, t_ptr, mask_ptr, b, S, D, tb, tc, tr, td, offs_c,
                                        r, d, in_j, valid_c, ignore_index, C, BLOCK_C, TGT_FLOAT,
                                        HAS_MASK)
            p1, aux1 = _probs(z1, valid_c, KIND_CE)
        acc_n += keep.to(tl.int32)
        if HAS_DICE:
            acc_y += y
        acc_cls1, acc_au1, acc_i1, acc_p1 = _tile_partials(
            z1, p1, aux1, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls1, acc_au1, acc_i1,
            acc_p1, C, BLOCK_C, KIND_CE, HAS_DICE, HAS_AU)
        if PAIR:
            if not SELECT:
                z2 = _load_logits(z2_ptr, b, s2b, s2c, s2r, s2d, offs_c, r, d, valid)
                p2, aux2 = _probs(z2, valid_c, KIND_CE)
            acc_cls2, acc_au2, acc_i2, acc_p2 = _tile_partials(
                z2, p2, aux2, y, cls, keep, valid_c, offs_c, lam, eps_au, acc_cls2, acc_au2, acc_i2,
                acc_p2, C, BLOCK_C, KIND_CE, HAS_DICE, HAS_AU)
    _store_row(part_ptr + (b * n_prog + pid) * W, acc_cls1, acc_au1, acc_n, acc_i1, acc_p1, acc_y,
               offs_c, offs_d, C, D, BLOCK_C, BLOCK_R, BLOCK_D, HAS_DICE)
    if PAIR:
        _store_row(part_ptr + ((n_b + b) * n_prog + pid) * W, acc_cls2, acc_au2, acc_n, acc_i2,
                   acc_p2, acc_y, offs_c, offs_d, C, D, BLOCK_C, BLOCK_R, BLOCK_D, HAS_DICE)


# --------------------------------------------------------------------------- finalize
@triton.jit
def _loss_finalize_kernel(part_ptr, coef_ptr, loss_ptr, B, n_rows, n_groups, dice_weight, eps,
                          G1: tl.constexpr, CLS_PER_PIXEL: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                          HAS_DICE: tl.constexpr, SUM_TERMS: tl.constexpr):
    """Program k: loss k's [B, n_rows, 3 + 3·G1] partials → its terms and coef[k]. The Dice sums
    of [BLOCK_B samples, BLOCK_G groups] are reduced side by side over the rows (a loop per
    sample would serialise one global-memory latency per sample)."""
    W: tl.constexpr = 3 + 3 * G1
    k = tl.program_id(0).to(tl.int64)
    part_ptr += k * B * n_rows * W
    coef_ptr += k * (2 + B * 2 * G1)
    offs_p = tl.arange(0, BLOCK_P)
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
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_R)
    offs_g = tl.arange(0, BLOCK_G)
    dice_acc = tl.zeros([BLOCK_B, BLOCK_G], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + offs_b
        in_b = bb < B
        for g0 in range(0, G1, BLOCK_G):
            g = g0 + offs_g
            m_bg = in_b[:, None] & (g < G1)[None, :]
            alpha = tl.zeros([BLOCK_B, BLOCK_G], tl.float32)
            beta = tl.zeros([BLOCK_B, BLOCK_G], tl.float32)
            if HAS_DICE:
                ai = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_G], tl.float32)
                ap = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_G], tl.float32)
                ay = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_G], tl.float32)
                for r0 in range(0, n_rows, BLOCK_R):
                    r = r0 + offs_r
                    m3 = m_bg[:, None, :] & (r < n_rows)[None, :, None]
                    row = (part_ptr + ((bb[:, None] * n_rows + r[None, :]) * W)[:, :, None]
                           + 3 + g[None, None, :])
                    ai += tl.load(row, mask=m3, other=0.0)
                    ap += tl.load(row + G1, mask=m3, other=0.0)
                    ay += tl.load(row + 2 * G1, mask=m3, other=0.0)
                inter2 = 2.0 * tl.sum(ai, axis=1) + eps
                den = (tl.sum(ap, axis=1) + tl.sum(ay, axis=1)) + eps
                dice_acc += tl.where(m_bg, 1.0 - inter2 / den, 0.0)
                alpha = -2.0 * dice_weight / (n_groups * den)
                beta = dice_weight * inter2 / (n_groups * den * den)
            crow = coef_ptr + 2 + bb[:, None] * 2 * G1 + g[None, :]
            tl.store(crow, alpha, mask=m_bg)
            tl.store(crow + G1, beta, mask=m_bg)
    n_pix = tl.maximum(tl.sum(acc_n, axis=0), 1)
    n_cls = n_pix * CLS_PER_PIXEL
    cls = tl.sum(acc_cls, axis=0) / n_cls.to(tl.float32)
    dice = tl.sum(tl.sum(dice_acc, axis=1), axis=0) / n_groups
    if SUM_TERMS:
        tl.store(loss_ptr + k, cls + dice_weight * dice)
    else:
        tl.store(loss_ptr + 3 * k, cls)
        tl.store(loss_ptr + 3 * k + 1, dice)
        tl.store(loss_ptr + 3 * k + 2, tl.sum(acc_au, axis=0) / n_pix.to(tl.float32))
    # the backward's 1/n as float32(1/n computed in float64)
    tl.store(coef_ptr, (1.0 / n_cls.to(tl.float64)).to(tl.float32))
    tl.store(coef_ptr + 1, (1.0 / n_pix.to(tl.float64)).to(tl.float32))


# --------------------------------------------------------------------------- backward sweep
@triton.jit
def _grad_tile(z, y, cls, keep, valid_c, offs_c, d, coef_row, g_row, lam, eps_au, inv_cls, inv_pix,
               C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
               KIND_CE: tl.constexpr, HAS_DICE: tl.constexpr, HAS_AU: tl.constexpr,
               SUM_TERMS: tl.constexpr):
    """g_cls·∂cls/∂z + g_dice·∂dice/∂z + g_au·∂au/∂z of one tile, 0 outside the counted pixels.
    g_row: the upstream grads of this loss, [g] (SUM_TERMS) or [g_cls, g_dice, g_au]."""
    valid = valid_c & keep[None, :]
    p, _ = _probs(z, valid_c, KIND_CE)
    g_cls = tl.load(g_row).to(tl.float32)
    if KIND_CE:
        dz = (p * tl.sum(y, axis=0)[None, :] - y) * (g_cls * inv_cls)
    else:
        dz = (p - y) * (g_cls * inv_cls)
    if HAS_DICE:
        if BLOCK_D == 1:  # one (α, β) per class: a vector load, broadcast over the pixels
            cm = offs_c < C
            a_g = tl.load(coef_row + offs_c, mask=cm, other=0.0)[:, None]
            b_g = tl.load(coef_row + C + offs_c, mask=cm, other=0.0)[:, None]
        else:
            cd = offs_c[:, None] * D + d[None, :]
            a_g = tl.load(coef_row + cd, mask=valid, other=0.0)
            b_g = tl.load(coef_row + C * D + cd, mask=valid, other=0.0)
        if SUM_TERMS:
            g_dice = g_cls
        else:
            g_dice = tl.load(g_row + 1).to(tl.float32)
        dp = tl.where(valid, a_g * y + b_g, 0.0) * g_dice
        if KIND_CE:
            dz += p * (dp - tl.sum(dp * p, axis=0)[None, :])
        else:
            dz += dp * p * (1.0 - p)
    if HAS_AU:
        s, u, m, S, wa, wi = _au_pixel(z, valid_c, cls, offs_c, lam, C, BLOCK_C)
        lu = tl.log(1.0 - u + eps_au)
        lv = tl.log(u + eps_au)
        dl_ds = -wa * lu + wi * lv
        dl_du = wa * s / (1.0 - u + eps_au) - wi * (1.0 - s) / (u + eps_au)
        inv_s = 1.0 / S
        g_c = softplus_grad_f32(z)
        is_m = offs_c[:, None] == m[None, :]
        ds = g_c * (tl.where(is_m, inv_s[None, :], 0.0) - (s * inv_s)[None, :])
        du = g_c * (-C * inv_s * inv_s)[None, :]
        g_au = tl.load(g_row + 2).to(tl.float32) * inv_pix
        dz += (dl_ds[None, :] * ds + dl_du[None, :] * du) * g_au
    return tl.where(valid, dz, 0.0)


@triton.jit
def _loss_bwd_kernel(g_ptr, z1_ptr, z2_ptr, lab_ptr, t_ptr, mask_ptr, lam_ptr, coef_ptr, dz1_ptr,
                     dz2_ptr, R, eps_au, ignore_index,
                     s1b, s1c, s1r, s1d, s2b, s2c, s2r, s2d, tb, tc, tr, td,
                     d1b, d1c, d1r, d1d, d2b, d2c, d2r, d2d,
                     C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, KIND_CE: tl.constexpr,
                     TGT_FLOAT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DICE: tl.constexpr,
                     HAS_AU: tl.constexpr, PAIR: tl.constexpr, SUM_TERMS: tl.constexpr):
    BLOCK_J: tl.constexpr = BLOCK_R * BLOCK_D
    G_STRIDE: tl.constexpr = 1 if SUM_TERMS else 3
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
    y, cls, keep = _load_target(lab_ptr, t_ptr, mask_ptr, b, S, D, tb, tc, tr, td, offs_c, r, d,
                                in_j, valid_c, ignore_index, C, BLOCK_C, TGT_FLOAT, HAS_MASK)
    # coef of loss k: [1/n_cls, 1/n_pix, then [B, 2, C·D]] (the finalize's layout)
    K_STRIDE = 2 + n_b * 2 * C * D
    z1 = _load_logits(z1_ptr, b, s1b, s1c, s1r, s1d, offs_c, r, d, valid)
    dz1 = _grad_tile(z1, y, cls, keep, valid_c, offs_c, d, coef_ptr + 2 + b * 2 * C * D, g_ptr,
                     lam, eps_au, tl.load(coef_ptr), tl.load(coef_ptr + 1), C, D, BLOCK_C, BLOCK_D,
                     KIND_CE, HAS_DICE, HAS_AU, SUM_TERMS)
    tl.store(dz1_ptr + b * d1b + offs_c[:, None] * d1c + (r * d1r + d * d1d)[None, :],
             dz1.to(dz1_ptr.dtype.element_ty), mask=valid)
    if PAIR:
        z2 = _load_logits(z2_ptr, b, s2b, s2c, s2r, s2d, offs_c, r, d, valid)
        coef2 = coef_ptr + K_STRIDE
        dz2 = _grad_tile(z2, y, cls, keep, valid_c, offs_c, d, coef2 + 2 + b * 2 * C * D,
                         g_ptr + G_STRIDE, lam, eps_au, tl.load(coef2), tl.load(coef2 + 1), C, D,
                         BLOCK_C, BLOCK_D, KIND_CE, HAS_DICE, HAS_AU, SUM_TERMS)
        tl.store(dz2_ptr + b * d2b + offs_c[:, None] * d2c + (r * d2r + d * d2d)[None, :],
                 dz2.to(dz2_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- launch geometry
def rd_layout(t: torch.Tensor, per_slice: bool) -> tuple[torch.Tensor, int, int, int, int]:
    """(t', sb, sc, sr, sd): element (b, c, r, d) of t seen as [B, C, R, D] at
    b·sb + c·sc + r·sr + d·sd. per_slice (a 5-D t): R = H·W and D = the last dim, else all spatial
    dims in R (sd = 0). Layouts whose R dims do not collapse are copied once."""
    if not per_slice:
        t, sb, sc, ss = flat_layout(t)
        return t, sb, sc, ss, 0
    dims = [(n, s) for n, s in zip(t.shape[2:4], t.stride()[2:4]) if n != 1]
    if len(dims) == 2 and dims[0][1] != dims[1][1] * dims[1][0]:
        t = t.contiguous()
        dims = [(n, s) for n, s in zip(t.shape[2:4], t.stride()[2:4]) if n != 1]
    sr = dims[-1][1] if dims else 1
    return t, t.stride(0), t.stride(1), sr, t.stride(4)


def slices(z: torch.Tensor, per_slice: bool) -> int:
    """D: the Dice groups a (sample, class) splits into."""
    return z.shape[-1] if per_slice else 1


def geometry(z: torch.Tensor, per_slice: bool) -> tuple[int, int, int, int, int, int]:
    """(R, D, BLOCK_C, BLOCK_R, BLOCK_D, tiles per sample) of logits z (header: the rule)."""
    C, D = z.shape[1], slices(z, per_slice)
    R = spatial_size(z) // D
    block_c, block_d = next_pow2(C), next_pow2(D)
    block_r = max(1, tu.TILE_ELEMS // (block_c * block_d))
    block_r = min(next_pow2(block_r), next_pow2(R))
    block_r = max(block_r, 16 // block_d if block_d < 16 else 1)  # at least 16 pixels a tile
    return R, D, block_c, block_r, block_d, cdiv(R, block_r)


def target_programs(device: torch.device) -> int:
    """Forward-sweep programs of a call, all samples together: 8 per SM."""
    return PROGRAMS_PER_SM * sm_count(device)


def coef_shape(z: torch.Tensor, K: int, per_slice: bool) -> tuple[int, int]:
    """coef [K, 2 + B·2·C·D] float32: per loss 1/n_cls, 1/n_pix, then per sample α[C·D], β[C·D]."""
    return (K, 2 + z.shape[0] * 2 * z.shape[1] * slices(z, per_slice))


def _targets(z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, per_slice: bool):
    """(labels [B, S] | None, float target | None, its strides, mask [B, S] uint8 | None)."""
    if target.dim() == z.dim():
        t = target.view(torch.uint8) if target.dtype == torch.bool else target
        t, *strides = rd_layout(t, per_slice)
        return None, t, tuple(strides), None
    B = z.shape[0]
    lab = target.reshape(B, -1).contiguous()  # the kernels read dense [B, S]
    msk = None if mask is None else mask.reshape(B, -1).contiguous().view(torch.uint8)
    return lab, None, (0, 0, 0, 0), msk


def _grad_buffer(z: torch.Tensor, per_slice: bool):
    """(dz = empty_like(z), the tensor the kernel writes, its strides): dz itself unless dz's
    spatial dims do not collapse (then a dense copy, copied back into dz after the launch)."""
    dz = torch.empty_like(z)
    flat, *strides = rd_layout(dz, per_slice)
    return dz, flat, strides


def launch_forward(z1: torch.Tensor, z2: torch.Tensor | None, target: torch.Tensor,
                   mask: torch.Tensor | None, lam: torch.Tensor | None, losses: torch.Tensor,
                   coef: torch.Tensor, *, kind: str, dice: bool, dice_weight: float, eps: float,
                   ignore_index: int, per_slice: bool, sum_terms: bool,
                   select: tuple | None = None) -> None:
    """Forward sweep + finalize into `losses` ([K, 3], or [K] / 0-D with sum_terms) and `coef`
    (`coef_shape`). select = (threshold 0-D, labels out, mask out, uncertainty out, mean): the
    pseudo-labels computed in the sweep (SELECT; then `target` is unused and z2 is required)."""
    K = 1 if z2 is None else 2
    B, C = z1.shape[:2]
    R, D, block_c, block_r, block_d, n_tiles = geometry(z1, per_slice)
    W = 3 + 3 * C * D
    per_sample = max(1, min(target_programs(z1.device) // B, _PART_BUDGET // (K * B * W)))
    n_prog = cdiv(n_tiles, cdiv(n_tiles, per_sample))
    a, *sa = rd_layout(z1, per_slice)
    bb, *sbb = rd_layout(z2, per_slice) if z2 is not None else (a, *sa)
    if select is None:
        lab, tgt, st, msk = _targets(a, target, mask, per_slice)
        thr = lab_out = keep_out = unc_out = None
        inv_log_c, mean = 1.0, False
    else:
        thr, lab_out, keep_out, unc_out, mean = select
        keep_out = keep_out.view(torch.uint8)
        lab = tgt = msk = None
        st, inv_log_c = (0, 0, 0, 0), 1.0 / math.log(C)
    part = a.new_empty((K, B, n_prog, W), dtype=torch.float32)
    _loss_fwd_kernel[(n_prog, B)](
        a, bb, *(x if x is not None else part for x in (lab, tgt, msk, lam, thr, lab_out,
                                                         keep_out, unc_out)),
        part, R, n_tiles, AU_EPS, ignore_index, inv_log_c, *sa, *sbb, *st,
        C=C, D=D, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_D=block_d, KIND_CE=(kind == "ce"),
        TGT_FLOAT=tgt is not None, HAS_MASK=msk is not None, HAS_DICE=dice, HAS_AU=lam is not None,
        PAIR=z2 is not None, SELECT=select is not None, MEAN=mean,
        num_warps=num_warps_for(K * block_c, block_r * block_d))
    G1 = C * D
    block_g = min(next_pow2(G1), max(16, _FINALIZE_TILE // 4))
    block_b = min(next_pow2(B), max(1, _FINALIZE_TILE // block_g))
    block_rr = max(1, min(next_pow2(n_prog), _FINALIZE_TILE // (block_b * block_g)))
    block_p = max(2, min(next_pow2(B * n_prog), _FINALIZE_TILE))
    _loss_finalize_kernel[(K,)](
        part, coef, losses, B, n_prog, float(B * G1), float(dice_weight), float(eps), G1=G1,
        CLS_PER_PIXEL=1 if kind == "ce" else C, BLOCK_P=block_p, BLOCK_B=block_b,
        BLOCK_R=block_rr, BLOCK_G=block_g, HAS_DICE=dice, SUM_TERMS=sum_terms, num_warps=8)


def launch_backward(grad: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor | None,
                    target: torch.Tensor, mask: torch.Tensor | None, lam: torch.Tensor | None,
                    coef: torch.Tensor, *, kind: str, dice: bool, ignore_index: int,
                    per_slice: bool, sum_terms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward sweep: (dz1, dz2 or None), each in the layout of empty_like(z). grad: the
    upstream grads, [K, 3] ([K] or 0-D with sum_terms), any float dtype."""
    B, C = z1.shape[:2]
    R, D, block_c, block_r, block_d, n_tiles = geometry(z1, per_slice)
    a, *sa = rd_layout(z1, per_slice)
    bb, *sbb = rd_layout(z2, per_slice) if z2 is not None else (a, *sa)
    dz1, w1, sd1 = _grad_buffer(z1, per_slice)
    dz2, w2, sd2 = _grad_buffer(z2, per_slice) if z2 is not None else (None, w1, sd1)
    lab, tgt, st, msk = _targets(a, target, mask, per_slice)
    _loss_bwd_kernel[(n_tiles, B)](
        grad.to(torch.float32).contiguous(), a, bb,
        *(x if x is not None else coef for x in (lab, tgt, msk, lam)), coef, w1, w2, R, AU_EPS,
        ignore_index, *sa, *sbb, *st, *sd1, *sd2, C=C, D=D, BLOCK_C=block_c, BLOCK_R=block_r,
        BLOCK_D=block_d, KIND_CE=(kind == "ce"), TGT_FLOAT=tgt is not None,
        HAS_MASK=msk is not None, HAS_DICE=dice, HAS_AU=lam is not None, PAIR=z2 is not None,
        SUM_TERMS=sum_terms, num_warps=num_warps_for(block_c, block_r * block_d))
    for dz, w in ((dz1, w1), (dz2, w2)):
        if dz is not None and w is not dz:
            dz.copy_(w)
    return dz1, dz2
