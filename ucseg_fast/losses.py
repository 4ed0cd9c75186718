"""Loss primitives of UC-Seg, reproducing the reference code (docs/method.md §2.1, §6.5).

Every function here is a pure PyTorch expression of device tensors: no `Tensor.item` call, no
host-side branch on tensor values, so the whole step can run eagerly, under `torch.compile`
or inside a captured CUDA graph. Per-step scalars (the AU factor λ_t) arrive as 0-D device
tensors (see `ucseg_fast.train.schedules.ScheduleTensors`).

Precision: float64 inputs are computed in float64 (golden parity); every other floating
dtype (fp32, bf16, fp16) is promoted to float32 before any reduction, so the losses are
fp32 even under autocast.

Shapes: logits/probabilities `[B, C, *S]` with S = (H, W) or (H, W, D); class maps
`[B, *S]`; one-hot targets `[B, C, *S]`.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "Kind",
    "acc",
    "probs",
    "ce_loss",
    "bce_loss",
    "dice_loss",
    "au_loss",
    "diff_loss",
    "queue_gate",
    "queue_gate_hard",
    "supervised_terms",
    "unsup_terms",
    "supervised_total",
    "pseudo_total",
    "unsup_total",
]

Kind = Literal["ce", "bce"]

_AU_EPS = 1e-10
_DICE_EPS = 1e-5
_GATE_SMOOTH = 1e-3


def acc(x: torch.Tensor) -> torch.Tensor:
    """`x` in its accumulation dtype: float64 stays float64, everything else becomes fp32."""
    return x if x.dtype == torch.float64 else x.float()


def probs(logits: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Probabilities the reference feeds to Dice: softmax over C for CE (ACDC), σ for BCE."""
    z = acc(logits)
    if kind == "ce":
        return torch.softmax(z, dim=1)
    if kind == "bce":
        return torch.sigmoid(z)
    raise ValueError(f"losses.probs: kind must be 'ce' or 'bce', got {kind!r}")


def ce_loss(logits: torch.Tensor, target_prob: torch.Tensor) -> torch.Tensor:
    """`nn.CrossEntropyLoss()` with probability targets: mean over B·|S| of −Σ_c y_c log softmax(z)_c.

    An all-zero target row (ACDC `--nms 0` pseudo-labels) contributes 0 but still counts in
    the mean, exactly as PyTorch's probability-target CE does.
    """
    z = acc(logits)
    return F.cross_entropy(z, target_prob.to(z.dtype))


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """smp `SoftBCEWithLogitsLoss()`: mean over all B·C·|S| of (1−y)·z + softplus(−z).

    smp multiplies by a `y != −100` mask first; it is inert for 0/1 targets and omitted.
    """
    z = acc(logits)
    return F.binary_cross_entropy_with_logits(z, target.to(z.dtype))


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = _DICE_EPS) -> torch.Tensor:
    """Reference `utils/losses.dice_loss`: mean over the remaining dims of 1 − (2I+ε)/(Σp+Σy+ε).

    The sums run over dims (2, 3) ONLY, as the reference codes it: per (b, c) in 2D, and per
    (b, c, axial slice d) for 3D `[B, C, H, W, D]` tensors (empty-vs-empty slices give 0).
    """
    if prob.dim() < 4:
        raise ValueError(f"losses.dice_loss: need [B,C,H,W(,D)], got shape {tuple(prob.shape)}")
    p = acc(prob)
    y = target.to(p.dtype)
    intersect = (p * y).sum(dim=(2, 3))
    z_sum = p.sum(dim=(2, 3))
    y_sum = y.sum(dim=(2, 3))
    dice = (2 * intersect + eps) / (z_sum + y_sum + eps)
    return (1 - dice).mean()


def _as_lambda(lam: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"losses.au_loss: lam must be a 0-D tensor, got shape {tuple(lam.shape)}")
        return lam.to(torch.float32)
    # A Python float costs an H2D copy per call and is not CUDA-graph safe; fine off the hot path.
    return torch.tensor(float(lam), dtype=torch.float32, device=device)


