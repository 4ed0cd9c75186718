"""SSL4MIS / UA-MT HDF5 volume reader for the 3D trainer (LA 2018, Pancreas-NIH).

Layouts (docs/method.md §3, "File formats"; the reference's LA / Pancreas dataset class)::

    <root>/train.list, test.list, ...              one case name a line
    <root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5   LA (UA-MT layout)
    <root>/<case>/mri_norm2.h5                     LA with the lists inside the training folder
    <root>/Pancreas_h5/<case>_norm.h5              Pancreas-NIH
    <root>/data/<case>.h5, <root>/<case>.h5        generic SSL4MIS volumes

Every file holds datasets ``image`` (float32, z-score normalised) and ``label`` (uint8) of the
same 3-D shape ``[X, Y, Z]`` (about ``[180, 140, 88]`` for LA). Labeled data are the first ``n_l``
lines of ``train.list`` (LA 10 %: 8 of 80), the rest unlabeled. With ``val_holdout = k`` the last
``k`` lines of ``train.list`` are the validation volumes instead (split ``"val"``): they are left
out of training altogether, neither labeled nor unlabeled. h5py is imported lazily.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .guards import check_file
from .ssl4mis import read_h5_pair

__all__ = ["VolumeDataset", "VolumeNotFoundError"]


class VolumeNotFoundError(DataError, FileNotFoundError):
    """No file of a listed case exists in any known layout (a `DataError` and a `FileNotFoundError`)."""


def _layouts(root: Path, name: str) -> list[Path]:
    """Candidate files of one case, in lookup order (first existing wins)."""
    return [
        root / "2018LA_Seg_Training Set" / name / "mri_norm2.h5",
        root / name / "mri_norm2.h5",
        root / "Pancreas_h5" / f"{name}_norm.h5",
        root / "data" / f"{name}.h5",
        root / f"{name}.h5",
    ]


class VolumeDataset:
    """Reader of one 3D SSL4MIS / UA-MT folder.

    Args:
        root: the folder holding ``train.list`` (and optionally ``test.list``) and the volumes.
        num_classes: every label read is checked to be in ``[0, num_classes)`` (LA, Pancreas: 2).
        val_holdout: the last ``val_holdout`` lines of ``train.list`` are the validation volumes
            (`held_out_volumes`, split ``"val"`` of `split_volumes`) and are not training volumes
            (`train_volumes`); 0 = every line trains and ``"val"`` is ``<root>/val.list``.
    """

    def __init__(self, root: str | os.PathLike[str], num_classes: int = 2, val_holdout: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"3D dataset root not found: {self.root}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(val_holdout, bool) or int(val_holdout) < 0:
            raise ValueError(f"data.val_holdout = {val_holdout!r} must be >= 0")
        self.num_classes = int(num_classes)
        self.val_holdout = int(val_holdout)
        self._lists: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ lists and paths
    def volumes(self, split: str) -> list[str]:
        """Case names of ``<root>/<split>.list`` in file order (stripped, blank lines skipped)."""
        if not split or "/" in split or "\\" in split:
            raise ValueError(f"split must be a plain list name such as 'train' or 'test', got {split!r}")
        if split not in self._lists:
            path = self.root / f"{split}.list"
            if not os.path.lexists(path):
                raise FileNotFoundError(f"split list not found: {path}")
            check_file(path, "split list")
            names = [line.strip() for line in path.read_text().splitlines()]
            names = [n for n in names if n]
            if not names:
                raise DataError(f"{path}: the list is empty")
            self._lists[split] = names
        return list(self._lists[split])

    def _split_train_list(self) -> tuple[list[str], list[str]]:
        """``train.list`` cut into (training lines, the last ``val_holdout`` lines)."""
        names = self.volumes("train")
        k = self.val_holdout
        if k >= len(names):
            raise DataError(f"{self.root / 'train.list'}: data.val_holdout = {k} holds out its last {k} "
                            f"lines, but the list has only {len(names)} volumes: none would be left to "
                            f"train on")
        return names[:len(names) - k], names[len(names) - k:]

    @property
    def train_volumes(self) -> list[str]:
        """Training case names: the lines of ``train.list`` in file order (the labeled ones first),
        without the last ``val_holdout`` lines."""
        return self._split_train_list()[0]

    @property
    def held_out_volumes(self) -> list[str]:
        """The validation case names taken from ``train.list``: its last ``val_holdout`` lines, in
        file order (empty when ``val_holdout = 0``)."""
        return self._split_train_list()[1] if self.val_holdout else []

    def split_volumes(self, split: str) -> list[str]:
        """Case names an evaluation of ``split`` reads: ``"val"`` with ``val_holdout > 0`` is the
        held-out tail of ``train.list`` (`held_out_volumes`); any other split (and ``"val"``
        without a hold-out) is ``<root>/<split>.list`` (`volumes`)."""
        if split == "val" and self.val_holdout:
            return self.held_out_volumes
        return self.volumes(split)

    def path(self, name: str) -> Path:
        """The file of case ``name``: the first existing of the known layouts (module docstring). A
        candidate that exists but is broken (a directory, a dangling symlink, a loop) is reported
        as such (`guards.check_file`), not skipped."""
        candidates = _layouts(self.root, name.strip())
        for path in candidates:
            if os.path.lexists(path):
                check_file(path, f"HDF5 file of case {name.strip()!r}")
                return path
        tried = "\n  ".join(str(p) for p in candidates)
        raise VolumeNotFoundError(f"no HDF5 file for case {name!r} under {self.root}; tried:\n  {tried}")

    # ------------------------------------------------------------------ reading
    def read_volume(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One case: image float32 ``[X, Y, Z]``, label int64 ``[X, Y, Z]`` (validated)."""
        image, label = self._read(self.path(name))
        return image, label.astype(np.int64, copy=False)

    def load_volumes(self, names: Sequence[str] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Read volumes into the training cache (default: ``train_volumes``, in list order).

        Returns:
            ``images`` float32 and ``labels`` uint8 CPU tensors ``[X_i, Y_i, Z_i]`` (sizes differ
            between volumes; full LA: 80 x ~2.3 M voxels x 5 B = ~0.9 GB).
        """
        names = self.train_volumes if names is None else list(names)
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for name in names:
            path = self.path(name)
            image, label = self._read(path)
            if int(label.max()) > 255:
                raise DataError(f"{path}: 'label' value {int(label.max())} does not fit the uint8 cache")
            images.append(torch.from_numpy(np.ascontiguousarray(image)))
            labels.append(torch.from_numpy(np.ascontiguousarray(label.astype(np.uint8, copy=False))))
        return images, labels

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return read_h5_pair(path, 3, self.num_classes)

    def __repr__(self) -> str:
        return (f"VolumeDataset(root={str(self.root)!r}, num_classes={self.num_classes}, "
                f"val_holdout={self.val_holdout})")
