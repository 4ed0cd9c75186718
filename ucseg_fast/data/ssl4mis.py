"""SSL4MIS-layout HDF5 reader (ACDC slices and volumes) and the in-memory slice cache.

Layout (the de-facto standard of semi-supervised medical segmentation, docs/method.md §3)::

    <root>/train_slices.list       one slice name a line, e.g. ``patient099_frame01_slice_15``
    <root>/val.list, test.list     one volume name a line, e.g. ``patient028_frame01``
    <root>/data/slices/<name>.h5   datasets ``image`` float32 [H, W], ``label`` uint8 [H, W]
    <root>/data/<name>.h5          datasets ``image`` float32 [D, H, W], ``label`` uint8 [D, H, W]

Labeled data are the first ``n_l`` lines of ``train_slices.list`` (``LABELED_SLICES`` maps the
number of labeled patients to ``n_l``), the rest is unlabeled. Training reads every slice once
into memory (`SSL4MISDataset.load_slices`), resized to 256x256 with OpenCV's nearest rule, which
is the reference's first transform (``Resize(256, 256, INTER_NEAREST)`` for image *and* mask).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DataPathError
from .guards import check_file

__all__ = [
    "LABELED_SLICES",
    "DataError",
    "DataPathError",
    "SSL4MISDataset",
    "cv2_nearest_indices",
    "labeled_slice_count",
    "patient_of",
    "read_h5_pair",
    "resize_nearest",
    "slices_of_first_patients",
]

#: Labeled patients -> labeled slices of the SSL4MIS ACDC ``train_slices.list`` (its
#: ``patients_to_slices``). 140 is the reference table's alias for "all 70 patients".
LABELED_SLICES: dict[int, int] = {
    3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312, 140: 1312,
}

_SPLITS = ("val", "test")


def labeled_slice_count(patients: int) -> int:
    """Number of labeled ACDC slices for ``patients`` labeled patients (SSL4MIS table)."""
    try:
        return LABELED_SLICES[int(patients)]
    except (KeyError, TypeError, ValueError):
        allowed = ", ".join(str(k) for k in LABELED_SLICES)
        raise ValueError(
            f"labeled patients = {patients!r} is not in the SSL4MIS ACDC table; allowed: {allowed}"
        ) from None


def patient_of(name: str) -> str:
    """``'patient099_frame01_slice_15'`` -> ``'patient099'``."""
    return name.split("_", 1)[0]


def slices_of_first_patients(names: Sequence[str], patients: int) -> int:
    """Lines of ``names`` that belong to the first ``patients`` distinct patients, in list order.

    Works for any list whose slices are grouped by patient (SSL4MIS's and the synthetic one),
    so a custom split does not need a hand-made table.
    """
    if patients < 0:
        raise ValueError(f"patients must be >= 0, got {patients}")
    seen: list[str] = []
    for i, name in enumerate(names):
        p = patient_of(name)
        if not seen or seen[-1] != p:
            if p in seen:
                raise ValueError(f"slice list is not grouped by patient: {p} reappears at line {i + 1}")
            if len(seen) == patients:
                return i
            seen.append(p)
    if len(seen) < patients:
        raise ValueError(f"the slice list names only {len(seen)} patients, {patients} requested")
    return len(names)


def cv2_nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of every destination index under ``cv2.resize(..., INTER_NEAREST)``.

    OpenCV (``resizeNN``) computes ``inv_scale = dst / src`` and ``ifx = 1 / inv_scale`` in
    double precision and picks ``min(floor(i * ifx), src - 1)`` -- the *corner-aligned* rule,
    not the pixel-centre one (``INTER_NEAREST_EXACT`` / PIL). Reproduced bit for bit here,
    including the double rounding of ``1 / (dst / src)``.
    """
    if src < 1 or dst < 1:
        raise ValueError(f"sizes must be >= 1, got src={src}, dst={dst}")
    ifx = 1.0 / (float(dst) / float(src))
    idx = np.floor(np.arange(dst, dtype=np.float64) * ifx).astype(np.int64)
    return np.minimum(idx, src - 1)


def resize_nearest(array_HW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes to ``size = (H, W)`` with OpenCV's INTER_NEAREST rule."""
    h, w = array_HW.shape[-2:]
    if (h, w) == tuple(size):
        return array_HW  # albumentations' resize returns the input unchanged
    rows = cv2_nearest_indices(h, size[0])
    cols = cv2_nearest_indices(w, size[1])
    # two 1-D takes: the same pixels as array[..., rows[:, None], cols[None, :]], ~3x faster
    return np.take(np.take(array_HW, rows, axis=-2), cols, axis=-1)


def _clean_name(line: str) -> str:
    name = line.strip()
    return name[:-3] if name.endswith(".h5") else name


def read_h5_pair(path: Path, ndim: int, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The validated ``image`` / ``label`` pair of one SSL4MIS / UA-MT HDF5 file: image float32,
    label in its stored integer dtype (int64 for integral floats). Every problem is a
    `DataError` (FileNotFoundError for a missing file) naming the file: unreadable HDF5, a
    missing dataset, not ``ndim``-D, shapes differing, an empty array, a non-numeric or
    non-finite image, non-integer labels, a label outside ``[0, num_classes)``."""
    import h5py  # lazy: the rest of the data package (sampler, augmentation) runs without it

    check_file(path, "HDF5 file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    arrays: dict[str, np.ndarray] = {}
    with h5:
        for key in ("image", "label"):
            node = h5.get(key)
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{path}: missing dataset '{key}' (found: {sorted(h5.keys())})")
            try:
                arrays[key] = np.asarray(node[()])
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(f"{path}: cannot read dataset '{key}' ({exc})") from exc
    image, label = arrays["image"], arrays["label"]
    if image.ndim != ndim or label.ndim != ndim:
        raise DataError(
            f"{path}: expected {ndim}-D 'image' and 'label', got shapes {image.shape} and {label.shape}"
        )
    if image.shape != label.shape:
        raise DataError(f"{path}: 'image' shape {image.shape} != 'label' shape {label.shape}")
    if min(image.shape) < 1:
        raise DataError(f"{path}: empty array of shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise DataError(f"{path}: 'image' has non-numeric dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise DataError(f"{path}: 'image' holds NaN or infinite values")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.issubdtype(label.dtype, np.floating) or not np.array_equal(label, np.round(label)):
            raise DataError(f"{path}: 'label' must hold integer class ids, got dtype {label.dtype}")
        label = label.astype(np.int64)
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = lo if lo < 0 else hi
        raise DataError(f"{path}: 'label' value {bad} outside [0, num_classes={num_classes})")
    return image.astype(np.float32, copy=False), label


class SSL4MISDataset:
    """Reader of one SSL4MIS-layout folder (ACDC).

    Args:
        root: the folder holding ``train_slices.list``, ``val.list`` and ``data/``.
        num_classes: when given, every label read is checked to be in ``[0, num_classes)``.
        check_files: verify at construction that every file named by the list files present
            exists, so a missing file fails now, not after an hour of training.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, num_classes: int | None = None, check_files: bool = True
    ) -> None:
        self.root = Path(root)
        self.num_classes = num_classes
        if not self.root.is_dir():
            raise FileNotFoundError(f"SSL4MIS dataset root not found: {self.root}")
        self.data_dir = self.root / "data"
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"SSL4MIS data folder not found: {self.data_dir}")
        self._lists: dict[str, list[str]] = {}
        if check_files:
            for split in ("train_slices", *_SPLITS):
                if os.path.lexists(self.root / f"{split}.list"):
                    for name in self._list(split):
                        check_file(self._path(split, name), "HDF5 file", listed_in=self.root / f"{split}.list")

    # ------------------------------------------------------------------ lists and paths
    def _list(self, split: str) -> list[str]:
        if split not in self._lists:
            path = self.root / f"{split}.list"
            if not os.path.lexists(path):
                hint = " (this set has no test split)" if split == "test" else ""
                raise FileNotFoundError(f"split list not found: {path}{hint}")
            check_file(path, "split list")
            names = [_clean_name(line) for line in path.read_text().splitlines()]
            self._lists[split] = [n for n in names if n]
            if not self._lists[split]:
                raise DataError(f"{path}: the list is empty")
        return self._lists[split]

    def _path(self, split: str, name: str) -> Path:
        if split == "train_slices":
            return self.data_dir / "slices" / f"{name}.h5"
        return self.data_dir / f"{name}.h5"

    @property
    def train_slices(self) -> list[str]:
        """Slice names of ``train_slices.list`` in file order (labeled ones first)."""
        return list(self._list("train_slices"))

    def volumes(self, split: str) -> list[str]:
        """Volume names of ``val.list`` or ``test.list``."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLITS)}")
        return list(self._list(split))

    # ------------------------------------------------------------------ reading
    def _read(self, path: Path, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        return read_h5_pair(path, ndim, self.num_classes)

    def read_slice(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One training slice at its stored size: image float32 ``[H, W]``, label int64 ``[H, W]``."""
        image, label = self._read(self._path("train_slices", _clean_name(name)), ndim=2)
        return image, label.astype(np.int64)

    def read_volume(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One volume: image float32 ``[D, H, W]``, label int64 ``[D, H, W]``."""
        image, label = self._read(self._path("val", _clean_name(name)), ndim=3)
        return image, label.astype(np.int64)

    def load_slices(
        self, names: Sequence[str] | None = None, size: tuple[int, int] = (256, 256)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and resize slices into one in-memory cache.

        Every slice goes through the reference's first transform, ``Resize(size, INTER_NEAREST)``
        (image and label; `resize_nearest`). Full ACDC: 1312 x 256² x (4 + 1) B = 430 MB.

        Returns:
            ``images_NHW`` float32 and ``labels_NHW`` uint8 CPU tensors, in the order of ``names``
            (default: ``train_slices``).
        """
        names = self.train_slices if names is None else [_clean_name(n) for n in names]
        h, w = int(size[0]), int(size[1])
        images_NHW = torch.empty((len(names), h, w), dtype=torch.float32)
        labels_NHW = torch.empty((len(names), h, w), dtype=torch.uint8)
        for i, name in enumerate(names):
            path = self._path("train_slices", name)
            image, label = self._read(path, ndim=2)
            if label.max(initial=0) > 255:
                raise DataError(f"{path}: 'label' value {int(label.max())} does not fit the uint8 cache")
            images_NHW[i] = torch.from_numpy(np.ascontiguousarray(resize_nearest(image, (h, w))))
            labels_NHW[i] = torch.from_numpy(np.ascontiguousarray(resize_nearest(label, (h, w)).astype(np.uint8)))
        return images_NHW, labels_NHW

    def __repr__(self) -> str:
        return f"SSL4MISDataset(root={str(self.root)!r}, num_classes={self.num_classes})"
