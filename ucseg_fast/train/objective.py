"""The UC-Seg training objective of one step (METHOD.md §2.2, §2.3, golden README item 7).

`UCSegObjective` owns the CCP memory queues and turns one batch into the total loss:
one forward of the UC-Seg pair on labeled + unlabeled images, the supervised, pseudo-label,
unsupervised and CCP terms, the gated queue update and, in phase 2, the copy-paste mixed
forward. Everything stays on the device: the queue gate, the copy-paste box and branch are
device tensors, so the step has no host synchronisation and can be captured as a CUDA graph
(the CPU connected-component path of `nms` is the one exception, see ops.components).

Call order follows the reference exactly, because it matters for the numbers: IFE of the
un-mixed batch reads the queues before this step's update; the mixed IFE reads them after.

`supervision` picks the reference trainer whose loss family is reproduced (METHOD.md §2):
"softmax" = the ACDC trainer (CE, softmax Dice, argmax pseudo-labels); "sigmoid" = the
2D-generic / 3D trainers (binary, C = 2: BCE on the 2-channel one-hot, σ Dice, AU on the same
logits, pseudo-label [σ(P_c) > 0.5] per channel (with `nms`: the 3D rule [σ(P_1) ≥ 0.5] +
largest component), IFE masks σ(z_k) resized then > 0.5, the diff terms on σ, the soft queue
gate on channel 1 / the hard gate on [σ(z_1) > 0.5]). Logged term names stay `ce*` in both
modes (the classification term: BCE under "sigmoid"), so logs keep one schema.

`fused_losses` (opt-in, `loss.fused_losses`) computes the un-masked CE/BCE + Dice (+ AU)
terms with the fused kernels of `ops.fusion_loss` instead of the PyTorch chain: the labeled
terms of z1, z2 and P (`segmentation_loss_terms` against the int class map), both subnets'
unsupervised terms of the `fusion` mode in one pair sweep (`fusion_unsup_losses` against the
pseudo-label as a class map when it is one — nms — or as its float one-hot/multi-hot when rows
may be empty or multi-hot — nms off), and phase 2's mixed terms (pair sweep, float y_mix).
Same values (fp32 rounding), same term names and addition orders; the masked modes'
unsupervised terms keep the PyTorch path. Off = the PyTorch chain, unchanged.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ..ccp import CCP
from ..losses import acc, bce_loss, ce_loss, diff_loss, dice_loss, pseudo_total, queue_gate
from ..losses import queue_gate_hard
from ..losses import supervised_terms, supervised_total, unsup_total
from ..pseudo_labels import copy_paste_box, copy_paste_mask, copy_paste_mix, fusion_pseudo_label
from ..pseudo_labels import fusion_pseudo_label_map, one_hot, prediction_masks


class StepScalars(Protocol):
    """Per-step schedule values as 0-D device tensors, updated in place between steps
    (`train.schedules.ScheduleTensors` is the implementation)."""
    w: Tensor      # consistency weight w(t) (includes the x150 factor)
    lam: Tensor    # AU annealing factor λ_t (float32 value of the reference)
    thr: Tensor    # queue-gate threshold thr(t)
    tau: Tensor    # confidence threshold of the entropy / fusion+mask modes


class UCSegObjective(nn.Module):
    def __init__(self, num_classes: int, *, pseudo_mode: str = "fusion", nms: bool = True,
                 embed_c_factor: float = 0.2, embed_p_factor: float = 0.1, ccp: bool = True,
                 queue_size: int = 1440, contrast_temperature: float = 0.3,
                 queue_pointer: str = "per_class", queue_init: str = "feature_norm",
                 queue_gate: str = "hard", feature_channels=(64, 128, 256),
                 supervision: str = "softmax", fused_losses: bool = False):
        super().__init__()
        if supervision not in ("softmax", "sigmoid"):
            raise ValueError(f"loss.supervision = {supervision!r}; choose 'softmax' or 'sigmoid'")
        if supervision == "sigmoid":
            if num_classes != 2:
                raise ValueError(f"loss.supervision = 'sigmoid' is the binary variant (2-channel "
                                 f"one-hot [bg, fg]); data.num_classes = {num_classes}")
            if pseudo_mode != "fusion":
                raise ValueError(f"loss.supervision = 'sigmoid' supports loss.pseudo_mode = "
                                 f"'fusion' only (the entropy modes are softmax rules), got "
                                 f"{pseudo_mode!r}")
        self.supervision = supervision
        self.fused_losses = bool(fused_losses)
        self.binary = supervision == "sigmoid"
        self.kind = "bce" if self.binary else "ce"
        self.num_classes = num_classes
        self.pseudo_mode = pseudo_mode
        self.nms = nms
        self.lambda_c = embed_c_factor
        self.lambda_p = embed_p_factor
        self.gate_mode = queue_gate
        self.use_ccp = ccp
        self.ccp = CCP(num_classes, channels=tuple(feature_channels), queue_size=queue_size,
                       temperature=contrast_temperature, pointer=queue_pointer,
                       queue_init=queue_init) if ccp else None

    # ------------------------------------------------------------------------------------
    def _prob(self, logits: Tensor) -> Tensor:
        """softmax over C (ACDC) or per-channel σ (binary): what Dice, diff and gates read."""
        return torch.sigmoid(acc(logits)) if self.binary else torch.softmax(acc(logits), 1)

    def _cls_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return bce_loss(logits, target) if self.binary else ce_loss(logits, target)

    def _probs(self, z: Tensor) -> Tensor:
        """Detached float32 probabilities (σ for binary, softmax otherwise), computed once per
        forward and shared by the diff terms and the queue gates."""
        z = z.detach().float()
        return torch.sigmoid(z) if self.binary else torch.softmax(z, 1)

    def _gate(self, prob: Tensor, y_l_oh: Tensor) -> Tensor:
        """Queue gate of one subnet from its labeled-half probabilities."""
        if self.binary:
            if self.gate_mode == "soft":
                return queue_gate(prob, y_l_oh, binary=True)
            return queue_gate_hard((prob[:, 1] > 0.5).long(), y_l_oh.argmax(1), 2)
        if self.gate_mode == "soft":
            return queue_gate(prob, y_l_oh)
        return queue_gate_hard(prob.argmax(1), y_l_oh.argmax(1), self.num_classes)

    def _pseudo_targets(self, out, Bl: int, tau: Tensor):
        """Hard pseudo-label of the unlabeled half (one-hot, detached) and its pixel mask
        (None = every pixel counts, the reference's fusion mode)."""
        C = self.num_classes
        with torch.no_grad():
            if self.pseudo_mode == "entropy":
                from ..ops import entropy_pseudo_label
                res = entropy_pseudo_label(out.z1[Bl:], out.z2[Bl:], tau)
                return one_hot(res.labels, C, torch.float32), res.mask
            Y_u = fusion_pseudo_label(out.P[Bl:].detach(), nms=self.nms, binary=self.binary)
            if self.pseudo_mode == "fusion+mask":
                conf = torch.softmax(out.P[Bl:].float(), 1).amax(1)
                return Y_u, conf >= tau
            return Y_u, None

    def _fusion_targets(self, out, Bl: int) -> tuple[Tensor, Tensor]:
        """`fusion`-mode pseudo-label for the fused path: (Y_u one-hot [Bu, C, *S] float32, the
        same target as the kernels read it). With `nms` Y_u is the one-hot of a class map, so
        the map itself [Bu, *S] is passed (8 bytes a pixel instead of C floats); without `nms`
        rows may be all zero (softmax) or multi-hot (σ), so the float map is passed. Same values
        as `_pseudo_targets` (fusion_pseudo_label is one_hot of this map under nms)."""
        with torch.no_grad():
            P_u = out.P[Bl:].detach()
            if self.nms:
                y_map = fusion_pseudo_label_map(P_u, True, binary=self.binary)
                return one_hot(y_map, self.num_classes), y_map
            Y_u = fusion_pseudo_label(P_u, nms=False, binary=self.binary)
            return Y_u, Y_u

    @staticmethod
    def _diff(p1: Tensor, p2: Tensor) -> tuple[Tensor, Tensor]:
        """The reference's gradient-free BCE between the subnets (logged, added as constants);
        on softmax (ACDC) or σ (binary) probabilities."""
        return diff_loss(p1, p2), diff_loss(p2, p1)

    def _ife_masks(self, z: Tensor) -> Tensor:
        """IFE class masks of one subnet (CCP resizes them bilinearly, then > 0.5).
        ACDC: one-hot of the (largest-CC) argmax. Binary: σ(z_k) itself (the 2D-generic
        trainer), or with `nms` the one-hot of the 3D rule [σ(z_1) ≥ 0.5] + largest CC."""
        if not self.binary:
            return prediction_masks(z, nms=self.nms)
        if self.nms:
            return one_hot(fusion_pseudo_label_map(z, True, binary=True), 2)
        return torch.sigmoid(acc(z))

    def _contrast(self, out) -> tuple[Tensor, list[Tensor], list[list[Tensor]]]:
        """IC and IFE of one forward (queues read as they are now) and the three feature levels."""
        zero = out.z1.new_zeros((), dtype=torch.float32)
        if self.ccp is None:
            return zero, [zero, zero], [[], []]
        f1, f2 = list(out.feats1[-3:]), list(out.feats2[-3:])
        with torch.no_grad():
            masks = [self._ife_masks(out.z1.detach()), self._ife_masks(out.z2.detach())]
        ic = self.ccp.ic(f1, f2)[0]
        ife = [self.ccp.ife(f1, masks[0], 1)[0], self.ccp.ife(f2, masks[1], 2)[0]]
        return ic, ife, [f1, f2]

    def _unsup(self, logits: Tensor, Y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """CE (BCE) + Dice against a hard target; masked variants average over kept pixels."""
        if mask is None:
            return self._cls_loss(logits, Y), dice_loss(self._prob(logits), Y)
        from ..ops import pseudo_label_loss
        labels = Y.argmax(1)
        ce = pseudo_label_loss(logits, labels, mask)
        m = mask.unsqueeze(1).to(torch.float32)
        p = torch.softmax(acc(logits), 1) * m
        return ce, dice_loss(p, Y * m)

    # ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: Tensor, y_l: Tensor, sched: StepScalars,
                phase2: bool = False, *, mix_box: Tensor | None = None,
                mix_branch_a: Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss of one step and its terms (0-D tensors, detached for logging).

        x: [Bl+Bu, Cin, *S] images (labeled first); y_l: [Bl, *S] int class map.
        mix_box / mix_branch_a fix the phase-2 copy-paste draw (tests); otherwise they are
        drawn on the device from `generator`."""
        C = self.num_classes
        Bl = y_l.shape[0]
        out = model(x)
        ftype = torch.float64 if out.z1.dtype == torch.float64 else torch.float32
        y_oh = one_hot(y_l, C, ftype)
        terms: dict[str, Tensor] = {}

        fused = self.fused_losses
        fused_unsup = fused and self.pseudo_mode == "fusion"
        if fused:
            from ..ops.fusion_loss import fusion_unsup_losses, segmentation_loss_terms

        sup = []
        for k, z in ((1, out.z1), (2, out.z2)):
            if fused:
                s = segmentation_loss_terms(z[:Bl], y_l, kind=self.kind, lam=sched.lam)
            else:
                s = supervised_terms(z[:Bl], y_oh, y_l, sched.lam, kind=self.kind)
            sup.append(supervised_total(s))
            terms.update({f"ce{k}_l": s[self.kind], f"au{k}": s["au"], f"dice{k}_l": s["dice"]})
        if fused:
            sP = segmentation_loss_terms(out.P[:Bl], y_l, kind=self.kind, lam=sched.lam)
        else:
            sP = supervised_terms(out.P[:Bl], y_oh, y_l, sched.lam, kind=self.kind)
        pseudo = pseudo_total(sP)
        terms.update({"ceP_l": sP[self.kind], "auP": sP["au"], "diceP_l": sP["dice"], "pseudo": pseudo})

        if fused_unsup:
            Y_u, Y_tgt = self._fusion_targets(out, Bl)
            mask_u = None
            Y_u = Y_u.to(ftype)
            if Y_tgt.is_floating_point():
                Y_tgt = Y_u
        else:
            Y_u, mask_u = self._pseudo_targets(out, Bl, sched.tau)
            Y_u = Y_u.to(ftype)

        probs = (self._probs(out.z1), self._probs(out.z2))
        diff = self._diff(*probs)
        ic, ife, feats = self._contrast(out)
        if self.ccp is not None:
            # after this step's IFE, before the mixed IFE: the reference's order
            with torch.no_grad():
                label_all = torch.cat([y_oh, Y_u], 0)
                for k, (p, f) in enumerate(zip(probs, feats), start=1):
                    gate = self._gate(p[:Bl], y_oh)
                    terms[f"gate{k}"] = gate
                    self.ccp.enqueue([t.detach() for t in f], label_all, k, gate > sched.thr)

        unsup = []
        if fused_unsup:
            pair = fusion_unsup_losses(out.z1[Bl:], out.z2[Bl:], Y_tgt, kind=self.kind)
            for k, t in enumerate(pair, start=1):
                unsup.append(unsup_total(t))  # ce + dice, as below
                terms.update({f"ce{k}_u": t[self.kind], f"dice{k}_u": t["dice"]})
        else:
            for k, z in ((1, out.z1), (2, out.z2)):
                ce_u, dice_u = self._unsup(z[Bl:], Y_u, mask_u)
                unsup.append(ce_u + dice_u)
                terms.update({f"ce{k}_u": ce_u, f"dice{k}_u": dice_u})
        terms.update({"ic": ic, "ife1": ife[0], "ife2": ife[1], "diff1": diff[0], "diff2": diff[1]})
        if mask_u is not None:
            terms["mask_frac"] = mask_u.float().mean()

        if not phase2:
            L_k = [sup[i] + 0.5 * diff[i] + sched.w * unsup[i] + self.lambda_c * ife[i]
                   for i in range(2)]
            L = 0.5 * (L_k[0] + L_k[1]) + pseudo + self.lambda_p * ic
        else:
            spatial = tuple(x.shape[2:])
            if mix_box is None:
                mix_box = copy_paste_box(spatial, generator=generator, device=x.device)
            if mix_branch_a is None:
                mix_branch_a = torch.rand((), generator=generator, device=x.device) > 0.5
            M = copy_paste_mask(spatial, mix_box, dtype=x.dtype, device=x.device)
            x_mix, y_mix = copy_paste_mix(x[:Bl], x[Bl:], y_oh, Y_u, M, mix_branch_a)
            outm = model(x_mix)
            mix, diffmix = [], []
            if fused:
                # y_mix stays a float one-hot: it mixes the (possibly multi-hot) Y_u with y_oh
                pair = fusion_unsup_losses(outm.z1, outm.z2, y_mix, kind=self.kind)
                for k, t in enumerate(pair, start=1):
                    mix.append(unsup_total(t))  # ce + dice, as below
                    terms.update({f"ce{k}_m": t[self.kind], f"dice{k}_m": t["dice"]})
            else:
                for k, z in ((1, outm.z1), (2, outm.z2)):
                    ce_m = self._cls_loss(z, y_mix)
                    dice_m = dice_loss(self._prob(z), y_mix)
                    mix.append(ce_m + dice_m)
                    terms.update({f"ce{k}_m": ce_m, f"dice{k}_m": dice_m})
            diffmix = self._diff(self._probs(outm.z1), self._probs(outm.z2))
            icm, ifem, _ = self._contrast(outm)
            terms.update({"icmix": icm, "ife1mix": ifem[0], "ife2mix": ifem[1],
                          "diffmix1": diffmix[0], "diffmix2": diffmix[1],
                          "mix1": mix[0], "mix2": mix[1]})
            L_k = [sup[i] + 0.25 * (diff[i] + diffmix[i]) + 0.5 * sched.w * (unsup[i] + mix[i])
                   + self.lambda_c * (ife[i] + ifem[i]) * 0.5 for i in range(2)]
            L = 0.5 * (L_k[0] + L_k[1]) + pseudo + self.lambda_p * (icm + ic) * 0.5
        terms.update({"sup1": sup[0], "sup2": sup[1], "unsup1": unsup[0], "unsup2": unsup[1],
                      "loss_1": L_k[0], "loss_2": L_k[1], "L": L})
        return L, {k: v.detach() for k, v in terms.items()}
