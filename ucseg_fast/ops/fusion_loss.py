"""The per-pixel losses of the paper's `fusion` mode (CE or BCE, Dice, AU), fused.

Kernels, math, traffic and layout: `loss_kernels.py` (this module is its CE|BCE + Dice + AU
front end: KIND_CE or BCE, float or class-map targets, AU with a device λ, per-slice Dice for
[B, C, H, W, D] logits). Three launches a call, for one logit map or two against one target
(`loss_rows`, `fusion_unsup_losses`: the target is read once per tile for both).

Terms, as `ucseg_fast.losses` computes them (float32): the CE|BCE mean over the counted pixels,
the soft Dice of p against y per (b, c) — per (b, c, d) axial slice in 3D, summed over (H, W) as
losses.dice_loss — and the evidential AU term. A class-map pixel labelled `ignore_index` or
outside [0, C) is not counted (F.cross_entropy's rule); every pixel of a float map counts.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loss_kernels as lk
from . import reference
from ._triton_utils import check_ignore_index, check_logits, out_float_dtype, triton_usable, use_triton

__all__ = ["segmentation_loss_terms", "SegmentationLossTerms", "fusion_unsup_losses",
           "FusionUnsupLosses", "pair_loss_terms", "loss_rows"]


# --------------------------------------------------------------------------- launchers
def _per_slice(z: torch.Tensor) -> bool:
    return z.dim() == 5  # [B, C, H, W, D]: Dice per axial slice


def _coef_shape(z: torch.Tensor, K: int) -> tuple[int, int]:
    return lk.coef_shape(z, K, _per_slice(z))


def _kernels_run(z: torch.Tensor) -> bool:
    """The custom ops launch the kernels; an empty input (B = 0 or no pixel) takes the
    reference (0 for every term, as there), and so does what Triton cannot run."""
    return triton_usable(z) and z.numel() > 0


def _launch_fwd(z1, z2, target, lam, kind, dice, eps, ignore_index):
    """(losses [K, 3] = (cls, dice, au) per map, coef): forward sweep + finalize."""
    K = 1 if z2 is None else 2
    losses = z1.new_empty((K, 3), dtype=torch.float32)
    coef = z1.new_empty(_coef_shape(z1, K), dtype=torch.float32)
    lk.launch_forward(z1, z2, target, None, lam, losses, coef, kind=kind, dice=dice,
                      dice_weight=1.0, eps=eps, ignore_index=ignore_index,
                      per_slice=_per_slice(z1), sum_terms=False)
    return losses.to(out_float_dtype(z1)), coef


def _launch_bwd(grad, z1, z2, target, lam, coef, kind, dice, ignore_index):
    return lk.launch_backward(grad, z1, z2, target, None, lam, coef, kind=kind, dice=dice,
                              ignore_index=ignore_index, per_slice=_per_slice(z1),
                              sum_terms=False)


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
