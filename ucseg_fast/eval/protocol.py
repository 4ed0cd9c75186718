"""The evaluation protocol of a configuration: which data, which inference, which metrics.

Training-time validation and `ucseg-fast eval` call the same two functions, so a checkpoint
is scored the same way wherever it is scored:
- SSL4MIS HDF5 and NIfTI volumes: slice-wise inference (docs/method.md §4, ACDC), per-class Dice
  (validation) or Dice / Jaccard / HD95 / ASD (evaluation) over classes 1..C-1;
- image folders: per-image inference at `img_size`, Dice / Jaccard per image (the 2D-generic
  protocol), mean over images;
- 3D (recipe "binary_3d", SSL4MIS / UA-MT or NIfTI volumes [X, Y, Z] as stored):
  sliding windows of `img_size` with strides `data.eval_stride_xy` / `eval_stride_z`, mean
  σ(P)[:, 1] > 0.5, the largest 26-connected component, Dice / Jaccard / HD95 / ASD of the
  foreground per case (docs/method.md §4; NIfTI items carry the header spacing (x, y, z), so
  distances are in its units, voxels for the HDF5 volumes);
- binary recipes: the prediction is σ(P)[:, 1] > 0.5, otherwise argmax.

Which volumes: split "val" is `<root>/val.list`, except for 3D SSL4MIS / UA-MT volumes with
`data.val_holdout = k > 0`, where it is the last k lines of train.list (which then do not train);
"test" is always `<root>/test.list`. `selection_warning` names a configuration that selects its
best checkpoint on the test split.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .inference import (EvaluationResult, ImageEvaluation, binary_decision_logits,
                        evaluate_images, evaluate_volumes)

PredictFn = Callable[[torch.Tensor], torch.Tensor]


def is_3d(cfg) -> bool:
    """True for a 3D recipe (volumes, 3D subnets: `cfg.spec.dims`)."""
    return cfg.spec.dims == 3


def open_dataset(cfg) -> Any:
    """The dataset object of `cfg.data` (SSL4MIS slices/volumes, image folder or NIfTI)."""
    dc = cfg.data
    if dc.format == "nifti":
        from ..data.nifti import NiftiDataset, resolve_intensity
        dims = 3 if is_3d(cfg) else 2
        return NiftiDataset(dc.root, num_classes=dc.num_classes, dims=dims,
                            normalize=resolve_intensity(getattr(dc, "intensity", "auto"), dims))
    if is_3d(cfg):
        from ..data.volumes import VolumeDataset
        return VolumeDataset(dc.root, num_classes=dc.num_classes,
                             val_holdout=dc.val_holdout)
    if dc.format == "folder":
        from ..data.folders import FolderDataset
        return FolderDataset(dc.root, num_classes=dc.num_classes, mask_mode=dc.mask_mode,
                             max_image_pixels=dc.max_image_pixels)
    from ..data.ssl4mis import SSL4MISDataset
    return SSL4MISDataset(dc.root, num_classes=dc.num_classes)


def evaluation_items(cfg, dataset: Any, split: str = "val",
                     limit: int | None = None) -> list[tuple[Any, ...]]:
    """`(name, image, label[, spacing])` items of `split`: volumes [D,H,W] (SSL4MIS, NIfTI),
    3D volumes [X,Y,Z] as stored (3D recipe; NIfTI: with spacing (x, y, z), label int64) or
    images [C,H,W] with labels [H,W] (folders). Image folders and NIfTI sets (2D and 3D) have
    one held-out split (folders: `val/`; NIfTI: `imagesVal/`, else `imagesTs/`). 3D SSL4MIS
    volumes with `data.val_holdout > 0`: "val" is the held-out tail of train.list (`dataset`
    from `open_dataset`), "test" is test.list."""
    fmt = cfg.data.format
    if fmt == "nifti":
        if split != "val":
            raise ValueError(f"{dataset.root}: NIfTI sets have one held-out split ('val': "
                             f"imagesVal/, else imagesTs/), not {split!r}")
        return dataset.val_volumes(limit)
    if is_3d(cfg):
        holdout, held = cfg.data.val_holdout, getattr(dataset, "val_holdout", 0)
        if holdout != held:
            raise ValueError(f"{dataset.root}: the dataset holds out {held} lines of train.list but "
                             f"data.val_holdout = {holdout}; open it with open_dataset(cfg)")
        names = dataset.split_volumes(split)[:limit]
        if not names:
            raise ValueError(f"{dataset.root}: {split}.list names no volume")
        return [(n, *dataset.read_volume(n)) for n in names]
    if fmt == "folder":
        if split != "val":
            raise ValueError(f"{dataset.root}: image folders have a 'val' split only, not {split!r}")
        items = []
        for path in dataset.images("val")[:limit]:
            image_CHW, label_HW = dataset.read_pair(path)
            items.append((path.stem, image_CHW, label_HW.astype("int64")))
        if not items:
            raise FileNotFoundError(f"{dataset.root / 'val' / 'image'}: no validation images")
        return items
    names = dataset.volumes(split)[:limit]
    return [(n, *dataset.read_volume(n)) for n in names]


def selection_warning(cfg) -> str | None:
    """One line when validation, which picks the best checkpoint, reads the test split
    (`data.val_split = "test"`, 2D or 3D): a test score of that checkpoint is then not a
    result. None otherwise."""
    if cfg.data.val_split != "test":
        return None
    return ("WARNING: validation reads test.list (data.val_split = 'test'): the best checkpoint "
            "is selected on the test split, so its test score is not a result; validate on "
            "val.list or, for 3D volumes, on data.val_holdout lines of train.list")


def evaluate(cfg, predict_fn: PredictFn, items: list[tuple[Any, ...]], *,
             device: torch.device, batch_size: int, dice_only: bool = False,
             mode: str = "medpy", save_dir: str | None = None
             ) -> EvaluationResult | ImageEvaluation:
    """Score `items` with the protocol of `cfg` (see the module docstring)."""
    binary = cfg.spec.binary
    img_size = tuple(cfg.data.img_size)
    if is_3d(cfg):
        from .sliding_window import evaluate_cases_3d
        return evaluate_cases_3d(predict_fn, items, patch=img_size,
                                 stride_xy=cfg.data.eval_stride_xy, stride_z=cfg.data.eval_stride_z,
                                 nms=True, batch_size=batch_size, device=device,
                                 dice_only=dice_only, mode=mode, save_dir=save_dir,
                                 in_channels=cfg.model.in_channels)
    if cfg.data.format == "folder":
        return evaluate_images(predict_fn, items, cfg.data.num_classes, img_size=img_size,
                               batch_size=batch_size, device=device, binary=binary,
                               in_channels=cfg.model.in_channels)
    fn = predict_fn
    if binary:
        fn = (lambda f: lambda x: binary_decision_logits(f(x)))(predict_fn)
    return evaluate_volumes(fn, items, cfg.data.num_classes, img_size=img_size,
                            batch_size=batch_size, device=device, dice_only=dice_only,
                            mode=mode, save_dir=save_dir, in_channels=cfg.model.in_channels)


def mean_dice(result: EvaluationResult | ImageEvaluation) -> float:
    return float(result.mean()["dice"])
