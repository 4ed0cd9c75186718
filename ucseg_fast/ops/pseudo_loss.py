"""Masked cross-entropy + soft Dice against hard pseudo-labels, fused forward and backward.

Kernels, traffic and layout: `loss_kernels.py` (this module is its SUM_TERMS front end: one
loss a logit tensor, CE + dice_weight·Dice, with an optional mask; the two-subnet form adds
SELECT). p = softmax(z) in float32, y = one_hot(labels), m = the counted pixels (label in
[0, C), not `ignore_index`, kept by the mask):
  CE   = Σ_i m_i·(−Σ_c y_ic log p_ic) / max(1, Σ_i m_i)                  (0 if nothing counted)
  Dice = mean_{b,c} 1 − (2 I_bc + eps) / (U_bc + eps),  I = Σ_s p·y·m,  U = Σ_s p·m + Σ_s y·m
  loss = CE + dice_weight·Dice
Softmax is recomputed from the logits in the backward: no [B, C, ...] float tensor is saved.
`pseudo_label_loss`: 3 launches (forward sweep, finalize, backward sweep).

Two subnets (`cross_pseudo_label_loss`): one forward sweep computes the pseudo-labels of
`entropy_pseudo_label` and both subnets' partials from the same registers (SELECT, PAIR), one
finalize (a program per subnet) and one backward sweep writing both gradients: 3 launches for
the whole cross-pseudo-supervision chain. Per pixel: forward reads 2·C·e, writes 13 bytes
(labels, mask, uncertainty); backward reads 2·C·e + 9, writes 2·C·e.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loss_kernels as lk
from . import reference
from ._triton_utils import (check_ignore_index, check_logits, out_float_dtype, triton_usable,
                            use_triton)
from .entropy import check_pair, check_threshold, threshold_tensor
from .reference import CrossPseudoLoss, PseudoLabels

__all__ = ["pseudo_label_loss", "PseudoLabelLoss", "cross_pseudo_label_loss",
           "CrossPseudoLabelLoss", "CrossPseudoLoss"]


# --------------------------------------------------------------------------- launchers
def _kernels_run(logits: torch.Tensor) -> bool:
    """The custom ops launch the kernels; an empty input (B = 0 or no pixel) takes the
    reference (loss 0, empty outputs), and so does what Triton cannot run."""
    return triton_usable(logits) and logits.numel() > 0


def _coef_shape(logits: torch.Tensor, K: int = 1) -> tuple[int, int]:
    return lk.coef_shape(logits, K, per_slice=False)


def _forward(z1, z2, labels, mask, losses, coef, dice_weight, eps, ignore_index=-100, select=None):
    lk.launch_forward(z1, z2, labels, mask, None, losses, coef, kind="ce", dice=dice_weight != 0.0,
                      dice_weight=dice_weight, eps=eps, ignore_index=ignore_index,
                      per_slice=False, sum_terms=True, select=select)


def _backward_sweep(grad, z1, z2, labels, mask, coef, dice_weight, ignore_index=-100):
    return lk.launch_backward(grad, z1, z2, labels, mask, None, coef, kind="ce",
                              dice=dice_weight != 0.0, ignore_index=ignore_index,
                              per_slice=False, sum_terms=True)


@torch.library.custom_op("ucseg::pseudo_label_loss", mutates_args=())
def _pl_loss_op(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                dice_weight: float, eps: float, ignore_index: int = -100
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, coef): coef [1, 2 + 2BC] float32 holds what the backward needs
    (`loss_kernels.coef_shape`: 1/max(1, Σm), then the Dice α_bc and β_bc); it is a
    non-differentiable output."""
    loss = logits.new_empty((), dtype=out_float_dtype(logits))
    coef = logits.new_empty(_coef_shape(logits), dtype=torch.float32)
    if not _kernels_run(logits):  # the backward recomputes through the reference; coef unused
        ref = reference.pseudo_label_loss(logits, labels, mask, dice_weight=dice_weight, eps=eps,
                                          ignore_index=ignore_index)
        return loss.copy_(ref), coef.zero_()
    _forward(logits, None, labels, mask, loss, coef, dice_weight, eps, ignore_index)
    return loss, coef


@_pl_loss_op.register_fake
def _(logits, labels, mask, dice_weight, eps, ignore_index=-100):
    return (logits.new_empty((), dtype=out_float_dtype(logits)),
            logits.new_empty(_coef_shape(logits), dtype=torch.float32))


@torch.library.custom_op("ucseg::pseudo_label_loss_backward", mutates_args=())
def _pl_loss_bwd_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor | None, coef: torch.Tensor, dice_weight: float,
                    eps: float, ignore_index: int = -100) -> torch.Tensor:
    if not _kernels_run(logits):
        # torch.func, not enable_grad + autograd.grad: an op's implementation runs below the
        # autograd dispatch key, where enable_grad() records nothing
        ref, vjp = torch.func.vjp(
            lambda z: reference.pseudo_label_loss(z, labels, mask, dice_weight=dice_weight,
                                                  eps=eps, ignore_index=ignore_index),
            logits.detach())
        (g,) = vjp(grad.to(ref.dtype))
        return torch.empty_like(logits).copy_(g)
    return _backward_sweep(grad, logits, None, labels, mask, coef, dice_weight, ignore_index)[0]


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
            za.new_empty(_coef_shape(za, 2), dtype=torch.float32))


@torch.library.custom_op("ucseg::cross_pseudo_label_loss", mutates_args=())
def _cps_op(logits_a: torch.Tensor, logits_b: torch.Tensor, threshold: torch.Tensor, select: str,
            dice_weight: float, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (losses [2], labels, mask, uncertainty, coef [2, 2 + 2BC]); only losses is
    differentiable. Forward: one sweep + one finalize launch."""
    losses, labels, mask, unc, coef = _pair_outputs(logits_a)
    if not _kernels_run(logits_a):
        ref = reference.cross_pseudo_label_loss(logits_a, logits_b, threshold, select=select,
                                                dice_weight=dice_weight, eps=eps)
        losses.copy_(torch.stack([ref.loss_a, ref.loss_b]))
        return (losses, labels.copy_(ref.pseudo.labels), mask.copy_(ref.pseudo.mask),
                unc.copy_(ref.pseudo.uncertainty), coef.zero_())
    _forward(logits_a, logits_b, None, None, losses, coef, dice_weight, eps,
             select=(threshold, labels, mask, unc, select == "mean"))
    return losses, labels, mask, unc, coef


@_cps_op.register_fake
def _(logits_a, logits_b, threshold, select, dice_weight, eps):
    return _pair_outputs(logits_a)


@torch.library.custom_op("ucseg::cross_pseudo_label_loss_backward", mutates_args=())
def _cps_bwd_op(grad_losses: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor,
                labels: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, dice_weight: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not _kernels_run(logits_a):
        return tuple(_pl_loss_bwd_op(g, z, labels, mask, coef[0], dice_weight, eps)
                     for z, g in ((logits_a, grad_losses[0]), (logits_b, grad_losses[1])))
    return _backward_sweep(grad_losses, logits_a, logits_b, labels, mask, coef, dice_weight)


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
