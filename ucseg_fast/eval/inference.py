"""Slice-wise volume inference and the evaluation protocol of the reference (docs/method.md §4).

ACDC protocol of the reference (``test_single_volume`` / ``prediction_ACDC.py``): every slice
of a ``[D, H, W]`` volume is resized to 256² with ``scipy.ndimage.zoom(order=0)``, fed to the
network, ``argmax softmax`` taken, resized back with ``zoom(order=0)`` and stacked. Here the
two resizes are index gathers on the tensor's device that follow scipy's order-0 rule bit for
bit (:func:`zoom_order0_indices`), and slices go through the network in batches.

scipy's rule (``grid_mode=False``, ``mode="constant"``, ``cval=0``): output index ``k`` reads
input ``floor(k·(n_in−1)/(n_out−1) + 0.5)``; when rounding makes ``k·(n_in−1)/(n_out−1)``
exceed ``n_in − 1`` by an ulp, scipy writes ``cval`` instead. That happens for the last
row/column of some sizes (e.g. 256 → 215 or 216: the prediction's last column becomes
background). It is kept: predictions equal the reference's.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import (Mode, SegmentationMetrics, mean_over_volumes, normalize_spacing,
                      segmentation_metrics)

__all__ = [
    "EvaluationResult",
    "ImageEvaluation",
    "binary_decision_logits",
    "evaluate_images",
    "evaluate_volumes",
    "predict_volume",
    "save_nifti",
    "zoom_nearest",
    "zoom_order0_indices",
]

PredictFn = Callable[[torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=512)
def zoom_order0_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index and validity of each output index of scipy's order-0 zoom along one axis.

    Returns ``(index int64 [n_out], valid bool [n_out])``; invalid outputs take ``cval = 0``.
    The arithmetic is scipy's (float64 ``(n_in-1)/(n_out-1)``, times ``k``, ``floor(+0.5)``),
    so ties and the last-index overflow resolve as they do there.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"zoom sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    step = np.float64(n_in - 1) / np.float64(n_out - 1) if n_out > 1 else np.float64(1.0)
    coord = np.arange(n_out, dtype=np.float64) * step
    valid = ~(coord > n_in - 1)
    index = np.clip(np.floor(coord + 0.5).astype(np.int64), 0, n_in - 1)
    index.setflags(write=False)
    valid.setflags(write=False)
    return index, valid


def zoom_nearest(x: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """Resize the last two dims of ``x [..., H, W]`` to ``out_hw`` like
    ``scipy.ndimage.zoom(x, (h/H, w/W), order=0)`` (any dtype, any device)."""
    if x.ndim < 2:
        raise ValueError(f"zoom_nearest needs [..., H, W], got shape {tuple(x.shape)}")
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], (int(out_hw[0]), int(out_hw[1]))
    ih, iw, keep_hw = _zoom_gather(h_in, w_in, h_out, w_out, x.device)
    out = x.index_select(-2, ih).index_select(-1, iw)
    if keep_hw is not None:
        out = torch.where(keep_hw, out, torch.zeros((), dtype=out.dtype, device=x.device))
    return out


@functools.lru_cache(maxsize=64)
def _zoom_gather(h_in: int, w_in: int, h_out: int, w_out: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Device copies of the row/column indices and the cval mask (None when all valid),
    cached so a volume's slices cost no host-to-device index transfers."""
    ih, vh = zoom_order0_indices(h_in, h_out)
    iw, vw = zoom_order0_indices(w_in, w_out)
    keep = None if (vh.all() and vw.all()) else torch.tensor(vh[:, None] & vw[None, :],
                                                            device=device)
    return torch.tensor(ih, device=device), torch.tensor(iw, device=device), keep


