"""NIfTI image/label volume pairs (nibabel): the nnU-Net / Medical Segmentation Decathlon layout.

Layout (``data.format = "nifti"``)::

    <root>/imagesTr/<case>.nii.gz   or  <case>_0000.nii.gz   (nnU-Net channel suffix)
    <root>/labelsTr/<case>.nii.gz                            (label of a training case, optional)
    <root>/imagesVal/ + labelsVal/  (validation; falls back to imagesTs/ + labelsTs/)

or explicit lists (`NiftiDataset.from_lists`). Training cases in sorted order; like the SSL4MIS
split, the first ``data.labeled_patients`` cases *that have a label* are labeled, every other
case of ``imagesTr`` is unlabeled (its label, if any, is never read).

2D recipes (``dims=2``, the default): volumes are read as axial slices ``[D, H, W]``: nibabel's
``(x, y, z)`` array transposed to ``(z, y, x)``, the inverse of
`ucseg_fast.eval.inference.save_nifti`, with spacing ``(D, H, W)`` from the header zooms.
Images are min-max normalised per volume to [0, 1] (SSL4MIS's ACDC preprocessing).

3D recipe (``dims=3``, a 3-value ``data.img_size``): volumes are used as stored, ``[X, Y, Z]``
(nibabel's array order, no transpose: the 3D network's axes are the file's), spacing
``(x, y, z)`` from the header zooms, images z-score normalised per volume,
``(v - mean) / std`` (UA-MT's ``mri_norm2.h5`` preprocessing of the LA recipe; a constant
volume, std 0, is an error). `NiftiDataset.load_volumes` is the `VolumeStream` cache.

``normalize`` (``data.intensity``) overrides the per-volume scaling: ``"minmax"``,
``"zscore"`` or ``"none"`` (the stored values); `resolve_intensity` maps ``"auto"`` to minmax
(2D) or zscore (3D). Labels must hold integer values in ``[0, num_classes)``. A missing label,
an image/label shape mismatch, a volume that is not 3D, NaN / inf intensities, a non-integer
or out-of-range label or an unreadable file is a `DataError` naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .guards import check_file, fingerprint_lines
from .ssl4mis import resize_nearest

__all__ = ["NiftiDataset", "read_nifti", "resolve_intensity", "NIFTI_SUFFIXES", "INTENSITY_MODES"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# per-volume intensity scaling of the images (``data.intensity``; "auto" resolved by dims)
INTENSITY_MODES = ("auto", "minmax", "zscore", "none")
_NORMALIZE = ("minmax", "zscore", "none")


def resolve_intensity(intensity: str = "auto", dims: int = 2) -> str:
    """``data.intensity`` -> the `NiftiDataset` ``normalize`` mode: ``"auto"`` is ``"minmax"``
    for the 2D recipes (SSL4MIS's ACDC slices) and ``"zscore"`` for the 3D one (UA-MT's LA)."""
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {intensity!r}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    if intensity == "auto":
        return "zscore" if dims == 3 else "minmax"
    return intensity


def _case_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case`` (nnU-Net channel suffix dropped), ``case.nii`` -> ``case``."""
    name = path.name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    if name.endswith("_0000"):  # only nnU-Net's first channel: `pat_0001` stays `pat_0001`
        name = name[:-5]
    return name


def _extra_channel(path: Path) -> bool:
    """`case_0001.nii.gz` beside a `case_0000.nii.gz`: a further nnU-Net input channel (the
    model reads one channel, the first), not a case of its own."""
    stem = path.name
    for suf in NIFTI_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() and stem[-4:] != "0000":
        return any(os.path.lexists(path.parent / f"{stem[:-5]}_0000{s}") for s in NIFTI_SUFFIXES)
    return False


