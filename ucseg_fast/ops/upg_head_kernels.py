"""UPG fusion head kernels, fused by recomputation: six (1×1 conv → BatchNorm → LeakyReLU 0.2) layers.

The launch, autograd and custom-op code is `upg_head.py`; this file holds the kernels.

Math (docs/method.md §6.3), per pixel i, F(i) = [A·z1(i), A·z2(i)] (2C values), h0 = F:
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
again by the eager chain (conv/BN/LReLU activations kept for the backward, docs/method.md §6.1).

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
chosen per call by `upg_head.dot_precision` (env UCSEG_UPG_DOT = auto | ieee | tf32 | tf32x3,
default auto; tf32x3 = three tf32 products, near-fp32, only when asked for; devices without tensor cores
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
Accuracy (CPU, the PyTorch head with its products' operands truncated to tf32, the worst case;
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

Launch geometry, computed per call from the shapes and the device (`upg_head._TritonRunner`):
a tile is BLOCK_S = 64 pixels (tl.dot needs ≥ 16 rows) of the flattened B·S pixels; the
statistics and emit sweeps and the Σdy sweeps run min(tiles, 8·SMs) programs, the final
backward sweep min(tiles, 2·SMs) (each writes [6, W, W] weight-gradient partials: keep them few);
SMs = the device's multiprocessor count (`sm_count`). The one-program reductions read 64
partial rows a step; `_grad_reduce_kernel` runs 6·W/16 programs of 16 rows of Wₖᵀ. 4 warps each.
"""
from __future__ import annotations

from ._triton_utils import tl, triton
from .evidential import token_nf


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
    per-program (count, mean, M2) partials [n_prog, 3, MAXW] in a fixed order, then the
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
