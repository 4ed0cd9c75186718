"""Masked cross-entropy + soft Dice against hard pseudo-labels, fused forward and backward.

Math (METHOD.md §2.1, §6.5), p = softmax(z) in float32, y = one_hot(labels) (a label outside
[0, C) is an all-zero row: CE 0, still counted — the reference's probability-target CE), m = mask:
  CE   = Σ_i m_i·(−Σ_c y_ic log p_ic) / max(1, Σ_i m_i)                  (0 if nothing kept)
  Dice = mean_{b,c} 1 − (2 I_bc + eps) / (U_bc + eps),  I = Σ_s p·y·m,  U = Σ_s p·m + Σ_s y·m
  loss = CE + dice_weight·Dice
Backward, g = ∂loss/∂loss (a device scalar), with the forward's per-(b, c) coefficients
α = −2w/(BC(U+eps)), β = w(2I+eps)/(BC(U+eps)²) (w = dice_weight) and 1/max(1, Σm):
  ∂/∂z_ij = g·m_i·[ (p_ij Σ_c y_ic − y_ij)/max(1, Σm) + p_ij (d_ij − Σ_c d_ic p_ic) ],
  d_ic = α_bc y_ic + β_bc   (∂Dice/∂p through the softmax Jacobian p_c(δ_cj − p_j)).
Softmax is recomputed from the logits in the backward: no [B, C, ...] float tensor is saved.

Kernels: (1) forward sweep, grid (P, B): each program loops over tiles of one sample and
writes one row of partial sums [CE, Σm, I_c, Σp·m_c, Σy·m_c] (no atomics: the result is
deterministic and identical eager / compiled / graph-replayed); (2) a one-program finalize that
reduces the rows of all samples side by side, in a fixed order, and writes the loss and the
backward coefficients; (3) backward sweep, grid (tiles, B).
Traffic per pixel (e bytes per logit, 8-byte labels, 1-byte mask): forward reads C·e + 9;
backward reads C·e + 9, writes C·e. The unfused PyTorch chain (log_softmax, one_hot, mul,
sums, mask, softmax, three Dice sums, and the autograd backward of each) moves ≈ 30·C·4 bytes.

Two subnets (`cross_pseudo_label_loss`): one forward sweep computes the pseudo-labels of
`entropy_pseudo_label` and both subnets' partials from the same registers, one finalize (a
program per subnet) and one backward sweep writing both gradients: 3 launches for the whole
cross-pseudo-supervision chain. Per pixel: forward reads 2·C·e, writes 13 bytes (labels, mask,
uncertainty); backward reads 2·C·e + 9, writes 2·C·e.

Layout: logits [B, C, *spatial] with spatial dims collapsing to one stride (contiguous or
channels-last, read in place; the gradient is written in the layout of `empty_like(logits)`);
labels [B, *spatial] any integer dtype, mask [B, *spatial] bool (reshaped, copied only if
strided). CE is computed as −Σ_c y_c log p_c from the log-softmax (equal to lse·Σy − z_y).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import reference
from ._triton_utils import (cdiv, check_ignore_index, check_logits, flat_layout, next_pow2,
                            num_warps_for, out_float_dtype, softmax_logp_f32, spatial_size,
                            tile_sizes, tl, triton, triton_usable, use_triton)
from .entropy import check_pair, check_threshold, pseudo_label_tile, threshold_tensor
from .reference import CrossPseudoLoss, PseudoLabels

__all__ = ["pseudo_label_loss", "PseudoLabelLoss", "cross_pseudo_label_loss",
           "CrossPseudoLabelLoss", "CrossPseudoLoss"]

_TARGET_PROGRAMS = 1024  # forward sweep: about 8 programs per SM on H100/H200
_FINALIZE_TILE = 4096  # elements of one [samples, rows, classes] tile of the finalize


@triton.jit
def _loss_partials(acc_ce, acc_i, acc_p, p, logp, y, keep, HAS_DICE: tl.constexpr):
    """Add one tile's CE (−Σ_c y log p) and Dice partials (Σ p·y·m, Σ p·m per class)."""
    acc_ce += tl.where(keep, -tl.sum(tl.where(y, logp, 0.0), axis=0), 0.0)
    if HAS_DICE:
        pk = tl.where(keep[None, :], p, 0.0)
        acc_i += tl.where(y, pk, 0.0)
        acc_p += pk
    return acc_ce, acc_i, acc_p


