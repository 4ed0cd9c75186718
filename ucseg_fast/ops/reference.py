"""Plain-PyTorch oracles of every fused op: the definition of what the kernels compute.

Tests compare the Triton kernels with these, benchmarks time them ("reference eager" and
"reference compiled" providers), and the functional API falls back to them where Triton cannot
run. They are written for clarity, not speed, and are differentiated by autograd.

`dtype` (keyword) picks the compute precision: None = float32 (float64 for float64 inputs),
the op's contract. Tests also evaluate them in float64 (the oracle) and in the input's own
precision (the "same-precision PyTorch error" that kernel tolerances are derived from).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PseudoLabels(NamedTuple):
    """Output of `entropy_pseudo_label`: hard labels, confidence mask, per-pixel uncertainty."""

    labels: torch.Tensor  # int64 [B, *spatial]
    mask: torch.Tensor  # bool [B, *spatial]
    uncertainty: torch.Tensor  # float32 [B, *spatial], normalised entropy in [0, 1]


def _compute_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def evidential_uncertainty(logits: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dirichlet vacuity u = C / Σ_c (softplus(z_c) + 1), [B, 1, *spatial] (docs/method.md §6.2)."""
    z = logits.to(_compute_dtype(logits, dtype))
    C = z.shape[1]
    return C / (F.softplus(z) + 1).sum(1, keepdim=True)


def normalized_entropy(p: torch.Tensor) -> torch.Tensor:
    """-Σ_c p_c log p_c / log C over dim 1 (0·log 0 = 0), [B, *spatial]."""
    return -torch.special.xlogy(p, p).sum(1) / math.log(p.shape[1])


def entropy_pseudo_label(logits_a: torch.Tensor, logits_b: torch.Tensor,
                         threshold: float | torch.Tensor = 0.95, *, select: str = "min_entropy",
                         dtype: torch.dtype | None = None) -> PseudoLabels:
    """Confidence-masked hard pseudo-labels from two subnets' logits.

    min_entropy: per pixel, the softmax of the subnet with the lower normalised entropy
    (subnet a on equality); mean: the average of the two softmaxes. labels = argmax (first
    index on ties), mask = max_c p >= threshold, uncertainty = normalised entropy of the
    chosen p. No gradient flows to the outputs."""
    with torch.no_grad():
        ct = _compute_dtype(logits_a, dtype)
        pa = torch.softmax(logits_a.to(ct), dim=1)
        pb = torch.softmax(logits_b.to(ct), dim=1)
        if select == "min_entropy":
            ha, hb = normalized_entropy(pa), normalized_entropy(pb)
            take_a = ha <= hb
            p = torch.where(take_a.unsqueeze(1), pa, pb)
            h = torch.where(take_a, ha, hb)
        elif select == "mean":
            p = 0.5 * (pa + pb)
            h = normalized_entropy(p)
        else:
            raise ValueError(f"select={select!r}: expected 'min_entropy' or 'mean'")
        pmax, labels = p.max(dim=1)
        thr = threshold.to(ct) if isinstance(threshold, torch.Tensor) else threshold
        mask = pmax >= thr
        out_dt = torch.float64 if ct == torch.float64 else torch.float32
        return PseudoLabels(labels.to(torch.int64), mask, h.to(out_dt))


def one_hot_labels(labels: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, *spatial] one-hot; a label outside [0, C) gives an all-zero row. (The loss ops do
    not count such a pixel at all: see `counted_pixels`.)"""
    classes = torch.arange(C, device=labels.device).view(1, C, *([1] * (labels.dim() - 1)))
    return (labels.unsqueeze(1) == classes).to(dtype)


def counted_pixels(labels: torch.Tensor, C: int, ignore_index: int = -100) -> torch.Tensor:
    """bool [B, *spatial]: the pixels a class-map loss counts — label in [0, C) and not
    `ignore_index`. Every other pixel is left out of every term of the loss (sums and means),
    as `F.cross_entropy(..., ignore_index=...)` leaves it out."""
    lab = labels.long()  # compare in int64: a uint8 map against -100 must not wrap
    return (lab >= 0) & (lab < C) & (lab != ignore_index)


def _zero_loss(z: torch.Tensor) -> torch.Tensor:
    """A 0-D zero connected to z (zero gradient): the value of every loss of an empty input."""
    return z.sum() * 0


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                      *, dice_weight: float = 0.0, eps: float = 1e-5, ignore_index: int = -100,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Masked CE mean over kept pixels + dice_weight × soft Dice loss (docs/method.md §2.1, §6.5).

    m_i = mask_i and labels_i in [0, C) and labels_i != ignore_index (the counted pixels);
    CE = Σ_i m_i·(−Σ_c y_ic log p_ic) / max(1, Σ_i m_i)  (no counted pixel → 0, zero gradient);
    Dice = mean_{b,c} 1 − (2Σ p·y·m + eps) / (Σ p·m + Σ y·m + eps), sums over all spatial dims
    (an empty batch has no (b, c) group: Dice 0)."""
    ct = _compute_dtype(logits, dtype)
    z = logits.to(ct)
    C = z.shape[1]
    logp = torch.log_softmax(z, dim=1)
    y = one_hot_labels(labels, C, ct)
    keep = counted_pixels(labels, C, ignore_index)
    if mask is not None:
        keep = keep & mask.to(torch.bool)
    m = keep.unsqueeze(1).to(ct)
    ce_pix = -(y * logp).sum(1, keepdim=True)
    loss = (ce_pix * m).sum() / m.sum().clamp(min=1)
    if dice_weight != 0.0 and z.shape[0] > 0:
        p = torch.softmax(z, dim=1)
        dims = tuple(range(2, z.dim()))
        inter = (p * y * m).sum(dims)
        union = (p * m).sum(dims) + (y * m).sum(dims)
        dice = (1 - (2 * inter + eps) / (union + eps)).mean()
        loss = loss + dice_weight * dice
    return loss