def _resolve_device(volume: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(volume, torch.Tensor):
        return volume.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_volume(predict_fn: PredictFn, volume_DHW: np.ndarray | torch.Tensor, *,
                   img_size: Sequence[int] = (256, 256), batch_size: int = 16,
                   device: torch.device | str | None = None,
                   in_channels: int = 3) -> torch.Tensor:
    """Slice-wise prediction of a ``[D, H, W]`` volume → int64 ``[D, H, W]`` label map.

    predict_fn: ``x [N, in_channels, *img_size] float32 → logits [N, C, *img_size]``; put the
      model in eval mode (and wrap autocast) yourself. The gray slice is repeated over
      ``in_channels``. Labels are ``argmax softmax(logits.float())`` as in the reference (the
      softmax is kept so float32 ties resolve the same way).
    device: where slices are resized and the network runs (default: the volume's device for a
      tensor, else CUDA when available). The result stays on that device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    dev = _resolve_device(volume_DHW, device)
    vol = (volume_DHW if isinstance(volume_DHW, torch.Tensor)
           else torch.from_numpy(np.ascontiguousarray(volume_DHW)))
    if vol.ndim != 3:
        raise ValueError(f"volume_DHW must be [D, H, W], got shape {tuple(vol.shape)}")
    vol = vol.to(dev)
    size = (int(img_size[0]), int(img_size[1]))
    depth, height, width = vol.shape
    pred_DHW = torch.empty((depth, height, width), dtype=torch.int64, device=dev)
    with torch.no_grad():
        for start in range(0, depth, batch_size):
            # zoom first, then cast: the reference zooms the stored dtype and calls .float().
            x_NHW = zoom_nearest(vol[start:start + batch_size], size).to(torch.float32)
            x_NCHW = x_NHW[:, None].expand(-1, in_channels, -1, -1).contiguous()
            logits = predict_fn(x_NCHW)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"predict_fn returned {type(logits).__name__}; it must return "
                                f"one logits tensor [N, C, {size[0]}, {size[1]}] (wrap models "
                                f"that return tuples, e.g. lambda x: model(x)[-1])")
            if logits.ndim != 4 or logits.shape[0] != x_NCHW.shape[0] \
                    or tuple(logits.shape[2:]) != size:
                raise ValueError(f"predict_fn returned shape {tuple(logits.shape)} for input "
                                 f"{tuple(x_NCHW.shape)}; expected [N, C, {size[0]}, {size[1]}]")
            labels_NHW = torch.softmax(logits.float(), dim=1).argmax(dim=1)
            pred_DHW[start:start + batch_size] = zoom_nearest(labels_NHW, (height, width))
    return pred_DHW


@dataclass(frozen=True)
class EvaluationResult:
    """Per-volume metrics and their mean over volumes (``summary``)."""

    names: tuple[str, ...]
    per_volume: tuple[SegmentationMetrics, ...]
    summary: SegmentationMetrics

    def mean(self) -> dict[str, float]:
        """Mean over classes of the per-class means over volumes (the reference's number)."""
        return self.summary.mean()

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary.as_dict(),
            "volumes": {n: r.as_dict() for n, r in zip(self.names, self.per_volume)},
        }


def evaluate_volumes(predict_fn: PredictFn,
                     volumes: Iterable[tuple[Any, ...]], num_classes: int, *,
                     img_size: Sequence[int] = (256, 256), batch_size: int = 16,
                     device: torch.device | str | None = None,
                     spacing: float | Sequence[float] | None = None, mode: Mode = "medpy",
                     dice_only: bool = False, save_dir: str | Path | None = None,
                     in_channels: int = 3) -> EvaluationResult:
    """Predict and score volumes: the reference's validation (``dice_only=True``: Dice per
    class 1..C−1, 0 for an absent predicted class) or its test protocol (Dice, Jaccard, HD95,
    ASD in voxel units); means per class over volumes, then over classes (``.mean()``).

    volumes: ``(name, image [D,H,W], label [D,H,W])`` or ``(name, image, label, spacing)``
      items; a per-item spacing overrides ``spacing`` (use it with ``mode="strict"``).
    save_dir: when given, writes ``<name>_pred/_img/_gt.nii.gz`` (needs nibabel).
    """
    def predict(name: str, image: Any) -> torch.Tensor:
        return predict_volume(predict_fn, image, img_size=img_size, batch_size=batch_size,
                              device=device, in_channels=in_channels)

    return score_items(volumes, predict, num_classes, spacing=spacing, mode=mode,
                       dice_only=dice_only, save_dir=save_dir, save=save_nifti, what="volume")


def score_items(items: Iterable[tuple[Any, ...]], predict: Callable[[str, Any], torch.Tensor],
                num_classes: int, *, spacing: float | Sequence[float] | None, mode: Mode,
                dice_only: bool, save_dir: str | Path | None,
                save: Callable[[Path, Any, Any], None], what: str = "volume",
                ndim: int | None = None, empty_pred_distance: float = 0.0) -> EvaluationResult:
    """The scoring loop shared by the volume protocols: per ``(name, image, label[, spacing])``
    item, ``predict(name, image)`` → class map, `segmentation_metrics` against the label (a
    per-item spacing overrides ``spacing``), optional ``<name>_pred/_img/_gt.nii.gz`` through
    ``save(path, array, spacing)``; the mean over items in ``summary``."""
    names: list[str] = []
    results: list[SegmentationMetrics] = []
    for item in items:
        if len(item) not in (3, 4):
            raise ValueError(f"{what} items must be (name, image, label[, spacing]); got "
                             f"{len(item)} fields")
        name, image, label = str(item[0]), item[1], item[2]
        item_spacing = item[3] if len(item) == 4 else spacing
        if tuple(np.shape(image)) != tuple(np.shape(label)):
            raise ValueError(f"{what} {name!r}: image shape {tuple(np.shape(image))} != label "
                             f"shape {tuple(np.shape(label))}")
        if ndim is not None and len(np.shape(image)) != ndim:
            raise ValueError(f"{what} {name!r}: expected {ndim}-D image and label, got shape "
                             f"{tuple(np.shape(image))}")
        pred = predict(name, image)
        results.append(segmentation_metrics(pred, label, num_classes, spacing=item_spacing,
                                            mode=mode, distances=not dice_only,
                                            empty_pred_distance=empty_pred_distance))
        names.append(name)
        if save_dir is not None:
            out = Path(save_dir)
            out.mkdir(parents=True, exist_ok=True)
            save(out / f"{name}_pred.nii.gz", pred, item_spacing)
            save(out / f"{name}_img.nii.gz", image, item_spacing)
            save(out / f"{name}_gt.nii.gz", label, item_spacing)
    if not results:
        raise ValueError(f"no {what}s to evaluate")
    return EvaluationResult(names=tuple(names), per_volume=tuple(results),
                            summary=mean_over_volumes(results))


def save_nifti(path: str | Path, volume: np.ndarray | torch.Tensor,
               spacing: float | Sequence[float] | None = None) -> Path:
    """Write a ``[D, H, W]`` volume as NIfTI; ``spacing`` is per array axis ``(D, H, W)``.

    Axes are stored as (x, y, z) = (W, H, D), the layout SimpleITK's ``GetImageFromArray``
    gives the reference's output, so viewers show the same orientation.
    """
    try:
        import nibabel as nib
    except ImportError as err:  # optional dependency
        raise ImportError("save_nifti needs nibabel: pip install 'ucseg-fast[nifti]'") from err
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if arr.ndim != 3:
        raise ValueError(f"save_nifti({path}): expected [D, H, W], got shape {arr.shape}")
    sp = normalize_spacing(spacing, 3) or (1.0, 1.0, 1.0)
    if arr.dtype.kind in "iub":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            arr = arr.astype(np.int16)
        else:
            arr = arr.astype(np.uint8)
    else:
        arr = arr.astype(np.float32)
    affine = np.diag([sp[2], sp[1], sp[0], 1.0])
    path = Path(path)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), affine), str(path))
    return path