@triton.jit
def _store_partials(row, acc_ce, acc_n, acc_i, acc_p, acc_y, offs_c, C: tl.constexpr,
                    HAS_DICE: tl.constexpr):
    """One row [CE, Σm, I_c, Σp·m_c, Σy·m_c] of the partial-sum buffer."""
    tl.store(row, tl.sum(acc_ce, axis=0))
    tl.store(row + 1, tl.sum(acc_n, axis=0))
    if HAS_DICE:
        cm = offs_c < C
        tl.store(row + 2 + offs_c, tl.sum(acc_i, axis=1), mask=cm)
        tl.store(row + 2 + C + offs_c, tl.sum(acc_p, axis=1), mask=cm)
        tl.store(row + 2 + 2 * C + offs_c, tl.sum(acc_y, axis=1), mask=cm)


@triton.jit
def _loss_grad_tile(p, y, keep, crow, g, offs_c, valid_c, C: tl.constexpr, HAS_DICE: tl.constexpr):
    """∂loss/∂z of one tile from the finalize's coefficients row crow = [1/max(1,Σm), α_c, β_c]."""
    yf = y.to(tl.float32)
    d = (p * tl.sum(yf, axis=0)[None, :] - yf) * tl.load(crow)
    if HAS_DICE:
        cm = offs_c < C
        alpha = tl.load(crow + 1 + offs_c, mask=cm, other=0.0)
        beta = tl.load(crow + 1 + C + offs_c, mask=cm, other=0.0)
        gp = tl.where(valid_c, alpha[:, None] * yf + beta[:, None], 0.0)
        d += p * (gp - tl.sum(gp * p, axis=0)[None, :])
    return tl.where(keep[None, :], d * g, 0.0)


@triton.jit
def _labels_keep(label_ptr, mask_ptr, b, S, offs_s, in_s, offs_c, ignore_index, C: tl.constexpr,
                 HAS_MASK: tl.constexpr):
    """(y [BLOCK_C, BLOCK_S] bool one-hot, keep [BLOCK_S]): the counted pixels — in bounds,
    kept by the mask, label in [0, C) and not ignore_index (compared in int64, so a uint8 255
    or an int64 2**32 + 1 never wraps into [0, C))."""
    lab = tl.load(label_ptr + b * S + offs_s, mask=in_s, other=-1).to(tl.int64)
    keep = in_s & (lab >= 0) & (lab < C) & (lab != ignore_index)
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * S + offs_s, mask=in_s, other=0) != 0)
    return offs_c[:, None] == lab[None, :], keep


@triton.jit
def _pl_loss_fwd_kernel(z_ptr, label_ptr, mask_ptr, part_ptr, S, n_tiles, ignore_index,
                        stride_zb, stride_zc, stride_zs,
                        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                        HAS_MASK: tl.constexpr, HAS_DICE: tl.constexpr):
    pid_s = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = (offs_c < C)[:, None]
    acc_ce = tl.zeros([BLOCK_S], tl.float32)
    acc_n = tl.zeros([BLOCK_S], tl.float32)
    acc_i = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_p = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_y = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for t in range(pid_s, n_tiles, n_prog):
        offs_s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                    mask=valid_c & in_s[None, :], other=0.0).to(tl.float32)
        p, logp = softmax_logp_f32(z, valid_c)
        y, keep = _labels_keep(label_ptr, mask_ptr, b, S, offs_s, in_s, offs_c, ignore_index, C,
                               HAS_MASK)
        acc_ce, acc_i, acc_p = _loss_partials(acc_ce, acc_i, acc_p, p, logp, y, keep, HAS_DICE)
        acc_n += keep.to(tl.float32)
        if HAS_DICE:
            acc_y += (y & keep[None, :]).to(tl.float32)
    row = part_ptr + (b * n_prog + pid_s) * (2 + 3 * C)
    _store_partials(row, acc_ce, acc_n, acc_i, acc_p, acc_y, offs_c, C, HAS_DICE)


