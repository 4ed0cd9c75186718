"""Entropy-selected, confidence-masked pseudo-labels from two subnets, fused in one launch.

Math: p_k = softmax(z_k) (float32), H_k = −Σ_c p_k,c log p_k,c / log C with 0·log 0 = 0
(computed as p·log_softmax, finite for any finite logit, so ±1e4 logits are safe).
  select="min_entropy": p = p_a where H_a <= H_b else p_b; uncertainty = that H.
  select="mean":        p = (p_a + p_b)/2; uncertainty = normalised entropy of p.
labels = argmax_c p (lowest class on ties), mask = max_c p >= threshold, no gradient.
The threshold is read from a 0-D device tensor inside the kernel, so a captured CUDA graph sees
in-place updates of it between replays (a Python float becomes a fresh 0-D tensor per call).

Traffic per pixel (C classes, e bytes per logit): reads 2·C·e, writes 8 (int64 label) + 1
(mask) + 4 (uncertainty) bytes. The unfused PyTorch chain (2× softmax, 2× entropy with log,
mul and sum, compare, where, max/argmax, compare) moves ≈ 20·C·4 bytes and launches ~15
kernels.

Layout: both logits [B, C, *spatial] with spatial dims that collapse to one stride each
(contiguous or channels-last; the two may differ), read in place. Outputs are contiguous
[B, *spatial]. Each program owns all C classes of BLOCK_S pixels of one sample.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import reference
from ._triton_utils import (cdiv, check_logits, flat_layout, num_warps_for, out_float_dtype,
                            softmax_logp_f32, spatial_size, tile_sizes, tl, triton, triton_usable,
                            use_triton)
from .reference import PseudoLabels

__all__ = ["entropy_pseudo_label", "EntropyPseudoLabel", "PseudoLabels"]

_SELECT = ("min_entropy", "mean")


@triton.jit
def softmax_entropy_tile(z, valid_c, inv_log_c):
    """(p, log p, normalised entropy) of a [BLOCK_C, BLOCK_S] tile (padded rows masked)."""
    p, logp = softmax_logp_f32(z, valid_c)
    return p, logp, -tl.sum(p * logp, axis=0) * inv_log_c


@triton.jit
def pseudo_label_tile(za, zb, valid_c, thr, inv_log_c, MEAN: tl.constexpr):
    """The per-pixel pseudo-label rule on a tile of both subnets' logits.

    Returns (label int32, keep bool, uncertainty, p_a, log p_a, p_b, log p_b) so that fused
    callers (the two-subnet loss) reuse the softmaxes instead of recomputing them."""
    pa, la, ha = softmax_entropy_tile(za, valid_c, inv_log_c)
    pb, lb, hb = softmax_entropy_tile(zb, valid_c, inv_log_c)
    if MEAN:
        p = 0.5 * (pa + pb)
        # p > 0 also excludes the padded class rows (p = 0 there)
        h = -tl.sum(tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0), axis=0) * inv_log_c
    else:
        take_a = ha <= hb
        p = tl.where(take_a[None, :], pa, pb)
        h = tl.where(take_a, ha, hb)
    p = tl.where(valid_c, p, -1.0)
    pmax, label = tl.max(p, axis=0, return_indices=True, return_indices_tie_break_left=True)
    return label, pmax >= thr, h, pa, la, pb, lb


@triton.jit
def _entropy_pseudo_label_kernel(
        za_ptr, zb_ptr, thr_ptr, label_ptr, mask_ptr, unc_ptr, S,
        stride_ab, stride_ac, stride_as, stride_bb, stride_bc, stride_bs, inv_log_c,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, MEAN: tl.constexpr):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    in_s = offs_s < S
    valid_c = (offs_c < C)[:, None]
    ld = valid_c & in_s[None, :]
    za = tl.load(za_ptr + b * stride_ab + offs_c[:, None] * stride_ac + offs_s[None, :] * stride_as,
                 mask=ld, other=0.0).to(tl.float32)
    zb = tl.load(zb_ptr + b * stride_bb + offs_c[:, None] * stride_bc + offs_s[None, :] * stride_bs,
                 mask=ld, other=0.0).to(tl.float32)
    thr = tl.load(thr_ptr).to(tl.float32)
    label, keep, h, _, _, _, _ = pseudo_label_tile(za, zb, valid_c, thr, inv_log_c, MEAN)
    out = b * S + offs_s
    tl.store(label_ptr + out, label.to(tl.int64), mask=in_s)
    tl.store(mask_ptr + out, keep.to(tl.uint8), mask=in_s)
    tl.store(unc_ptr + out, h, mask=in_s)


# --------------------------------------------------------------------------- custom op
def _empty_outputs(logits: torch.Tensor):
    shape = (logits.shape[0], *logits.shape[2:])
    return (logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.bool),
            logits.new_empty(shape, dtype=out_float_dtype(logits)))


@torch.library.custom_op("ucseg::entropy_pseudo_label", mutates_args=())
def _entropy_pl_op(logits_a: torch.Tensor, logits_b: torch.Tensor, threshold: torch.Tensor,
                   select: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels, mask, unc = _empty_outputs(logits_a)
    if not triton_usable(logits_a) or logits_a.numel() == 0:
        ref = reference.entropy_pseudo_label(logits_a, logits_b, threshold, select=select)
        return labels.copy_(ref.labels), mask.copy_(ref.mask), unc.copy_(ref.uncertainty)
    B, C = logits_a.shape[:2]
    za, sab, sac, sas = flat_layout(logits_a)
    zb, sbb, sbc, sbs = flat_layout(logits_b)
    S = spatial_size(za)
    block_c, block_s = tile_sizes(C, S)
    _entropy_pseudo_label_kernel[(cdiv(S, block_s), B)](
        za, zb, threshold, labels, mask.view(torch.uint8), unc, S,
        sab, sac, sas, sbb, sbc, sbs, 1.0 / math.log(C),
        C=C, BLOCK_C=block_c, BLOCK_S=block_s, MEAN=(select == "mean"),
        num_warps=num_warps_for(block_c, block_s))
    return labels, mask, unc


@_entropy_pl_op.register_fake
def _(logits_a, logits_b, threshold, select):
    return _empty_outputs(logits_a)


# --------------------------------------------------------------------------- public API
def check_pair(logits_a: torch.Tensor, logits_b: torch.Tensor, select: str,
               op: str = "entropy_pseudo_label") -> None:
    check_logits(f"{op}: logits_a", logits_a)
    check_logits(f"{op}: logits_b", logits_b)
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"{op}: logits_a {tuple(logits_a.shape)} and logits_b "
                         f"{tuple(logits_b.shape)} must have one shape")
    if logits_a.device != logits_b.device or logits_a.dtype != logits_b.dtype:
        raise ValueError(f"{op}: logits_a ({logits_a.device}, {logits_a.dtype}) and "
                         f"logits_b ({logits_b.device}, {logits_b.dtype}) differ in device/dtype")
    if select not in _SELECT:
        raise ValueError(f"{op}: select={select!r}, expected one of {_SELECT}")


def check_threshold(threshold: float | torch.Tensor, like: torch.Tensor,
                    op: str = "entropy_pseudo_label") -> float | torch.Tensor:
    """The one threshold contract of every backend: a real Python number, or a floating tensor
    of one element — 0-D or [1] — on the logits' device (returned as a 0-D view: in-place
    updates of the caller's tensor stay visible to a captured graph). Anything else raises
    here, before the backend is chosen, with the same message on every path."""
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() > 1 or threshold.numel() != 1:
            raise ValueError(f"{op}: threshold must be a number, a 0-D tensor or a 1-element "
                             f"tensor [1], got shape {tuple(threshold.shape)}")
        if not threshold.is_floating_point():
            raise TypeError(f"{op}: a threshold tensor must be floating point, got "
                            f"{threshold.dtype}")
        if threshold.device != like.device:
            raise ValueError(f"{op}: threshold is on {threshold.device}, the logits on "
                             f"{like.device}; a threshold tensor must be on the logits' device")
        return threshold.reshape(())
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{op}: threshold must be a number, a 0-D tensor or a 1-element tensor "
                        f"[1], got {type(threshold).__name__}")
    return float(threshold)


def threshold_tensor(threshold: float | torch.Tensor, like: torch.Tensor,
                     op: str = "entropy_pseudo_label") -> torch.Tensor:
    """The kernels' 0-D threshold tensor of a checked threshold (`check_threshold`)."""
    threshold = check_threshold(threshold, like, op)
    if isinstance(threshold, torch.Tensor):
        return threshold
    # torch.full is a device fill, not a host->device copy: no sync, graph-capturable
    return torch.full((), threshold, device=like.device, dtype=torch.float32)