# ------------------------------------------------------------------------------------------
# 2D generic protocol: per-image prediction of colour / gray images (docs/method.md §4).
# ------------------------------------------------------------------------------------------
def binary_decision_logits(logits_NCHW: torch.Tensor) -> torch.Tensor:
    """Two-channel logits whose ``argmax softmax`` is the binary rule ``σ(P)[:, 1] > 0.5``.

    Lets the slice-wise volume path (which takes ``argmax softmax``) serve sigmoid-trained
    models unchanged: the fp32 σ compare is made here (``σ`` rounds to exactly 0.5 for
    0 < P ≲ 1.2e-7, so ``P_1 > 0`` would differ) and turned into ±1 logits, far from a tie.
    """
    fg_NHW = torch.sigmoid(logits_NCHW[:, 1].float()) > 0.5
    one = torch.ones_like(logits_NCHW[:, 1], dtype=torch.float32)
    return torch.stack([torch.where(fg_NHW, -one, one), torch.where(fg_NHW, one, -one)], 1)


def _nearest_torch(x: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """OpenCV INTER_NEAREST resize of the last two dims (the training cache's rule,
    `ucseg_fast.data.ssl4mis.cv2_nearest_indices`) on the tensor's device."""
    from ..data.ssl4mis import cv2_nearest_indices

    h, w = x.shape[-2:]
    if (h, w) == (int(out_hw[0]), int(out_hw[1])):
        return x
    rows = torch.as_tensor(cv2_nearest_indices(h, int(out_hw[0])), device=x.device)
    cols = torch.as_tensor(cv2_nearest_indices(w, int(out_hw[1])), device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


@dataclass(frozen=True)
class ImageEvaluation:
    """Per-image Dice (and Jaccard) of the 2D generic protocol; ``dice``/``jaccard`` are the
    means over images (the reference's "avg_dice", "avg_iou")."""

    names: tuple[str, ...]
    dice_per_image: tuple[float, ...]
    jaccard_per_image: tuple[float, ...]

    @property
    def dice(self) -> float:
        return float(np.mean(self.dice_per_image))

    @property
    def jaccard(self) -> float:
        return float(np.mean(self.jaccard_per_image))

    def mean(self) -> dict[str, float]:
        return {"dice": self.dice, "jaccard": self.jaccard}


def evaluate_images(predict_fn: PredictFn, items: Iterable[tuple[Any, Any, Any]],
                    num_classes: int, *, img_size: Sequence[int] = (224, 224),
                    batch_size: int = 16, device: torch.device | str | None = None,
                    binary: bool = False, in_channels: int = 3,
                    resolution: str = "model") -> ImageEvaluation:
    """Per-image validation of image folders (the reference's 2D-generic protocol, docs/method.md §4).

    items: ``(name, image [C, H, W] float, label [H, W] int)``; images may differ in size.
    Each image is resized to ``img_size`` with OpenCV's nearest rule (the training cache's),
    a gray image is repeated over ``in_channels``; prediction = ``σ(P)[:, 1] > 0.5``
    (``binary``, sigmoid-trained) or ``argmax softmax(P)``. ``resolution="model"`` scores at
    ``img_size`` against the label resized the same way (the reference: metrics at 224²);
    ``"original"`` resizes the prediction back to the label's size instead.
    Per image: medpy ``dc`` (0 when prediction and label are both empty) per class 1..C−1,
    averaged over classes (one class when binary); Jaccard likewise (0 for empty-vs-empty).
    """
    if resolution not in ("model", "original"):
        raise ValueError(f"evaluate_images: resolution must be 'model' or 'original', got "
                         f"{resolution!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    size = (int(img_size[0]), int(img_size[1]))
    classes = [1] if binary else list(range(1, num_classes))
    names: list[str] = []
    dice: list[torch.Tensor] = []
    jac: list[torch.Tensor] = []

    def score(pred_HW: torch.Tensor, label_HW: torch.Tensor) -> None:
        d, j = [], []
        for c in classes:
            p, g = pred_HW == c, label_HW == c
            inter = (p & g).sum().double()
            tot = p.sum().double() + g.sum().double()
            union = tot - inter
            d.append(torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.zeros_like(tot)))
            j.append(torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(tot)))
        dice.append(torch.stack(d).mean())
        jac.append(torch.stack(j).mean())

    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        x_NCHW = torch.stack([x for _, x, _ in pending])
        with torch.no_grad():
            logits = predict_fn(x_NCHW)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4 \
                or logits.shape[0] != x_NCHW.shape[0] or tuple(logits.shape[2:]) != size:
            raise ValueError(f"predict_fn returned {getattr(logits, 'shape', type(logits))} for "
                             f"input {tuple(x_NCHW.shape)}; expected [N, C, {size[0]}, {size[1]}]")
        if binary:
            pred_NHW = (torch.sigmoid(logits[:, 1].float()) > 0.5).long()
        else:
            pred_NHW = torch.softmax(logits.float(), dim=1).argmax(dim=1)
        for (name, _, label_HW), pred_HW in zip(pending, pred_NHW):
            if resolution == "model":
                score(pred_HW, _nearest_torch(label_HW, size))
            else:
                score(_nearest_torch(pred_HW, label_HW.shape), label_HW)
            names.append(name)
        pending.clear()

    for item in items:
        if len(item) < 3:
            raise ValueError(f"image items must be (name, image [C,H,W], label [H,W]); got "
                             f"{len(item)} fields")
        name, image, label = str(item[0]), item[1], item[2]
        img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        lab = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3 or lab.ndim != 2 or tuple(img.shape[1:]) != tuple(lab.shape):
            raise ValueError(f"image {name!r}: need image [C, H, W] and label [H, W] of the same "
                             f"size, got {tuple(img.shape)} and {tuple(lab.shape)}")
        if img.shape[0] not in (1, in_channels):
            raise ValueError(f"image {name!r}: {img.shape[0]} channels, model takes {in_channels}")
        x = _nearest_torch(img.to(dev, torch.float32), size)
        if x.shape[0] == 1:
            x = x.expand(in_channels, -1, -1)
        pending.append((name, x.contiguous(), lab.to(dev, torch.int64)))
        if len(pending) == batch_size:
            flush()
    flush()
    if not names:
        raise ValueError("evaluate_images got no images")
    d_host = torch.stack(dice).cpu().tolist()  # one transfer for the whole validation set
    j_host = torch.stack(jac).cpu().tolist()
    return ImageEvaluation(names=tuple(names), dice_per_image=tuple(d_host),
                           jaccard_per_image=tuple(j_host))