def _is_nifti(path: Path) -> bool:
    # by name: a broken entry (dangling symlink, folder named x.nii.gz) is listed and then reported
    # by `read_nifti` as what it is, instead of the case silently missing
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def read_nifti(path: str | os.PathLike[str], *, as_stored: bool = False
               ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Volume ``[D, H, W]`` (axial slices first; ``as_stored=True``: nibabel's ``[X, Y, Z]``) with
    its values as stored (no scaling beyond the header's slope/intercept) and its spacing in the
    same axis order. A 4D volume with one channel/time point is squeezed; others raise."""
    import nibabel as nib

    p = Path(path)
    check_file(p, "NIfTI file")
    try:
        img = nib.load(str(p))
        arr = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # nibabel raises several types (ImageFileError, EOFError, zlib ...)
        raise DataError(f"{p}: unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{p}: expected a 3D volume (x, y, z), got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise DataError(f"{p}: empty volume of shape {arr.shape}")
    sx, sy, sz = (zooms + (1.0, 1.0, 1.0))[:3]
    if as_stored:
        return np.ascontiguousarray(arr), (sx, sy, sz)
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), (sz, sy, sx)


class NiftiDataset:
    """Reader of NIfTI training / validation volumes (see the module docstring).

    Args:
        root: folder with ``imagesTr/`` (and ``labelsTr/``, ``imagesVal/``, ``labelsVal/``).
        num_classes: labels are checked against ``[0, num_classes)``.
        normalize: per-volume image scaling, ``"minmax"`` (to [0, 1]), ``"zscore"``
            (``(v - mean) / std``) or ``"none"``; ``None``/``"auto"``: minmax (2D), zscore (3D).
        dims: 2 (axial slices ``[D, H, W]``, the 2D recipes) or 3 (volumes ``[X, Y, Z]`` as
            stored, the 3D recipe).
    """

    def __init__(self, root: str | os.PathLike[str] | None, *, num_classes: int,
                 normalize: str | None = None, dims: int = 2) -> None:
        normalize = resolve_intensity("auto" if normalize is None else normalize, dims)
        if normalize not in _NORMALIZE:  # pragma: no cover - resolve_intensity checked it
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.num_classes = int(num_classes)
        self.normalize = normalize
        self.dims = int(dims)
        self.root = Path(root) if root is not None else None
        self._train: list[tuple[Path, Path | None]] = []
        self._val: list[tuple[Path, Path | None]] = []
        if self.root is not None:
            if not (self.root / "imagesTr").is_dir():
                raise FileNotFoundError(f"NIfTI dataset: {self.root / 'imagesTr'} not found (layout "
                                        "<root>/imagesTr/*.nii.gz + labelsTr/, nnU-Net / MSD)")
            self._train = self._scan("imagesTr", "labelsTr")
            if not self._train:
                raise DataError(f"{self.root / 'imagesTr'}: no .nii/.nii.gz files")
            for im, lab in (("imagesVal", "labelsVal"), ("imagesTs", "labelsTs")):
                if (self.root / im).is_dir():
                    self._val = [(i, l) for i, l in self._scan(im, lab)]
                    break

    @classmethod
    def from_lists(cls, images: Sequence[str | os.PathLike[str]],
                   labels: Sequence[str | os.PathLike[str] | None], *, num_classes: int,
                   val_images: Sequence[str | os.PathLike[str]] = (),
                   val_labels: Sequence[str | os.PathLike[str]] = (),
                   normalize: str | None = None, dims: int = 2) -> NiftiDataset:
        """Explicit pairs; ``labels[i] = None`` marks an unlabeled case."""
        if len(images) != len(labels) or len(val_images) != len(val_labels):
            raise ValueError(f"image/label lists differ in length: {len(images)} vs {len(labels)}, "
                             f"validation {len(val_images)} vs {len(val_labels)}")
        self = cls(None, num_classes=num_classes, normalize=normalize, dims=dims)
        self._train = [(Path(i), None if l is None else Path(l)) for i, l in zip(images, labels)]
        self._val = [(Path(i), Path(l)) for i, l in zip(val_images, val_labels)]
        return self

    def _scan(self, images: str, labels: str) -> list[tuple[Path, Path | None]]:
        assert self.root is not None
        out = []
        lab_dir = self.root / labels
        for p in sorted(q for q in (self.root / images).iterdir()
                        if _is_nifti(q) and not _extra_channel(q)):
            case = _case_name(p)
            lab = None
            for cand in (lab_dir / p.name, *(lab_dir / f"{case}{s}" for s in NIFTI_SUFFIXES)):
                if os.path.lexists(cand):  # a broken label file is reported when read, not dropped
                    lab = cand
                    break
            out.append((p, lab))
        return out

    # ------------------------------------------------------------------ listing
    def cases(self, split: str = "train") -> list[tuple[Path, Path | None]]:
        """``(image, label or None)`` pairs of ``train`` or ``val`` in sorted order."""
        if split == "train":
            return list(self._train)
        if split == "val":
            return list(self._val)
        raise ValueError(f"unknown split {split!r}; allowed: train, val")

    def labeled_split(self, labeled_cases: int) -> tuple[list[tuple[Path, Path]], list[Path]]:
        """The first ``labeled_cases`` labeled training cases, and every other training image."""
        labeled = [(i, l) for i, l in self._train if l is not None][:labeled_cases]
        taken = {i for i, _ in labeled}
        return labeled, [i for i, _ in self._train if i not in taken]  # type: ignore[misc]

    # ------------------------------------------------------------------ reading
    @property
    def _axes(self) -> str:
        return "(X, Y, Z)" if self.dims == 3 else "(D, H, W)"

    def read_image(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Image float32 ``[D, H, W]`` (3D: ``[X, Y, Z]``), normalised, and its spacing."""
        vol, spacing = read_nifti(path, as_stored=self.dims == 3)
        if not np.issubdtype(vol.dtype, np.number):
            raise DataError(f"{path}: image dtype {vol.dtype} is not numeric")
        vol = vol.astype(np.float32)
        if not np.isfinite(vol).all():
            raise DataError(f"{path}: image holds NaN or inf values")
        if self.normalize == "minmax":
            lo, hi = float(vol.min()), float(vol.max())
            vol = (vol - lo) / max(hi - lo, 1e-12)
        elif self.normalize == "zscore":  # UA-MT: (image - mean) / std, population std
            mean, std = float(vol.mean(dtype=np.float64)), float(vol.std(dtype=np.float64))
            if not std > 0.0:
                raise DataError(f"{path}: constant image (std 0, value {mean:g}) cannot be z-score "
                                "normalised (data.intensity = 'zscore')")
            vol = ((vol.astype(np.float64) - mean) / std).astype(np.float32)
        return vol, spacing

    def read_label(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Label uint8 ``[D, H, W]`` (3D: ``[X, Y, Z]``); integer values in ``[0, num_classes)``
        (float storage is fine when every value is an integer)."""
        vol, _ = read_nifti(path, as_stored=self.dims == 3)
        if np.issubdtype(vol.dtype, np.floating):
            if not np.isfinite(vol).all() or not np.array_equal(vol, np.round(vol)):
                raise DataError(f"{path}: label holds non-integer values (a label map must be "
                                "class ids)")
        elif not np.issubdtype(vol.dtype, np.integer) and vol.dtype != np.bool_:
            raise DataError(f"{path}: label dtype {vol.dtype} is not integer")
        lo, hi = (float(vol.min()), float(vol.max())) if vol.size else (0.0, 0.0)
        if lo < 0 or hi >= self.num_classes:
            raise DataError(f"{path}: label value {int(hi) if hi >= self.num_classes else int(lo)} "
                            f"outside the class set [0, {self.num_classes})")
        return vol.astype(np.uint8)

    def read_pair(self, image: str | os.PathLike[str], label: str | os.PathLike[str]
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """Image float32, label uint8 (``[D, H, W]``; 3D: ``[X, Y, Z]``), spacing; shapes checked."""
        vol, spacing = self.read_image(image)
        lab = self.read_label(label)
        if lab.shape != vol.shape:
            raise DataError(f"{label}: label shape {lab.shape} {self._axes} != image shape "
                            f"{vol.shape} of {image}")
        return vol, lab, spacing

    def val_volumes(self, limit: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray,
                                                                  tuple[float, float, float]]]:
        """``(name, image, label, spacing)`` of the validation cases: `evaluate_volumes` items
        (2D: image float32 / label uint8 ``[D, H, W]``) or `evaluate_cases_3d` items (3D: image
        float32 / label int64 ``[X, Y, Z]``, spacing ``(x, y, z)``)."""
        cases = self._val[:limit]
        if not cases:
            where = self.root if self.root is not None else "the explicit lists"
            raise FileNotFoundError(f"{where}: no validation volumes (imagesVal/ + labelsVal/ or "
                                    "imagesTs/ + labelsTs/)")
        out = []
        for img, lab in cases:
            if lab is None:
                raise DataError(f"{img}: validation image has no label")
            vol, y, sp = self.read_pair(img, lab)
            if self.dims == 3:
                y = y.astype(np.int64)
            out.append((_case_name(img), vol, y, sp))
        return out

    def load_volumes(self, labeled_cases: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, list[str]]:
        """3D training cache (``dims=3``; `VolumeStream.from_arrays`): images float32 and labels
        uint8 CPU tensors ``[X_i, Y_i, Z_i]`` (sizes may differ), the first ``labeled_cases``
        labeled training cases first, then every other case of ``imagesTr`` (label all zeros,
        its file never read); the labeled count and the case names in that order."""
        if self.dims != 3:
            raise ValueError("load_volumes reads [X, Y, Z] volumes: build the dataset with dims=3")
        where = self.root if self.root is not None else "NIfTI lists"
        labeled, unlabeled = self.labeled_split(labeled_cases)
        n_avail = sum(1 for _, l in self._train if l is not None)
        if labeled_cases < 1 or len(labeled) < labeled_cases:
            raise DataError(f"{where}: data.labeled_patients = {labeled_cases} labeled volumes asked, "
                            f"{n_avail} imagesTr case(s) have a label in labelsTr")
        if not unlabeled:
            raise DataError(f"{where}: every imagesTr case ({len(self._train)}) is labeled with "
                            f"data.labeled_patients = {labeled_cases}: no unlabeled volume left")
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        names: list[str] = []
        for img, lab in labeled:
            vol, y, _ = self.read_pair(img, lab)
            images.append(torch.from_numpy(vol))
            labels.append(torch.from_numpy(np.ascontiguousarray(y)))
            names.append(_case_name(img))
        for img in unlabeled:
            vol, _ = self.read_image(img)
            images.append(torch.from_numpy(vol))
            labels.append(torch.zeros(vol.shape, dtype=torch.uint8))
            names.append(_case_name(img))
        return images, labels, len(labeled), names

    def load_slices(self, labeled_cases: int, size: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Training cache: axial slices resized with OpenCV's nearest rule (the reference's first
        transform): images float32 ``[N, H, W]``, labels uint8 ``[N, H, W]`` (0 on unlabeled
        slices), and the labeled slice count (labeled slices first). 2D datasets only."""
        images, labels, n_l, _ = self.load_slices_named(labeled_cases, size)
        return images, labels, n_l

    def load_slices_named(self, labeled_cases: int, size: tuple[int, int]
                          ) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
        """`load_slices` plus one name per slice, ``<image file name>:<z>`` (the resume
        fingerprint's lines: `fingerprint`)."""
        if self.dims != 2:
            raise ValueError("load_slices cuts axial slices: build the dataset with dims=2")
        labeled, unlabeled = self.labeled_split(labeled_cases)
        if not labeled:
            raise DataError(f"{self.root or 'NIfTI lists'}: no labeled training case (labelsTr/ "
                            "missing or empty)")
        h, w = int(size[0]), int(size[1])
        imgs: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        names: list[str] = []
        for img, lab in labeled:
            vol, y, _ = self.read_pair(img, lab)
            imgs.append(resize_nearest(vol, (h, w)))
            labs.append(resize_nearest(y, (h, w)))
            names += [f"{img.name}:{z}" for z in range(vol.shape[0])]
        n_l = sum(a.shape[0] for a in imgs)
        for img in unlabeled:
            vol, _ = self.read_image(img)
            r = resize_nearest(vol, (h, w))
            imgs.append(r)
            labs.append(np.zeros(r.shape, np.uint8))
            names += [f"{img.name}:{z}" for z in range(vol.shape[0])]
        images = torch.from_numpy(np.ascontiguousarray(np.concatenate(imgs), dtype=np.float32))
        labels = torch.from_numpy(np.ascontiguousarray(np.concatenate(labs)))
        return images, labels, n_l, names

    def fingerprint(self, names: list[str], part: str) -> dict:
        """Content fingerprint of slice / case ``names`` (`guards.fingerprint_lines`), named after
        the training folder and ``part`` (``"labeled"`` / ``"unlabeled"``)."""
        where = str(self.root / "imagesTr") if self.root is not None else "NIfTI lists"
        return fingerprint_lines(names, f"{where} ({part} {'cases' if self.dims == 3 else 'slices'})")

    def __repr__(self) -> str:
        return (f"NiftiDataset(root={str(self.root) if self.root else None!r}, "
                f"num_classes={self.num_classes}, dims={self.dims}, normalize={self.normalize!r}, "
                f"train={len(self._train)}, val={len(self._val)})")