@triton.jit
def _cps_fwd_kernel(za_ptr, zb_ptr, thr_ptr, label_ptr, mask_ptr, unc_ptr, part_ptr, S, n_tiles,
                    stride_ab, stride_ac, stride_as, stride_bb, stride_bc, stride_bs, inv_log_c,
                    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    MEAN: tl.constexpr, HAS_DICE: tl.constexpr):
    """Pseudo-labels of both subnets and both subnets' loss partials in one sweep."""
    pid_s = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = (offs_c < C)[:, None]
    thr = tl.load(thr_ptr).to(tl.float32)
    acc_ce_a = tl.zeros([BLOCK_S], tl.float32)
    acc_ce_b = tl.zeros([BLOCK_S], tl.float32)
    acc_n = tl.zeros([BLOCK_S], tl.float32)
    acc_i_a = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_p_a = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_i_b = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_p_b = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_y = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for t in range(pid_s, n_tiles, n_prog):
        offs_s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        ld = valid_c & in_s[None, :]
        za = tl.load(za_ptr + b * stride_ab + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as,
                     mask=ld, other=0.0).to(tl.float32)
        zb = tl.load(zb_ptr + b * stride_bb + offs_c[:, None] * stride_bc + offs_s[None, :] * stride_bs,
                     mask=ld, other=0.0).to(tl.float32)
        label, keep, h, pa, la, pb, lb = pseudo_label_tile(za, zb, valid_c, thr, inv_log_c, MEAN)
        out = b * S + offs_s
        tl.store(label_ptr + out, label.to(tl.int64), mask=in_s)
        tl.store(mask_ptr + out, keep.to(tl.uint8), mask=in_s)
        tl.store(unc_ptr + out, h, mask=in_s)
        y = offs_c[:, None] == label[None, :]
        keep = keep & in_s
        acc_ce_a, acc_i_a, acc_p_a = _loss_partials(acc_ce_a, acc_i_a, acc_p_a, pa, la, y, keep, HAS_DICE)
        acc_ce_b, acc_i_b, acc_p_b = _loss_partials(acc_ce_b, acc_i_b, acc_p_b, pb, lb, y, keep, HAS_DICE)
        acc_n += keep.to(tl.float32)
        if HAS_DICE:
            acc_y += (y & keep[None, :]).to(tl.float32)
    W: tl.constexpr = 2 + 3 * C
    row_a = part_ptr + (b * n_prog + pid_s) * W
    row_b = part_ptr + ((n_b + b) * n_prog + pid_s) * W
    _store_partials(row_a, acc_ce_a, acc_n, acc_i_a, acc_p_a, acc_y, offs_c, C, HAS_DICE)
    _store_partials(row_b, acc_ce_b, acc_n, acc_i_b, acc_p_b, acc_y, offs_c, C, HAS_DICE)


@triton.jit
def _pl_loss_finalize_kernel(part_ptr, coef_ptr, loss_ptr, B, n_rows, dice_weight, eps,
                             C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr, HAS_DICE: tl.constexpr):
    """Program k: fixed-order reduction of loss k's [B, n_rows, 2 + 3C] partials into
    loss[k] and coef[k] = [B, 1 + 2C] (1/max(1, Σm), α_bc, β_bc). All samples are reduced
    side by side in [BLOCK_B, BLOCK_R, BLOCK_C] tiles (a loop over samples would serialise
    one global-memory latency per sample)."""
    W: tl.constexpr = 2 + 3 * C
    k = tl.program_id(0).to(tl.int64)
    part_ptr += k * B * n_rows * W
    coef_ptr += k * B * (1 + 2 * C)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    in_b = offs_b < B
    cm = offs_c < C
    acc_ce = tl.zeros([BLOCK_B, BLOCK_R], tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_R], tl.float32)
    acc_i = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_C], tl.float32)
    acc_p = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_C], tl.float32)
    acc_y = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = r0 + offs_r
        m2 = in_b[:, None] & (r < n_rows)[None, :]
        row = part_ptr + (offs_b[:, None] * n_rows + r[None, :]) * W
        acc_ce += tl.load(row, mask=m2, other=0.0)
        acc_n += tl.load(row + 1, mask=m2, other=0.0)
        if HAS_DICE:
            m3 = m2[:, :, None] & cm[None, None, :]
            col = row[:, :, None] + offs_c[None, None, :]
            acc_i += tl.load(col + 2, mask=m3, other=0.0)
            acc_p += tl.load(col + 2 + C, mask=m3, other=0.0)
            acc_y += tl.load(col + 2 + 2 * C, mask=m3, other=0.0)
    inv_n = 1.0 / tl.maximum(tl.sum(tl.sum(acc_n, axis=1), axis=0), 1.0)
    loss = tl.sum(tl.sum(acc_ce, axis=1), axis=0) * inv_n
    crow = coef_ptr + offs_b * (1 + 2 * C)
    tl.store(crow, tl.zeros([BLOCK_B], tl.float32) + inv_n, mask=in_b)
    m_bc = in_b[:, None] & cm[None, :]
    coef_c = crow[:, None] + 1 + offs_c[None, :]
    if HAS_DICE:
        scale = dice_weight / (B * C)
        inter = tl.sum(acc_i, axis=1)
        den = tl.sum(acc_p, axis=1) + tl.sum(acc_y, axis=1) + eps
        dice = tl.where(m_bc, 1.0 - (2.0 * inter + eps) / den, 0.0)
        loss += scale * tl.sum(tl.sum(dice, axis=1), axis=0)
        tl.store(coef_c, -2.0 * scale / den, mask=m_bc)
        tl.store(coef_c + C, scale * (2.0 * inter + eps) / (den * den), mask=m_bc)
    else:  # defined output (opcheck, determinism), never read by the backward
        zero = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        tl.store(coef_c, zero, mask=m_bc)
        tl.store(coef_c + C, zero, mask=m_bc)
    tl.store(loss_ptr + k, loss)


