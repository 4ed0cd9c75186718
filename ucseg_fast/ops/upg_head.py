"""UPG fusion head, fused by recomputation: six (1×1 conv → BatchNorm → LeakyReLU 0.2) layers.

Math (METHOD.md §6.3), per pixel i, F(i) = [A·z1(i), A·z2(i)] (2C values), h0 = F:
  x_k = W_k h_{k−1}   (W_k: [c_k, c_{k−1}], no bias; the BN input)
  y_k = a_k·x_k + b_k, a_k = γ_k·rstd_k, b_k = β_k − μ_k·a_k, rstd_k = 1/sqrt(var_k + eps)
  h_k = LReLU_0.2(y_k);   P = h_6
Training: μ_k, var_k are the batch mean / biased variance of x_k over all B·S pixels.
Backward (dy_k = dh_k·LReLU'(y_k), x̂_k = (x_k − μ_k)·rstd_k, N = B·S):
  dβ_k = Σ dy_k,  dγ_k = Σ dy_k·x̂_k,
  dx_k = a_k·(dy_k − dβ_k/N − x̂_k·dγ_k/N)   (eval: dx_k = a_k·dy_k),
  dh_{k−1} = W_kᵀ dx_k,  dW_k = Σ_i dx_k h_{k−1}ᵀ,  dz1 = A·dF[:C], dz2 = A·dF[C:],
  dA = Σ_c z1_c dF_c + z2_c dF_{C+c}.

Recompute scheme: nothing but P (and [6, W] statistics) is written in the forward, nothing but
dz1, dz2, dA (and small per-program partials) in the backward. Each *sweep* reads z1, z2, A
(2C+1 values per pixel) and recomputes the layers it needs in registers:
  forward (train): sweep j = 1..6 recomputes layers 1..j−1 with the statistics already known and
    reduces x_j's statistics; sweep 7 emits P.  Eval: sweep 7 only (running statistics).
  backward (train): sweep k = 6..1 recomputes the forward and the backward down to dy_k and
    reduces Σdy_k, Σdy_k·x̂_k; a final sweep emits dz1, dz2, dA and the per-program partials of
    all six dW_k and of dγ, dβ.  Eval: the final sweep only.
Traffic per pixel (e bytes per input element): forward 7·(2C·e + e) read + C·e written; backward
7·(2C·e + e + C·e) read + (2C+1)·e written — against ≈ 2·(160 + C)·4 bytes written and read
again by the eager chain (conv/BN/LReLU activations kept for the backward, METHOD §6.1).

Statistics (numerical choice): each program merges per-tile (count, mean, M2) with Chan's
parallel formula (M2 = Σ(x − mean)², never Σx² − N·mean²), and the per-program partials are
merged the same way by a one-program kernel (`_bn_finalize_kernel`, which also writes the BN
affine the next sweep reads). This has no catastrophic cancellation when
|mean| ≫ std (the head's first layer sees A·logits with large means). Measured against float64
on [4,4,64,64] (as launched: 256 programs of one 64-pixel tile): logits ~N(0,3): relative variance error
1.4e-7 (layer 1), 2.0e-7 (all layers); logits with mean 300, std 0.03: 5.3e-6 / 6.7e-5, where the
naive fp32 E[x²] − E[x]² is off by 2.6e-2 (tests/test_ops_upg_head.py checks < 1e-3 there).
(The final merge moved from PyTorch into that kernel, same formula; under the CPU
interpreter, same [4,4,64,64] shape with another initialisation, the largest relative variance
error went from 9.1e-8 to 1.5e-7 (layer 1) and 2.2e-7 to 4.1e-7 (all layers) for N(0,3) logits,
and stayed 1.5e-7 / went from 1.8e-6 to 2.7e-6 for mean 300, std 0.03: fp32 rounding either way.)
Per-program partials, then a fixed-order reduction: deterministic, no atomics; eager, compiled
and graph-replayed runs agree bit for bit.

Products use tl.dot (all widths padded to ≥ 16) with input_precision "ieee" (exact fp32
products) or "tf32" (tensor cores: fp32 operands read with a 10-bit mantissa, fp32 accumulation),
chosen per call by `dot_precision` (env UCSEG_UPG_DOT = auto | ieee | tf32 | tf32x3, default
auto; tf32x3 = three tf32 products, near-fp32, only when asked for; devices without tensor cores
ignore the choice):
  auto → "tf32" when the logits are bf16 / fp16 (autocast training: the PyTorch head computes these
  very products as bf16 1×1 convolutions there, an 8-bit mantissa), or when they are fp32 and
  `torch.get_float32_matmul_precision()` is not "highest" (the user allowed TF32 matmuls; the
  Trainer does on CUDA); "ieee" otherwise (fp32 with the default precision: exact products).
Why it matters: the head is compute-bound, not memory-bound. The recompute sweeps cost about
90 k multiply-adds a pixel for forward + backward (25 k in the 7 forward sweeps, 65 k in the 7
backward ones; widths padded to 16, 16, 32, 64, 32, 16, 16 at C = 4), 142 G at the ACDC shape
(24 × 256²): 4.2 ms at the fp32 FMA peak of an H100's CUDA cores (67 TFLOP/s), 0.6 ms at its
dense TF32 tensor-core peak (495 TFLOP/s) — arithmetic from the datasheet, not yet timed.
Accuracy (CPU, the PyTorch twin with tf32 operands emulated by truncation, the worst case;
norm-wise relative error against float64 from the same bf16 inputs): P 1e-3 against the PyTorch
head's 1.1e-2 under bf16 autocast, every gradient 1.05-6.7× closer than the autocast head's
(tests/test_ops_upg_head.py::test_tf32_error_is_below_bf16_autocast); "ieee" is at 3e-7.

Not fused here, on purpose: P's pseudo-label (argmax / threshold) and P's loss partials. At the
ACDC shape in bf16 they would save, per step, the argmax read of P's unlabeled half (6.3 MB), the
loss kernels' reads of P's labeled half and their dP write (19 MB), the zero-filled full dP of
the slice backward (25 MB) and the 7 reads of dP by the backward sweeps (88 MB, against 11 MB of
int8 labels): about 125 MB, 30 µs at 4 TB/s, 1-5 % of the head's own compute above (byte counts,
not measurements). The price: the head op would take the labels, λ and the loss constants,
return loss terms as a second differentiable output whose reductions its backward depends on,
and carry a copy of the CE / Dice / AU math that `ops.fusion_loss` already owns.

Layout: z1, z2 [B, C, *S] and A [B, 1, *S] whose spatial dims collapse to one stride
(contiguous or channels-last; read in place); P and dz in the layout of `empty_like(z1/z2)`.
A may instead come as the cross-attention's output tokens [B, N, p^d] (`a_patch_size=p`,
`Patchify(p)` order, any strides): every sweep, forward and backward, computes each pixel's
token n and in-patch feature f from its spatial index (`evidential.token_nf`: two integer
divisions by H, W and divisions by the constexpr p) and loads A at b·sA_b + n·sA_n + f·sA_f;
the final backward sweep stores dA there too (dA in A's layout). This removes the unpatchify
copy of A (a [B, N, p^d] read and a [B, 1, *S] write, and the same again for dA in the
backward); A's loads/stores come in contiguous runs of p values instead of whole rows.
Channel widths are padded to powers of two ≥ 16 (tl.dot's minimum) in registers only: the
kernels read each layer's own conv weight [cₖ, cₖ₋₁, 1, …] (contiguous or channels-last, in
place) and BN tensors through one pointer per layer with masked loads, so padded rows, columns
and γ are 0 and padded channels stay exactly 0.

Launches: between the Triton launches nothing but allocations is dispatched — no
packing, no per-layer PyTorch merges, no gradient copies. Training forward: 6 × (statistics
sweep + `_bn_finalize_kernel`), the emit sweep, and `_running_kernel` (op
`ucseg::bn_running_update`: nn.BatchNorm's running-statistics update of all six layers in
place); backward: 6 × (Σdy, Σdy·x̂ sweep + `_bwd_coef_kernel`), the final sweep and
`_grad_reduce_kernel`, which writes every layer's dW, dγ, dβ into per-layer gradient tensors.
14 + 14 launches (eval: 2 + 2); tests/test_upg_head_ops_count.py pins it.

float64 (golden parity) and non-Triton devices run the same
sweeps in PyTorch (`_TorchRunner`), so the algorithm itself is checked against the golden vectors;
given token A it unpatchifies A once (it works on pixel-major copies anyway) and patchifies dA.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._triton_utils import cdiv, flat_layout, next_pow2, spatial_size, tl, triton, triton_usable, use_triton
from .evidential import patchify_map, token_geometry, token_nf, unpatchify_map

__all__ = ["fusion_head", "fusion_head_layers", "pack_head_params", "dot_precision", "NUM_LAYERS"]

NUM_LAYERS = 6
_ROWS = 6  # rows of the per-layer vector buffer: scale, shift, mean, rstd, c1 = Σdy/N, c2 = Σdy·x̂/N
BLOCK_S = int(os.environ.get("UCSEG_UPG_BLOCK_S", "64"))  # pixels per tile (tl.dot needs ≥ 16)
FWD_PROGRAMS = int(os.environ.get("UCSEG_UPG_FWD_PROGRAMS", "1024"))
# the final backward sweep writes [programs, 6, W, W] weight-grad partials: keep them few
BWD_PROGRAMS = int(os.environ.get("UCSEG_UPG_BWD_PROGRAMS", "264"))
DOT_PRECISION = os.environ.get("UCSEG_UPG_DOT", "auto")  # auto | ieee | tf32, see dot_precision
_TORCH_CHUNK = 65536  # pixels per "program" of the PyTorch sweeps
RECOMPUTE_TORCH = False  # see _TorchRunner


_PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")


def dot_precision(z: Tensor) -> str:
    """The kernel's tl.dot input precision for logits `z` (module docstring: the auto rule);
    `DOT_PRECISION` (env UCSEG_UPG_DOT) other than "auto" forces it."""
    if DOT_PRECISION not in _PRECISIONS:
        raise ValueError(f"UCSEG_UPG_DOT = {DOT_PRECISION!r}; choose one of {', '.join(_PRECISIONS)}")
    if DOT_PRECISION != "auto":
        return DOT_PRECISION
    if z.dtype in (torch.bfloat16, torch.float16):
        return "tf32"
    if z.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _truncate_tf32(x: Tensor) -> Tensor:
    """fp32 values with the mantissa cut to tf32's 10 bits (round toward zero: how tensor cores
    read fp32 registers as tf32 operands; the worst case of the two roundings in use)."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)  # -8192 = ~0x1FFF


