"""Sliding-window 3D inference and the 3D test protocol of the reference (docs/method.md §4, "3D").

The reference's ``test_single_case`` (UA-MT's loop as UC-Seg ships it in ``prediction.py``):

* an axis shorter than the patch is zero-padded to the patch size (``⌊pad/2⌋`` before, the rest
  after; only those axes), and the padding is cropped off at the end;
* per axis ``⌈(n − p)/stride⌉ + 1`` windows starting at ``min(stride·i, n − p)`` (stride_xy on
  x and y, stride_z on z), visited x-outer, z-inner, one window per network call;
* ``σ(P)[:, 1]`` (the fused output, foreground channel) of every window is added to a float32
  score map and 1 to a float32 count map; score / count; ``> 0.5``;
* ``getLargestCC``: skimage ``label`` (full connectivity, 26 in 3D), the largest component kept
  (``argmax`` of the sizes: the earliest label on ties); an empty mask is returned unchanged;
* ``calculate_metric_percase``: medpy ``dc, jc, hd95, asd`` of the class-1 masks in voxel
  units; an **empty prediction scores Dice 0, Jaccard 0, HD95 100, ASD 100** (whatever the GT).

Here the windows go through the network ``batch_size`` at a time and everything stays on the
device. The probabilities are added into the score map one window at a time in the reference's
order, so the float32 sums — hence the map and the ``> 0.5`` decision — are the reference's bit
for bit (for the same ``σ(P)`` values). The count map is the outer product of per-axis window
counts (exact small integers, as the reference's float32 ``+1`` increments are).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ops.components import largest_component
from .inference import EvaluationResult, PredictFn, _resolve_device, save_nifti, score_items
from .metrics import Mode

__all__ = [
    "EMPTY_PRED_DISTANCE_3D",
    "evaluate_cases_3d",
    "predict_case_3d",
    "sliding_window_probability",
    "window_starts",
]

# HD95 / ASD the reference's 3D protocol gives a case with an empty prediction
# (``calculate_metric_percase`` in UC-Seg_3D ``utils/utils.py``); Dice and Jaccard are 0.
EMPTY_PRED_DISTANCE_3D = 100.0


def window_starts(n: int, patch: int, stride: int) -> list[int]:
    """Start indices of the windows along one axis of (padded) length ``n >= patch``:
    ``min(stride·i, n − patch)`` for ``i < ⌈(n − patch)/stride⌉ + 1`` (the reference's rule)."""
    if patch < 1 or stride < 1:
        raise ValueError(f"window_starts: patch={patch} and stride={stride} must be >= 1")
    if n < patch:
        raise ValueError(f"window_starts: axis of length {n} is shorter than the patch {patch}; "
                         f"pad it first")
    count = -(-(n - patch) // stride) + 1  # ceil((n - patch) / stride) + 1, integer arithmetic
    return [min(stride * i, n - patch) for i in range(count)]


def _axis_coverage(n: int, patch: int, starts: Sequence[int], device: torch.device
                   ) -> torch.Tensor:
    """float32 [n]: how many windows along this axis cover each index."""
    cover = torch.zeros(n + 1, dtype=torch.float32)
    for s in starts:
        cover[s] += 1
        cover[s + patch] -= 1
    return torch.cumsum(cover, 0)[:n].to(device)


def _check_patch(patch: Sequence[int]) -> tuple[int, int, int]:
    p = tuple(int(v) for v in patch)
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch={tuple(patch)}; expected three sizes >= 1 (x, y, z)")
    return p  # type: ignore[return-value]


def sliding_window_probability(predict_fn: PredictFn, image_XYZ: np.ndarray | torch.Tensor, *,
                               patch: Sequence[int] = (96, 96, 96), stride_xy: int = 18,
                               stride_z: int = 4, batch_size: int = 4,
                               device: torch.device | str | None = None,
                               in_channels: int = 1) -> torch.Tensor:
    """Foreground probability of an ``[X, Y, Z]`` volume by the reference's sliding window.

    predict_fn: ``x [N, in_channels, *patch] float32 → logits [N, 2, *patch]`` (the fused
      output ``P``); put the model in eval mode (and wrap autocast) yourself. The image is
      repeated over ``in_channels``. Each window contributes ``σ(logits.float())[:, 1]``.
    batch_size: windows per ``predict_fn`` call (the reference uses 1; the result does not
      depend on it as long as ``predict_fn`` treats batch items independently — note that the
      reference's 3D UNet uses InstanceNorm, which does).
    device: where the volume, the network input and the maps live (default: the image's device
      for a tensor, else CUDA when available). The result stays there.
    Returns float32 ``[X, Y, Z]``: the mean of the overlapping window probabilities. A voxel no
    window covers (only possible with a stride larger than the patch) is ``0/0 = NaN``, as in
    the reference, and counts as background after ``> 0.5``.
    """
    px, py, pz = _check_patch(patch)
    if stride_xy < 1 or stride_z < 1:
        raise ValueError(f"stride_xy={stride_xy}, stride_z={stride_z}; must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    dev = _resolve_device(image_XYZ, device)
    img = (image_XYZ if isinstance(image_XYZ, torch.Tensor)
           else torch.from_numpy(np.ascontiguousarray(image_XYZ)))
    if img.ndim != 3:
        raise ValueError(f"image_XYZ must be [X, Y, Z], got shape {tuple(img.shape)}")
    # The reference pads the stored dtype and casts each patch to float32: the same values.
    img = img.to(dev, torch.float32)
    size = tuple(int(n) for n in img.shape)
    pads = [max(p - n, 0) for n, p in zip(size, (px, py, pz))]
    before = [pad // 2 for pad in pads]
    padded = tuple(n + pad for n, pad in zip(size, pads))
    if any(pads):
        vol = torch.zeros(padded, dtype=torch.float32, device=dev)
        vol[before[0]:before[0] + size[0], before[1]:before[1] + size[1],
            before[2]:before[2] + size[2]] = img
    else:
        vol = img

    starts = [window_starts(padded[0], px, stride_xy), window_starts(padded[1], py, stride_xy),
              window_starts(padded[2], pz, stride_z)]
    windows = list(itertools.product(*starts))  # x outer, z inner: the reference's order
    score = torch.zeros(padded, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            x_NXYZ = torch.stack([vol[xs:xs + px, ys:ys + py, zs:zs + pz]
                                  for xs, ys, zs in chunk])
            x_NCXYZ = x_NXYZ[:, None].expand(-1, in_channels, -1, -1, -1).contiguous()
            logits = predict_fn(x_NCXYZ)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"predict_fn returned {type(logits).__name__}; it must return "
                                f"one logits tensor [N, 2, {px}, {py}, {pz}] (wrap models that "
                                f"return tuples, e.g. lambda x: model(x)[-1])")
            if logits.ndim != 5 or logits.shape[0] != len(chunk) or logits.shape[1] < 2 \
                    or tuple(logits.shape[2:]) != (px, py, pz):
                raise ValueError(f"predict_fn returned shape {tuple(logits.shape)} for input "
                                 f"{tuple(x_NCXYZ.shape)}; expected [N, 2, {px}, {py}, {pz}]")
            prob_NXYZ = torch.sigmoid(logits[:, 1].float()).to(dev)
            # One add per window, in order: the reference's float32 summation, bit for bit.
            for (xs, ys, zs), prob in zip(chunk, prob_NXYZ):
                score[xs:xs + px, ys:ys + py, zs:zs + pz] += prob
    cx, cy, cz = (_axis_coverage(n, p, s, dev) for n, p, s in zip(padded, (px, py, pz), starts))
    score /= cx[:, None, None] * cy[None, :, None] * cz[None, None, :]
    if any(pads):
        score = score[before[0]:before[0] + size[0], before[1]:before[1] + size[1],
                      before[2]:before[2] + size[2]].contiguous()
    return score


def predict_case_3d(predict_fn: PredictFn, image_XYZ: np.ndarray | torch.Tensor, *,
                    patch: Sequence[int] = (96, 96, 96), stride_xy: int = 18, stride_z: int = 4,
                    nms: bool = True, batch_size: int = 4,
                    device: torch.device | str | None = None,
                    in_channels: int = 1) -> torch.Tensor:
    """Label map (int64 ``[X, Y, Z]``, 0/1, on the device) of one case: the sliding-window
    probability ``> 0.5``, then (``nms``) only its largest 26-connected component (ties: the
    component whose first voxel in C order comes first, as skimage ``label`` + ``argmax``; an
    empty mask stays empty). See :func:`sliding_window_probability` for the arguments."""
    prob = sliding_window_probability(predict_fn, image_XYZ, patch=patch, stride_xy=stride_xy,
                                      stride_z=stride_z, batch_size=batch_size, device=device,
                                      in_channels=in_channels)
    mask = (prob > 0.5).to(torch.uint8)  # uint8: a quarter of int64's traffic in the CC pass
    if nms:
        mask = largest_component(mask[None], 2)[0]
    return mask.to(torch.int64)


def _save_case(path: Path, volume_XYZ: np.ndarray | torch.Tensor,
               spacing: float | Sequence[float] | None) -> None:
    """Write an ``[X, Y, Z]`` volume with the NIfTI axes (x, y, z) = (X, Y, Z), as the
    reference's ``nib.Nifti1Image(array, affine)`` does: :func:`save_nifti` stores a ``[D, H, W]``
    array as (W, H, D), so it is handed the ``[Z, Y, X]`` view and the reversed spacing."""
    if isinstance(volume_XYZ, torch.Tensor):
        zyx = volume_XYZ.permute(2, 1, 0)
    else:
        zyx = np.asarray(volume_XYZ).transpose(2, 1, 0)
    sp = None
    if spacing is not None:
        sp = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(spacing)[::-1]
    save_nifti(path, zyx, sp)


def evaluate_cases_3d(predict_fn: PredictFn, items: Iterable[tuple[Any, ...]], *,
                      patch: Sequence[int] = (96, 96, 96), stride_xy: int = 18,
                      stride_z: int = 4, nms: bool = True, batch_size: int = 4,
                      device: torch.device | str | None = None, dice_only: bool = False,
                      mode: Mode = "medpy", save_dir: str | Path | None = None,
                      in_channels: int = 1,
                      spacing: float | Sequence[float] | None = None) -> EvaluationResult:
    """The reference's 3D test protocol (``dice_only=False``) or its training-time validation
    (``dice_only=True``, Dice/Jaccard only: the same routine, distances skipped).

    items: ``(name, image [X,Y,Z], label [X,Y,Z])`` or ``(name, image, label, spacing)``; the
      label holds 0/1 (values outside ``[0, 2)`` are refused, not mapped to background). A
      per-item spacing overrides ``spacing`` (the reference scores in voxel units: none).
    Per case, class 1: medpy ``dc, jc, hd95, asd``. **Empty prediction → Dice 0, Jaccard 0,
      HD95 100, ASD 100** (:data:`EMPTY_PRED_DISTANCE_3D`; the 2D/ACDC protocol uses 0), also
      when the GT is empty too; such a case counts in ``n_empty["pred_empty"]`` (GT not empty)
      or ``n_empty["both_empty"]``, and its 100s enter the means like any other value. In
      ``mode="strict"`` an empty side gives NaN distances instead (left out of the means).
      A non-empty prediction against an empty GT (medpy raises there) scores Dice/Jaccard 0,
      HD95/ASD NaN, counted in ``n_empty["gt_empty"]``.
    Means over cases: ``result.summary`` (one class, so ``result.mean()`` is the reference's
    ``avg_dice`` etc.). save_dir: writes ``<name>_pred/_img/_gt.nii.gz`` (needs nibabel), axes
    (x, y, z) = the array's (X, Y, Z) as the reference writes them.
    """
    def predict(name: str, image: Any) -> torch.Tensor:
        return predict_case_3d(predict_fn, image, patch=patch, stride_xy=stride_xy,
                               stride_z=stride_z, nms=nms, batch_size=batch_size, device=device,
                               in_channels=in_channels)

    return score_items(items, predict, 2, spacing=spacing, mode=mode, dice_only=dice_only,
                       save_dir=save_dir, save=_save_case, what="case", ndim=3,
                       empty_pred_distance=EMPTY_PRED_DISTANCE_3D)