@triton.jit
def _pl_loss_bwd_kernel(g_ptr, z_ptr, label_ptr, mask_ptr, coef_ptr, dz_ptr, S, ignore_index,
                        stride_zb, stride_zc, stride_zs, stride_db, stride_dc, stride_ds,
                        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                        HAS_MASK: tl.constexpr, HAS_DICE: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid_c = (offs_c < C)[:, None]
    ld = valid_c & in_s[None, :]
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_s[None, :] * stride_zs,
                mask=ld, other=0.0).to(tl.float32)
    p, _ = softmax_logp_f32(z, valid_c)
    y, keep = _labels_keep(label_ptr, mask_ptr, b, S, offs_s, in_s, offs_c, ignore_index, C,
                           HAS_MASK)
    g = tl.load(g_ptr).to(tl.float32)
    dz = _loss_grad_tile(p, y, keep, coef_ptr + b * (1 + 2 * C), g, offs_c, valid_c, C, HAS_DICE)
    tl.store(dz_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_s[None, :] * stride_ds,
             dz.to(dz_ptr.dtype.element_ty), mask=ld)


@triton.jit
def _cps_bwd_kernel(g_ptr, za_ptr, zb_ptr, label_ptr, mask_ptr, coef_ptr, dza_ptr, dzb_ptr, S,
                    stride_ab, stride_ac, stride_as, stride_bb, stride_bc, stride_bs,
                    stride_dab, stride_dac, stride_das, stride_dbb, stride_dbc, stride_dbs,
                    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    HAS_DICE: tl.constexpr):
    """Both subnets' gradients in one sweep, against the forward's saved labels and mask."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid_c = (offs_c < C)[:, None]
    ld = valid_c & in_s[None, :]
    lab = tl.load(label_ptr + b * S + offs_s, mask=in_s, other=-1)
    y = offs_c[:, None] == lab[None, :]
    keep = in_s & (tl.load(mask_ptr + b * S + offs_s, mask=in_s, other=0) != 0)
    za = tl.load(za_ptr + b * stride_ab + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as,
                 mask=ld, other=0.0).to(tl.float32)
    pa, _ = softmax_logp_f32(za, valid_c)
    dza = _loss_grad_tile(pa, y, keep, coef_ptr + b * (1 + 2 * C), tl.load(g_ptr).to(tl.float32),
                          offs_c, valid_c, C, HAS_DICE)
    tl.store(dza_ptr + b * stride_dab + offs_c[:, None] * stride_dac + offs_s[None, :] * stride_das,
             dza.to(dza_ptr.dtype.element_ty), mask=ld)
    zb = tl.load(zb_ptr + b * stride_bb + offs_c[:, None] * stride_bc + offs_s[None, :] * stride_bs,
                 mask=ld, other=0.0).to(tl.float32)
    pb, _ = softmax_logp_f32(zb, valid_c)
    dzb = _loss_grad_tile(pb, y, keep, coef_ptr + (n_b + b) * (1 + 2 * C),
                          tl.load(g_ptr + 1).to(tl.float32), offs_c, valid_c, C, HAS_DICE)
    tl.store(dzb_ptr + b * stride_dbb + offs_c[:, None] * stride_dbc + offs_s[None, :] * stride_dbs,
             dzb.to(dzb_ptr.dtype.element_ty), mask=ld)


# --------------------------------------------------------------------------- launchers
def _flat_targets(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None):
    B, S = logits.shape[0], spatial_size(logits)
    # the kernels index labels / mask as dense [B, S]: a strided view (e.g. y[:, 0]) is copied
    lab = labels.reshape(B, S).contiguous()
    if mask is None:
        return lab, lab, False  # the mask pointer is unused when HAS_MASK is False
    return lab, mask.reshape(B, S).contiguous().view(torch.uint8), True


def _kernels_run(logits: torch.Tensor) -> bool:
    """The custom ops launch the kernels; an empty input (B = 0 or no pixel) takes the
    reference (loss 0, empty outputs), and so does what Triton cannot run."""
    return triton_usable(logits) and logits.numel() > 0


def _coef_shape(logits: torch.Tensor) -> tuple[int, int]:
    return (logits.shape[0], 1 + 2 * logits.shape[1])


def _sweep_geometry(B: int, C: int, S: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_S, n_tiles, programs per sample) of a forward sweep: ~_TARGET_PROGRAMS
    programs in all, each looping over the same number of tiles (balanced)."""
    block_c, block_s = tile_sizes(C, S)
    n_tiles = cdiv(S, block_s)
    per_prog = cdiv(n_tiles, max(1, _TARGET_PROGRAMS // B))
    return block_c, block_s, n_tiles, cdiv(n_tiles, per_prog)


def _finalize(part: torch.Tensor, coef: torch.Tensor, loss: torch.Tensor, dice_weight: float,
              eps: float) -> None:
    """One program per loss k: part [K, B, n_rows, 2+3C] -> loss [K], coef [K, B, 1+2C]."""
    K, B, n_rows = part.shape[:3]
    C = (part.shape[3] - 2) // 3
    block_b, block_c = next_pow2(B), next_pow2(C)
    block_r = min(next_pow2(n_rows), max(1, _FINALIZE_TILE // (block_b * block_c)))
    _pl_loss_finalize_kernel[(K,)](
        part, coef, loss, B, n_rows, float(dice_weight), float(eps), C=C, BLOCK_B=block_b,
        BLOCK_R=block_r, BLOCK_C=block_c, HAS_DICE=dice_weight != 0.0, num_warps=8)


@torch.library.custom_op("ucseg::pseudo_label_loss", mutates_args=())
def _pl_loss_op(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                dice_weight: float, eps: float, ignore_index: int = -100
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, coef): coef [B, 1 + 2C] float32 holds what the backward needs
    (1/max(1, Σm), then the Dice α_bc and β_bc); it is a non-differentiable output."""
    B, C = logits.shape[:2]
    odt = out_float_dtype(logits)
    loss = logits.new_empty((), dtype=odt)
    coef = logits.new_empty(_coef_shape(logits), dtype=torch.float32)
    if not _kernels_run(logits):  # the backward recomputes through the reference; coef unused
        ref = reference.pseudo_label_loss(logits, labels, mask, dice_weight=dice_weight, eps=eps,
                                          ignore_index=ignore_index)
        return loss.copy_(ref), coef.zero_()
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    lab, msk, has_mask = _flat_targets(z, labels, mask)
    has_dice = dice_weight != 0.0
    block_c, block_s, n_tiles, n_prog = _sweep_geometry(B, C, S)
    part = logits.new_empty((B, n_prog, 2 + 3 * C), dtype=torch.float32)
    _pl_loss_fwd_kernel[(n_prog, B)](
        z, lab, msk, part, S, n_tiles, ignore_index, sb, sc, ss, C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        HAS_MASK=has_mask, HAS_DICE=has_dice, num_warps=num_warps_for(block_c, block_s))
    _finalize(part.unsqueeze(0), coef, loss, dice_weight, eps)
    return loss, coef


@_pl_loss_op.register_fake
def _(logits, labels, mask, dice_weight, eps, ignore_index=-100):
    return (logits.new_empty((), dtype=out_float_dtype(logits)),
            logits.new_empty(_coef_shape(logits), dtype=torch.float32))


@torch.library.custom_op("ucseg::pseudo_label_loss_backward", mutates_args=())
def _pl_loss_bwd_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor | None, coef: torch.Tensor, dice_weight: float,
                    eps: float, ignore_index: int = -100) -> torch.Tensor:
    dz = torch.empty_like(logits)
    if not _kernels_run(logits):
        # torch.func, not enable_grad + autograd.grad: an op's implementation runs below the
        # autograd dispatch key, where enable_grad() records nothing
        ref, vjp = torch.func.vjp(
            lambda z: reference.pseudo_label_loss(z, labels, mask, dice_weight=dice_weight,
                                                  eps=eps, ignore_index=ignore_index),
            logits.detach())
        (g,) = vjp(grad.to(ref.dtype))
        return dz.copy_(g)
    B, C = logits.shape[:2]
    z, sb, sc, ss = flat_layout(logits)
    S = spatial_size(z)
    lab, msk, has_mask = _flat_targets(z, labels, mask)
    dz_flat, db, dc, ds = flat_layout(dz)  # a copy only for non-collapsible layouts
    block_c, block_s = tile_sizes(C, S)
    _pl_loss_bwd_kernel[(cdiv(S, block_s), B)](
        grad, z, lab, msk, coef, dz_flat, S, ignore_index, sb, sc, ss, db, dc, ds, C=C, BLOCK_C=block_c,
        BLOCK_S=block_s, HAS_MASK=has_mask, HAS_DICE=dice_weight != 0.0,
        num_warps=num_warps_for(block_c, block_s))
    return dz if dz_flat is dz else dz.copy_(dz_flat)


@_pl_loss_bwd_op.register_fake
def _(grad, logits, labels, mask, coef, dice_weight, eps, ignore_index=-100):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, mask, dice_weight, eps, ignore_index = inputs
    _, coef = output
    ctx.save_for_backward(logits, labels, mask, coef)
    ctx.dice_weight, ctx.eps, ctx.ignore_index = dice_weight, eps, ignore_index
    ctx.mark_non_differentiable(coef)
    ctx.set_materialize_grads(False)  # no zero-filled grad for coef (a launch saved)


def _backward(ctx, grad_loss: torch.Tensor | None, grad_coef: torch.Tensor | None):
    if grad_loss is None:
        return None, None, None, None, None, None
    logits, labels, mask, coef = ctx.saved_tensors
    dz = _pl_loss_bwd_op(grad_loss, logits, labels, mask, coef, ctx.dice_weight, ctx.eps,
                         ctx.ignore_index)
    return dz, None, None, None, None, None


_pl_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _check_targets(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> None:
    want = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != want or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"pseudo_label_loss: labels must be an integer tensor of shape {want} "
                         f"(class indices), got {labels.dtype} {tuple(labels.shape)}")
    if mask is not None and (tuple(mask.shape) != want or mask.dtype != torch.bool):
        raise ValueError(f"pseudo_label_loss: mask must be a bool tensor of shape {want}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    for name, t in (("labels", labels), ("mask", mask)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"pseudo_label_loss: {name} on {t.device}, logits on {logits.device}")


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                      *, dice_weight: float = 0.0, eps: float = 1e-5,
                      ignore_index: int = -100) -> torch.Tensor:
    """Masked cross-entropy over kept pixels + dice_weight × soft Dice loss, a 0-D tensor.

    logits [B, C, *spatial] (fp32/fp16/bf16, contiguous or channels-last, differentiable);
    labels [B, *spatial] integer class indices (e.g. `entropy_pseudo_label(...).labels`);
    mask [B, *spatial] bool or None (all kept). A pixel counts when the mask keeps it and its
    label is in [0, C) and not `ignore_index` (255, −1, ... are never counted); an uncounted
    pixel adds nothing to the CE sum, its denominator or the Dice sums (F.cross_entropy's
    ignore_index rule). No counted pixel (or B = 0) → CE 0 with zero gradient (torch: NaN).
    dice_weight is a Python number, default 0 (CE only; 0 skips the Dice sums entirely).
    float32 result."""
    op = "pseudo_label_loss"
    check_logits(f"{op}: logits", logits)
    _check_targets(logits, labels, mask)
    check_ignore_index(op, ignore_index)
    if isinstance(dice_weight, torch.Tensor) or isinstance(eps, torch.Tensor):
        raise TypeError("pseudo_label_loss: dice_weight and eps must be Python numbers (they are "
                        "kernel constants); scale the returned loss for a per-step device weight")
    if not use_triton(logits):
        return reference.pseudo_label_loss(logits, labels, mask, dice_weight=dice_weight, eps=eps,
                                           ignore_index=ignore_index)
    loss, _ = _pl_loss_op(logits, labels, mask, float(dice_weight), float(eps), ignore_index)
    return loss


class PseudoLabelLoss(nn.Module):
    """nn.Module form of `pseudo_label_loss` (no parameters).

        crit = PseudoLabelLoss(dice_weight=1.0, ignore_index=255)
        loss = crit(logits, labels, mask)  # mask optional"""

    def __init__(self, dice_weight: float = 0.0, eps: float = 1e-5,
                 ignore_index: int = -100) -> None:
        super().__init__()
        check_ignore_index("PseudoLabelLoss", ignore_index)
        self.dice_weight, self.eps = float(dice_weight), float(eps)
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return pseudo_label_loss(logits, labels, mask, dice_weight=self.dice_weight, eps=self.eps,
                                 ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, eps={self.eps}, ignore_index={self.ignore_index}"


# --------------------------------------------------------------------------- both subnets
def _pair_outputs(za: torch.Tensor):
    B, C = za.shape[:2]
    shape = (B, *za.shape[2:])
    return (za.new_empty((2,), dtype=out_float_dtype(za)),
            za.new_empty(shape, dtype=torch.int64), za.new_empty(shape, dtype=torch.bool),
            za.new_empty(shape, dtype=out_float_dtype(za)),
            za.new_empty((2, B, 1 + 2 * C), dtype=torch.float32))


@torch.library.custom_op("ucseg::cross_pseudo_label_loss", mutates_args=())
def _cps_op(logits_a: torch.Tensor, logits_b: torch.Tensor, threshold: torch.Tensor, select: str,
            dice_weight: float, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (losses [2], labels, mask, uncertainty, coef [2, B, 1 + 2C]); only losses is
    differentiable. Forward: one sweep + one finalize launch."""
    losses, labels, mask, unc, coef = _pair_outputs(logits_a)
    if not _kernels_run(logits_a):
        ref = reference.cross_pseudo_label_loss(logits_a, logits_b, threshold, select=select,
                                                dice_weight=dice_weight, eps=eps)
        losses.copy_(torch.stack([ref.loss_a, ref.loss_b]))
        return (losses, labels.copy_(ref.pseudo.labels), mask.copy_(ref.pseudo.mask),
                unc.copy_(ref.pseudo.uncertainty), coef.zero_())
    B, C = logits_a.shape[:2]
    za, sab, sac, sas = flat_layout(logits_a)
    zb, sbb, sbc, sbs = flat_layout(logits_b)
    S = spatial_size(za)
    block_c, block_s, n_tiles, n_prog = _sweep_geometry(B, C, S)
    part = za.new_empty((2, B, n_prog, 2 + 3 * C), dtype=torch.float32)
    _cps_fwd_kernel[(n_prog, B)](
        za, zb, threshold, labels, mask.view(torch.uint8), unc, part, S, n_tiles,
        sab, sac, sas, sbb, sbc, sbs, 1.0 / math.log(C), C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        MEAN=(select == "mean"), HAS_DICE=dice_weight != 0.0,
        num_warps=num_warps_for(2 * block_c, block_s))
    _finalize(part, coef, losses, dice_weight, eps)
    return losses, labels, mask, unc, coef


@_cps_op.register_fake
def _(logits_a, logits_b, threshold, select, dice_weight, eps):
    return _pair_outputs(logits_a)


@torch.library.custom_op("ucseg::cross_pseudo_label_loss_backward", mutates_args=())
def _cps_bwd_op(grad_losses: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor,
                labels: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, dice_weight: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dza, dzb = torch.empty_like(logits_a), torch.empty_like(logits_b)
    if not _kernels_run(logits_a):
        for z, dz, g in ((logits_a, dza, grad_losses[0]), (logits_b, dzb, grad_losses[1])):
            dz.copy_(_pl_loss_bwd_op(g, z, labels, mask, coef[0], dice_weight, eps))
        return dza, dzb
    B, C = logits_a.shape[:2]
    za, sab, sac, sas = flat_layout(logits_a)
    zb, sbb, sbc, sbs = flat_layout(logits_b)
    S = spatial_size(za)
    lab, msk, _ = _flat_targets(za, labels, mask)
    block_c, block_s = tile_sizes(C, S)
    dza_flat, *la = flat_layout(dza)  # copies only for non-collapsible layouts
    dzb_flat, *lb = flat_layout(dzb)
    _cps_bwd_kernel[(cdiv(S, block_s), B)](
        grad_losses.contiguous(), za, zb, lab, msk, coef, dza_flat, dzb_flat, S, sab, sac, sas,
        sbb, sbc, sbs, *la, *lb, C=C, BLOCK_C=block_c, BLOCK_S=block_s,
        HAS_DICE=dice_weight != 0.0, num_warps=num_warps_for(block_c, block_s))
    return (dza if dza_flat is dza else dza.copy_(dza_flat),
            dzb if dzb_flat is dzb else dzb.copy_(dzb_flat))


@_cps_bwd_op.register_fake
def _(grad_losses, logits_a, logits_b, labels, mask, coef, dice_weight, eps):
    return torch.empty_like(logits_a), torch.empty_like(logits_b)


def _cps_setup_context(ctx, inputs, output) -> None:
    logits_a, logits_b, _, _, dice_weight, eps = inputs
    _, labels, mask, unc, coef = output
    ctx.save_for_backward(logits_a, logits_b, labels, mask, coef)
    ctx.dice_weight, ctx.eps = dice_weight, eps
    ctx.mark_non_differentiable(labels, mask, unc, coef)
    # otherwise autograd zero-fills a grad for each of the four non-differentiable outputs:
    # four memsets of [B, *spatial] tensors per backward
    ctx.set_materialize_grads(False)


def _cps_backward(ctx, grad_losses: torch.Tensor | None, *_):
    if grad_losses is None:
        return None, None, None, None, None, None
    logits_a, logits_b, labels, mask, coef = ctx.saved_tensors
    dza, dzb = _cps_bwd_op(grad_losses, logits_a, logits_b, labels, mask, coef,
                           ctx.dice_weight, ctx.eps)
    return dza, dzb, None, None, None, None


_cps_op.register_autograd(_cps_backward, setup_context=_cps_setup_context)


def cross_pseudo_label_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                            threshold: float | torch.Tensor = 0.95, *,
                            select: str = "min_entropy", dice_weight: float = 0.0,
                            eps: float = 1e-5) -> CrossPseudoLoss:
    """Cross pseudo-supervision of two subnets in one fused forward and one fused backward.

    Equals `entropy_pseudo_label(a.detach(), b.detach(), threshold, select=select)` followed by
    `pseudo_label_loss(a, labels, mask, ...)` and `pseudo_label_loss(b, labels, mask, ...)`,
    but reads each logit tensor once forward and once backward (3 launches in all).
    Returns CrossPseudoLoss(loss_a, loss_b, pseudo=PseudoLabels(labels, mask, uncertainty))."""
    op = "cross_pseudo_label_loss"
    check_pair(logits_a, logits_b, select, op)
    threshold = check_threshold(threshold, logits_a, op)
    if isinstance(dice_weight, torch.Tensor) or isinstance(eps, torch.Tensor):
        raise TypeError(f"{op}: dice_weight and eps must be Python numbers (kernel constants); "
                        "scale the returned losses for a per-step device weight")
    if not use_triton(logits_a):
        return reference.cross_pseudo_label_loss(logits_a, logits_b, threshold, select=select,
                                                 dice_weight=dice_weight, eps=eps)
    thr = threshold_tensor(threshold, logits_a, op)
    losses, labels, mask, unc, _ = _cps_op(logits_a, logits_b, thr, select, float(dice_weight),
                                           float(eps))
    loss_a, loss_b = losses.unbind(0)
    return CrossPseudoLoss(loss_a, loss_b, PseudoLabels(labels, mask, unc))


class CrossPseudoLabelLoss(nn.Module):
    """nn.Module form of `cross_pseudo_label_loss`; threshold is a 0-D float32 buffer updated in
    place by `set_threshold` (captured CUDA graphs see the new value)."""

    threshold: torch.Tensor

    def __init__(self, threshold: float = 0.95, select: str = "min_entropy",
                 dice_weight: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.select, self.dice_weight, self.eps = select, float(dice_weight), float(eps)
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=False)

    @torch.no_grad()
    def set_threshold(self, value: float | torch.Tensor) -> None:
        """In place (a captured graph sees it); a number, or a 0-D / [1] floating tensor."""
        value = check_threshold(value, value if isinstance(value, torch.Tensor) else
                                self.threshold, "CrossPseudoLabelLoss.set_threshold")
        if isinstance(value, torch.Tensor):
            self.threshold.copy_(value)
        else:
            self.threshold.fill_(value)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> CrossPseudoLoss:
        return cross_pseudo_label_loss(logits_a, logits_b, self.threshold, select=self.select,
                                       dice_weight=self.dice_weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"select={self.select!r}, dice_weight={self.dice_weight}, eps={self.eps}"
