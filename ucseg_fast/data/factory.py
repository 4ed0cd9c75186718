"""One entry point from the ``[data]`` config to a training stream (torch or DALI backend).

For the trainer::

    from ucseg_fast.data.factory import build_train_stream
    stream = build_train_stream(cfg.data, device=device, seed=cfg.train.seed, rank=rank,
                                world_size=world_size, channels=cfg.model.in_channels)
    batch = stream.next()                  # Batch(x_l [Bl,C,*S], y_l [Bl,*S] int64, x_u [Bu,C,*S])
    state = stream.state_dict()            # JSON; stream.load_state_dict(state) resumes exactly
    stream.epoch_length                    # floor(n_labeled / labeled_bs), the reference's epoch

Every returned stream is a `base.Stream`: ``next()``, ``__next__``, ``state_dict()``,
``load_state_dict()``, ``epoch_length``, ``img_size``, ``n_labeled``, ``skipped_files`` (files a
manifest skipped so far; 0 where nothing can be skipped) and ``close()``. This module only
selects and constructs: it opens the dataset once, reads what the stream caches, and hands
everything (cache, file lists, manifest, resume identity) to the stream's constructor.

Data safety (``[data]`` keys): ``max_image_pixels`` caps decoded images (checked from the header:
an error naming the file in folders, a skipped and counted file in manifests);
``decode_workers`` threads decode image files ahead of the step (manifests; unlabeled folders
too large to cache; the folder cache at start-up), without changing any batch;
``resume_changed_data`` lets a resume continue on lists whose content changed since the
checkpoint (every stream's state carries a fingerprint of its lists: ``train_slices.list``
lines, folder file names, NIfTI slices, ``train.list`` cases, manifest lines).

The recipe's dimensionality (``dims``; ``data.img_size`` has that many entries) picks the
stream: 2D ``(H, W)`` below, 3D ``(X, Y, Z)`` (docs/method.md §3, 3D column):

* 3D: ``format="ssl4mis"``, no ``unlabeled_manifest``: a `VolumeStream` over the UA-MT /
  SSL4MIS volume folder (`VolumeDataset`: LA ``2018LA_Seg_Training Set/<case>/
  mri_norm2.h5``, ``Pancreas_h5/<case>_norm.h5``, ...). Labeled = the first
  ``labeled_patients`` volumes of ``train.list`` (LA 10 %: 8), the rest unlabeled, except the
  last ``val_holdout`` lines: those are the validation volumes and never train;
  ``RandomRotFlip`` (off with ``augment = false``) then ``RandomCrop(img_size)``.
  ``backend="dali"``: a `DaliVolumeStream` (`dali3d`), the same draws and batches with the
  crop / rotation / flip done by DALI operators (GPU operators on a CUDA device).
* 3D, ``format="nifti"``: the same stream (`VolumeStream.from_arrays`, cache on the CPU) over
  ``<root>/imagesTr`` + ``labelsTr`` (`NiftiDataset` with ``dims=3``: volumes ``[X, Y, Z]`` as
  stored, z-score per volume unless ``data.intensity`` says otherwise): the first
  ``labeled_patients`` labeled cases are labeled, every other ``imagesTr`` case unlabeled.

2D:

* ``format="ssl4mis"``: labeled = slices of the first ``labeled_patients`` patients of
  ``train_slices.list``, the rest unlabeled (as the trainer does today).
* ``format="folder"``: labeled = ``<root>/labeled``, unlabeled = ``<root>/unlabeled``; RGB
  folders keep their 3 colour channels (cache ``[N, 3, H, W]``, never a repeated gray one).
  torch backend: the unlabeled images are cached on the device like the labeled ones when their
  decoded size is at most ``FOLDER_CACHE_MAX_BYTES`` (4 GiB); a larger unlabeled folder is
  decoded from its files for every step by ``decode_workers`` threads (`FolderTrainStream`):
  the same batches, the same state format.
* ``format="nifti"``: ``<root>/imagesTr`` + ``labelsTr`` (`NiftiDataset`): axial slices of the
  first ``labeled_patients`` labeled cases are labeled, every other case's slices unlabeled.
* ``unlabeled_manifest``: the unlabeled stream comes from that manifest instead (sharded by
  ``rank``/``world_size``; torch backend: decoded on the CPU, augmented on the device; DALI:
  decoded by DALI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import Identity, Stream
from .errors import DataError
from .folder_stream import FolderTrainStream
from .folders import FolderDataset
from .guards import DEFAULT_MAX_IMAGE_PIXELS, fingerprint_lines
from .manifest import ManifestStream
from .manifest_stream import ManifestTrainStream
from .ssl4mis import SSL4MISDataset, slices_of_first_patients
from .stream import TrainStream
from .stream3d import VolumeStream
from .volumes import VolumeDataset

__all__ = ["FOLDER_CACHE_MAX_BYTES", "ManifestTrainStream", "augment_kwargs", "build_train_stream", "safety_options"]

#: torch backend, image folders: the unlabeled split is cached on the device up to this decoded
#: size (N x C x H x W x 4 bytes), else streamed from its files (`FolderTrainStream`).
FOLDER_CACHE_MAX_BYTES = 4 << 30

_FORMATS_2D = ("ssl4mis", "folder", "nifti")
_BACKENDS = ("torch", "dali")


def safety_options(data: Any) -> tuple[int | None, int, bool]:
    """``(max_image_pixels, decode_workers, resume_changed_data)`` of a `DataConfig` (defaults for
    objects without them)."""
    cap = getattr(data, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    workers = int(getattr(data, "decode_workers", 2))
    if workers < 0:
        raise ValueError(f"data.decode_workers = {workers}; need >= 0 (0 = decode in the training thread)")
    return (int(cap) if cap else None), workers, bool(getattr(data, "resume_changed_data", False))


def augment_kwargs(data: Any) -> dict[str, Any]:
    """`augment_2d` keyword arguments from a `DataConfig` (all off when ``augment = false``)."""
    aug = dict(hflip_p=data.hflip_p, vflip_p=data.vflip_p, ssr_p=data.ssr_p, shift_limit=data.shift_limit,
               scale_limit=data.scale_limit, rotate_limit=data.rotate_limit, distort_p=data.distort_p,
               dropout_p=data.dropout_p)
    if not data.augment:
        aug.update(hflip_p=0.0, vflip_p=0.0, ssr_p=0.0, distort_p=0.0, dropout_p=0.0)
    return aug


# ---------------------------------------------------------------------------- 2D: reading
@dataclass
class _Cache2D:
    """What a 2D stream is built from: the cache (``images [N, H, W]`` or ``[N, C, H, W]``,
    ``labels [N, H, W]``; the first ``n_labeled`` labeled), the resume identity, and for an
    image folder the opened dataset and its unlabeled files (not cached yet)."""

    images: torch.Tensor
    labels: torch.Tensor
    n_labeled: int
    identity: Identity
    folder: FolderDataset | None = None
    unlabeled_files: list[Path] = field(default_factory=list)


def _open_2d(data: Any, cap: int | None) -> Any:
    """The dataset of ``data.format``, opened once (lists read and checked, nothing decoded)."""
    if data.format == "ssl4mis":
        return SSL4MISDataset(data.root, num_classes=data.num_classes)
    if data.format == "folder":
        return FolderDataset(data.root, num_classes=data.num_classes, mask_mode=data.mask_mode, max_image_pixels=cap)
    from .nifti import NiftiDataset, resolve_intensity

    return NiftiDataset(data.root, num_classes=data.num_classes,
                        normalize=resolve_intensity(getattr(data, "intensity", "auto"), 2))


def _read_2d(data: Any, ds: Any, size: tuple[int, int], workers: int, *, labeled_only: bool,
             resume_changed: bool) -> _Cache2D:
    """Read the cache of ``ds``; ``labeled_only``: the unlabeled data come from a manifest."""
    fp_unl: dict[str, Any] | None = None
    if data.format == "ssl4mis":
        names = ds.train_slices
        n_l = slices_of_first_patients(names, data.labeled_patients)
        if not labeled_only and n_l >= len(names):
            raise DataError(f"{data.root}: train_slices.list has {len(names)} slices, all labeled "
                            f"with {data.labeled_patients} patients: no unlabeled data")
        src = str(ds.root / "train_slices.list")
        fp_lab = fingerprint_lines(names[:n_l], f"{src} (labeled lines)")
        if labeled_only:
            names = names[:n_l]
        else:
            fp_unl = fingerprint_lines(names[n_l:], f"{src} (unlabeled lines)")
        images, labels = ds.load_slices(names, size=size)
        return _Cache2D(images, labels, n_l, Identity(fp_lab, fp_unl, resume_changed))
    if data.format == "folder":
        files = ds.labeled_files
        images, labels = ds.load_split("labeled", size, workers=workers, paths=files)
        fp_lab = ds.fingerprint("labeled", files)
        unlabeled: list[Path] = []
        if not labeled_only:
            unlabeled = ds.images("unlabeled")
            if not unlabeled:
                raise DataError(f"{data.root}: no unlabeled/image files and no data.unlabeled_manifest")
            fp_unl = ds.fingerprint("unlabeled", unlabeled)
        return _Cache2D(images, labels, len(files), Identity(fp_lab, fp_unl, resume_changed), ds, unlabeled)
    images, labels, n_l, slice_names = ds.load_slices_named(data.labeled_patients, size)
    fp_lab = ds.fingerprint(slice_names[:n_l], "labeled")
    if labeled_only:
        images, labels = images[:n_l], labels[:n_l]
    elif n_l >= images.shape[0]:
        raise DataError(f"{data.root}: every imagesTr slice is labeled with "
                        f"{data.labeled_patients} labeled cases: no unlabeled data")
    else:
        fp_unl = ds.fingerprint(slice_names[n_l:], "unlabeled")
    return _Cache2D(images, labels, n_l, Identity(fp_lab, fp_unl, resume_changed))


def _cache_unlabeled_folder(cache: _Cache2D, size: tuple[int, int], workers: int) -> None:
    """Append the folder's unlabeled images to the cache (decoded once, on the CPU, by
    ``workers`` threads; zero labels, never read)."""
    assert cache.folder is not None
    x_u, _ = cache.folder.load_split("unlabeled", size, with_labels=False, workers=workers,
                                     paths=cache.unlabeled_files)
    cache.images = torch.cat([cache.images, x_u])
    cache.labels = torch.cat([cache.labels, torch.zeros((x_u.shape[0], *size), dtype=cache.labels.dtype)])


# ---------------------------------------------------------------------------- entry point
def build_train_stream(
    data: Any,
    *,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    channels: int = 3,
    dims: int | None = None,
    dataset: Any = None,
) -> Stream:
    """Build the training stream described by ``data`` (a `DataConfig`).

    Args:
        data: the ``[data]`` section: ``root``, ``format``, ``backend``, ``num_classes``,
            ``labeled_patients`` (ssl4mis; labeled volumes in 3D), ``img_size`` (``(H, W)`` or the
            3D patch ``(X, Y, Z)``), ``labeled_bs``, ``unlabeled_bs``,
            augmentation fields, ``unlabeled_manifest``, ``mask_mode`` (folder).
        device: training device (cache, augmentation and batches live there).
        seed: ``train.seed``; rank/world_size: data-parallel replica.
        channels: ``model.in_channels`` (gray repeated).
        dims: 2 or 3, the recipe's dimensionality (`train.recipe.Recipe.stream` passes it;
            the configuration rules have checked that ``img_size`` has that many values);
            None: the number of ``img_size`` values.
        dataset: the dataset of ``data`` when the caller has opened it already (the recipe opens
            it once for its checks, the stream and validation); None: opened here.

    Returns:
        `TrainStream`, `FolderTrainStream`, `ManifestTrainStream` or `DaliTrainStream`
        (2-entry ``img_size``); `VolumeStream` or `DaliVolumeStream` (3-entry ``img_size``).
    """
    dims = len(data.img_size) if dims is None else dims
    if dims != len(data.img_size) or dims not in (2, 3):
        raise ValueError(f"data.img_size = {tuple(data.img_size)!r}; a {dims}D stream needs "
                         f"{dims} sizes ((H, W) or (X, Y, Z))")
    if dims == 3:
        return _build_volume_stream(data, device=device, seed=seed, rank=rank, world_size=world_size,
                                    channels=channels, dataset=dataset)
    if data.format not in _FORMATS_2D:
        raise ValueError(f"data.format = {data.format!r}; choose 'ssl4mis', 'folder' or 'nifti'")
    if data.backend not in _BACKENDS:
        raise ValueError(f"data.backend = {data.backend!r}; choose 'torch' or 'dali'")
    aug = augment_kwargs(data)
    size = (int(data.img_size[0]), int(data.img_size[1]))
    cap, workers, resume_changed = safety_options(data)
    ds = dataset if dataset is not None else _open_2d(data, cap)
    manifest = None
    if data.unlabeled_manifest:
        # DALI decodes the manifest's files itself (it reads their bytes through the stream);
        # colour labeled images (RGB folders): colour unlabeled ones too
        manifest = ManifestStream(data.unlabeled_manifest, rank=rank, world_size=world_size, size=size,
                                  max_image_pixels=cap, decode_workers=workers if data.backend == "torch" else 0,
                                  resume_changed_data=resume_changed,
                                  channels=3 if isinstance(ds, FolderDataset) and ds.channels == 3 else 1)
    cache = _read_2d(data, ds, size, workers, labeled_only=manifest is not None, resume_changed=resume_changed)
    common = dict(labeled_bs=data.labeled_bs, seed=seed, device=device, augment=aug, rank=rank,
                  world_size=world_size, channels=channels)
    if data.backend == "dali":
        from .dali import DaliTrainStream

        return DaliTrainStream(
            cache.images, cache.labels, n_labeled=cache.n_labeled, unlabeled_bs=data.unlabeled_bs,
            unlabeled_files=cache.unlabeled_files if cache.folder is not None and manifest is None else None,
            unlabeled_manifest=manifest, max_image_pixels=cap, identity=cache.identity, **common)
    if manifest is not None:
        labeled = TrainStream.from_tensors(cache.images, cache.labels, n_labeled=cache.n_labeled, unlabeled_bs=0,
                                           identity=Identity(cache.identity.labeled, None, resume_changed),
                                           **common)
        return ManifestTrainStream(labeled, manifest, data.unlabeled_bs, aug, seed, rank)
    if cache.folder is not None:
        # torch backend: the unlabeled folder is cached too unless it is too large; then it is
        # decoded per step by `decode_workers` threads.
        nbytes = len(cache.unlabeled_files) * cache.folder.channels * size[0] * size[1] * 4
        if nbytes > FOLDER_CACHE_MAX_BYTES:
            return FolderTrainStream.from_folder(
                cache.folder, cache.images, cache.labels, cache.unlabeled_files, unlabeled_bs=data.unlabeled_bs,
                decode_workers=workers, identity=cache.identity, **common)
        _cache_unlabeled_folder(cache, size, workers)
    return TrainStream.from_tensors(cache.images, cache.labels, n_labeled=cache.n_labeled,
                                    unlabeled_bs=data.unlabeled_bs, identity=cache.identity, **common)


# ---------------------------------------------------------------------------- 3D
def _build_volume_stream(data: Any, *, device: torch.device | str, seed: int, rank: int, world_size: int,
                         channels: int, dataset: Any = None) -> VolumeStream:
    """The 3D branch of `build_train_stream` (UA-MT / SSL4MIS or NIfTI volumes): a `VolumeStream`
    (``backend="torch"``) or a `DaliVolumeStream` (``backend="dali"``: same draws and batches,
    geometry by DALI operators)."""
    size = tuple(int(s) for s in data.img_size)
    if data.format not in ("ssl4mis", "nifti"):
        raise ValueError(f"data.format = {data.format!r} with a 3-D data.img_size {size}; 3D training "
                         f"reads SSL4MIS / UA-MT or NIfTI volumes: format = 'ssl4mis' or 'nifti'")
    if data.backend not in _BACKENDS:
        raise ValueError(f"data.backend = {data.backend!r} with a 3-D data.img_size {size}; choose "
                         f"'torch' or 'dali'")
    cls: type[VolumeStream] = VolumeStream
    if data.backend == "dali":
        from .dali3d import DaliVolumeStream  # nvidia.dali itself is imported when the stream is built

        cls = DaliVolumeStream
    if data.unlabeled_manifest:
        raise ValueError(f"data.unlabeled_manifest = {data.unlabeled_manifest!r} with a 3-D data.img_size "
                         f"{size}; 3D training takes its unlabeled volumes from train.list")
    _, _, resume_changed = safety_options(data)
    common = dict(labeled_bs=data.labeled_bs, unlabeled_bs=data.unlabeled_bs, seed=seed, device=device,
                  patch_size=size, rank=rank, world_size=world_size, channels=channels, rot_flip=bool(data.augment))
    if data.format == "nifti":
        from .nifti import NiftiDataset, resolve_intensity

        nds = dataset if dataset is not None else NiftiDataset(
            data.root, num_classes=data.num_classes,
            normalize=resolve_intensity(getattr(data, "intensity", "auto"), 3), dims=3)
        images, labels, n_l, names = nds.load_volumes(int(data.labeled_patients))
        identity = Identity(nds.fingerprint(names[:n_l], "labeled"), nds.fingerprint(names[n_l:], "unlabeled"),
                            resume_changed)
        return cls.from_arrays(images, labels, n_labeled=n_l, names=names, identity=identity, **common)
    holdout = int(data.val_holdout)
    ds = dataset if dataset is not None else VolumeDataset(data.root, num_classes=data.num_classes,
                                                           val_holdout=holdout)
    names = ds.train_volumes  # without the held-out validation lines
    n_l = int(data.labeled_patients)
    if not 1 <= n_l < len(names):
        if holdout and n_l >= 1:
            total = len(names) + holdout
            raise DataError(f"{ds.root / 'train.list'}: {total} volumes; data.labeled_patients = {n_l} "
                            f"plus data.val_holdout = {holdout} held out for validation leave no unlabeled "
                            f"volume (labeled_patients + val_holdout must be at most {total - 1})")
        raise DataError(f"{data.root}: train.list has {len(names)} volumes; data.labeled_patients = "
                        f"{data.labeled_patients} must be in [1, {len(names) - 1}] to leave unlabeled data")
    # train.list fingerprints: set by VolumeStream from the dataset
    return cls(ds, n_labeled=n_l, identity=Identity(resume_changed_data=resume_changed), **common)
