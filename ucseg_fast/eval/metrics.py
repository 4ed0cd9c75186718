"""Per-class segmentation metrics: Dice, Jaccard, HD95, ASD.

Two conventions (docs/design.md §6):

* ``mode="medpy"`` reproduces what the reference computes (``medpy.metric.binary`` ``dc``,
  ``jc``, ``hd95``, ``asd`` applied per class, docs/method.md §4), without importing medpy:

  - surface = ``mask XOR binary_erosion(mask, cross-shaped structure (connectivity 1))``,
    erosion with border value 0 (voxels on the array border belong to the surface);
  - directed distances = ``distance_transform_edt(~other_surface, sampling=spacing)`` read at
    the voxels of one surface;
  - ``hd95`` = 95th percentile (numpy ``linear``) of the union of both directed sets;
    ``asd`` = mean of the *directed* prediction→GT distances (medpy's ``asd``, not ``assd``);
  - class absent from the prediction → Dice = Jaccard = HD95 = ASD = 0 (the reference's
    ``calculate_metric_percase``; it makes HD95/ASD look better). ``empty_pred_distance``
    changes the distance value (the reference's 3D protocol uses 100);
  - class present in the prediction but absent from the GT: the reference would crash (medpy
    raises ``RuntimeError``). Here it is well defined: Dice = Jaccard = 0 (what ``dc``/``jc``
    return), HD95 = ASD = NaN, and the case is counted in ``n_empty["gt_empty"]``;
  - voxel units unless ``spacing`` is given (the reference never gives it).

* ``mode="strict"``: spacing honoured; a distance needs both surfaces, so an empty prediction
  or an empty GT gives NaN HD95/ASD; Dice/Jaccard are 0 when exactly one side is empty and NaN
  when both are (nothing to score). Every such case is counted.

Dice and Jaccard come from one confusion matrix computed where the labels live (GPU stays on
GPU; only C² counts come back). The distance part runs on the CPU with scipy, cropped to the
bounding box of prediction ∪ GT (+1 voxel), which leaves every distance unchanged. It goes
through :func:`_surface_distances`, the hook a GPU implementation may replace.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

__all__ = [
    "SegmentationMetrics",
    "segmentation_metrics",
    "mean_over_volumes",
    "normalize_spacing",
]

Mode = Literal["medpy", "strict"]
LabelMap = np.ndarray | torch.Tensor
_METRICS = ("dice", "jaccard", "hd95", "asd")
_EMPTY_KEYS = ("pred_empty", "gt_empty", "both_empty")


@dataclass(frozen=True)
class SegmentationMetrics:
    """Per-class metrics of one volume (``n_volumes == 1``) or a mean over volumes.

    ``dice[i]`` etc. belong to class ``classes[i]``. ``hd95``/``asd`` are ``None`` when the
    distances were not computed (``distances=False``). ``n_empty`` counts, per class, the
    volumes where only the prediction was empty (``pred_empty``), only the GT
    (``gt_empty``), or both (``both_empty``); it is filled in both modes. ``units`` is
    ``"voxel"`` (no spacing), ``"spacing"`` (distances scaled by ``spacing``) or ``"mixed"``
    (a mean over volumes scored in different units).
    """

    classes: tuple[int, ...]
    num_classes: int
    dice: np.ndarray
    jaccard: np.ndarray
    hd95: np.ndarray | None
    asd: np.ndarray | None
    mode: Mode = "medpy"
    spacing: tuple[float, ...] | None = None
    units: str = "voxel"
    n_empty: dict[str, np.ndarray] = field(default_factory=dict)
    n_volumes: int = 1

    def metric_names(self) -> tuple[str, ...]:
        return tuple(m for m in _METRICS if getattr(self, m) is not None)

    def mean(self) -> dict[str, float]:
        """Mean over classes of each metric, NaN entries (undefined cases) left out."""
        return {m: _nanmean(getattr(self, m)) for m in self.metric_names()}

    def for_class(self, cls: int) -> dict[str, float]:
        if cls not in self.classes:
            raise KeyError(f"class {cls} not evaluated (classes={self.classes})")
        i = self.classes.index(cls)
        return {m: float(getattr(self, m)[i]) for m in self.metric_names()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN → None, so ``json.dumps(..., allow_nan=False)`` works)."""
        return {
            "mode": self.mode,
            "units": self.units,
            "spacing": None if self.spacing is None else list(self.spacing),
            "num_classes": self.num_classes,
            "n_volumes": self.n_volumes,
            "classes": list(self.classes),
            "per_class": {
                str(c): {m: _json_float(getattr(self, m)[i]) for m in self.metric_names()}
                for i, c in enumerate(self.classes)
            },
            "mean": {k: _json_float(v) for k, v in self.mean().items()},
            "n_empty": {k: [int(x) for x in v] for k, v in self.n_empty.items()},
        }