def _mm(a: Tensor, b: Tensor, tf32: bool) -> Tensor:
    return _truncate_tf32(a) @ _truncate_tf32(b) if tf32 else a @ b


def _padded(chans: Sequence[int]) -> list[int]:
    return [max(16, next_pow2(c)) for c in chans]


# =========================================================================== Triton kernels
@triton.jit
def _wt_tile(w_ptr, PI: tl.constexpr, PO: tl.constexpr, RI: tl.constexpr, RO: tl.constexpr):
    """Wₖᵀ as a zero-padded [PI, PO] tile, read in place from the layer's own conv weight
    [RO, RI, 1, …] (element (o, i) at o·RI + i: contiguous or channels-last; tiny, stays in cache)."""
    i = tl.arange(0, PI)
    o = tl.arange(0, PO)
    return tl.load(w_ptr + o[None, :] * RI + i[:, None], mask=(i < RI)[:, None] & (o < RO)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _vec(vec_ptr, K: tl.constexpr, ROW: tl.constexpr, PO: tl.constexpr, MAXW: tl.constexpr):
    """Row ROW (0 scale, 1 shift, 2 mean, 3 rstd) of layer K+1 in the [6, 4, MAXW] affine buffer."""
    return tl.load(vec_ptr + (K * 4 + ROW) * MAXW + tl.arange(0, PO))


@triton.jit
def _cvec(cv_ptr, K: tl.constexpr, ROW: tl.constexpr, PO: tl.constexpr, MAXW: tl.constexpr):
    """Row ROW (0: c1 = Σdy/N, 1: c2 = Σdy·x̂/N) of layer K+1 in the backward's [6, 2, MAXW] buffer."""
    return tl.load(cv_ptr + (K * 2 + ROW) * MAXW + tl.arange(0, PO))


@triton.jit
def _fwd_layer(h, w_ptr, vec_ptr, K: tl.constexpr, PI: tl.constexpr, PO: tl.constexpr,
               RI: tl.constexpr, RO: tl.constexpr, MAXW: tl.constexpr, PREC: tl.constexpr,
               ACT: tl.constexpr):
    """(x, y, h') of layer K+1 for a [BLOCK_S, PI] tile h; ACT=False (the layer whose statistics
    a sweep reduces: its affine is not computed yet) gives x only (y = h' = x, unused)."""
    x = tl.dot(h, _wt_tile(w_ptr, PI, PO, RI, RO), input_precision=PREC)
    if ACT:
        y = x * _vec(vec_ptr, K, 0, PO, MAXW)[None, :] + _vec(vec_ptr, K, 1, PO, MAXW)[None, :]
        hn = tl.where(y > 0, y, 0.2 * y)
    else:
        y = x
        hn = x
    return x, y, hn


@triton.jit
def _act(x, vec_ptr, K: tl.constexpr, PO: tl.constexpr, MAXW: tl.constexpr):
    """h = LReLU(BN(x)) of layer K+1, recomputed from x in the backward: only the x_k tiles stay
    live across a backward sweep (y_k, h_k are one FMA + select away), a third of the registers."""
    y = x * _vec(vec_ptr, K, 0, PO, MAXW)[None, :] + _vec(vec_ptr, K, 1, PO, MAXW)[None, :]
    return tl.where(y > 0, y, 0.2 * y)


@triton.jit
def _bn_bwd(dh, x, valid, vec_ptr, cv_ptr, K: tl.constexpr, PO: tl.constexpr, MAXW: tl.constexpr,
            TRAIN: tl.constexpr, HAS_C: tl.constexpr):
    """(dy, x̂, dx) of layer K+1; rows outside the batch get dx = 0 (they must not reach dW).
    HAS_C=False: the layer whose c1, c2 a sweep reduces (not computed yet; its dx is unused)."""
    y = x * _vec(vec_ptr, K, 0, PO, MAXW)[None, :] + _vec(vec_ptr, K, 1, PO, MAXW)[None, :]
    dy = tl.where(y > 0, dh, 0.2 * dh)
    xhat = (x - _vec(vec_ptr, K, 2, PO, MAXW)[None, :]) * _vec(vec_ptr, K, 3, PO, MAXW)[None, :]
    g = dy
    if TRAIN:
        if HAS_C:
            g = dy - _cvec(cv_ptr, K, 0, PO, MAXW)[None, :] - xhat * _cvec(cv_ptr, K, 1, PO, MAXW)[None, :]
    dx = tl.where(valid[:, None], g * _vec(vec_ptr, K, 0, PO, MAXW)[None, :], 0.0)
    return dy, xhat, dx


@triton.jit
def _dh_prev(dx, w_ptr, PI: tl.constexpr, PO: tl.constexpr, RI: tl.constexpr, RO: tl.constexpr,
             PREC: tl.constexpr):
    """dh_{K} = dx Wₖ: [BLOCK_S, PO] × [PO, PI]."""
    return tl.dot(dx, tl.trans(_wt_tile(w_ptr, PI, PO, RI, RO)), input_precision=PREC)


@triton.jit
def _acc_dw(acc, h_prev, dx, PREC: tl.constexpr):
    """acc[PI, PO] += h_prevᵀ dx (the transposed weight gradient of this tile)."""
    return acc + tl.dot(tl.trans(h_prev), dx, input_precision=PREC)


@triton.jit
def _store_dw(dw_ptr, K: tl.constexpr, acc, PI: tl.constexpr, PO: tl.constexpr, MAXW: tl.constexpr):
    i = tl.arange(0, PI)
    o = tl.arange(0, PO)
    tl.store(dw_ptr + K * MAXW * MAXW + i[:, None] * MAXW + o[None, :], acc)


@triton.jit
def _a_offset(b, s, sab, sa1, sa2, H, W, GH, GW, A_TOK: tl.constexpr, PATCH: tl.constexpr):
    """Element offset of A (or dA) at pixel s of sample b: b·sab + s·sa1 in pixel layout
    [B, 1, *S]; b·sab + n·sa1 + f·sa2 in token layout [B, N, p^d], with the pixel's token n and
    in-patch feature f computed here (int32: s < S < 2**31) — no unpatchify copy of A."""
    if A_TOK:
        n, f = token_nf(s.to(tl.int32), H, W, GH, GW, PATCH)
        off = b * sab + n.to(tl.int64) * sa1 + f.to(tl.int64) * sa2
    else:
        off = b * sab + s * sa1
    return off


@triton.jit
def _head_kernel(z1_ptr, z2_ptr, a_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr, w5_ptr, w6_ptr, vec_ptr, cv_ptr,
                 out_ptr, dp_ptr, dz1_ptr, dz2_ptr, da_ptr, part_ptr, dw_ptr, NPIX, S, n_tiles,
                 s1b, s1c, s1s, s2b, s2c, s2s, sab, sa1, sa2, sob, soc, sos, sgb, sgc, sgs,
                 sd1b, sd1c, sd1s, sd2b, sd2c, sd2s, sdab, sda1, sda2, H, W, GH, GW,
                 A_TOK: tl.constexpr, PATCH: tl.constexpr,
                 C: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                 R5: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 P3: tl.constexpr, P4: tl.constexpr, P5: tl.constexpr, P6: tl.constexpr,
                 PJ: tl.constexpr, MAXW: tl.constexpr, MODE: tl.constexpr, J: tl.constexpr,
                 NUP: tl.constexpr, TRAIN: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr,
                 SJ: tl.constexpr, CJ: tl.constexpr):
    """One sweep of the recompute scheme (NUP = layers recomputed: J in MODE 0, else 6).
    MODE 0: statistics of x_J (per-program count, mean, M2 → part [programs, 3, MAXW]);
    MODE 1: emit P; MODE 2: Σdy_J, Σdy_J·x̂_J → part [programs, 2, MAXW]; MODE 3: dz1, dz2, dA, and per-program Σdy, Σdy·x̂ of every layer
    (part [programs, 6, 2, MAXW]) and dWᵀ partials (dw [programs, 6, MAXW, MAXW]).
    A_TOK: A / dA in patch-token layout [B, N, PATCH^d] (strides sab, sa1 = token, sa2 = feature;
    sda* likewise), the token index of each pixel computed per tile; else [B, 1, *S] (sa1 = the
    collapsed spatial stride). w1..w6: the layers' own conv weights (Wₖ [Rₖ, Rₖ₋₁], R0 = 2C,
    R6 = C), read masked: padded rows and columns are 0. vec [6, 4, MAXW]: scale, shift, mean,
    rstd; cv [6, 2, MAXW]: c1, c2 (read by TRAIN backward sweeps only). SJ = J in MODE 0, CJ = J in
    MODE 2 (else 0): the layer whose affine / c1, c2 the sweep's result is for (not applied there)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, P0)
    in1 = cols < C
    in2 = (cols >= C) & (cols < 2 * C)
    c2 = tl.where(in2, cols - C, 0)
    if MODE == 0:
        st_n = tl.zeros([PJ], tl.float32)
        st_mean = tl.zeros([PJ], tl.float32)
        st_m2 = tl.zeros([PJ], tl.float32)
    if MODE == 2:
        s_dy = tl.zeros([PJ], tl.float32)
        s_dyx = tl.zeros([PJ], tl.float32)
    if MODE == 3:
        g1 = tl.zeros([P0, P1], tl.float32)
        g2 = tl.zeros([P1, P2], tl.float32)
        g3 = tl.zeros([P2, P3], tl.float32)
        g4 = tl.zeros([P3, P4], tl.float32)
        g5 = tl.zeros([P4, P5], tl.float32)
        g6 = tl.zeros([P5, P6], tl.float32)
        q1 = tl.zeros([P1], tl.float32)
        r1 = tl.zeros([P1], tl.float32)
        q2 = tl.zeros([P2], tl.float32)
        r2 = tl.zeros([P2], tl.float32)
        q3 = tl.zeros([P3], tl.float32)
        r3 = tl.zeros([P3], tl.float32)
        q4 = tl.zeros([P4], tl.float32)
        r4 = tl.zeros([P4], tl.float32)
        q5 = tl.zeros([P5], tl.float32)
        r5 = tl.zeros([P5], tl.float32)
        q6 = tl.zeros([P6], tl.float32)
        r6 = tl.zeros([P6], tl.float32)
    for t in range(pid, n_tiles, n_prog):
        pix = (t * BLOCK_S + rows).to(tl.int64)  # NPIX < 2**31 (checked by the launcher)
        valid = pix < NPIX
        b = pix // S
        s = pix - b * S
        zc = tl.load(z1_ptr + (b * s1b + s * s1s)[:, None] + cols[None, :] * s1c,
                     mask=valid[:, None] & in1[None, :], other=0.0).to(tl.float32)
        zc += tl.load(z2_ptr + (b * s2b + s * s2s)[:, None] + c2[None, :] * s2c,
                      mask=valid[:, None] & in2[None, :], other=0.0).to(tl.float32)
        av = tl.load(a_ptr + _a_offset(b, s, sab, sa1, sa2, H, W, GH, GW, A_TOK, PATCH),
                     mask=valid, other=0.0).to(tl.float32)
        h0 = zc * av[:, None]
        x1, y1, h1 = _fwd_layer(h0, w1_ptr, vec_ptr, 0, P0, P1, 2 * C, R1, MAXW, PREC, SJ != 1)
        if NUP >= 2:
            x2, y2, h2 = _fwd_layer(h1, w2_ptr, vec_ptr, 1, P1, P2, R1, R2, MAXW, PREC, SJ != 2)
        if NUP >= 3:
            x3, y3, h3 = _fwd_layer(h2, w3_ptr, vec_ptr, 2, P2, P3, R2, R3, MAXW, PREC, SJ != 3)
        if NUP >= 4:
            x4, y4, h4 = _fwd_layer(h3, w4_ptr, vec_ptr, 3, P3, P4, R3, R4, MAXW, PREC, SJ != 4)
        if NUP >= 5:
            x5, y5, h5 = _fwd_layer(h4, w5_ptr, vec_ptr, 4, P4, P5, R4, R5, MAXW, PREC, SJ != 5)
        if NUP >= 6:
            x6, y6, h6 = _fwd_layer(h5, w6_ptr, vec_ptr, 5, P5, P6, R5, C, MAXW, PREC, SJ != 6)
        if MODE == 0:
            if J == 1:
                xs = x1
            elif J == 2:
                xs = x2
            elif J == 3:
                xs = x3
            elif J == 4:
                xs = x4
            elif J == 5:
                xs = x5
            else:
                xs = x6
            # Chan's merge of this tile's (n, mean, M2) into the program's running triple
            n_t = tl.sum(valid.to(tl.float32), axis=0)
            m_t = tl.sum(tl.where(valid[:, None], xs, 0.0), axis=0) / n_t
            d = tl.where(valid[:, None], xs - m_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            n_new = st_n + n_t
            delta = m_t - st_mean
            st_mean += delta * (n_t / n_new)
            st_m2 += m2_t + delta * delta * (st_n * n_t / n_new)
            st_n = n_new
        if MODE == 1:
            oc = tl.arange(0, P6)
            tl.store(out_ptr + (b * sob + s * sos)[:, None] + oc[None, :] * soc,
                     h6.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (oc < C)[None, :])
        if MODE >= 2:
            oc = tl.arange(0, P6)
            dh = tl.load(dp_ptr + (b * sgb + s * sgs)[:, None] + oc[None, :] * sgc,
                         mask=valid[:, None] & (oc < C)[None, :], other=0.0).to(tl.float32)
            dy, xh, dx = _bn_bwd(dh, x6, valid, vec_ptr, cv_ptr, 5, P6, MAXW, TRAIN, CJ != 6)
            if MODE == 2 and J == 6:
                s_dy += tl.sum(dy, axis=0)
                s_dyx += tl.sum(dy * xh, axis=0)
            if MODE == 3:
                q6 += tl.sum(dy, axis=0)
                r6 += tl.sum(dy * xh, axis=0)
                g6 = _acc_dw(g6, _act(x5, vec_ptr, 4, P5, MAXW), dx, PREC)
            if J <= 5:
                dh = _dh_prev(dx, w6_ptr, P5, P6, R5, C, PREC)
                dy, xh, dx = _bn_bwd(dh, x5, valid, vec_ptr, cv_ptr, 4, P5, MAXW, TRAIN, CJ != 5)
                if MODE == 2 and J == 5:
                    s_dy += tl.sum(dy, axis=0)
                    s_dyx += tl.sum(dy * xh, axis=0)
                if MODE == 3:
                    q5 += tl.sum(dy, axis=0)
                    r5 += tl.sum(dy * xh, axis=0)
                    g5 = _acc_dw(g5, _act(x4, vec_ptr, 3, P4, MAXW), dx, PREC)
            if J <= 4:
                dh = _dh_prev(dx, w5_ptr, P4, P5, R4, R5, PREC)
                dy, xh, dx = _bn_bwd(dh, x4, valid, vec_ptr, cv_ptr, 3, P4, MAXW, TRAIN, CJ != 4)
                if MODE == 2 and J == 4:
                    s_dy += tl.sum(dy, axis=0)
                    s_dyx += tl.sum(dy * xh, axis=0)
                if MODE == 3:
                    q4 += tl.sum(dy, axis=0)
                    r4 += tl.sum(dy * xh, axis=0)
                    g4 = _acc_dw(g4, _act(x3, vec_ptr, 2, P3, MAXW), dx, PREC)
            if J <= 3:
                dh = _dh_prev(dx, w4_ptr, P3, P4, R3, R4, PREC)
                dy, xh, dx = _bn_bwd(dh, x3, valid, vec_ptr, cv_ptr, 2, P3, MAXW, TRAIN, CJ != 3)
                if MODE == 2 and J == 3:
                    s_dy += tl.sum(dy, axis=0)
                    s_dyx += tl.sum(dy * xh, axis=0)
                if MODE == 3:
                    q3 += tl.sum(dy, axis=0)
                    r3 += tl.sum(dy * xh, axis=0)
                    g3 = _acc_dw(g3, _act(x2, vec_ptr, 1, P2, MAXW), dx, PREC)
            if J <= 2:
                dh = _dh_prev(dx, w3_ptr, P2, P3, R2, R3, PREC)
                dy, xh, dx = _bn_bwd(dh, x2, valid, vec_ptr, cv_ptr, 1, P2, MAXW, TRAIN, CJ != 2)
                if MODE == 2 and J == 2:
                    s_dy += tl.sum(dy, axis=0)
                    s_dyx += tl.sum(dy * xh, axis=0)
                if MODE == 3:
                    q2 += tl.sum(dy, axis=0)
                    r2 += tl.sum(dy * xh, axis=0)
                    g2 = _acc_dw(g2, _act(x1, vec_ptr, 0, P1, MAXW), dx, PREC)
            if J <= 1:
                dh = _dh_prev(dx, w2_ptr, P1, P2, R1, R2, PREC)
                dy, xh, dx = _bn_bwd(dh, x1, valid, vec_ptr, cv_ptr, 0, P1, MAXW, TRAIN, CJ != 1)
                if MODE == 2:
                    s_dy += tl.sum(dy, axis=0)
                    s_dyx += tl.sum(dy * xh, axis=0)
                if MODE == 3:
                    q1 += tl.sum(dy, axis=0)
                    r1 += tl.sum(dy * xh, axis=0)
                    g1 = _acc_dw(g1, h0, dx, PREC)
                    dF = _dh_prev(dx, w1_ptr, P0, P1, 2 * C, R1, PREC)  # [BLOCK_S, P0]
                    da = tl.sum(zc * dF, axis=1)
                    dfa = dF * av[:, None]
                    tl.store(dz1_ptr + (b * sd1b + s * sd1s)[:, None] + cols[None, :] * sd1c,
                             dfa.to(dz1_ptr.dtype.element_ty), mask=valid[:, None] & in1[None, :])
                    tl.store(dz2_ptr + (b * sd2b + s * sd2s)[:, None] + c2[None, :] * sd2c,
                             dfa.to(dz2_ptr.dtype.element_ty), mask=valid[:, None] & in2[None, :])
                    tl.store(da_ptr + _a_offset(b, s, sdab, sda1, sda2, H, W, GH, GW, A_TOK, PATCH),
                             da.to(da_ptr.dtype.element_ty), mask=valid)
    if MODE == 0:
        o = tl.arange(0, PJ)
        row = part_ptr + pid * 3 * MAXW
        tl.store(row + o, st_n)
        tl.store(row + MAXW + o, st_mean)
        tl.store(row + 2 * MAXW + o, st_m2)
    if MODE == 2:
        o = tl.arange(0, PJ)
        row = part_ptr + pid * 2 * MAXW
        tl.store(row + o, s_dy)
        tl.store(row + MAXW + o, s_dyx)
    if MODE == 3:
        prow = part_ptr + pid * (6 * 2 * MAXW)
        o1 = tl.arange(0, P1)
        tl.store(prow + o1, q1)
        tl.store(prow + MAXW + o1, r1)
        o2 = tl.arange(0, P2)
        tl.store(prow + 2 * MAXW + o2, q2)
        tl.store(prow + 3 * MAXW + o2, r2)
        o3 = tl.arange(0, P3)
        tl.store(prow + 4 * MAXW + o3, q3)
        tl.store(prow + 5 * MAXW + o3, r3)
        o4 = tl.arange(0, P4)
        tl.store(prow + 6 * MAXW + o4, q4)
        tl.store(prow + 7 * MAXW + o4, r4)
        o5 = tl.arange(0, P5)
        tl.store(prow + 8 * MAXW + o5, q5)
        tl.store(prow + 9 * MAXW + o5, r5)
        o6 = tl.arange(0, P6)
        tl.store(prow + 10 * MAXW + o6, q6)
        tl.store(prow + 11 * MAXW + o6, r6)
        wrow = dw_ptr + pid.to(tl.int64) * (6 * MAXW * MAXW)
        _store_dw(wrow, 0, g1, P0, P1, MAXW)
        _store_dw(wrow, 1, g2, P1, P2, MAXW)
        _store_dw(wrow, 2, g3, P2, P3, MAXW)
        _store_dw(wrow, 3, g4, P3, P4, MAXW)
        _store_dw(wrow, 4, g5, P4, P5, MAXW)
        _store_dw(wrow, 5, g6, P5, P6, MAXW)


# Small single-purpose kernels between the sweeps: each replaces a chain of tiny PyTorch ops
# (merges, affine, running statistics, gradient reductions). All reductions run over the
# per-program partials in a fixed order: deterministic, no atomics.
_RED_P = 64  # partial rows reduced per step
_GRAD_ROWS = 16  # rows of Wₖᵀ per program of the gradient reduction


@triton.jit
def _store_affine(mean, var, ok, g_ptr, b_ptr, vec_ptr, mean_ptr, var_ptr, eps,
                  K: tl.constexpr, MAXW: tl.constexpr):
    """vec[K] = (scale, shift, mean, rstd) from the statistics BN uses (ATen's invstd =
    1/sqrt(var + eps)); mean/var out[K] = mean, var. Lanes past the layer's width get 0."""
    o = tl.arange(0, MAXW)
    g = tl.load(g_ptr + o, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + o, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.where(ok, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), 0.0)
    scale = g * rstd
    row = vec_ptr + K * 4 * MAXW + o
    tl.store(row, scale)
    tl.store(row + MAXW, b - mean * scale)
    tl.store(row + 2 * MAXW, mean)
    tl.store(row + 3 * MAXW, rstd)
    tl.store(mean_ptr + K * MAXW + o, mean)
    tl.store(var_ptr + K * MAXW + o, var)


@triton.jit
def _bn_finalize_kernel(part_ptr, n_prog, g_ptr, b_ptr, vec_ptr, mean_ptr, var_ptr, eps,
                        K: tl.constexpr, CO: tl.constexpr, MAXW: tl.constexpr, BLOCK_P: tl.constexpr):
    """Training BN of layer K+1 after its statistics sweep, one program: Chan's merge of the
    per-program (count, mean, M2) partials [n_prog, 3, MAXW] (as `_merge_stats`), then the
    affine and the batch statistics (`_store_affine`)."""
    o = tl.arange(0, MAXW)
    ok = o < CO
    r = tl.arange(0, BLOCK_P)
    s_n = tl.zeros([MAXW], tl.float32)
    s_nm = tl.zeros([MAXW], tl.float32)
    s_m2 = tl.zeros([MAXW], tl.float32)
    for p0 in range(0, n_prog, BLOCK_P):
        msk = ((p0 + r) < n_prog)[:, None] & ok[None, :]
        at = part_ptr + (p0 + r)[:, None] * (3 * MAXW) + o[None, :]
        n_p = tl.load(at, mask=msk, other=0.0)
        s_n += tl.sum(n_p, axis=0)
        s_nm += tl.sum(n_p * tl.load(at + MAXW, mask=msk, other=0.0), axis=0)
        s_m2 += tl.sum(tl.load(at + 2 * MAXW, mask=msk, other=0.0), axis=0)
    n = tl.maximum(s_n, 1.0)
    mean = tl.div_rn(s_nm, n)
    s_d = tl.zeros([MAXW], tl.float32)
    for p0 in range(0, n_prog, BLOCK_P):
        msk = ((p0 + r) < n_prog)[:, None] & ok[None, :]
        at = part_ptr + (p0 + r)[:, None] * (3 * MAXW) + o[None, :]
        n_p = tl.load(at, mask=msk, other=0.0)
        d = tl.load(at + MAXW, mask=msk, other=0.0) - mean[None, :]
        s_d += tl.sum(n_p * (d * d), axis=0)
    var = tl.div_rn(s_m2 + s_d, n)
    _store_affine(mean, var, ok, g_ptr, b_ptr, vec_ptr, mean_ptr, var_ptr, eps, K, MAXW)


@triton.jit
def _running_layer(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, momentum, keep, unbias,
                   K: tl.constexpr, CO: tl.constexpr, MAXW: tl.constexpr, CUMULATIVE: tl.constexpr):
    """nn.BatchNorm's running-statistics update of layer K+1, in place: num_batches_tracked += 1;
    running = m·batch + (1 − m)·running, m = momentum and keep = 1 − m, or (CUMULATIVE,
    momentum=None) m = 1/num_batches_tracked; the batch variance made unbiased (× n/(n − 1))."""
    o = tl.arange(0, MAXW)
    ok = o < CO
    nbt = tl.load(nbt_ptr) + 1
    tl.store(nbt_ptr, nbt)
    if CUMULATIVE:
        m = tl.div_rn(1.0, nbt.to(tl.float32))
        k = 1.0 - m
    else:
        m = momentum
        k = keep
    bm = tl.load(mean_ptr + K * MAXW + o, mask=ok, other=0.0)
    bv = tl.load(var_ptr + K * MAXW + o, mask=ok, other=0.0) * unbias
    rm = tl.load(rm_ptr + o, mask=ok, other=0.0).to(tl.float32)
    tl.store(rm_ptr + o, (m * bm + k * rm).to(rm_ptr.dtype.element_ty), mask=ok)
    rv = tl.load(rv_ptr + o, mask=ok, other=0.0).to(tl.float32)
    tl.store(rv_ptr + o, (m * bv + k * rv).to(rv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _running_kernel(mean_ptr, var_ptr, m1, m2, m3, m4, m5, m6, v1, v2, v3, v4, v5, v6,
                    n1, n2, n3, n4, n5, n6, momentum, keep, unbias,
                    R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                    R5: tl.constexpr, R6: tl.constexpr, MAXW: tl.constexpr, CUMULATIVE: tl.constexpr):
    """All six layers' running-statistics updates from the batch mean/var [6, MAXW], one program."""
    _running_layer(mean_ptr, var_ptr, m1, v1, n1, momentum, keep, unbias, 0, R1, MAXW, CUMULATIVE)
    _running_layer(mean_ptr, var_ptr, m2, v2, n2, momentum, keep, unbias, 1, R2, MAXW, CUMULATIVE)
    _running_layer(mean_ptr, var_ptr, m3, v3, n3, momentum, keep, unbias, 2, R3, MAXW, CUMULATIVE)
    _running_layer(mean_ptr, var_ptr, m4, v4, n4, momentum, keep, unbias, 3, R4, MAXW, CUMULATIVE)
    _running_layer(mean_ptr, var_ptr, m5, v5, n5, momentum, keep, unbias, 4, R5, MAXW, CUMULATIVE)
    _running_layer(mean_ptr, var_ptr, m6, v6, n6, momentum, keep, unbias, 5, R6, MAXW, CUMULATIVE)


@triton.jit
def _eval_affine_layer(m_ptr, v_ptr, g_ptr, b_ptr, vec_ptr, mean_ptr, var_ptr, eps,
                       K: tl.constexpr, CO: tl.constexpr, MAXW: tl.constexpr):
    o = tl.arange(0, MAXW)
    ok = o < CO
    mean = tl.load(m_ptr + o, mask=ok, other=0.0).to(tl.float32)
    var = tl.load(v_ptr + o, mask=ok, other=0.0).to(tl.float32)
    _store_affine(mean, var, ok, g_ptr, b_ptr, vec_ptr, mean_ptr, var_ptr, eps, K, MAXW)


@triton.jit
def _eval_affine_kernel(m1, m2, m3, m4, m5, m6, v1, v2, v3, v4, v5, v6, g1, g2, g3, g4, g5, g6,
                        b1, b2, b3, b4, b5, b6, vec_ptr, mean_ptr, var_ptr, eps,
                        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                        R5: tl.constexpr, R6: tl.constexpr, MAXW: tl.constexpr):
    """Eval: the affine of all six layers from the running statistics, one program."""
    _eval_affine_layer(m1, v1, g1, b1, vec_ptr, mean_ptr, var_ptr, eps, 0, R1, MAXW)
    _eval_affine_layer(m2, v2, g2, b2, vec_ptr, mean_ptr, var_ptr, eps, 1, R2, MAXW)
    _eval_affine_layer(m3, v3, g3, b3, vec_ptr, mean_ptr, var_ptr, eps, 2, R3, MAXW)
    _eval_affine_layer(m4, v4, g4, b4, vec_ptr, mean_ptr, var_ptr, eps, 3, R4, MAXW)
    _eval_affine_layer(m5, v5, g5, b5, vec_ptr, mean_ptr, var_ptr, eps, 4, R5, MAXW)
    _eval_affine_layer(m6, v6, g6, b6, vec_ptr, mean_ptr, var_ptr, eps, 5, R6, MAXW)


@triton.jit
def _bwd_coef_kernel(part_ptr, n_prog, cv_ptr, n_pix, K: tl.constexpr, CO: tl.constexpr,
                     MAXW: tl.constexpr, BLOCK_P: tl.constexpr):
    """cv[K] = (Σdy/N, Σdy·x̂/N) of layer K+1 from the partials [n_prog, 2, MAXW], one program."""
    o = tl.arange(0, MAXW)
    ok = o < CO
    r = tl.arange(0, BLOCK_P)
    s0 = tl.zeros([MAXW], tl.float32)
    s1 = tl.zeros([MAXW], tl.float32)
    for p0 in range(0, n_prog, BLOCK_P):
        msk = ((p0 + r) < n_prog)[:, None] & ok[None, :]
        at = part_ptr + (p0 + r)[:, None] * (2 * MAXW) + o[None, :]
        s0 += tl.sum(tl.load(at, mask=msk, other=0.0), axis=0)
        s1 += tl.sum(tl.load(at + MAXW, mask=msk, other=0.0), axis=0)
    tl.store(cv_ptr + K * 2 * MAXW + o, tl.div_rn(s0, n_pix))
    tl.store(cv_ptr + (K * 2 + 1) * MAXW + o, tl.div_rn(s1, n_pix))


@triton.jit
def _grad_layer(dw_ptr, part_ptr, n_prog, dwk_ptr, dgk_ptr, dbk_ptr, blk, K: tl.constexpr,
                PI: tl.constexpr, PO: tl.constexpr, RI: tl.constexpr, RO: tl.constexpr,
                MAXW: tl.constexpr, ROWS: tl.constexpr):
    """Rows [blk·ROWS, …) of Σ_p dWₖᵀ partials, stored transposed into the layer's weight
    gradient [RO, RI, 1, …] (o·RI + i); block 0 also sums dβₖ, dγₖ."""
    if blk * ROWS < RI:
        i = blk * ROWS + tl.arange(0, ROWS)
        o = tl.arange(0, PO)
        acc = tl.zeros([ROWS, PO], tl.float32)
        tile = dw_ptr + K * MAXW * MAXW + i[:, None] * MAXW + o[None, :]
        lim = (i < RI)[:, None] & (o < RO)[None, :]
        for p in range(0, n_prog):
            acc += tl.load(tile + p * (6 * MAXW * MAXW), mask=lim, other=0.0)
        tl.store(dwk_ptr + o[None, :] * RI + i[:, None], acc.to(dwk_ptr.dtype.element_ty), mask=lim)
    if blk == 0:
        o = tl.arange(0, PO)
        q = tl.zeros([PO], tl.float32)
        r = tl.zeros([PO], tl.float32)
        row = part_ptr + K * 2 * MAXW + o
        for p in range(0, n_prog):
            q += tl.load(row + p * (12 * MAXW))
            r += tl.load(row + p * (12 * MAXW) + MAXW)
        tl.store(dbk_ptr + o, q.to(dbk_ptr.dtype.element_ty), mask=o < RO)
        tl.store(dgk_ptr + o, r.to(dgk_ptr.dtype.element_ty), mask=o < RO)


@triton.jit
def _grad_reduce_kernel(dw_ptr, part_ptr, n_prog, dw1, dw2, dw3, dw4, dw5, dw6, dg1, dg2, dg3, dg4,
                        dg5, dg6, db1, db2, db3, db4, db5, db6,
                        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
                        R4: tl.constexpr, R5: tl.constexpr, R6: tl.constexpr,
                        P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                        P4: tl.constexpr, P5: tl.constexpr, P6: tl.constexpr,
                        MAXW: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr):
    """The final backward sweep's per-program partials → every layer's dW, dγ, dβ, written
    straight into per-layer gradient tensors. Program (layer k, row block) = (pid // NB, pid % NB),
    NB = MAXW / ROWS row blocks per layer (blocks past a layer's input width only idle)."""
    pid = tl.program_id(0)
    k = pid // NB
    blk = pid - k * NB
    if k == 0:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw1, dg1, db1, blk, 0, P0, P1, R0, R1, MAXW, ROWS)
    if k == 1:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw2, dg2, db2, blk, 1, P1, P2, R1, R2, MAXW, ROWS)
    if k == 2:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw3, dg3, db3, blk, 2, P2, P3, R2, R3, MAXW, ROWS)
    if k == 3:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw4, dg4, db4, blk, 3, P3, P4, R3, R4, MAXW, ROWS)
    if k == 4:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw5, dg5, db5, blk, 4, P4, P5, R4, R5, MAXW, ROWS)
    if k == 5:
        _grad_layer(dw_ptr, part_ptr, n_prog, dw6, dg6, db6, blk, 5, P5, P6, R5, R6, MAXW, ROWS)


