"""The UC-Seg training objective of one step (docs/method.md §2.2, §2.3, docs/golden.md §6 (Objectives, item 7)).

`UCSegObjective` owns the CCP memory queues and turns one batch into the total loss:
one forward of the UC-Seg pair on labeled + unlabeled images, the supervised, pseudo-label,
unsupervised and CCP terms, the gated queue update and, in phase 2, the copy-paste mixed
forward. Everything stays on the device: the queue gate, the copy-paste box and branch are
device tensors, so the step has no host synchronisation and can be captured as a CUDA graph.

Call order follows the reference where it matters for the numbers: IFE of the un-mixed batch
reads the queues before this step's update; the mixed IFE reads them after.

The step is written to launch few kernels (the ledger, `ucseg-fast bench ledger`, counts them):
* every logit map is up-cast once and its softmax computed once, shared by the supervised and
  unsupervised Dice terms, the diff terms, the gates and the argmax maps (PyTorch path);
* the gradient-free predictions — the argmax maps of z1, z2 and P's unlabeled half, both diff
  terms and both hard gates — are one op (`ops.prediction_stats`; a kernel with the fused ops,
  its PyTorch oracle without), and one largest-component call labels all three maps;
* CCP (IC, both IFEs, the gated update of both queues) runs every level at once
  (`CCP.step`) from one mask tensor;
* the loss terms are stacked into one vector; every derived term (sup, pseudo, unsup, mix,
  L_1, L_2, L) is one matrix-vector product with coefficients that depend on w(t), so the
  logged terms come back as one tensor (`StepTerms`) that the trainer accumulates with one add.

`supervision` picks the reference trainer whose loss family is reproduced (docs/method.md §2):
"softmax" = the ACDC trainer (CE, softmax Dice, argmax pseudo-labels); "sigmoid" = the
2D-generic / 3D trainers (binary, C = 2: BCE on the 2-channel one-hot, σ Dice, AU on the same
logits, pseudo-label [σ(P_c) > 0.5] per channel (with `nms`: the 3D rule [σ(P_1) ≥ 0.5] +
largest component), IFE masks σ(z_k) resized then > 0.5 (with `nms` the one-hot of the 3D rule
on z_k), the diff terms on σ, the soft queue gate on channel 1 / the hard gate on
[σ(z_1) > 0.5]). Logged term names stay `ce*` in both modes (the classification term: BCE
under "sigmoid"), so logs keep one schema.

`fused_losses` (`loss.fused_losses`) computes the un-masked CE/BCE + Dice (+ AU) terms with the
fused kernels of `ops.fusion_loss` (both subnets' labeled terms in one pair sweep, P's in one,
both subnets' unsupervised terms in one, phase 2's mixed terms in one, against class maps where
the target is one) and the predictions with the `ops.prediction_stats` kernel. Same values
(fp32 rounding), same term names; the masked modes' unsupervised terms keep the PyTorch path.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Protocol

import torch
from torch import Tensor, nn

from ..ccp import CCP
from ..losses import acc, au_loss, bce_loss, ce_loss, dice_loss, queue_gate
from ..ops import entropy_pseudo_label, pseudo_label_loss
from ..ops import reference as ops_ref
from ..ops.components import largest_component
from ..ops.fusion_loss import loss_rows
from ..ops.predictions import prediction_stats
from ..pseudo_labels import (copy_paste_box, copy_paste_box_size, copy_paste_branch,
                             fusion_pseudo_label, one_hot)

__all__ = ["UCSegObjective", "StepScalars", "StepTerms"]


class StepScalars(Protocol):
    """Per-step schedule values as 0-D device tensors, updated in place between steps
    (`train.schedules.ScheduleTensors` is the implementation)."""
    w: Tensor      # consistency weight w(t) (includes the x150 factor)
    lam: Tensor    # AU annealing factor λ_t (float32 value of the reference)
    thr: Tensor    # queue-gate threshold thr(t)
    tau: Tensor    # confidence threshold of the entropy / fusion+mask modes


class StepTerms(Mapping):
    """The logged loss terms of one step: `names` and one detached tensor `values` [n]
    (device); `terms[name]` is a 0-D view. The trainer adds `values` to its window sums.
    Slots whose name starts with "_" (e.g. the AU slot of an unlabeled loss row) are padding."""

    def __init__(self, names: tuple[str, ...], values: Tensor) -> None:
        self.names = names  # every slot of `values`; names starting with "_" are not terms
        self.values = values
        self._index = {n: i for i, n in enumerate(names) if not n.startswith("_")}

    def __getitem__(self, key: str) -> Tensor:
        return self.values[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index


# Derived terms: name -> {term: coefficient, ("w", term): coefficient·w(t)}; `lc`, `lp` are
# the CCP weights (embed_c_factor, embed_p_factor). Phase 1 (docs/method.md §2.2) and phase 2 (§2.3).
def _derived(phase2: bool, lc: float, lp: float, semi: bool = True) -> dict[str, dict]:
    d: dict[str, dict] = {}
    if not semi:  # the supervised baseline: L = ½(Lsup_1 + Lsup_2) + Lpseudo (labeled P terms)
        for k in (1, 2):
            d[f"sup{k}"] = {f"ce{k}_l": 1.0, f"au{k}": 1.0, f"dice{k}_l": 1.0}
        d["pseudo"] = {"diceP_l": 1.0, "ceP_l": 1.0, "auP": 1.0}
        L = {t: 0.5 * c for k in (1, 2) for t, c in d[f"sup{k}"].items()}
        L.update(d["pseudo"])
        d["L"] = L
        return d
    for k in (1, 2):
        d[f"sup{k}"] = {f"ce{k}_l": 1.0, f"au{k}": 1.0, f"dice{k}_l": 1.0}
        d[f"unsup{k}"] = {f"ce{k}_u": 1.0, f"dice{k}_u": 1.0}
        if phase2:
            d[f"mix{k}"] = {f"ce{k}_m": 1.0, f"dice{k}_m": 1.0}
    d["pseudo"] = {"diceP_l": 1.0, "ceP_l": 1.0, "auP": 1.0}
    for k in (1, 2):
        loss = dict(d[f"sup{k}"])
        if not phase2:
            loss.update({f"diff{k}": 0.5, f"ife{k}": lc})
            loss.update({("w", t): c for t, c in d[f"unsup{k}"].items()})
        else:
            loss.update({f"diff{k}": 0.25, f"diffmix{k}": 0.25, f"ife{k}": 0.5 * lc,
                         f"ife{k}mix": 0.5 * lc})
            for t, c in {**d[f"unsup{k}"], **d[f"mix{k}"]}.items():
                loss[("w", t)] = 0.5 * c
        d[f"loss_{k}"] = loss
    L: dict = {}
    for k in (1, 2):
        for t, c in d[f"loss_{k}"].items():
            L[t] = L.get(t, 0.0) + 0.5 * c
    for t, c in d["pseudo"].items():
        L[t] = L.get(t, 0.0) + c
    if not phase2:
        L["ic"] = L.get("ic", 0.0) + lp
    else:
        L["ic"] = L.get("ic", 0.0) + 0.5 * lp
        L["icmix"] = L.get("icmix", 0.0) + 0.5 * lp
    d["L"] = L
    return d


class UCSegObjective(nn.Module):
    def __init__(self, num_classes: int, *, pseudo_mode: str = "fusion", nms: bool = True,
                 embed_c_factor: float = 0.2, embed_p_factor: float = 0.1, ccp: bool = True,
                 queue_size: int = 1440, contrast_temperature: float = 0.3,
                 queue_pointer: str = "per_class", queue_init: str = "feature_norm",
                 queue_gate: str = "hard", feature_channels=(64, 128, 256),
                 supervision: str = "softmax", fused_losses: bool = False,
                 semi_supervised: bool = True):
        super().__init__()
        # False: the supervised baseline -- only the labeled images are forwarded, and only
        # the labeled terms of z1, z2 and P are computed (no pseudo-label, CCP or copy-paste)
        self.semi_supervised = bool(semi_supervised)
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
        self._consts: dict = {}

    @classmethod
    def from_config(cls, cfg) -> "UCSegObjective":
        """The objective of a configuration: its [loss] and [reference] sections, the class
        count of [data] and the supervision of its recipe ("auto" fused losses must have been
        resolved for the device: `train.recipe.resolve_ops`)."""
        lc, ref = cfg.loss, cfg.reference
        return cls(cfg.data.num_classes, pseudo_mode=lc.pseudo_mode, nms=lc.nms,
                   embed_c_factor=lc.embed_c_factor, embed_p_factor=lc.embed_p_factor,
                   ccp=lc.ccp, queue_size=lc.queue_size,
                   contrast_temperature=lc.contrast_temperature,
                   queue_pointer=ref.queue_pointer, queue_init=ref.queue_init,
                   queue_gate=ref.queue_gate, supervision=cfg.spec.supervision,
                   fused_losses=lc.fused_losses, semi_supervised=lc.semi_supervised)

    # ------------------------------------------------------------------------------------
    def _prob(self, z: Tensor) -> Tensor:
        """softmax over C (ACDC) or per-channel σ (binary) of an up-cast logit map."""
        return torch.sigmoid(z) if self.binary else torch.softmax(z, 1)

    def _cls_loss(self, z: Tensor, target: Tensor) -> Tensor:
        return bce_loss(z, target) if self.binary else ce_loss(z, target)

    def _ife_class_maps(self) -> bool:
        """Whether the IFE masks are one-hots of class maps: argmax (+ largest component with
        `nms`) in the softmax modes, the 3D rule [σ(z_1) ≥ 0.5] + largest component for binary
        with `nms`; σ(z) itself (soft) for binary without `nms`."""
        return self.nms or not self.binary

    def _p_map(self) -> bool:
        """Whether the pseudo-label of P is a class map (argmax / [σ(P_1) ≥ 0.5] + largest
        component: `nms` in the fusion modes)."""
        return self.nms and self.pseudo_mode != "entropy"

    def draw_mix(self, spatial: tuple[int, ...], device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The phase-2 copy-paste draw on the device: (box starts [d] int64, branch a 0-D bool).
        Kept apart from the forward so a compiled step can draw outside the compiled region."""
        return (copy_paste_box(spatial, generator=generator, device=device),
                copy_paste_branch(generator=generator, device=device))

    def _keep_labeled(self, spatial: tuple[int, ...], box: Tensor, branch: Tensor) -> Tensor:
        """Bool [*S]: where the mixed image takes the labeled image (`copy_paste_mix`): outside
        the zero box of M in branch a, inside it in branch b (pseudo_labels.copy_paste_mask)."""
        def build():
            grids = torch.meshgrid(*[torch.arange(n, device=box.device) for n in spatial],
                                   indexing="ij")
            nd = len(spatial)
            return (torch.stack(grids), torch.tensor([copy_paste_box_size(n) for n in spatial],
                                                     device=box.device).view(nd, *([1] * nd)))
        coords, length = self._const(("coords", spatial, box.device), build)
        d = coords - box.to(coords.device).view(-1, *([1] * len(spatial)))
        inside = (torch.div(d, length, rounding_mode="floor") == 0).all(0)  # 0 <= d < length
        return inside ^ torch.as_tensor(branch, device=inside.device)

    def _coef(self, names: tuple[str, ...], phase2: bool, dtype: torch.dtype,
              device: torch.device) -> tuple[tuple[str, ...], Tensor, Tensor]:
        def build():
            der = _derived(phase2, self.lambda_c, self.lambda_p, self.semi_supervised)
            idx = {n: i for i, n in enumerate(names)}
            D0 = torch.zeros(len(der), len(names), dtype=torch.float64)
            D1 = torch.zeros(len(der), len(names), dtype=torch.float64)
            for r, (dn, coeffs) in enumerate(der.items()):
                for t, v in coeffs.items():
                    if isinstance(t, tuple):
                        D1[r, idx[t[1]]] += v
                    else:
                        D0[r, idx[t]] += v
            return (tuple(der), D0.to(dtype=dtype, device=device),
                    D1.to(dtype=dtype, device=device))
        return self._const(("coef", names, phase2, dtype, device), build)

    def _const(self, key: tuple, build):
        """A per-shape constant, built once (rebuilt, not cached, while torch.compile traces:
        the compiled graph holds it)."""
        if torch.compiler.is_compiling():
            return build()
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = build()
        return c

    # ------------------------------------------------------------------------------------
    def _predictions(self, z1: Tensor, z2: Tensor, P: Tensor | None, y_l: Tensor | None,
                     probs: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """(maps, stats) of `ops.prediction_stats`: the kernel with the fused ops, else the
        oracle on the probabilities already computed for the losses."""
        if self.fused_losses:
            return prediction_stats(z1, z2, P, y_l, binary=self.binary)
        with torch.no_grad():
            p1, p2 = (p.detach() for p in probs)
            Bl = 0 if y_l is None else y_l.shape[0]
            pP = self._prob(acc(P[Bl:].detach())) if P is not None else None
            return ops_ref.prediction_stats_from_probs(p1, p2, pP, y_l, binary=self.binary)

    def _soft_masks(self, z: Tensor, p: Tensor | None) -> Tensor:
        """IFE masks that are not class maps: the one-hot of the argmax (ACDC, nms off) or
        σ(z) itself (binary, nms off), float [B, C, *S]."""
        with torch.no_grad():
            if self.binary:
                return p.detach() if p is not None else torch.sigmoid(acc(z.detach()))
            return one_hot((p.detach() if p is not None else z.detach()).argmax(1),
                           self.num_classes, torch.float64 if z.dtype == torch.float64
                           else torch.float32)

    def _pseudo_targets(self, out, Bl: int, tau: Tensor, maps_u: Tensor | None):
        """(Y_u one-hot/multi-hot float [Bu, C, *S], Y_u class map or None, pixel mask or None)
        of the unlabeled half; detached."""
        C = self.num_classes
        ftype = torch.float64 if out.z1.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            if self.pseudo_mode == "entropy":
                res = entropy_pseudo_label(out.z1[Bl:], out.z2[Bl:], tau)
                return one_hot(res.labels, C, ftype), None, res.mask
            if maps_u is not None:
                Y_u = one_hot(maps_u, C, ftype)
            else:
                Y_u = fusion_pseudo_label(out.P[Bl:].detach(), nms=False, binary=self.binary)
                Y_u = Y_u.to(ftype)
            mask = None
            if self.pseudo_mode == "fusion+mask":
                mask = torch.softmax(out.P[Bl:].detach().float(), 1).amax(1) >= tau
            return Y_u, maps_u, mask

    # ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: Tensor, y_l: Tensor, sched: StepScalars,
                phase2: bool = False, *, mix_box: Tensor | None = None,
                mix_branch_a: Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, StepTerms]:
        """Total loss of one step and its terms (detached, one tensor: `StepTerms`).

        x: [Bl+Bu, Cin, *S] images (labeled first); y_l: [Bl, *S] int class map.
        mix_box / mix_branch_a fix the phase-2 copy-paste draw (`draw_mix`); otherwise they are
        drawn on the device from `generator`."""
        L, values, names = self.forward_values(model, x, y_l, sched, phase2, mix_box=mix_box,
                                               mix_branch_a=mix_branch_a, generator=generator)
        return L, StepTerms(names, values)

    def forward_values(self, model: nn.Module, x: Tensor, y_l: Tensor, sched: StepScalars,
                       phase2: bool = False, *, mix_box: Tensor | None = None,
                       mix_branch_a: Tensor | None = None,
                       generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        """`forward` as (L, term values [n], term names): tensors and constants only, what a
        `torch.compile(fullgraph=True)` step returns."""
        C = self.num_classes
        Bl = y_l.shape[0]
        if not self.semi_supervised:  # the supervised baseline never sees an unlabeled image
            x, phase2 = x[:Bl], False
        B = x.shape[0]
        kind, fused = self.kind, self.fused_losses
        out = model(x)
        ftype = torch.float64 if out.z1.dtype == torch.float64 else torch.float32
        ife_class, need_P = self._ife_class_maps(), self._p_map()
        # the terms, as blocks of one tensor each (rows of a fused op, the stats vector, single
        # values): one cat builds the vector, and its backward only narrows the gradient
        blocks: list[tuple[Tensor, tuple[str, ...]]] = []

        def add(v: Tensor, *names: str) -> None:
            blocks.append((v.reshape(-1), names))

        # --- labeled terms of z1, z2 and P ---------------------------------------------------
        probs = None
        y_oh = None
        if fused:
            add(loss_rows(out.z1[:Bl], out.z2[:Bl], y_l, kind=kind, lam=sched.lam),
                "ce1_l", "dice1_l", "au1", "ce2_l", "dice2_l", "au2")
            add(loss_rows(out.P[:Bl], None, y_l, kind=kind, lam=sched.lam),
                "ceP_l", "diceP_l", "auP")
        else:
            z1f, z2f, zPf = acc(out.z1), acc(out.z2), acc(out.P[:Bl])
            probs = (self._prob(z1f), self._prob(z2f))  # shared by every term below
            y_oh = one_hot(y_l, C, ftype)
            for k, z, p in (("1", z1f, probs[0]), ("2", z2f, probs[1]), ("P", zPf, None)):
                p = self._prob(z) if p is None else p
                add(self._cls_loss(z[:Bl], y_oh), f"ce{k}_l")
                add(au_loss(z[:Bl], y_l, sched.lam), f"au{k}" if k != "P" else "auP")
                add(dice_loss(p[:Bl], y_oh), f"dice{k}_l")
        if not self.semi_supervised:
            return self._combine(blocks, phase2, ftype, sched)

        # --- predictions: argmax maps, diff terms, hard gates; largest components ------------
        maps, stats = self._predictions(out.z1, out.z2, out.P if need_P else None, y_l, probs)
        if self.nms:  # one call labels z1's, z2's and P_u's maps
            maps = largest_component(maps, C)
        maps_u = maps[2 * B:] if need_P else None
        gates = stats[2:]
        if self.gate_mode == "soft":
            with torch.no_grad():
                ps = probs if probs is not None else (self._prob(acc(out.z1.detach())),
                                                      self._prob(acc(out.z2.detach())))
                y_g = y_oh if y_oh is not None else one_hot(y_l, C, ftype)
                gates = torch.stack([queue_gate(p.detach()[:Bl], y_g, binary=self.binary)
                                     for p in ps]).to(stats.dtype)
            add(stats[:2], "diff1", "diff2")
            add(gates, "gate1", "gate2")
        else:
            add(stats, "diff1", "diff2", "gate1", "gate2")

        # --- pseudo-label and unlabeled terms ------------------------------------------------
        Y_u, Y_map, mask_u = self._pseudo_targets(out, Bl, sched.tau, maps_u)
        if fused and mask_u is None:
            add(loss_rows(out.z1[Bl:], out.z2[Bl:], Y_map if Y_map is not None else Y_u,
                          kind=kind), "ce1_u", "dice1_u", "_au1_u", "ce2_u", "dice2_u", "_au2_u")
        else:
            if probs is None:
                z1f, z2f = acc(out.z1), acc(out.z2)
                probs = (self._prob(z1f), self._prob(z2f))
            for k, z, p in ((1, z1f, probs[0]), (2, z2f, probs[1])):
                if mask_u is None:
                    add(self._cls_loss(z[Bl:], Y_u), f"ce{k}_u")
                    add(dice_loss(p[Bl:], Y_u), f"dice{k}_u")
                else:
                    add(pseudo_label_loss(out.z1[Bl:] if k == 1 else out.z2[Bl:], Y_u.argmax(1),
                                          mask_u), f"ce{k}_u")
                    m = mask_u.unsqueeze(1).to(p.dtype)
                    add(dice_loss(p[Bl:] * m, Y_u * m), f"dice{k}_u")
        if mask_u is not None:
            add(mask_u.float().mean().to(ftype), "mask_frac")

        # --- CCP: IC, IFE (queues as they are), then the gated queue update -----------------
        if self.ccp is not None:
            if ife_class and Y_map is not None:
                label = torch.cat([y_l.to(maps.dtype), Y_map])
                masks = self._onehot_stack(maps[:B], maps[B:2 * B], label, ftype)
            else:
                y_all = torch.cat([y_oh if y_oh is not None else one_hot(y_l, C, ftype), Y_u])
                masks = torch.cat(self._ife_masks(out, maps, probs, B) + [y_all.to(ftype)], 1)
            ic, ife = self.ccp.step(out.feats1, out.feats2, masks, gates=gates > sched.thr)
        else:
            ic, ife = out.z1.new_zeros((), dtype=ftype), out.z1.new_zeros(2, dtype=ftype)
        add(ic, "ic")
        add(ife, "ife1", "ife2")

        # --- phase 2: copy-paste mix and the mixed forward ----------------------------------
        if phase2:
            spatial = tuple(x.shape[2:])
            if mix_box is None or mix_branch_a is None:
                box, branch = self.draw_mix(spatial, x.device, generator)
                mix_box = box if mix_box is None else mix_box
                mix_branch_a = branch if mix_branch_a is None else mix_branch_a
            keep = self._keep_labeled(spatial, mix_box, mix_branch_a)
            x_mix = torch.where(keep, x[:Bl], x[Bl:])
            if Y_map is not None:
                y_mix = torch.where(keep, y_l, Y_map)  # class map
            else:
                y_mix = torch.where(keep, y_oh if y_oh is not None else one_hot(y_l, C, ftype), Y_u)
            outm = model(x_mix)
            pm = None
            if fused:
                add(loss_rows(outm.z1, outm.z2, y_mix, kind=kind),
                    "ce1_m", "dice1_m", "_au1_m", "ce2_m", "dice2_m", "_au2_m")
            else:
                y_mix_t = y_mix if y_mix.dim() == outm.z1.dim() else one_hot(y_mix, C, ftype)
                zm = (acc(outm.z1), acc(outm.z2))
                pm = (self._prob(zm[0]), self._prob(zm[1]))
                for k, z, p in ((1, zm[0], pm[0]), (2, zm[1], pm[1])):
                    add(self._cls_loss(z, y_mix_t), f"ce{k}_m")
                    add(dice_loss(p, y_mix_t), f"dice{k}_m")
            maps_m, stats_m = self._predictions(outm.z1, outm.z2, None, None, pm)
            add(stats_m[:2], "diffmix1", "diffmix2")
            if self.ccp is not None:
                if ife_class:
                    if self.nms:
                        maps_m = largest_component(maps_m, C)
                    masks_m = self._onehot_stack(maps_m[:Bl], maps_m[Bl:], None, ftype)
                else:
                    masks_m = torch.cat(self._ife_masks(outm, maps_m, pm, Bl), 1)
                icm, ifem = self.ccp.step(outm.feats1, outm.feats2, masks_m)
            else:
                icm, ifem = ic, ife
            add(icm, "icmix")
            add(ifem, "ife1mix", "ife2mix")

        return self._combine(blocks, phase2, ftype, sched)

    def _combine(self, blocks: list[tuple[Tensor, tuple[str, ...]]], phase2: bool,
                 ftype: torch.dtype, sched: StepScalars) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        """Every derived term and L from the term blocks: one matrix-vector product."""
        names = tuple(n for _, ns in blocks for n in ns)
        base = torch.cat([v if v.dtype == ftype else v.to(ftype) for v, _ in blocks])
        der_names, D0, D1 = self._coef(names, phase2, ftype, base.device)
        derived = torch.mv(torch.addcmul(D0, D1, sched.w.to(ftype)), base)
        values = torch.cat([base, derived]).detach()
        return derived[-1], values, names + der_names

    def _onehot_stack(self, m1: Tensor, m2: Tensor, label: Tensor | None,
                      ftype: torch.dtype) -> Tensor:
        """[B, J·C, *S] float one-hots of the IFE maps of both subnets (and the label map)."""
        C = self.num_classes
        maps = torch.stack([m1, m2] + ([label] if label is not None else []), 1)  # [B, J, *S]
        cls = self._const(("classes", C, maps.dim(), maps.dtype, maps.device),
                          lambda: torch.arange(C, dtype=maps.dtype, device=maps.device).view(
                              1, 1, C, *([1] * (maps.dim() - 2))))
        oh = (maps.unsqueeze(2) == cls).to(ftype)  # [B, J, C, *S]
        return oh.flatten(1, 2)

    def _ife_masks(self, out, maps: Tensor, probs, B: int) -> list[Tensor]:
        """IFE masks of both subnets when they are not (all) class maps."""
        if self._ife_class_maps():
            return [one_hot(maps[:B], self.num_classes, torch.float64 if out.z1.dtype ==
                            torch.float64 else torch.float32),
                    one_hot(maps[B:2 * B], self.num_classes, torch.float64 if out.z1.dtype ==
                            torch.float64 else torch.float32)]
        return [self._soft_masks(out.z1, probs[0] if probs is not None else None),
                self._soft_masks(out.z2, probs[1] if probs is not None else None)]
