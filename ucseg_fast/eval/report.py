"""Human- and machine-readable outputs of an evaluation: table, JSON, CSV, overlay figure."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .inference import EvaluationResult
from .metrics import SegmentationMetrics

__all__ = ["class_names", "format_table", "save_overlay_figure", "write_csv", "write_json"]

Result = SegmentationMetrics | EvaluationResult
ACDC_CLASS_NAMES = ("BG", "RV", "Myo", "LV")
# Class colours of the overlays (RGB), index = class id; background is transparent.
_COLORS = ((0.0, 0.0, 0.0), (0.90, 0.10, 0.10), (0.10, 0.75, 0.20), (0.15, 0.35, 0.95),
           (0.95, 0.80, 0.10), (0.80, 0.20, 0.85), (0.10, 0.80, 0.85), (0.95, 0.50, 0.10))


def class_names(num_classes: int, classes: Sequence[int] | None = None) -> list[str]:
    """Display names: RV/Myo/LV for ACDC (4 classes), "foreground" for a binary task."""
    ids = list(range(num_classes)) if classes is None else list(classes)
    if num_classes == 4:
        return [ACDC_CLASS_NAMES[c] for c in ids]
    if num_classes == 2:
        return ["background" if c == 0 else "foreground" for c in ids]
    return [f"class {c}" for c in ids]


def _summary(result: Result) -> SegmentationMetrics:
    if isinstance(result, EvaluationResult):
        return result.summary
    if isinstance(result, SegmentationMetrics):
        return result
    raise TypeError(f"expected SegmentationMetrics or EvaluationResult, got "
                    f"{type(result).__name__}")


def _fmt(x: float, scale: float = 1.0) -> str:
    return "nan" if math.isnan(x) else f"{x * scale:.2f}"


def format_table(result: Result, names: Sequence[str] | None = None) -> str:
    """Per-class table: Dice %, Jaccard %, HD95, ASD (+ empty-case counts when any)."""
    s = _summary(result)
    names = list(names) if names is not None else class_names(s.num_classes, s.classes)
    metrics = s.metric_names()
    scales = {"dice": 100.0, "jaccard": 100.0, "hd95": 1.0, "asd": 1.0}
    unit = {"voxel": "vox", "spacing": "mm", "mixed": "mixed"}[s.units]
    heads = {"dice": "Dice %", "jaccard": "Jaccard %", "hd95": f"HD95 ({unit})",
             "asd": f"ASD ({unit})"}
    show_empty = s.mode == "strict" or any(int(v.sum()) for v in s.n_empty.values())
    cols = ["class"] + [heads[m] for m in metrics]
    if show_empty:
        cols += ["empty pred/gt/both"]
    rows = []
    for i, name in enumerate(names):
        row = [name] + [_fmt(float(getattr(s, m)[i]), scales[m]) for m in metrics]
        if show_empty:
            row.append("/".join(str(int(s.n_empty[k][i]))
                                for k in ("pred_empty", "gt_empty", "both_empty")))
        rows.append(row)
    mean = s.mean()
    rows.append(["mean"] + [_fmt(mean[m], scales[m]) for m in metrics]
                + ([""] if show_empty else []))
    widths = [max(len(r[j]) for r in [cols] + rows) for j in range(len(cols))]
    header = f"mode={s.mode}  units={s.units}  volumes={s.n_volumes}"
    if s.spacing is not None:
        header += f"  spacing={tuple(s.spacing)}"
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
    body = [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join([header] + body)


def write_json(path: str | Path, result: Result) -> Path:
    """Write ``result.as_dict()`` (NaN → null, strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = result.as_dict()
    s = _summary(result)
    payload["class_names"] = class_names(s.num_classes, s.classes)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: str | Path, result: Result) -> Path:
    """One row per (volume, class) plus ``mean`` rows; NaN written as ``nan``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = _summary(result)
    metrics = s.metric_names()
    names = class_names(s.num_classes, s.classes)
    if isinstance(result, EvaluationResult):
        blocks = list(zip(result.names, result.per_volume)) + [("mean", s)]
    else:
        blocks = [("volume", s)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["volume", "class", "name", *metrics])
        for vol, r in blocks:
            for i, c in enumerate(r.classes):
                w.writerow([vol, c, names[i], *(repr(float(getattr(r, m)[i])) for m in metrics)])
            w.writerow([vol, "mean", "mean", *(repr(r.mean()[m]) for m in metrics)])
    return path


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def save_overlay_figure(path: str | Path, image_DHW: np.ndarray | torch.Tensor,
                        label_DHW: np.ndarray | torch.Tensor,
                        pred_DHW: np.ndarray | torch.Tensor, n_slices: int = 4,
                        num_classes: int | None = None) -> list[int]:
    """PNG with rows of (image | GT overlay | prediction overlay) for ``n_slices`` slices
    spread over those with foreground in GT or prediction; returns the slice indices.

    Uses matplotlib's Agg canvas directly, so the global pyplot backend is left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # optional dependency
        raise ImportError("save_overlay_figure needs matplotlib: "
                          "pip install 'ucseg-fast[plot]'") from err
    image, label, pred = _np(image_DHW), _np(label_DHW), _np(pred_DHW)
    if not (image.ndim == 3 and image.shape == label.shape == pred.shape):
        raise ValueError(f"image/label/pred must be equal [D, H, W] shapes, got "
                         f"{image.shape}, {label.shape}, {pred.shape}")
    if n_slices < 1:
        raise ValueError(f"n_slices={n_slices}; must be >= 1")
    n_cls = num_classes or int(max(label.max(), pred.max(), 1)) + 1
    fg = np.flatnonzero(((label > 0) | (pred > 0)).reshape(label.shape[0], -1).any(axis=1))
    pool = fg if fg.size else np.arange(label.shape[0])
    picks = sorted({int(pool[round(t)]) for t in np.linspace(0, pool.size - 1, n_slices)})

    rgba = np.array([(*_COLORS[c % len(_COLORS)], 0.0 if c == 0 else 0.55)
                     for c in range(n_cls)])
    fig = Figure(figsize=(9, 3 * len(picks)), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(picks), 3, squeeze=False)
    for row, z in enumerate(picks):
        for col, (title, overlay) in enumerate((("image", None), ("ground truth", label[z]),
                                                ("prediction", pred[z]))):
            ax = axes[row][col]
            ax.imshow(image[z], cmap="gray", interpolation="nearest")
            if overlay is not None:
                ax.imshow(rgba[np.clip(overlay.astype(np.int64), 0, n_cls - 1)],
                          interpolation="nearest")
            ax.set_title(f"{title} (slice {z})", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return picks


def format_image_table(result) -> str:
    """Per-image protocol (image folders): mean Dice / Jaccard over images and the spread."""
    d = np.asarray(result.dice_per_image, dtype=np.float64)
    j = np.asarray(result.jaccard_per_image, dtype=np.float64)
    lines = [f"per-image protocol: {len(d)} images",
             f"Dice %     mean {100 * d.mean():6.2f}  median {100 * np.median(d):6.2f}  "
             f"min {100 * d.min():6.2f}",
             f"Jaccard %  mean {100 * j.mean():6.2f}  median {100 * np.median(j):6.2f}  "
             f"min {100 * j.min():6.2f}"]
    return "\n".join(lines)


def write_image_reports(directory: str | Path, result) -> tuple[Path, Path]:
    """metrics.json (means + per image) and metrics.csv (one row per image)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    js = d / "metrics.json"
    js.write_text(json.dumps({"dice": result.dice, "jaccard": result.jaccard,
                              "images": {n: {"dice": a, "jaccard": b} for n, a, b in zip(
                                  result.names, result.dice_per_image,
                                  result.jaccard_per_image)}}, indent=1))
    cs = d / "metrics.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "dice", "jaccard"])
        for row in zip(result.names, result.dice_per_image, result.jaccard_per_image):
            w.writerow(row)
    return js, cs