# =========================================================================== sweep runners
def _merge_stats(part: Tensor) -> tuple[Tensor, Tensor]:
    """Per-program (count, mean, M2) [P, 3, W] → (mean, biased var) [W] (Chan's merge, fixed order)."""
    n_P1 = part[:, 0]
    mean_P1 = part[:, 1]
    n = n_P1.sum(0).clamp_min(1)  # padded channels (count 0) get mean 0, var 0, not NaN
    mean = (n_P1 * mean_P1).sum(0) / n
    m2 = part[:, 2].sum(0) + (n_P1 * (mean_P1 - mean) ** 2).sum(0)
    return mean, m2 / n


def _set_affine(vec: Tensor, k: int, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor,
                eps: float) -> None:
    """vec[k, :, :c] = scale, shift, mean, rstd (ATen's invstd = 1/sqrt(var + eps)) for the c
    channels of layer k+1 (the rest of vec stays 0)."""
    c = mean.shape[0]
    rstd = 1.0 / torch.sqrt(var + eps)
    scale = gamma * rstd
    vec[k, 0, :c] = scale
    vec[k, 1, :c] = beta - mean * scale
    vec[k, 2, :c] = mean
    vec[k, 3, :c] = rstd


def _update_running(running_mean: Tensor, running_var: Tensor, nbt: Tensor, mean: Tensor, var: Tensor,
                    n: int, momentum: float | None) -> None:
    """nn.BatchNorm's running-statistics update from the batch mean / biased var (PyTorch twin of
    `_running_layer`)."""
    nbt.add_(1)
    # momentum=None: nn.BatchNorm's 1.0 / float(num_batches_tracked), a double, device-side
    m = 1.0 / nbt.to(torch.float64) if momentum is None else momentum
    bm = mean.to(running_mean.dtype)
    bv = (var * (n / (n - 1))).to(running_var.dtype)
    running_mean.copy_(m * bm + (1 - m) * running_mean)
    running_var.copy_(m * bv + (1 - m) * running_var)