class CrossPseudoLoss(NamedTuple):
    """Output of `cross_pseudo_label_loss`: each subnet's loss against the shared labels."""

    loss_a: torch.Tensor  # 0-D float32, differentiable in logits_a
    loss_b: torch.Tensor  # 0-D float32, differentiable in logits_b
    pseudo: PseudoLabels  # the shared pseudo-labels (no gradient)


def cross_pseudo_label_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                            threshold: float | torch.Tensor = 0.95, *, select: str = "min_entropy",
                            dice_weight: float = 0.0, eps: float = 1e-5,
                            dtype: torch.dtype | None = None) -> CrossPseudoLoss:
    """Both subnets trained on one set of pseudo-labels: `entropy_pseudo_label` of the detached
    logits, then `pseudo_label_loss` of each subnet against (labels, mask)."""
    pl = entropy_pseudo_label(logits_a.detach(), logits_b.detach(), threshold, select=select,
                              dtype=dtype)
    kw = dict(dice_weight=dice_weight, eps=eps, dtype=dtype)
    return CrossPseudoLoss(pseudo_label_loss(logits_a, pl.labels, pl.mask, **kw),
                           pseudo_label_loss(logits_b, pl.labels, pl.mask, **kw), pl)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64 (test/benchmark helper; host sync)."""
    return float((a.detach().double() - b.detach().double()).abs().max())  # sync-ok: test helper


_OUTPUT_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7,
               torch.float64: 2.0**-52}


def tolerance(oracle: torch.Tensor, baseline: torch.Tensor, *, atol: float = 0.0,
              out_dtype: torch.dtype = torch.float32) -> float:
    """Allowed max |ours − oracle| (docs/design.md §7): twice the error of the same computation done
    by PyTorch in the input's precision (`baseline`), plus `atol`, plus one rounding of the
    largest oracle value to `out_dtype` (outputs stored in bf16/fp16, e.g. gradients)."""
    scale = float(oracle.detach().double().abs().max()) if oracle.numel() else 0.0  # sync-ok: test helper
    return 2.0 * max_abs_err(baseline, oracle) + atol + _OUTPUT_ULP[out_dtype] * scale


def segmentation_loss_terms(logits: torch.Tensor, target: torch.Tensor, *, kind: str = "ce",
                            lam: torch.Tensor | float | None = None, dice: bool = True,
                            eps: float = 1e-5, ignore_index: int = -100,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The fusion-mode loss terms {kind: CE|BCE, 'dice', 'au'} of one logit map, exactly the
    plain-PyTorch losses of `ucseg_fast.losses` (ce_loss/bce_loss, dice_loss(probs) — per
    axial slice in 3D —, au_loss) when every pixel counts.

    target: an int class map [B, *S], or a float one-hot/multi-hot map [B, C, *S] whose argmax
    (first index; 0 for an all-zero row) is the AU target class.
    Class map: a pixel whose label is `ignore_index` or outside [0, C) is not counted — it
    adds nothing to the CE/BCE sum, the Dice sums (I, Σp, Σy) or the AU sum, and the CE/BCE
    and AU means run over the counted pixels only (F.cross_entropy's ignore_index rule); no
    counted pixel → CE/BCE and AU are 0 with zero gradient (where torch gives NaN).
    Float map: every pixel counts; an all-zero row is a real target (CE 0, in the mean).
    An empty input (no pixel, or B = 0) gives 0 for every term."""
    from .. import losses as L  # lazy: losses.py is built on ops/, keep the import one-way

    if kind not in ("ce", "bce"):
        raise ValueError(f"segmentation_loss_terms: kind must be 'ce' or 'bce', got {kind!r}")
    z = logits.to(_compute_dtype(logits, dtype))
    C = z.shape[1]
    keys = [kind] + (["dice"] if dice else []) + (["au"] if lam is not None else [])
    if z.numel() == 0:
        return {k: _zero_loss(z) for k in keys}
    if target.dim() == z.dim():
        y = target.to(z.dtype)
        terms = {kind: L.ce_loss(z, y) if kind == "ce" else L.bce_loss(z, y)}
        if dice:
            terms["dice"] = L.dice_loss(L.probs(z, kind), y, eps)
        if lam is not None:
            terms["au"] = L.au_loss(z, y.argmax(1), lam)
        return terms
    # class map: the means over all N pixels (losses.py), with the pixels that do not count
    # zeroed, rescaled by N / max(1, n). Every factor is exactly 1 when every pixel counts, so
    # the in-range values and gradients are bitwise those of losses.py.
    keep = counted_pixels(target, C, ignore_index)
    cls = torch.where(keep, target.long(), -1)
    y = one_hot_labels(cls, C, z.dtype)
    keep_c = keep.unsqueeze(1)
    n = keep.sum().to(z.dtype).clamp(min=1)
    scale = n.new_full((), keep.numel()) / n  # N / n (not N * (1/n): exactly 1 for n = N)
    if kind == "ce":
        cls_t = L.ce_loss(z, y)  # the uncounted rows of y are zero: they add 0 to the sum
    else:
        w = keep_c.to(z.dtype).expand_as(z)  # weight 1 (exact) / 0: uncounted pixels add 0
        cls_t = F.binary_cross_entropy_with_logits(z, y, weight=w)
    terms = {kind: cls_t * scale}
    if dice:
        p = L.probs(z, kind)
        terms["dice"] = L.dice_loss(torch.where(keep_c, p, torch.zeros_like(p)), y, eps)
    if lam is not None:
        au = L.au_loss(z, cls, lam, reduction="none")
        terms["au"] = torch.where(keep, au, torch.zeros_like(au)).mean() * scale
    return terms


