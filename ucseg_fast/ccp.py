"""CCP — Cross-subnet Consistency Preservation (docs/method.md §2.4): the IC and IFE contrast losses.

Both are the reference's `Contrast_global_consistency` (one instance per feature level), written
as a few batched matmuls + one masked logsumexp instead of Python loops over cells and classes.

* **IC** (inter-subnet consistency, "patch_loss"): pool both subnets' features to a
  `grid^d` grid (PyTorch adaptive-average bins, overlapping when `grid` does not divide n).
  For cell g and image b the logits are `[<p1[b,:,g], p2[b,:,g]>, <p1[b,:,g], p2[b',:,g']> for
  all b' and all g' != g] / T`, cross-entropy with target 0, mean over b; IC = mean over g.
* **IFE** (intra-subnet feature enhancement, "classes_loss"): prototype
  `pi[c, b] = mean over ALL positions of f[b] * mask[b, c]` (not over the mask area); logits
  `[<pi, mean_K Q[c]>, <pi, Q[c'][:, j]> for c' != c, all j] / T`, CE target 0, mean over b;
  IFE = mean over c. The queues are read detached.

Features are not normalised and there are no projection heads (as in the reference). The
reference writes the per-cell / per-class losses into float32 buffers and takes float32 means;
`CCPLevel.ic`/`ife` reproduce that rounding (the values come back float32 whatever the input
dtype), `ic_cells`/`ife_classes` return the values before it. The contrast math itself runs in
float32 (float64 for float64 inputs) with autocast switched off: the logits are unnormalised
dot products divided by 0.3, far outside what bf16 resolves.

Queue update (`enqueue`): for c = 0..C-1 in order, columns `[ptr, ptr+B)` (mod K) of `Q[c]`
receive the prototypes of the B images under the *label* mask, then `ptr <- (ptr+B) mod K`.
`pointer="shared"` keeps the reference's one pointer for all classes (so class c only ever
lands in blocks = c mod C and (C-1)/C of each class queue keeps its random init);
`pointer="per_class"` gives each class its own pointer (what was evidently meant). The update
is gated by a 0-D device bool through `torch.where`, so it never syncs with the host and can
be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CCP",
    "CCPLevel",
    "adaptive_pool_grid",
    "class_prototypes",
    "ic_cell_losses",
    "ife_class_losses",
    "resize_mask",
]

PointerMode = Literal["shared", "per_class"]
QueueInit = Literal["reference", "feature_norm"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (golden checks), else float32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_spatial(name: str, x: Tensor) -> int:
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"ccp: {name} must be [B, C, H, W] or [B, C, D, H, W], got shape "
                         f"{tuple(x.shape)}")
    return nd


# ------------------------------------------------------------------------------------------------
# functional pieces (pure, differentiable, no host syncs)
# ------------------------------------------------------------------------------------------------
def adaptive_pool_grid(f: Tensor, grid: int = 3) -> Tensor:
    """`[B, Cf, *S]` -> `[B, Cf, grid^d]`: adaptive average pooling, cells flattened row-major.

    PyTorch's bin rule (cell i of an axis of size n averages `floor(i*n/g) .. ceil((i+1)*n/g)-1`)
    is what the reference uses, so we call the same op rather than re-deriving the bins.
    """
    nd = _check_spatial("features", f)
    pool = F.adaptive_avg_pool2d if nd == 2 else F.adaptive_avg_pool3d
    return pool(f, grid).flatten(2)


def resize_mask(mask_onehot: Tensor, size: Sequence[int]) -> Tensor:
    """Class masks at feature resolution: `[resize(mask) > 0.5]` as 0/1 in float32 (float64 in).

    Bilinear/trilinear with align_corners=False, as the reference. For an even integer stride s
    this is "at least 3 of the 4 (2D) centre pixels of the s x s block"; for an odd stride it is
    the centre pixel; the interpolation covers every other ratio exactly like the reference.
    """
    nd = _check_spatial("mask", mask_onehot)
    dtype = torch.float64 if mask_onehot.dtype == torch.float64 else torch.float32
    m = mask_onehot.to(dtype)
    if tuple(m.shape[2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="bilinear" if nd == 2 else "trilinear",
                          align_corners=False)
    return (m > 0.5).to(dtype)


def class_prototypes(f: Tensor, mask: Tensor) -> Tensor:
    """`pi[c, b] = mean over all positions of f[b] * mask[b, c]` -> `[C, B, Cf]`.

    `mask` is at the feature resolution (`resize_mask`). The mean runs over every position, not
    the mask area, so the prototype's norm scales with the class area (reference behaviour).
    """
    if f.shape[0] != mask.shape[0] or f.shape[2:] != mask.shape[2:]:
        raise ValueError(f"ccp: features {tuple(f.shape)} and mask {tuple(mask.shape)} differ in "
                         f"batch or spatial size")
    n = f[0, 0].numel()
    return torch.einsum("bfs,bcs->cbf", f.flatten(2), mask.to(f.dtype).flatten(2)) / n


def ic_cell_losses(p1_BFG: Tensor, p2_BFG: Tensor, temperature: float = 0.3) -> Tensor:
    """IC cross-entropy of every grid cell, `[G]` (mean over the batch), in the inputs' dtype.

    One `[G, B, B, G]` table of all anchor/candidate dot products; the logits of anchor (b, g)
    are its row over (b', g') with the column g' = g kept only for b' = b (the positive).
    """
    B, _, G = p1_BFG.shape
    if p2_BFG.shape != p1_BFG.shape:
        raise ValueError(f"ccp: pooled features differ: {tuple(p1_BFG.shape)} vs "
                         f"{tuple(p2_BFG.shape)}")
    sim_GBBG = torch.einsum("bfg,dfh->gbdh", p1_BFG, p2_BFG) / temperature
    pos_GB = torch.einsum("bfg,bfg->gb", p1_BFG, p2_BFG) / temperature
    eye_G = torch.eye(G, dtype=torch.bool, device=sim_GBBG.device)
    eye_B = torch.eye(B, dtype=torch.bool, device=sim_GBBG.device)
    keep = ~eye_G[:, None, None, :] | (eye_B[None, :, :, None] & eye_G[:, None, None, :])
    lse_GB = sim_GBBG.masked_fill(~keep, float("-inf")).flatten(2).logsumexp(-1)
    return (lse_GB - pos_GB).mean(1)


def ife_class_losses(proto_CBF: Tensor, queue_CFK: Tensor, temperature: float = 0.3) -> Tensor:
    """IFE cross-entropy of every class, `[C]` (mean over the batch), in the prototypes' dtype.

    Positive: the queue mean of the own class; negatives: every slot of every other class. The
    queue is detached (it is a memory bank, not a parameter).
    """
    C, _, F_ = proto_CBF.shape
    if queue_CFK.shape[:2] != (C, F_):
        raise ValueError(f"ccp: queue {tuple(queue_CFK.shape)} does not match prototypes "
                         f"{tuple(proto_CBF.shape)} ([C, Cf, K] vs [C, B, Cf])")
    q_CFK = queue_CFK.detach().to(proto_CBF.dtype)
    pos_CB = torch.einsum("cbf,cf->cb", proto_CBF, q_CFK.mean(-1)) / temperature
    neg_CBCK = torch.einsum("cbf,lfk->cblk", proto_CBF, q_CFK) / temperature
    own_C1C1 = torch.eye(C, dtype=torch.bool, device=neg_CBCK.device)[:, None, :, None]
    neg_CBN = neg_CBCK.masked_fill(own_C1C1, float("-inf")).flatten(2)
    lse_CB = torch.cat([pos_CB[..., None], neg_CBN], -1).logsumexp(-1)
    return (lse_CB - pos_CB).mean(1)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
def _no_autocast(t: Tensor) -> torch.autocast:
    """Contrast math in fp32: unnormalised logits / 0.3 are far beyond what bf16 resolves."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class CCPLevel(nn.Module):
    """IC + IFE of one feature level, with the two subnets' class queues `[C, Cf, K]`.

    `ic`/`ife` return 0-D float32 values rounded like the reference's float32 loss buffers.
    Buffers: `queue1`, `queue2` (float32 unless the module is cast), `ptr1`, `ptr2` (int64,
    0-D for `pointer="shared"`, `[C]` for `"per_class"`).
    """

    queue1: Tensor
    queue2: Tensor
    ptr1: Tensor
    ptr2: Tensor

    def __init__(self, num_classes: int, channels: int, queue_size: int = 1440,
                 temperature: float = 0.3, grid: int = 3, pointer: PointerMode = "shared",
                 queue_init: QueueInit = "reference", batch_size: int | None = None) -> None:
        super().__init__()
        if pointer not in ("shared", "per_class"):
            raise ValueError(f"CCPLevel: pointer={pointer!r}, expected 'shared' or 'per_class'")
        if queue_init not in ("reference", "feature_norm"):
            raise ValueError(f"CCPLevel: queue_init={queue_init!r}, expected 'reference' or "
                             f"'feature_norm'")
        if batch_size is not None and not 0 < batch_size <= queue_size:
            raise ValueError(f"CCPLevel: batch_size={batch_size} must be in [1, queue_size="
                             f"{queue_size}]")
        self.num_classes, self.channels, self.queue_size = num_classes, channels, queue_size
        self.temperature, self.grid = float(temperature), grid
        self.pointer, self.queue_init, self.batch_size = pointer, queue_init, batch_size
        # 2D reference: randn normalised along the CLASS axis (a bug, kept as the default for
        # parity); 3D reference: along the feature axis.
        norm_dim = 0 if queue_init == "reference" else 1
        ptr_shape = () if pointer == "shared" else (num_classes,)
        for k in (1, 2):
            q = F.normalize(torch.randn(num_classes, channels, queue_size), dim=norm_dim)
            self.register_buffer(f"queue{k}", q)
            self.register_buffer(f"ptr{k}", torch.zeros(ptr_shape, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, channels={self.channels}, "
                f"queue_size={self.queue_size}, T={self.temperature}, grid={self.grid}, "
                f"pointer={self.pointer}, queue_init={self.queue_init}")

    # --- buffers ---------------------------------------------------------------------------
    @staticmethod
    def _check_k(k: int) -> None:
        if k not in (1, 2):
            raise ValueError(f"CCPLevel: subnet k={k!r}, expected 1 or 2")

    def queue(self, k: int) -> Tensor:
        self._check_k(k)
        return self.queue1 if k == 1 else self.queue2

    def ptr(self, k: int) -> Tensor:
        self._check_k(k)
        return self.ptr1 if k == 1 else self.ptr2

    @torch.no_grad()
    def load_queues(self, q1: Tensor, q2: Tensor, ptr: int | Tensor = 0) -> None:
        """Set both queues (cast to the buffer dtype) and both pointers (broadcast per class)."""
        for k, q in ((1, q1), (2, q2)):
            if tuple(q.shape) != tuple(self.queue(k).shape):
                raise ValueError(f"CCPLevel.load_queues: q{k} shape {tuple(q.shape)} != "
                                 f"{tuple(self.queue(k).shape)}")
            self.queue(k).copy_(q)
            self.ptr(k).copy_(torch.as_tensor(ptr, dtype=torch.int64).expand_as(self.ptr(k)))

    # --- losses ----------------------------------------------------------------------------
    def ic_cells(self, f1: Tensor, f2: Tensor) -> Tensor:
        """Per-cell IC `[grid^d]` before the float32 rounding (float64 in -> float64 out)."""
        if f1.shape != f2.shape:
            raise ValueError(f"CCPLevel.ic: f1 {tuple(f1.shape)} and f2 {tuple(f2.shape)} differ")
        with _no_autocast(f1):
            dt = _compute_dtype(f1, f2)
            return ic_cell_losses(adaptive_pool_grid(f1.to(dt), self.grid),
                                  adaptive_pool_grid(f2.to(dt), self.grid), self.temperature)

    def ic(self, f1: Tensor, f2: Tensor) -> Tensor:
        """IC of this level: float32 mean of the float32-rounded cell losses (reference)."""
        return self.ic_cells(f1, f2).float().mean()

    def prototypes(self, f: Tensor, mask_onehot: Tensor) -> Tensor:
        """`[C, B, Cf]` class prototypes of `f` under a full-resolution one-hot map."""
        with _no_autocast(f):
            dt = _compute_dtype(f)
            mask = resize_mask(mask_onehot, f.shape[2:])
            if mask.shape[1] != self.num_classes:
                raise ValueError(f"CCPLevel: mask has {mask.shape[1]} classes, expected "
                                 f"{self.num_classes}")
            return class_prototypes(f.to(dt), mask)

    def ife_classes(self, f: Tensor, mask_onehot: Tensor, k: int) -> Tensor:
        """Per-class IFE `[C]` of subnet k before the float32 rounding."""
        proto_CBF = self.prototypes(f, mask_onehot)
        with _no_autocast(f):
            # a copy: the queue is updated in place after this read, before the backward
            return ife_class_losses(proto_CBF, self.queue(k).detach().clone(), self.temperature)

    def ife(self, f: Tensor, mask_onehot: Tensor, k: int) -> Tensor:
        """IFE of subnet k against queue k: float32 mean over classes (reference rounding)."""
        return self.ife_classes(f, mask_onehot, k).float().mean()

    # --- queue update ----------------------------------------------------------------------
    def slots(self, k: int, batch: int) -> Tensor:
        """`[C, B]` queue columns the next update of subnet k writes (image order in a row)."""
        ptr = self.ptr(k)
        ar_B = torch.arange(batch, device=ptr.device)
        if self.pointer == "shared":  # class c starts where class c-1 left the shared pointer
            ar_C = torch.arange(self.num_classes, device=ptr.device)
            start_C1 = ptr + ar_C[:, None] * batch
        else:
            start_C1 = ptr[:, None]
        return (start_C1 + ar_B) % self.queue_size

    @torch.no_grad()
    def enqueue(self, f: Tensor, label_onehot: Tensor, k: int, gate: Tensor | bool) -> None:
        """Write GAP(f * label_c) of the B images into queue k, only where `gate` is true.

        No host sync: the gate selects between new and old columns/pointers with `torch.where`.
        """
        B = f.shape[0]
        if self.batch_size is not None and B != self.batch_size:
            raise ValueError(f"CCPLevel.enqueue: batch {B} != batch_size {self.batch_size}")
        if B > self.queue_size:
            raise ValueError(f"CCPLevel.enqueue: batch {B} > queue_size {self.queue_size}")
        queue, ptr = self.queue(k), self.ptr(k)
        gate = torch.as_tensor(gate, dtype=torch.bool, device=queue.device)
        proto_CBF = self.prototypes(f.detach(), label_onehot)
        new_CFB = proto_CBF.permute(0, 2, 1).to(queue.dtype)
        idx_CFB = self.slots(k, B)[:, None, :].expand(-1, self.channels, -1)
        old_CFB = queue.gather(2, idx_CFB)
        queue.scatter_(2, idx_CFB, torch.where(gate, new_CFB, old_CFB))
        step = B * self.num_classes if self.pointer == "shared" else B
        ptr.copy_(torch.where(gate, (ptr + step) % self.queue_size, ptr))


class CCP(nn.Module):
    """The reference's three `Contrast_global_consistency` levels (64, 128, 256 channels).

    `levels[i]` consumes `feats[-len(levels) + i]`, i.e. by default feats[-3] (64 ch),
    feats[-2] (128), feats[-1] (256). Level means are summed deepest first, as the trainer's
    `(l_256 + l_128 + l_64) / 3`, in float32.

    All levels' queues live in one tensor `[2, F, C, K]` (subnet, feature of every level
    stacked, class, slot; F = Σ channels) and the pointers in one `[2, L(, C)]`; each level's
    `queue1/queue2/ptr1/ptr2` buffers are views into them, so the state_dict, `load_queues` and
    the per-level methods (`ic`, `ife`, `enqueue`, the oracle of `step`) are unchanged, while
    `step` computes IC, both IFEs and the gated update of every level in a few batched ops.
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (64, 128, 256),
                 **level_kwargs: object) -> None:
        super().__init__()
        self.levels = nn.ModuleList(CCPLevel(num_classes, c, **level_kwargs)  # type: ignore[arg-type]
                                    for c in channels)
        self.num_classes = num_classes
        self.channels = tuple(int(c) for c in channels)
        self.offsets = [sum(self.channels[:i]) for i in range(len(self.channels))]
        first = self.levels[0]
        self.queue_size, self.temperature, self.grid = (first.queue_size, first.temperature,
                                                        first.grid)
        self.pointer, self.batch_size = first.pointer, first.batch_size
        with torch.no_grad():
            self._Q = torch.stack([torch.cat([lvl.queue(k).permute(1, 0, 2) for lvl in self.levels])
                                   for k in (1, 2)]).contiguous()
            self._P = torch.stack([torch.stack([lvl.ptr(k) for lvl in self.levels])
                                   for k in (1, 2)]).contiguous()
        self._cache: dict = {}
        self._bind()

    def _bind(self) -> None:
        """Point every level's buffers at its slice of the stacked storage."""
        for i, lvl in enumerate(self.levels):
            o, n = self.offsets[i], lvl.channels
            for k in (1, 2):
                lvl._buffers[f"queue{k}"] = self._Q[k - 1, o:o + n].permute(1, 0, 2)
                lvl._buffers[f"ptr{k}"] = self._P[k - 1, i]

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda(): keep the views
        self._Q = fn(self._Q)
        self._P = fn(self._P)
        self._cache = {}
        self._bind()
        return self

    def _feats(self, feats: Sequence[Tensor]) -> Sequence[Tensor]:
        n = len(self.levels)
        if len(feats) < n:
            raise ValueError(f"CCP: got {len(feats)} feature maps, need at least {n}")
        sel = list(feats)[-n:]
        for lvl, f in zip(self.levels, sel):
            if f.shape[1] != lvl.channels:
                raise ValueError(f"CCP: feature map {tuple(f.shape)} has {f.shape[1]} channels, "
                                 f"level expects {lvl.channels}")
        return sel

    @staticmethod
    def _mean(values: list[Tensor]) -> Tensor:
        total = values[-1]
        for v in reversed(values[:-1]):
            total = total + v
        return total / len(values)

    def ic(self, feats1: Sequence[Tensor], feats2: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """IC averaged over levels, and the per-level values (in `levels` order)."""
        per = [lvl.ic(a, b) for lvl, a, b in zip(self.levels, self._feats(feats1),
                                                 self._feats(feats2))]
        return self._mean(per), per

    def ife(self, feats: Sequence[Tensor], mask_onehot: Tensor,
            k: int) -> tuple[Tensor, list[Tensor]]:
        """IFE of subnet k averaged over levels, and the per-level values."""
        per = [lvl.ife(f, mask_onehot, k) for lvl, f in zip(self.levels, self._feats(feats))]
        return self._mean(per), per

    @torch.no_grad()
    def enqueue(self, feats: Sequence[Tensor], label_onehot: Tensor, k: int,
                gate: Tensor | bool) -> None:
        """Queue update of subnet k at every level, gated on device."""
        for lvl, f in zip(self.levels, self._feats(feats)):
            lvl.enqueue(f, label_onehot, k, gate)

    # --- all levels at once --------------------------------------------------------------
    def _consts(self, sizes: tuple, B: int, dt: torch.dtype, device: torch.device) -> dict:
        """Per-shape constants of `step`, built once: pooling weights, level weights, masks."""
        key = (sizes, B, dt, device)
        c = None if torch.compiler.is_compiling() else self._cache.get(key)
        if c is not None:
            return c
        C, G, L = self.num_classes, self.grid, len(self.levels)
        Ftot = sum(self.channels)
        pools, n_px = [], []
        for size in sizes:
            w = None
            for n in size:  # adaptive average pooling is separable: one [n, grid] matrix a dim
                a = F.adaptive_avg_pool1d(torch.eye(n, dtype=dt, device=device)[:, None], G)[:, 0]
                w = a if w is None else (w[:, None, :, None] * a[None, :, None, :]).reshape(
                    w.shape[0] * n, w.shape[1] * G)
            pools.append(w)  # [S_l, G^d]: column g averages the positions of cell g
            n_px.append(math.prod(size))
        level_of_f = torch.cat([torch.full((ch,), i, dtype=torch.int64, device=device)
                                for i, ch in enumerate(self.channels)])
        onehot_lf = (torch.arange(L, device=device)[:, None] == level_of_f[None, :]).to(dt)
        inv_n = torch.tensor([1.0 / n for n in n_px], dtype=dt, device=device)
        gd = pools[0].shape[1]
        eye_c = torch.eye(C, dtype=torch.bool, device=device)
        eye_g = torch.eye(gd, dtype=torch.bool, device=device)
        eye_b = torch.eye(B, dtype=torch.bool, device=device)
        # IC: candidate (b', g') of anchor (b, g) is dropped when g' == g and b' != b
        ic_drop = (eye_g[None, :, None, :] & ~eye_b[:, None, :, None]).reshape(B * gd, B * gd)
        c = {
            "pools": pools,
            # IFE: π of level l = features of level l only, / (T · positions of level l)
            "ife_w": onehot_lf * (inv_n[:, None] / self.temperature),
            "ic_w": onehot_lf / self.temperature,
            "proto_scale": inv_n[level_of_f],
            "level_of_f": level_of_f,
            "own": eye_c.view(1, 1, C, 1, C, 1),
            "ic_drop": ic_drop,
            "ar_b": torch.arange(B, device=device),
            "class_off": torch.arange(C, device=device) * B,
            "Ftot": Ftot,
        }
        if not torch.compiler.is_compiling():
            self._cache[key] = c
        return c

    def step(self, feats1: Sequence[Tensor], feats2: Sequence[Tensor], masks: Tensor, *,
             gates: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(IC 0-D, [IFE of subnet 1, IFE of subnet 2]) of one forward — float32, the values of
        `ic` and `ife` — and, when `gates` ([2] bool, one per subnet) is given, the gated queue
        update of both subnets with this forward's features, after the IFEs read the queues.

        masks: [B, J·C, *S] float at the input resolution: channels [0, C) the IFE class masks
        of subnet 1, [C, 2C) those of subnet 2, and with `gates` [2C, 3C) the label masks of the
        update (resized and thresholded at 0.5 per level like `resize_mask`). One bmm per subnet
        and level gives every prototype and the IC's pooled cells; IFE and IC of all levels are
        one batched matmul each (level weights keep each level's dot products apart)."""
        f1, f2 = self._feats(feats1), self._feats(feats2)
        C, L, K = self.num_classes, len(self.levels), self.queue_size
        B = f1[0].shape[0]
        J = masks.shape[1]
        if J != (3 if gates is not None else 2) * C:
            raise ValueError(f"CCP.step: masks have {J} channels; expected {2 * C} (IFE masks of "
                             f"both subnets) or, with gates, {3 * C} (+ the label masks)")
        if gates is not None and self.batch_size is not None and B != self.batch_size:
            raise ValueError(f"CCP.step: batch {B} != batch_size {self.batch_size}")
        if gates is not None and B > K:
            raise ValueError(f"CCP.step: batch {B} > queue_size {K}")
        with _no_autocast(f1[0]):
            dt = _compute_dtype(*f1, *f2, masks)
            sizes = tuple(tuple(int(n) for n in f.shape[2:]) for f in f1)
            cst = self._consts(sizes, B, dt, f1[0].device)
            Ftot = cst["Ftot"]
            m_in = masks.to(dt)
            mats = []
            for size, pool in zip(sizes, cst["pools"]):
                m = m_in
                if tuple(m.shape[2:]) != size:
                    m = F.interpolate(m, size=size, mode="bilinear" if len(size) == 2 else
                                      "trilinear", align_corners=False)
                m = (m > 0.5).to(dt).flatten(2).transpose(1, 2)  # [B, S_l, J]
                mats.append(torch.cat([m, pool.expand(B, -1, -1)], 2))  # [B, S_l, J + G]
            parts = [torch.bmm(f.to(dt).flatten(2), M) for fs in (f1, f2) for f, M in zip(fs, mats)]
            R = torch.cat(parts, 1).view(B, 2, Ftot, -1)  # [B, subnet, F, J + G]
            # IFE: prototypes of subnet k under its own masks, both subnets and every level
            pi = R[..., :2 * C].view(B, 2, Ftot, 2, C).diagonal(dim1=1, dim2=3)  # [B, F, C, 2]
            pb = (pi.permute(3, 0, 2, 1)[:, :, :, None, :] * cst["ife_w"]).reshape(2, -1, Ftot)
            Q = self._Q.detach()
            Q = Q.clone() if gates is not None and Q.dtype == dt else Q.to(dt)  # update follows
            S = torch.matmul(pb, Q.view(2, Ftot, -1)).view(2, B, C, L, C, K)
            lse = S.masked_fill(cst["own"], float("-inf")).flatten(4).logsumexp(-1)
            pos = torch.matmul(pb, Q.mean(-1)).view(2, B, C, L, C).diagonal(dim1=2, dim2=4)
            pos = pos.transpose(2, 3)  # [2, B, C, L]
            ife = (torch.logaddexp(lse, pos) - pos).mean((1, 2, 3))
            # IC: pooled cells of subnet 1 against those of subnet 2, every level
            pool = R[..., J:]  # [B, 2, F, G]
            gd = pool.shape[-1]
            a = (pool[:, 0].transpose(1, 2)[None] * cst["ic_w"][:, None, None, :]).reshape(
                L, B * gd, Ftot)
            b = pool[:, 1].permute(1, 0, 2).reshape(Ftot, B * gd)
            sim = torch.matmul(a, b)  # [L, B·G, B·G]
            lse_ic = sim.masked_fill(cst["ic_drop"], float("-inf")).logsumexp(-1)
            ic = (lse_ic - sim.diagonal(dim1=1, dim2=2)).mean()
            if gates is not None:
                self._enqueue(R[..., 2 * C:3 * C], gates, cst)
        # the reference keeps these losses in float32 buffers (f32-rounded in a float64 run)
        return ic.float(), ife.float()

    @torch.no_grad()
    def _enqueue(self, protos: Tensor, gates: Tensor, cst: dict) -> None:
        """Write the label prototypes `protos` [B, 2, F, C] (sums over positions) into both
        subnets' queues at every level where `gates` [2] is true, and advance the pointers."""
        B, K = protos.shape[0], self.queue_size
        Q, P = self._Q, self._P
        new = (protos.detach() * cst["proto_scale"][:, None]).permute(1, 2, 3, 0)  # [2, F, C, B]
        # shared: class c starts where class c−1 left the one pointer; per_class: its own
        start = P[..., None] + cst["class_off"] if self.pointer == "shared" else P  # [2, L, C]
        slots = (start[..., None] + cst["ar_b"]) % K  # [2, L, C, B]
        idx = slots.index_select(1, cst["level_of_f"])  # [2, F, C, B]
        g = gates.view(2, 1, 1, 1)
        Q.scatter_(3, idx, torch.where(g, new.to(Q.dtype), Q.gather(3, idx)))
        step = B * self.num_classes if self.pointer == "shared" else B
        P.copy_(torch.where(gates.view(2, *([1] * (P.dim() - 1))), (P + step) % K, P))