def _layer_chans(weight: Sequence[Tensor]) -> list[int]:
    return [weight[0].shape[1], *[w.shape[0] for w in weight]]


def _dense_weight(w: Tensor) -> Tensor:
    """`w` [co, ci, 1, …] itself when element (o, i) sits at o·ci + i (contiguous or channels-last
    conv weights: no copy), else a contiguous copy (e.g. the views of `fusion_head`'s packed wt)."""
    if w.stride(1) == 1 and (w.shape[0] == 1 or w.stride(0) == w.shape[1]):
        return w
    return w.contiguous()


class _TorchRunner:
    """The sweeps in plain PyTorch, chunk by chunk (a chunk plays one program): the float64 and
    no-Triton path, and the algorithmic twin of the kernel (same partials, same merges).

    `recompute=True` recomputes every layer in every sweep, exactly as the kernel does;
    `recompute=False` (the default, `RECOMPUTE_TORCH`) keeps each chunk's activations and
    back-propagated gradient between the sweeps of one op call. Both compute the same ops on the
    same chunks in the same order, so they agree bit for bit (tested); the cached form only
    saves CPU time (the float64 golden run is ~4× faster) at the cost of the memory the kernel
    avoids — it serves float64 parity and the CPU fallback, not the GPU hot path.
    """

    def __init__(self, z1: Tensor, z2: Tensor, A: Tensor, weight: Sequence[Tensor], chans: Sequence[int],
                 recompute: bool | None = None, a_patch: int = 0) -> None:
        self.acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
        # products as the kernel's tf32 dots only when asked for explicitly (UCSEG_UPG_DOT=tf32):
        # this twin serves exactness (float64, CPU); emulating tf32 here measures its error
        self.tf32 = DOT_PRECISION == "tf32" and self.acc == torch.float32
        self.recompute = RECOMPUTE_TORCH if recompute is None else recompute
        self.z1, self.z2, self.A, self.a_patch = z1, z2, A, a_patch
        C = z1.shape[1]
        self.C, self.chans, self.W = C, list(chans), max(_padded(chans))
        self.zc = torch.cat([z1.movedim(1, -1).reshape(-1, C), z2.movedim(1, -1).reshape(-1, C)], 1).to(self.acc)
        # token-layout A (a_patch > 0): this twin works on pixel-major copies anyway (zc above),
        # so A is unpatchified here and dA patchified back; the kernel indexes tokens in place
        A_pix = unpatchify_map(A, z1.shape[2:], a_patch) if a_patch else A
        self.a = A_pix.reshape(-1).to(self.acc)
        self.weight = list(weight)
        self.wts = [w.reshape(chans[k + 1], chans[k]).t().to(self.acc) for k, w in enumerate(weight)]  # Wₖᵀ
        self.npix = self.zc.shape[0]
        self.chunks = [(i, min(self.npix, i + _TORCH_CHUNK)) for i in range(0, self.npix, _TORCH_CHUNK)]
        n = len(self.chunks)
        # cache (recompute=False): per chunk, layers whose BN affine is final; backward level + dh
        self._fwd: list[tuple[list, list, list] | None] = [None] * n
        self._bwd: list[tuple[int, Tensor] | None] = [None] * n
        self._part: Tensor | None = None
        self._dw: Tensor | None = None

    def _forward(self, p: int, vec: Tensor, nup: int, final: int):
        """(xs, ys, hs) of chunk p up to layer nup; layers < `final` have their final affine."""
        lo, hi = self.chunks[p]
        cached = None if self.recompute else self._fwd[p]
        if cached is None:
            xs, ys, hs = [], [], [self.zc[lo:hi] * self.a[lo:hi, None]]
        else:
            xs, ys, hs = (list(v) for v in cached)
        for k in range(len(xs), nup):
            co = self.chans[k + 1]
            x = _mm(hs[-1], self.wts[k], self.tf32)
            y = x * vec[k, 0, :co] + vec[k, 1, :co]
            xs.append(x)
            ys.append(y)
            hs.append(torch.where(y > 0, y, 0.2 * y))
        if not self.recompute:
            m = min(final, nup)
            self._fwd[p] = (xs[:m], ys[:m], hs[:m + 1])
        return xs, ys, hs

    def _flat(self, t: Tensor) -> Tensor:
        return t.movedim(1, -1).reshape(-1, t.shape[1]).to(self.acc)

    def _unflat(self, t_NC: Tensor, like: Tensor) -> Tensor:
        B, c, *S = like.shape
        out = torch.empty_like(like)
        return out.copy_(t_NC.reshape(B, *S, c).movedim(-1, 1))

    def stats(self, J: int, vec: Tensor) -> Tensor:
        part = vec.new_zeros((len(self.chunks), 3, self.W))
        co = self.chans[J]
        for p, (lo, hi) in enumerate(self.chunks):
            x = self._forward(p, vec, J, J - 1)[0][J - 1]
            m = x.mean(0)
            part[p, 0, :co] = hi - lo
            part[p, 1, :co] = m
            part[p, 2, :co] = ((x - m) ** 2).sum(0)
        return part

    def emit(self, vec: Tensor) -> Tensor:
        P = torch.cat([self._forward(p, vec, NUM_LAYERS, NUM_LAYERS)[2][-1] for p in range(len(self.chunks))])
        return self._unflat(P, self.z1)

    def forward(self, gamma: Sequence[Tensor], beta: Sequence[Tensor], running_mean: Sequence[Tensor],
                running_var: Sequence[Tensor], training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(P, mean [6, W], var [6, W], vec [6, 4, W]); see `_fusion_head_layers_op`."""
        acc, W = self.acc, self.W
        mean = self.zc.new_zeros((NUM_LAYERS, W))
        var = torch.zeros_like(mean)
        vec = mean.new_zeros((NUM_LAYERS, 4, W))
        for k in range(NUM_LAYERS):
            co = self.chans[k + 1]
            if training:
                m, v = (t[:co] for t in _merge_stats(self.stats(k + 1, vec)))
            else:
                m, v = running_mean[k].to(acc), running_var[k].to(acc)
            mean[k, :co], var[k, :co] = m, v
            _set_affine(vec, k, m, v, gamma[k].to(acc), beta[k].to(acc), eps)
        return self.emit(vec), mean, var, vec

    def _sweep_bwd(self, vec: Tensor, cvec: Tensor, dP: Tensor, J: int, final: bool, training: bool):
        dp = self._flat(dP)
        n = len(self.chunks)
        if self._part is None or self.recompute:
            self._part = vec.new_zeros((n, NUM_LAYERS, 2, self.W))
            self._dw = vec.new_zeros((n, NUM_LAYERS, self.W, self.W))
        part, dw = self._part, self._dw
        dF = []
        for p, (lo, hi) in enumerate(self.chunks):
            xs, ys, hs = self._forward(p, vec, NUM_LAYERS, NUM_LAYERS)
            level, dh = (NUM_LAYERS, dp[lo:hi]) if self.recompute or self._bwd[p] is None else self._bwd[p]
            for k in range(level - 1, J - 2, -1):
                co, ci = self.chans[k + 1], self.chans[k]
                dy = torch.where(ys[k] > 0, dh, 0.2 * dh)
                xh = (xs[k] - vec[k, 2, :co]) * vec[k, 3, :co]
                part[p, k, 0, :co] = dy.sum(0)
                part[p, k, 1, :co] = (dy * xh).sum(0)
                if k == J - 1 and not final:
                    break
                g = dy - cvec[k, 0, :co] - xh * cvec[k, 1, :co] if training else dy
                dx = g * vec[k, 0, :co]
                dw[p, k, :ci, :co] = _mm(hs[k].T, dx, self.tf32)
                dh = _mm(dx, self.wts[k].T, self.tf32)
                if not self.recompute:
                    self._bwd[p] = (k, dh)
            if final:
                dF.append(dh)
        if not final:
            return part
        dF = torch.cat(dF)
        C = self.C
        dz = dF * self.a[:, None]
        dA = (self.zc * dF).sum(1, keepdim=True)
        if self.a_patch:
            B = self.z1.shape[0]
            dA_tok = patchify_map(dA.reshape(B, 1, *self.z1.shape[2:]), self.a_patch)
            dA = torch.empty_like(self.A).copy_(dA_tok)
        else:
            dA = self._unflat(dA, self.A)
        return self._unflat(dz[:, :C], self.z1), self._unflat(dz[:, C:], self.z2), dA, part, dw

    def backward(self, vec: Tensor, dP: Tensor, training: bool, gamma: Sequence[Tensor],
                 beta: Sequence[Tensor]):
        """(dz1, dz2, dA, [dWₖ], [dγₖ], [dβₖ]); see `_fusion_head_layers_bwd_op`."""
        cvec = vec.new_zeros((NUM_LAYERS, 2, self.W))
        if training:
            for k in range(NUM_LAYERS, 0, -1):
                s = self._sweep_bwd(vec, cvec, dP, k, final=False, training=True)[:, k - 1].sum(0)
                cvec[k - 1, 0] = s[0] / self.npix
                cvec[k - 1, 1] = s[1] / self.npix
        dz1, dz2, dA, part, dw = self._sweep_bwd(vec, cvec, dP, 1, final=True, training=training)
        sums, dw = part.sum(0), dw.sum(0)
        cp = dict(memory_format=torch.contiguous_format, copy=True)
        dws, dgs, dbs = [], [], []
        for k in range(NUM_LAYERS):
            ci, co = self.chans[k], self.chans[k + 1]
            w = self.weight[k]
            dws.append(dw[k, :ci, :co].t().to(w.dtype, **cp).view(w.shape))
            dgs.append(sums[k, 1, :co].to(gamma[k].dtype, **cp))
            dbs.append(sums[k, 0, :co].to(beta[k].dtype, **cp))
        return dz1, dz2, dA, dws, dgs, dbs


class _TritonRunner:
    """Launches the sweeps of `_head_kernel` and the small kernels between them; same interface
    and numbers (to fp32 rounding) as `_TorchRunner`. Between the launches nothing but
    allocations (`torch.empty*`) is dispatched: the merges, the affine, the running-statistics
    update and the gradient reductions are kernels, which read and write the layers' own tensors."""

    def __init__(self, z1: Tensor, z2: Tensor, A: Tensor, weight: Sequence[Tensor], chans: Sequence[int],
                 a_patch: int = 0) -> None:
        self.prec = dot_precision(z1)
        self.C, self.chans = z1.shape[1], list(chans)
        self.pads = _padded(chans)
        self.W = max(self.pads)
        self.ws = [_dense_weight(w) for w in weight]
        self.z1, *self.l1 = flat_layout(z1)
        self.z2, *self.l2 = flat_layout(z2)
        self.a_patch = a_patch
        if a_patch:  # tokens [B, N, p^d], any strides: read in place, token index per pixel
            self.A = A
            self.la = list(A.stride())
            self.geo = list(token_geometry(z1.shape[2:], a_patch, "fusion_head")[:4])
        else:
            self.A, sab, _, sas = flat_layout(A)
            self.la = [sab, sas, 0]
            self.geo = [1, 1, 1, 1]
        self.S = spatial_size(z1)
        self.npix = z1.shape[0] * self.S
        self.n_tiles = cdiv(self.npix, BLOCK_S)

    def _new(self, *shape: int) -> Tensor:
        return torch.empty(shape, dtype=torch.float32, device=self.z1.device)

    def _launch(self, mode: int, J: int, vec: Tensor, n_prog: int, part: Tensor, dw: Tensor,
                out: Tensor | None = None, dp: Tensor | None = None, dz1: Tensor | None = None,
                dz2: Tensor | None = None, da: Tensor | None = None, cvec: Tensor | None = None,
                training: bool = True) -> None:
        dummy = vec
        lo = flat_layout(out)[1:] if out is not None else (0, 0, 0)
        if dp is not None:
            dp, *lg = flat_layout(dp)
        else:
            lg = (0, 0, 0)
        l1 = flat_layout(dz1)[1:] if dz1 is not None else (0, 0, 0)
        l2 = flat_layout(dz2)[1:] if dz2 is not None else (0, 0, 0)
        if da is None:
            lda = (0, 0, 0)
        elif self.a_patch:
            lda = da.stride()
        else:
            _, sdab, _, sdas = flat_layout(da)  # da = empty_like(self.A): spatial dims collapse
            lda = (sdab, sdas, 0)
        P, R = self.pads, self.chans
        _head_kernel[(n_prog,)](
            self.z1, self.z2, self.A, *self.ws, vec, cvec if cvec is not None else dummy,
            out if out is not None else dummy, dp if dp is not None else dummy,
            dz1 if dz1 is not None else dummy, dz2 if dz2 is not None else dummy,
            da if da is not None else dummy, part, dw,
            self.npix, self.S, self.n_tiles, *self.l1, *self.l2, *self.la, *lo, *lg, *l1, *l2,
            *lda, *self.geo, A_TOK=bool(self.a_patch), PATCH=max(1, self.a_patch),
            C=self.C, R1=R[1], R2=R[2], R3=R[3], R4=R[4], R5=R[5],
            P0=P[0], P1=P[1], P2=P[2], P3=P[3], P4=P[4], P5=P[5], P6=P[6],
            PJ=P[J], MAXW=self.W, MODE=mode, J=J, NUP=J if mode == 0 else NUM_LAYERS, TRAIN=training,
            BLOCK_S=BLOCK_S, PREC=self.prec, SJ=J if mode == 0 else 0, CJ=J if mode == 2 else 0, num_warps=4)

    def forward(self, gamma: Sequence[Tensor], beta: Sequence[Tensor], running_mean: Sequence[Tensor],
                running_var: Sequence[Tensor], training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training: per layer a statistics sweep + `_bn_finalize_kernel`; eval: one
        `_eval_affine_kernel`; then the emit sweep. 13 / 2 launches, nothing else."""
        W, R = self.W, self.chans
        mean, var, vec = self._new(NUM_LAYERS, W), self._new(NUM_LAYERS, W), self._new(NUM_LAYERS, 4, W)
        n_prog = min(FWD_PROGRAMS, self.n_tiles)
        if training:
            part = self._new(n_prog, 3, W)  # reused layer after layer (stream order)
            for k in range(NUM_LAYERS):
                self._launch(0, k + 1, vec, n_prog, part, vec)
                _bn_finalize_kernel[(1,)](part, n_prog, gamma[k], beta[k], vec, mean, var, eps, K=k,
                                          CO=R[k + 1], MAXW=W, BLOCK_P=_RED_P, num_warps=4)
        else:
            _eval_affine_kernel[(1,)](*running_mean, *running_var, *gamma, *beta, vec, mean, var, eps,
                                      R1=R[1], R2=R[2], R3=R[3], R4=R[4], R5=R[5], R6=R[6], MAXW=W,
                                      num_warps=4)
        out = torch.empty_like(self.z1)
        self._launch(1, NUM_LAYERS, vec, n_prog, vec, vec, out=out)
        return out, mean, var, vec

    def backward(self, vec: Tensor, dP: Tensor, training: bool, gamma: Sequence[Tensor],
                 beta: Sequence[Tensor]):
        """Training: per layer (6..1) a Σdy, Σdy·x̂ sweep + `_bwd_coef_kernel`; then the final
        sweep and `_grad_reduce_kernel` into per-layer gradients. 14 / 2 launches, nothing else."""
        W = self.W
        cvec = self._new(NUM_LAYERS, 2, W)
        if training:
            n_prog = min(FWD_PROGRAMS, self.n_tiles)
            part = self._new(n_prog, 2, W)
            for J in range(NUM_LAYERS, 0, -1):
                self._launch(2, J, vec, n_prog, part, vec, dp=dP, cvec=cvec, training=True)
                _bwd_coef_kernel[(1,)](part, n_prog, cvec, float(self.npix), K=J - 1, CO=self.chans[J],
                                       MAXW=W, BLOCK_P=_RED_P, num_warps=4)
        n_prog = min(BWD_PROGRAMS, self.n_tiles)
        part = self._new(n_prog, NUM_LAYERS, 2, W)
        dw = self._new(n_prog, NUM_LAYERS, W, W)
        dz1, dz2, da = torch.empty_like(self.z1), torch.empty_like(self.z2), torch.empty_like(self.A)
        self._launch(3, 1, vec, n_prog, part, dw, dp=dP, dz1=dz1, dz2=dz2, da=da, cvec=cvec,
                     training=training)
        dws = [torch.empty_like(w) for w in self.ws]  # o·ci + i, like the weights themselves
        dgs, dbs = [torch.empty_like(g) for g in gamma], [torch.empty_like(b) for b in beta]
        P, R = self.pads, self.chans
        _grad_reduce_kernel[(NUM_LAYERS * (W // _GRAD_ROWS),)](
            dw, part, n_prog, *dws, *dgs, *dbs, R0=R[0], R1=R[1], R2=R[2], R3=R[3], R4=R[4], R5=R[5],
            R6=R[6], P0=P[0], P1=P[1], P2=P[2], P3=P[3], P4=P[4], P5=P[5], P6=P[6], MAXW=W,
            ROWS=_GRAD_ROWS, NB=W // _GRAD_ROWS, num_warps=4)
        return dz1, dz2, da, dws, dgs, dbs


def _runner(z1: Tensor, z2: Tensor, A: Tensor, weight: Sequence[Tensor], chans: Sequence[int],
            a_patch: int = 0):
    if triton_usable(z1):
        return _TritonRunner(z1, z2, A, weight, chans, a_patch=a_patch)
    return _TorchRunner(z1, z2, A, weight, chans, a_patch=a_patch)


# =========================================================================== custom ops
def _check_chans(chans: Sequence[int], wt: Tensor) -> None:
    if len(chans) != NUM_LAYERS + 1:
        raise ValueError(f"fusion_head: widths {list(chans)} must list {NUM_LAYERS + 1} channel counts")
    if tuple(wt.shape) != (NUM_LAYERS, max(_padded(chans)), max(_padded(chans))):
        raise ValueError(f"fusion_head: packed weights have shape {tuple(wt.shape)}, expected "
                         f"[{NUM_LAYERS}, W, W] with W = {max(_padded(chans))} for widths {list(chans)}")


def _acc_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _like(out: Tensor, ref: Tensor) -> Tensor:
    """`out` with the strides of `empty_like(ref)`, which the fake kernels promise: the
    runner works on dense copies when `ref`'s spatial dims do not collapse."""
    want = torch.empty_like(ref, dtype=out.dtype)
    return out if out.stride() == want.stride() else want.copy_(out)


def _fake_stats(z1: Tensor, chans: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    W, acc = max(_padded(chans)), _acc_dtype(z1)
    return (z1.new_empty((NUM_LAYERS, W), dtype=acc), z1.new_empty((NUM_LAYERS, W), dtype=acc),
            z1.new_empty((NUM_LAYERS, 4, W), dtype=acc))


# ---- per-layer ops: what FusedFusionHead calls (nothing packed)
@torch.library.custom_op("ucseg::fusion_head_layers", mutates_args=())
def _fusion_head_layers_op(z1: Tensor, z2: Tensor, A: Tensor, weight: list[Tensor], gamma: list[Tensor],
                           beta: list[Tensor], running_mean: list[Tensor], running_var: list[Tensor],
                           training: bool, eps: float, a_patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(P, mean [6, W], var [6, W], vec [6, 4, W]) from the six layers' own tensors (conv weight
    [cₖ, cₖ₋₁, 1, …], BN weight/bias/running stats [cₖ]). mean/var: the biased batch statistics
    (training) or the running statistics (eval), zero-padded to W; vec: the BN affine the sweeps
    used (scale, shift, mean, rstd), saved for the backward. Functional (autograd needs that):
    the running-statistics update is `ucseg::bn_running_update`. (a_patch has no default on
    purpose: the dispatcher drops arguments equal to their default, which would shift the
    gradient structure autograd expects for ops with Tensor[] inputs.)"""
    run = _runner(z1, z2, A, weight, _layer_chans(weight), a_patch)
    P, mean, var, vec = run.forward(gamma, beta, running_mean, running_var, training, eps)
    return _like(P, z1), mean, var, vec


@_fusion_head_layers_op.register_fake
def _(z1, z2, A, weight, gamma, beta, running_mean, running_var, training, eps, a_patch):
    return (torch.empty_like(z1), *_fake_stats(z1, _layer_chans(weight)))


@torch.library.custom_op("ucseg::bn_running_update",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _bn_running_update_op(mean: Tensor, var: Tensor, running_mean: list[Tensor], running_var: list[Tensor],
                          num_batches_tracked: list[Tensor], momentum: float | None, n: int) -> None:
    """nn.BatchNorm's running-statistics update of all six layers, in place, from the batch
    mean / biased var [6, W] over n values: num_batches_tracked += 1, running = m·batch +
    (1 − m)·running with m = momentum (or 1/num_batches_tracked for momentum=None), the variance
    made unbiased (× n/(n − 1)). One kernel (`_running_kernel`) where Triton runs."""
    if triton_usable(mean):
        R = [t.shape[0] for t in running_mean]
        mom = 0.0 if momentum is None else float(momentum)
        _running_kernel[(1,)](mean, var, *running_mean, *running_var, *num_batches_tracked, mom, 1.0 - mom,
                              n / (n - 1), R1=R[0], R2=R[1], R3=R[2], R4=R[3], R5=R[4], R6=R[5],
                              MAXW=mean.shape[-1], CUMULATIVE=momentum is None, num_warps=4)
        return
    for k in range(NUM_LAYERS):
        co = running_mean[k].shape[0]
        _update_running(running_mean[k], running_var[k], num_batches_tracked[k], mean[k, :co], var[k, :co],
                        n, momentum)


@_bn_running_update_op.register_fake
def _(mean, var, running_mean, running_var, num_batches_tracked, momentum, n):
    return None


@torch.library.custom_op("ucseg::fusion_head_layers_backward", mutates_args=())
def _fusion_head_layers_bwd_op(dP: Tensor, z1: Tensor, z2: Tensor, A: Tensor, weight: list[Tensor],
                               gamma: list[Tensor], beta: list[Tensor], vec: Tensor, training: bool,
                               a_patch: int = 0) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor],
                                                          list[Tensor]]:
    """(dz1, dz2, dA, [dWₖ], [dγₖ], [dβₖ]) by recompute, each gradient allocated per layer in its
    tensor's shape (and, for dWₖ, layout) and written by the kernels; vec is the forward's; dA in
    A's layout (pixel or tokens, as `a_patch` says)."""
    run = _runner(z1, z2, A, weight, _layer_chans(weight), a_patch)
    dz1, dz2, dA, dws, dgs, dbs = run.backward(vec, dP, training, gamma, beta)
    return _like(dz1, z1), _like(dz2, z2), _like(dA, A), dws, dgs, dbs


@_fusion_head_layers_bwd_op.register_fake
def _(dP, z1, z2, A, weight, gamma, beta, vec, training, a_patch=0):
    return (torch.empty_like(z1), torch.empty_like(z2), torch.empty_like(A),
            [torch.empty_like(_dense_weight(w)) for w in weight],
            [torch.empty_like(g) for g in gamma], [torch.empty_like(b) for b in beta])


def _layers_setup_context(ctx, inputs, output) -> None:
    z1, z2, A, weight, gamma, beta = inputs[:6]
    _P, mean, var, vec = output
    ctx.save_for_backward(z1, z2, A, vec, *weight, *gamma, *beta)
    ctx.training, ctx.a_patch = inputs[8], inputs[10]
    ctx.mark_non_differentiable(mean, var, vec)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean / var / vec


def _layers_backward(ctx, dP: Tensor | None, _dmean, _dvar, _dvec):
    z1, z2, A, vec, *params = ctx.saved_tensors
    n = NUM_LAYERS
    nones = [None] * n  # list inputs take lists of gradients
    if dP is None:
        return None, None, None, nones, nones, nones, nones, nones, None, None, None
    dz1, dz2, dA, dws, dgs, dbs = _fusion_head_layers_bwd_op(
        dP, z1, z2, A, params[:n], params[n:2 * n], params[2 * n:], vec, ctx.training, ctx.a_patch)
    return dz1, dz2, dA, dws, dgs, dbs, nones, nones, None, None, None


_fusion_head_layers_op.register_autograd(_layers_backward, setup_context=_layers_setup_context)


# ---- packed op: the [6, W, W] / [6, W] interface of `pack_head_params` (kept for callers of
# `fusion_head`; unpacked into per-layer views, so it shares the kernels and the backward above)
def _unpack(chans: Sequence[int], wt: Tensor, *vecs: Tensor) -> tuple[list[Tensor], ...]:
    """Per-layer views: Wₖ = wt[k, :cₖ₋₁, :cₖ]ᵀ [cₖ, cₖ₋₁], and v[k, :cₖ] of each [6, W] tensor."""
    ws = [wt[k, :chans[k], :chans[k + 1]].t() for k in range(NUM_LAYERS)]
    return (ws, *([v[k, :chans[k + 1]] for k in range(NUM_LAYERS)] for v in vecs))


@torch.library.custom_op("ucseg::fusion_head", mutates_args=())
def _fusion_head_op(z1: Tensor, z2: Tensor, A: Tensor, wt: Tensor, gamma: Tensor, beta: Tensor,
                    mean_in: Tensor, var_in: Tensor, chans: list[int], training: bool,
                    eps: float, a_patch: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(P, mean, var, vec): P like z1; mean/var [6, W] in the accumulation dtype — the batch
    statistics in training (biased var), mean_in/var_in (running stats) in eval, zero-padded;
    vec [6, 4, W] the affine used (for the backward). Running statistics are not updated.
    a_patch = 0: A is [B, 1, *S]; a_patch = p > 0: A is the patch tokens [B, N, p^d]."""
    ws, gs, bs, ms, vs = _unpack(chans, wt, gamma, beta, mean_in, var_in)
    P, mean, var, vec = _runner(z1, z2, A, ws, chans, a_patch).forward(gs, bs, ms, vs, training, eps)
    return _like(P, z1), mean, var, vec


@_fusion_head_op.register_fake
def _(z1, z2, A, wt, gamma, beta, mean_in, var_in, chans, training, eps, a_patch=0):
    return (torch.empty_like(z1), *_fake_stats(z1, chans))


def _setup_context(ctx, inputs, output) -> None:
    z1, z2, A, wt, gamma, beta, _mi, _vi, chans, training, eps = inputs[:11]
    _P, mean, var, vec = output
    ctx.save_for_backward(z1, z2, A, wt, gamma, beta, vec)
    ctx.chans, ctx.training = chans, training
    ctx.a_patch = inputs[11] if len(inputs) > 11 else 0
    ctx.mark_non_differentiable(mean, var, vec)
    ctx.set_materialize_grads(False)


def _backward(ctx, dP: Tensor | None, _dmean, _dvar, _dvec):
    z1, z2, A, wt, gamma, beta, vec = ctx.saved_tensors
    if dP is None:
        return (None,) * 12
    chans, W = ctx.chans, wt.shape[-1]
    ws, gs, bs = _unpack(chans, wt, gamma, beta)
    dz1, dz2, dA, dws, dgs, dbs = _fusion_head_layers_bwd_op(dP, z1, z2, A, ws, gs, bs, vec, ctx.training,
                                                             ctx.a_patch)
    pads = [(0, W - c) for c in chans[1:]]
    dwt = torch.stack([F.pad(d.t(), (0, W - chans[k + 1], 0, W - chans[k])) for k, d in enumerate(dws)])
    dg = torch.stack([F.pad(d, p) for d, p in zip(dgs, pads)])
    db = torch.stack([F.pad(d, p) for d, p in zip(dbs, pads)])
    return dz1, dz2, dA, dwt, dg, db, None, None, None, None, None, None


_fusion_head_op.register_autograd(_backward, setup_context=_setup_context)


# =========================================================================== public API
def _check_inputs(z1: Tensor, z2: Tensor, A: Tensor, C: int, training: bool,
                  a_patch_size: int | None) -> int:
    for name, t in (("z1", z1), ("z2", z2)):
        if t.dim() < 3 or t.shape[1] != C:
            raise ValueError(f"fusion_head: {name} has shape {tuple(t.shape)}, expected [B, {C}, *spatial]")
    if z2.shape != z1.shape:
        raise ValueError(f"fusion_head: shapes z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)} must be equal [B, C, *S]")
    if a_patch_size is None:
        if A.shape != (z1.shape[0], 1, *z1.shape[2:]):
            raise ValueError(f"fusion_head: shapes z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}, A {tuple(A.shape)} "
                             "must be [B, C, *S], [B, C, *S], [B, 1, *S]")
        a_patch = 0
    else:
        n_tok, pv = token_geometry(z1.shape[2:], a_patch_size, "fusion_head")[4:]
        if A.shape != (z1.shape[0], n_tok, pv):
            raise ValueError(f"fusion_head: A {tuple(A.shape)} with a_patch_size={a_patch_size} must be the "
                             f"tokens [B, N, p^d] = {(z1.shape[0], n_tok, pv)} of z1 {tuple(z1.shape)}")
        a_patch = int(a_patch_size)
    if z1.shape[0] * spatial_size(z1) >= 2**31 - BLOCK_S:
        raise ValueError(f"fusion_head: {z1.shape[0] * spatial_size(z1)} pixels exceed the int32 tile index")
    if training and z1.shape[0] * spatial_size(z1) <= 1:
        raise ValueError(f"fusion_head: BatchNorm training needs more than 1 value per channel, got {tuple(z1.shape)}")
    use_triton(z1)  # raises when backend "triton" is forced where it cannot run
    return a_patch


def fusion_head_layers(z1: Tensor, z2: Tensor, A: Tensor, weight: Sequence[Tensor], gamma: Sequence[Tensor],
                       beta: Sequence[Tensor], running_mean: Sequence[Tensor], running_var: Sequence[Tensor],
                       num_batches_tracked: Sequence[Tensor], training: bool, eps: float = 1e-5,
                       momentum: float | None = 0.1, *, update_stats: bool | None = None,
                       a_patch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """P = head(cat(A·z1, A·z2)) by the recompute sweeps, from the six layers' own tensors;
    returns (P, mean [6, W], var [6, W]) as `fusion_head` does.

    `weight[k]`: layer k+1's 1×1 conv weight [cₖ, cₖ₋₁, 1, …] (read in place, contiguous or
    channels-last); `gamma`, `beta`, `running_mean`, `running_var` [cₖ] and `num_batches_tracked`
    (0-dim int64): its BatchNorm's. Nothing is packed or copied: the kernels take one pointer per
    layer and the backward writes each layer's gradients into tensors of its own. In training
    (unless `update_stats=False`) the running statistics and num_batches_tracked are then updated
    in place exactly as nn.BatchNorm does (momentum, or the cumulative average for momentum=None;
    unbiased variance) by one more kernel (`ucseg::bn_running_update`): no host sync. Between
    the Triton launches nothing but allocations is dispatched. A / `a_patch_size` as in
    `fusion_head`."""
    if not (len(weight) == len(gamma) == len(beta) == len(running_mean) == len(running_var)
            == len(num_batches_tracked) == NUM_LAYERS):
        raise ValueError(f"fusion_head_layers: every list needs {NUM_LAYERS} layers")
    chans = _layer_chans(weight)
    for k in range(NUM_LAYERS):
        co, ci = chans[k + 1], chans[k]
        if weight[k].dim() < 2 or tuple(weight[k].shape[:2]) != (co, ci) or weight[k].numel() != co * ci:
            raise ValueError(f"fusion_head_layers: layer {k + 1} weight {tuple(weight[k].shape)} is not a "
                             f"1×1 conv [{co}, {ci}, 1, …] following width {ci}")
        for name, t in (("gamma", gamma[k]), ("beta", beta[k]), ("running_mean", running_mean[k]),
                        ("running_var", running_var[k])):
            if tuple(t.shape) != (co,):
                raise ValueError(f"fusion_head_layers: layer {k + 1} {name} has shape {tuple(t.shape)}, "
                                 f"expected ({co},)")
    a_patch = _check_inputs(z1, z2, A, chans[-1], training, a_patch_size)
    P, mean, var, _vec = _fusion_head_layers_op(z1, z2, A, list(weight), list(gamma), list(beta),
                                                list(running_mean), list(running_var), bool(training),
                                                float(eps), a_patch)
    if training and (update_stats is None or update_stats):
        _bn_running_update_op(mean, var, list(running_mean), list(running_var), list(num_batches_tracked),
                              None if momentum is None else float(momentum), z1.shape[0] * spatial_size(z1))
    return P, mean, var


def fusion_head(z1: Tensor, z2: Tensor, A: Tensor, wt: Tensor, gamma: Tensor, beta: Tensor,
                running_mean: Tensor, running_var: Tensor, chans: Sequence[int], training: bool,
                eps: float = 1e-5, *, a_patch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """P = head(cat(A·z1, A·z2)) by the recompute sweeps; returns (P, mean [6, W], var [6, W]).

    `wt`, `gamma`, `beta`, `running_*` are the packed parameters of `pack_head_params`; mean/var
    are the biased batch statistics used (training) or the running statistics (eval). Updating the
    running statistics is the caller's job here. Packing costs a pad per tensor and layer (and
    their backward): `FusedFusionHead` calls `fusion_head_layers` instead, which takes the
    layers' tensors as they are and updates the running statistics itself.

    A is the attention map [B, 1, *S], or — with `a_patch_size=p` — its patch tokens
    [B, N, p^d] as the cross-attention's output Linear writes them (`Patchify(p)` order): the
    sweeps then index A's token layout per pixel (no unpatchify copy) and dA comes back in
    the layout A came in."""
    a_patch = _check_inputs(z1, z2, A, chans[-1], training, a_patch_size)
    _check_chans(chans, wt)
    P, mean, var, _vec = _fusion_head_op(z1, z2, A, wt, gamma, beta, running_mean, running_var, list(chans),
                                         bool(training), float(eps), a_patch)
    return P, mean, var


def pack_head_params(head: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]]:
    """(wt [6, W, W] = zero-padded Wₖᵀ, γ, β, running mean, running var [6, W], channel widths),
    differentiable in the head's parameters (pad + stack: gradients reach conv{k}.0.weight etc.).
    For `fusion_head`; `FusedFusionHead` does not pack (`fusion_head_layers`)."""
    convs = [getattr(head, f"conv{k + 1}")[0] for k in range(NUM_LAYERS)]
    chans = [convs[0].in_channels, *[c.out_channels for c in convs]]
    W = max(_padded(chans))
    wts, gs, bs, rms, rvs = [], [], [], [], []
    for k in range(NUM_LAYERS):
        bn = getattr(head, f"conv{k + 1}")[1]
        ci, co = chans[k], chans[k + 1]
        wts.append(F.pad(convs[k].weight.reshape(co, ci).t(), (0, W - co, 0, W - ci)))
        gs.append(F.pad(bn.weight, (0, W - co)))
        bs.append(F.pad(bn.bias, (0, W - co)))
        rms.append(F.pad(bn.running_mean, (0, W - co)))
        rvs.append(F.pad(bn.running_var, (0, W - co), value=1.0))
    return (torch.stack(wts), torch.stack(gs), torch.stack(bs), torch.stack(rms), torch.stack(rvs), chans)
