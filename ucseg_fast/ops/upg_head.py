"""UPG fusion head by recompute sweeps: launches, autograd, custom ops and the public API.

P = head(cat(A·z1, A·z2)), six (1×1 conv → BatchNorm → LeakyReLU 0.2) layers, computed by the
Triton kernels of `upg_head_kernels.py` (its header: the math, the recompute scheme, the bytes,
the layout, the launches and their geometry). Only P and per-layer statistics are written in
the forward; nothing is stored for the backward.

Where Triton cannot run (float64 golden parity, a CPU without the interpreter) or the ops backend
is "reference", `fusion_head_layers` / `fusion_head` compute `reference.fusion_head` — the head's
math in plain PyTorch, differentiated by autograd — and `reference.bn_running_update` (a
token-layout A is unpatchified first); the custom ops themselves always run the kernels.

The kernels' tl.dot input precision is chosen per call by `dot_precision` (env UCSEG_UPG_DOT =
auto | ieee | tf32 | tf32x3, a numerical choice documented in the README, read at import).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from ._triton_utils import cdiv, flat_layout, next_pow2, sm_count, spatial_size, triton_usable, use_triton
from .evidential import token_geometry, unpatchify_map
from .upg_head_kernels import (_bn_finalize_kernel, _bwd_coef_kernel, _eval_affine_kernel,
                               _grad_reduce_kernel, _head_kernel, _running_kernel)

__all__ = ["fusion_head", "fusion_head_layers", "pack_head_params", "dot_precision", "NUM_LAYERS"]

NUM_LAYERS = 6
# launch geometry (upg_head_kernels header): pixels a tile (tl.dot needs ≥ 16), programs per SM
# of the sweeps and of the final backward sweep, partial rows a reduction step, Wₖᵀ rows a program
BLOCK_S = 64
SWEEP_PROGRAMS_PER_SM = 8
FINAL_PROGRAMS_PER_SM = 2
_RED_P = 64
_GRAD_ROWS = 16
DOT_PRECISION = os.environ.get("UCSEG_UPG_DOT", "auto")  # auto | ieee | tf32 | tf32x3


_PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")


def dot_precision(z: Tensor) -> str:
    """The kernels' tl.dot input precision for logits `z` (upg_head_kernels header: the rule);
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


def _padded(chans: Sequence[int]) -> list[int]:
    return [max(16, next_pow2(c)) for c in chans]


def _layer_chans(weight: Sequence[Tensor]) -> list[int]:
    return [weight[0].shape[1], *[w.shape[0] for w in weight]]


def _dense_weight(w: Tensor) -> Tensor:
    """`w` [co, ci, 1, …] itself when element (o, i) sits at o·ci + i (contiguous or channels-last
    conv weights: no copy), else a contiguous copy (e.g. the views of `fusion_head`'s packed wt)."""
    if w.stride(1) == 1 and (w.shape[0] == 1 or w.stride(0) == w.shape[1]):
        return w
    return w.contiguous()


class _TritonRunner:
    """Launches the sweeps of `_head_kernel` and the small kernels between them. Between the
    launches nothing but allocations (`torch.empty*`) is dispatched: the merges, the affine, the
    running-statistics update and the gradient reductions are kernels, which read and write the
    layers' own tensors."""

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
        sms = sm_count(z1.device)
        self.sweep_programs = min(SWEEP_PROGRAMS_PER_SM * sms, self.n_tiles)
        self.final_programs = min(FINAL_PROGRAMS_PER_SM * sms, self.n_tiles)

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
        n_prog = self.sweep_programs
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
            n_prog = self.sweep_programs
            part = self._new(n_prog, 2, W)
            for J in range(NUM_LAYERS, 0, -1):
                self._launch(2, J, vec, n_prog, part, vec, dp=dP, cvec=cvec, training=True)
                _bwd_coef_kernel[(1,)](part, n_prog, cvec, float(self.npix), K=J - 1, CO=self.chans[J],
                                       MAXW=W, BLOCK_P=_RED_P, num_warps=4)
        n_prog = self.final_programs
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


# =========================================================================== custom ops
# The ops run the kernels; the functional API below sends what Triton cannot run to the reference.
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
    run = _TritonRunner(z1, z2, A, weight, _layer_chans(weight), a_patch)
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
        reference.bn_running_update(running_mean[k], running_var[k], num_batches_tracked[k], mean[k, :co],
                                    var[k, :co], n, momentum)


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
    run = _TritonRunner(z1, z2, A, weight, _layer_chans(weight), a_patch)
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
    P, mean, var, vec = _TritonRunner(z1, z2, A, ws, chans, a_patch).forward(gs, bs, ms, vs, training, eps)
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


# =========================================================================== reference path
def _reference(z1: Tensor, z2: Tensor, A: Tensor, weight, gamma, beta, running_mean, running_var,
               training: bool, eps: float, a_patch: int):
    """`reference.fusion_head` (differentiable), a token-layout A unpatchified first."""
    A_pix = unpatchify_map(A, z1.shape[2:], a_patch) if a_patch else A
    return reference.fusion_head(z1, z2, A_pix, weight, gamma, beta, running_mean, running_var,
                                 training, eps)


def _stack_padded(per_layer: Sequence[Tensor], chans: Sequence[int]) -> Tensor:
    """[6, W]: the layers' [cₖ] statistics, zero-padded to the widest padded width W."""
    W = max(_padded(chans))
    return torch.stack([F.pad(t, (0, W - t.shape[0])) for t in per_layer])


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
    update = training and (update_stats is None or update_stats)
    n = z1.shape[0] * spatial_size(z1)
    if not use_triton(z1):
        P, means, variances = _reference(z1, z2, A, weight, gamma, beta, running_mean, running_var,
                                         training, eps, a_patch)
        for k in range(NUM_LAYERS if update else 0):
            reference.bn_running_update(running_mean[k], running_var[k], num_batches_tracked[k],
                                        means[k], variances[k], n, momentum)
        return P, _stack_padded(means, chans), _stack_padded(variances, chans)
    P, mean, var, _vec = _fusion_head_layers_op(z1, z2, A, list(weight), list(gamma), list(beta),
                                                list(running_mean), list(running_var), bool(training),
                                                float(eps), a_patch)
    if update:
        _bn_running_update_op(mean, var, list(running_mean), list(running_var), list(num_batches_tracked),
                              None if momentum is None else float(momentum), n)
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
    if not use_triton(z1):
        ws, gs, bs, ms, vs = _unpack(chans, wt, gamma, beta, running_mean, running_var)
        P, means, variances = _reference(z1, z2, A, ws, gs, bs, ms, vs, training, eps, a_patch)
        return P, _stack_padded(means, chans), _stack_padded(variances, chans)
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