def _json_float(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _nanmean(a: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmean`` without the all-NaN RuntimeWarning (an all-NaN slice stays NaN)."""
    a = np.asarray(a, dtype=np.float64)
    valid = ~np.isnan(a)
    count = valid.sum(axis=axis)
    total = np.where(valid, a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(out) if axis is None else out


def normalize_spacing(spacing: float | Sequence[float] | None, ndim: int
                      ) -> tuple[float, ...] | None:
    """One positive spacing per axis (a scalar applies to every axis, as in medpy)."""
    if spacing is None:
        return None
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        values = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(values) != ndim:
        raise ValueError(f"spacing={tuple(values)} has {len(values)} entries for a {ndim}-D "
                         f"label map")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing={values} must be finite and positive")
    return values


# ---------------------------------------------------------------------------------------------
# Surface distances (CPU / scipy). Replaceable hook.
# ---------------------------------------------------------------------------------------------

def _surface(mask: np.ndarray) -> np.ndarray:
    """medpy's 1-voxel surface: mask XOR its erosion by the connectivity-1 cross."""
    footprint = generate_binary_structure(mask.ndim, 1)
    return mask ^ binary_erosion(mask, structure=footprint, iterations=1)


def _crop_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by one voxel (clipped to the array).

    The one-voxel margin of true background keeps the erosion identical to the uncropped
    one; where the box reaches the array border, erosion's border value 0 applies in both.
    The distance transform only needs the feature voxels (one surface) and the query voxels
    (the other), all inside the box, so every distance is unchanged.
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def _surface_distances(pred_mask: np.ndarray, gt_mask: np.ndarray,
                       spacing: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred→gt, gt→pred)`` of two non-empty boolean masks.

    ``pred→gt`` is medpy's ``__surface_distances(pred, gt)``: for every voxel of the
    prediction's surface (C order), the distance to the nearest GT-surface voxel. Both sets
    are returned in medpy's element order, so means and percentiles are bit-identical.

    This is the hook for a GPU implementation: replace
    ``ucseg_fast.eval.metrics._surface_distances`` with a function of the same signature
    (numpy in, float64 numpy out); :func:`segmentation_metrics` looks it up at call time.
    """
    box = _crop_box(pred_mask | gt_mask)
    pred_surf = _surface(np.ascontiguousarray(pred_mask[box]))
    gt_surf = _surface(np.ascontiguousarray(gt_mask[box]))
    sampling = None if spacing is None else np.asarray(spacing, dtype=np.float64)
    d_pred_to_gt = distance_transform_edt(~gt_surf, sampling=sampling)[pred_surf]
    d_gt_to_pred = distance_transform_edt(~pred_surf, sampling=sampling)[gt_surf]
    return d_pred_to_gt, d_gt_to_pred


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------

def _as_label_tensor(x: LabelMap, name: str) -> torch.Tensor:
    """Integer label map as a torch tensor (no copy where possible, device kept)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    if t.is_floating_point():
        # The reference carries label maps as float32 (`torch.Tensor(list)`); accept integral
        # floats, refuse anything else rather than truncate silently.
        if not bool(torch.equal(t, torch.round(t))):  # sync-ok: evaluation, not the step
            raise TypeError(f"{name} is a {t.dtype} map with non-integer values; "
                            f"pass an integer label map")
        return t.to(torch.int64)
    if t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; expected an integer label map")
    return t.to(torch.int64)


def _check_range(t: torch.Tensor, num_classes: int, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    lo, hi = torch.aminmax(t)
    lo_i, hi_i = int(lo), int(hi)  # sync-ok: evaluation, not the step
    if lo_i < 0 or hi_i >= num_classes:
        raise ValueError(f"{name} has labels in [{lo_i}, {hi_i}], outside [0, {num_classes}) "
                         f"for num_classes={num_classes}")


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """``cm[p, g]`` = number of voxels predicted p with GT g (computed on the labels' device)."""
    flat = (pred.reshape(-1) * num_classes + target.reshape(-1))
    cm = torch.bincount(flat, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)  # sync-ok


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def segmentation_metrics(pred: LabelMap, target: LabelMap, num_classes: int,
                         spacing: float | Sequence[float] | None = None,
                         mode: Mode = "medpy", classes: Sequence[int] | None = None,
                         *, distances: bool = True,
                         empty_pred_distance: float = 0.0) -> SegmentationMetrics:
    """Dice, Jaccard, HD95, ASD per class of two integer label maps (2D or 3D).

    pred, target: same shape, values in ``[0, num_classes)``; numpy or torch on any device.
    classes: class ids to score (default ``1..num_classes-1``, background excluded).
    spacing: voxel size per axis (or one scalar); ``None`` = voxel units.
    distances: ``False`` skips HD95/ASD (the reference's validation scores Dice only).
    empty_pred_distance: HD95/ASD given to a class absent from the prediction in medpy mode
      (0 = ACDC reference; the 3D reference uses 100). Ignored in strict mode (NaN).
    """
    if mode not in ("medpy", "strict"):
        raise ValueError(f"mode={mode!r}; expected 'medpy' or 'strict'")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; need at least 2 (background + 1)")
    pred_t = _as_label_tensor(pred, "pred")
    target_t = _as_label_tensor(target, "target")
    if pred_t.shape != target_t.shape:
        raise ValueError(f"pred shape {tuple(pred_t.shape)} != target shape "
                         f"{tuple(target_t.shape)}")
    if target_t.device != pred_t.device:
        target_t = target_t.to(pred_t.device)
    _check_range(pred_t, num_classes, "pred")
    _check_range(target_t, num_classes, "target")
    cls = tuple(range(1, num_classes)) if classes is None else tuple(int(c) for c in classes)
    bad = [c for c in cls if not 0 <= c < num_classes]
    if bad or not cls:
        raise ValueError(f"classes={cls} must be non-empty ids in [0, {num_classes})")
    sp = normalize_spacing(spacing, pred_t.ndim)

    cm = _confusion(pred_t, target_t, num_classes)
    idx = np.asarray(cls)
    inter = cm[idx, idx]
    n_pred = cm.sum(axis=1)[idx]
    n_gt = cm.sum(axis=0)[idx]
    # Same float operations as medpy: dc = 2.0 * I / float(|P| + |G|), jc = I / float(|P ∪ G|).
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * inter.astype(np.float64) / (n_pred + n_gt).astype(np.float64)
        jaccard = inter.astype(np.float64) / (n_pred + n_gt - inter).astype(np.float64)
    pred_empty, gt_empty = n_pred == 0, n_gt == 0
    n_empty = {
        "pred_empty": (pred_empty & ~gt_empty).astype(np.int64),
        "gt_empty": (gt_empty & ~pred_empty).astype(np.int64),
        "both_empty": (pred_empty & gt_empty).astype(np.int64),
    }
    if mode == "medpy":
        dice[pred_empty] = 0.0  # reference: absent predicted class → all metrics 0
        jaccard[pred_empty] = 0.0
    else:
        dice[pred_empty & gt_empty] = np.nan
        jaccard[pred_empty & gt_empty] = np.nan

    hd95 = asd = None
    if distances:
        hd95 = np.full(len(cls), np.nan)
        asd = np.full(len(cls), np.nan)
        if mode == "medpy":
            hd95[pred_empty] = empty_pred_distance
            asd[pred_empty] = empty_pred_distance
        todo = [i for i in range(len(cls)) if not (pred_empty[i] or gt_empty[i])]
        if todo:
            pred_np = pred_t.cpu().numpy()  # sync-ok: distances are computed on the host
            target_np = target_t.cpu().numpy()
            for i in todo:
                d_pg, d_gp = _surface_distances(pred_np == cls[i], target_np == cls[i], sp)
                hd95[i] = np.percentile(np.hstack((d_pg, d_gp)), 95)
                asd[i] = d_pg.mean()

    return SegmentationMetrics(classes=cls, num_classes=num_classes, dice=dice,
                               jaccard=jaccard, hd95=hd95, asd=asd, mode=mode, spacing=sp,
                               units="voxel" if sp is None else "spacing",
                               n_empty=n_empty, n_volumes=1)


def mean_over_volumes(results: Sequence[SegmentationMetrics]) -> SegmentationMetrics:
    """Per-class mean over volumes (NaN entries left out), empty-case counts summed.

    The reference averages each class over volumes, then the classes (``.mean()``); with no
    NaN this is the plain mean.
    """
    if not results:
        raise ValueError("mean_over_volumes needs at least one result")
    first = results[0]
    for r in results[1:]:
        if (r.classes, r.mode, r.metric_names()) != (first.classes, first.mode,
                                                     first.metric_names()):
            raise ValueError(f"cannot average results with classes/mode/metrics "
                             f"{r.classes}/{r.mode}/{r.metric_names()} and "
                             f"{first.classes}/{first.mode}/{first.metric_names()}")

    def avg(name: str) -> np.ndarray | None:
        if getattr(first, name) is None:
            return None
        return _nanmean(np.stack([getattr(r, name) for r in results]), axis=0)

    spacings = {r.spacing for r in results}
    units = {r.units for r in results}
    return SegmentationMetrics(
        classes=first.classes, num_classes=first.num_classes,
        dice=avg("dice"), jaccard=avg("jaccard"), hd95=avg("hd95"), asd=avg("asd"),
        mode=first.mode, spacing=first.spacing if len(spacings) == 1 else None,
        units=first.units if len(units) == 1 else "mixed",
        n_empty={k: np.sum([r.n_empty[k] for r in results], axis=0).astype(np.int64)
                 for k in _EMPTY_KEYS},
        n_volumes=sum(r.n_volumes for r in results),
    )