def fusion_unsup_losses(z1_u: torch.Tensor, z2_u: torch.Tensor, Y_u: torch.Tensor, *,
                        kind: str = "ce", eps: float = 1e-5, ignore_index: int = -100,
                        dtype: torch.dtype | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both subnets' unsupervised {kind, 'dice'} terms against one pseudo-label Y_u."""
    kw = dict(kind=kind, eps=eps, ignore_index=ignore_index, dtype=dtype)
    return (segmentation_loss_terms(z1_u, Y_u, **kw), segmentation_loss_terms(z2_u, Y_u, **kw))


# --------------------------------------------------------------------------------------------
# prediction_stats: the gradient-free per-pixel predictions of one UC-Seg step
# --------------------------------------------------------------------------------------------
def map_dtype(num_classes: int) -> torch.dtype:
    """Class maps of the step: uint8 (1 byte a pixel) up to 255 classes, else int32."""
    return torch.uint8 if num_classes <= 255 else torch.int32


def _bce_last(x_prob: torch.Tensor, y_prob: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of the reference's loss_diff BCE on channel C−1 (losses.diff_loss)."""
    x = x_prob.clamp(1e-8, 1 - 1e-7)
    y = y_prob.to(x.dtype)
    return ((y - 1) * torch.log1p(-x).clamp_min(-100) - y * torch.log(x).clamp_min(-100)).sum()


def prediction_stats_from_probs(p1: torch.Tensor, p2: torch.Tensor, pP: torch.Tensor | None,
                                y_l: torch.Tensor | None, *, binary: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`prediction_stats` on probabilities (softmax, or σ per channel when `binary`)."""
    B, C = p1.shape[:2]
    fg = (lambda p: p[:, 1] >= 0.5) if binary else (lambda p: p.argmax(1))
    srcs = [p1, p2] + ([pP] if pP is not None else [])
    maps = torch.cat([fg(p) for p in srcs], 0).to(map_dtype(C))
    n = p1[:, -1].numel()
    d1 = _bce_last(p1[:, -1], p2[:, -1]) / n
    d2 = _bce_last(p2[:, -1], p1[:, -1]) / n
    gates = []
    for p in (p1, p2):
        if y_l is None or y_l.shape[0] == 0:
            gates.append(torch.zeros((), dtype=d1.dtype, device=p1.device))
            continue
        Bl = y_l.shape[0]
        pred = (p[:Bl, 1] > 0.5).long() if binary else p[:Bl].argmax(1)
        gates.append(hard_gate(pred, y_l, C).to(d1.dtype))
    return maps, torch.stack([d1, d2, *gates]).to(torch.float32 if p1.dtype != torch.float64
                                                   else torch.float64)


def hard_gate(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over classes 1..C−1 of 2|P_c∩G_c| / (|P_c| + |G_c| + 0.001), 0 when both are
    empty (`losses.queue_gate_hard`), pooled over the whole labeled half. float32."""
    cls = torch.arange(1, num_classes, device=pred.device).view(-1, *([1] * pred.dim()))
    p = pred.unsqueeze(0) == cls
    g = target.unsqueeze(0) == cls
    dims = tuple(range(1, p.dim()))
    inter = (p & g).sum(dims).float()
    den = p.sum(dims).float() + g.sum(dims).float()
    return torch.where(den > 0, 2 * inter / (den + 1e-3), torch.zeros_like(den)).mean()


def prediction_stats(z1: torch.Tensor, z2: torch.Tensor, P_u: torch.Tensor | None,
                     y_l: torch.Tensor | None, *, binary: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient-free predictions of one step, from the logits (no gradient).

    Returns (maps, stats):
      maps  [2B (+ Bu), *S] (uint8, or int32 for more than 255 classes): the prediction map
            of z1 (B images), of z2 (B images) and of P_u (Bu images) — argmax_c softmax (first
            index on ties), or for `binary` [σ(z_1) ≥ 0.5] (the 3D / binary pseudo-label rule);
      stats [4] float32 (float64 for float64 inputs): diff1, diff2 — the reference's
            gradient-free BCE between the subnets' last-channel probabilities over all B
            images (losses.diff_loss(p1, p2), diff_loss(p2, p1)) — and gate1, gate2 — the hard
            queue gate of each subnet on the labeled half (the first y_l.shape[0] images)
            against y_l (losses.queue_gate_hard; binary: [σ(z_1) > 0.5] as the prediction);
            0 without y_l.
    """
    with torch.no_grad():
        ct = _compute_dtype(z1, None)
        prob = (lambda z: torch.sigmoid(z.to(ct))) if binary else (
            lambda z: torch.softmax(z.to(ct), 1))
        return prediction_stats_from_probs(prob(z1), prob(z2),
                                           prob(P_u) if P_u is not None else None, y_l,
                                           binary=binary)


def fusion_head(z1: torch.Tensor, z2: torch.Tensor, A: torch.Tensor, weight, gamma, beta,
                running_mean, running_var, training: bool, eps: float
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """UC-Seg's UPG fusion head on F = cat(A·z1, A·z2): six (1×1 conv → BatchNorm → LeakyReLU
    0.2) layers, as `models.upg.FusionHead` computes them, from the layers' own tensors (conv
    weight [cₖ, cₖ₋₁, 1, …], BN γ, β, running mean / var [cₖ]); A [B, 1, *S].

    Returns (P like z1, per-layer means, per-layer variances): the batch mean and biased
    variance in training, the running statistics in eval (the running statistics are not
    updated here: `bn_running_update`). float32 (float64 for float64 inputs), differentiable."""
    ct = _compute_dtype(z1, None)
    B, C, *S = z1.shape
    pix = lambda t: t.to(ct).movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731 - [N, c]
    h = torch.cat([pix(z1), pix(z2)], 1) * pix(A)
    means, variances = [], []
    for k, w in enumerate(weight):
        x = h @ w.reshape(w.shape[0], -1).to(ct).t()
        if training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:
            mean, var = running_mean[k].to(ct), running_var[k].to(ct)
        means.append(mean.detach())
        variances.append(var.detach())
        y = (x - mean) * torch.rsqrt(var + eps) * gamma[k].to(ct) + beta[k].to(ct)
        h = F.leaky_relu(y, 0.2)
    return h.reshape(B, *S, C).movedim(-1, 1), means, variances


@torch.no_grad()
def bn_running_update(running_mean: torch.Tensor, running_var: torch.Tensor, nbt: torch.Tensor,
                      mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float | None) -> None:
    """nn.BatchNorm's running-statistics update, in place, from the batch mean / biased var over
    n values: num_batches_tracked += 1, running = m·batch + (1 − m)·running with m = momentum, or
    1/num_batches_tracked (a double, device-side) for momentum=None; the variance unbiased."""
    nbt.add_(1)
    m = 1.0 / nbt.to(torch.float64) if momentum is None else momentum
    bm = mean.to(running_mean.dtype)
    bv = (var * (n / (n - 1))).to(running_var.dtype)
    running_mean.copy_(m * bm + (1 - m) * running_mean)
    running_var.copy_(m * bv + (1 - m) * running_var)