def entropy_pseudo_label(logits_a: torch.Tensor, logits_b: torch.Tensor,
                         threshold: float | torch.Tensor = 0.95, *,
                         select: str = "min_entropy") -> PseudoLabels:
    """Hard pseudo-labels, confidence mask and uncertainty from two subnets' logits.

    logits_a, logits_b: [B, C, *spatial], fp32/fp16/bf16, contiguous or channels-last.
    threshold: a number, or a 0-D / [1] floating tensor on the logits' device (update it in
    place between CUDA graph replays); anything else raises the same error on every backend.
    Returns PseudoLabels(labels int64, mask bool, uncertainty float32), each [B, *spatial],
    without gradient (empty for B = 0). Exact semantics: module docstring / `reference`."""
    check_pair(logits_a, logits_b, select)
    threshold = check_threshold(threshold, logits_a)
    if not use_triton(logits_a):
        return reference.entropy_pseudo_label(logits_a, logits_b, threshold, select=select)
    thr = threshold_tensor(threshold, logits_a)
    labels, mask, unc = _entropy_pl_op(logits_a.detach(), logits_b.detach(), thr, select)
    return PseudoLabels(labels, mask, unc)


class EntropyPseudoLabel(nn.Module):
    """nn.Module form of `entropy_pseudo_label`; the threshold is a 0-D float32 buffer (moves
    with `.to(device)`, update it with `set_threshold` — in place, so captured graphs see it)."""

    threshold: torch.Tensor

    def __init__(self, threshold: float = 0.95, select: str = "min_entropy") -> None:
        super().__init__()
        if select not in _SELECT:
            raise ValueError(f"EntropyPseudoLabel: select={select!r}, expected one of {_SELECT}")
        self.select = select
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=False)

    @torch.no_grad()
    def set_threshold(self, value: float | torch.Tensor) -> None:
        """In place (a captured graph sees it); a number, or a 0-D / [1] floating tensor."""
        value = check_threshold(value, value if isinstance(value, torch.Tensor) else
                                self.threshold, "EntropyPseudoLabel.set_threshold")
        if isinstance(value, torch.Tensor):
            self.threshold.copy_(value)
        else:
            self.threshold.fill_(value)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> PseudoLabels:
        return entropy_pseudo_label(logits_a, logits_b, self.threshold, select=self.select)

    def extra_repr(self) -> str:
        return f"select={self.select!r}"