def au_loss(
    logits: torch.Tensor,
    target_cls: torch.Tensor,
    lam: torch.Tensor | float,
    eps: float = _AU_EPS,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Evidential accuracy-vs-uncertainty calibration loss (`utils/UMIS.u_loss`, then mean).

    Per pixel: α = softplus(z)+1, S = Σα, (s, k̂) = max_c α_c/S (first index on ties),
    u = C/S, a = [k̂ == target], and
        L = λ·a·(−s·ln(1−u+ε)) + (1−λ)·(1−a)·(−(1−s)·ln(u+ε)).
    `a` is a constant; gradient flows through s and u. `lam` is λ_t as a 0-D float32 tensor:
    the reference computes λ·a and (1−λ)·(1−a) as float32 products and only then promotes them
    into the (float64 in the golden run) per-pixel terms — reproduced here on purpose.
    `reduction="none"` returns the per-pixel map `[B, *S]`.
    """
    z = acc(logits)
    C = z.shape[1]
    alpha = F.softplus(z) + 1
    S = alpha.sum(dim=1, keepdim=True)
    s, k_hat = (alpha / S).max(dim=1)
    u = C / S.squeeze(1)
    a32 = (k_hat == target_cls.to(k_hat.dtype)).to(torch.float32)
    lam32 = _as_lambda(lam, z.device)
    w_acc = (lam32 * a32).to(z.dtype)
    w_inacc = ((1 - lam32) * (1 - a32)).to(z.dtype)
    acc_uncertain = -s * torch.log(1 - u + eps)
    inacc_certain = -(1 - s) * torch.log(u + eps)
    per_pixel = w_acc * acc_uncertain + w_inacc * inacc_certain
    if reduction == "none":
        return per_pixel
    if reduction == "mean":
        return per_pixel.mean()
    raise ValueError(f"losses.au_loss: reduction must be 'mean' or 'none', got {reduction!r}")


@torch.no_grad()
def diff_loss(prob_a: torch.Tensor, prob_b: torch.Tensor) -> torch.Tensor:
    """The reference's gradient-free cross-subnet BCE (`utils/losses.loss_diff1/2`).

    `nn.BCELoss()(clamp(prob_a[:, C−1], 1e-8, 1−1e-7), prob_b[:, C−1])`: the reference loops
    over channels but overwrites, so only the last channel counts, and returns `Tensor.item` (a float), so
    the term carries no gradient. Here it is a DETACHED 0-D tensor (no host sync) to add to
    the total exactly like the reference's Python float. loss_diff1 = diff_loss(p1, p2),
    loss_diff2 = diff_loss(p2, p1). Written out (not `F.binary_cross_entropy`) because that
    op refuses to run under autocast.
    """
    x = acc(prob_a[:, -1]).clamp(1e-8, 1 - 1e-7)
    y = prob_b[:, -1].to(x.dtype)
    # nn.BCELoss clamps each log at −100; never active after the input clamp, kept for parity.
    log_x = torch.log(x).clamp_min(-100)
    log_1mx = torch.log1p(-x).clamp_min(-100)
    return ((y - 1) * log_1mx - y * log_x).mean()


def _soft_dice_gate(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """2Σp·g / (Σp + Σg + 0.001), 0 where Σp + Σg = 0; pooled over every dim of `p`."""
    num = 2 * (p * g).sum()
    den = p.sum() + g.sum()
    return torch.where(den > 0, num / (den + _GATE_SMOOTH), torch.zeros_like(den))


@torch.no_grad()
def queue_gate(prob_l: torch.Tensor, target_onehot: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """The reference's queue gate `val_coef(soft, y)` as the trainer calls it (arguments swapped).

    The 0.5 threshold hits the ground truth, the prediction stays soft:
    D_c = 2Σp_c·[y_c>0.5] / (Σp_c + Σ[y_c>0.5] + 0.001), pooled over the whole labeled half.
    ACDC (`binary=False`): mean over classes 1..C−1 (`val_coef_ACDC`); 2D-generic / 3D
    (`binary=True`): channel 1 only. float32 like the reference's numpy cast. 0-D tensor.
    """
    p = prob_l.float()
    g = (target_onehot > 0.5).float()
    if binary:
        return _soft_dice_gate(p[:, 1], g[:, 1])
    C = p.shape[1]
    if C < 2:
        raise ValueError(f"losses.queue_gate: need C >= 2 channels, got shape {tuple(p.shape)}")
    return torch.stack([_soft_dice_gate(p[:, c], g[:, c]) for c in range(1, C)]).mean()


@torch.no_grad()
def queue_gate_hard(pred_cls: torch.Tensor, target_cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The evidently-meant hard Dice gate: argmax prediction vs ground-truth class map.

    Mean over classes 1..C−1 of 2|P_c∩G_c| / (|P_c| + |G_c| + 0.001) (0 when both are empty),
    pooled over the labeled half; C = 2 gives the binary (channel 1) variant. The project's
    default gate; `queue_gate` is the reference's soft variant.
    """
    vals = [
        _soft_dice_gate((pred_cls == c).float(), (target_cls == c).float())
        for c in range(1, num_classes)
    ]
    return torch.stack(vals).mean()


def supervised_terms(
    logits_l: torch.Tensor,
    y_onehot_l: torch.Tensor,
    y_cls_l: torch.Tensor,
    lam: torch.Tensor | float,
    kind: Kind = "ce",
) -> dict[str, torch.Tensor]:
    """Labeled-half terms {kind: CE|BCE, 'au': AU, 'dice': Dice(probs)} of one logit map.

    Use `supervised_total` (ce + au + dice, the reference's Lsup order) or `pseudo_total`
    (dice + ce + au, its Lpseudo order on P): the order matters at float64 tolerance.
    """
    if kind == "ce":
        cls_term = ce_loss(logits_l, y_onehot_l)
    elif kind == "bce":
        cls_term = bce_loss(logits_l, y_onehot_l)
    else:
        raise ValueError(f"losses.supervised_terms: kind must be 'ce' or 'bce', got {kind!r}")
    return {
        kind: cls_term,
        "au": au_loss(logits_l, y_cls_l, lam),
        "dice": dice_loss(probs(logits_l, kind), y_onehot_l),
    }


def unsup_terms(logits: torch.Tensor, Y_onehot: torch.Tensor, kind: Kind = "ce") -> dict[str, torch.Tensor]:
    """Pseudo-label / mixed-label terms {kind: CE|BCE, 'dice'}; total = `unsup_total`."""
    if kind == "ce":
        cls_term = ce_loss(logits, Y_onehot)
    elif kind == "bce":
        cls_term = bce_loss(logits, Y_onehot)
    else:
        raise ValueError(f"losses.unsup_terms: kind must be 'ce' or 'bce', got {kind!r}")
    return {kind: cls_term, "dice": dice_loss(probs(logits, kind), Y_onehot)}


def _cls_key(terms: dict[str, torch.Tensor]) -> str:
    for k in ("ce", "bce"):
        if k in terms:
            return k
    raise KeyError(f"losses: terms dict has neither 'ce' nor 'bce': {sorted(terms)}")


def supervised_total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Lsup_k = ce + au + dice (the reference's addition order)."""
    return terms[_cls_key(terms)] + terms["au"] + terms["dice"]


def pseudo_total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Lpseudo_l = dice + ce + au (the reference's addition order for the fused logits P)."""
    return terms["dice"] + terms[_cls_key(terms)] + terms["au"]


def unsup_total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Lunsup_k / Lmix_k = ce + dice (the reference's addition order)."""
    return terms[_cls_key(terms)] + terms["dice"]
