"""One entry point from the ``[data]`` config to a training stream (torch or DALI backend).

For the trainer::

    from ucseg_fast.data.factory import build_train_stream
    stream = build_train_stream(cfg.data, device=device, seed=cfg.train.seed, rank=rank,
                                world_size=world_size, channels=cfg.model.in_channels)
    batch = stream.next()                  # Batch(x_l [Bl,C,*S], y_l [Bl,*S] int64, x_u [Bu,C,*S])
    state = stream.state_dict()            # JSON; stream.load_state_dict(state) resumes exactly
    stream.epoch_length                    # floor(n_labeled / labeled_bs), the reference's epoch

Every returned stream has ``next()``, ``__next__``, ``state_dict()``, ``load_state_dict()``,
``epoch_length``, ``img_size``, ``n_labeled`` and ``skipped_files`` (files a manifest skipped
so far; 0 where nothing can be skipped).

Data safety (``[data]`` keys): ``max_image_pixels`` caps decoded images (checked from the header:
an error naming the file in folders, a skipped and counted file in manifests);
``decode_workers`` threads decode image files ahead of the step (manifests; unlabeled folders
too large to cache; the folder cache at start-up), without changing any batch;
``resume_changed_data`` lets a resume continue on lists whose content changed since the
checkpoint (every stream's state carries a fingerprint of its lists: ``train_slices.list``
lines, folder file names, NIfTI slices, ``train.list`` cases, manifest lines).

The length of ``data.img_size`` picks the dimensionality: two entries ``(H, W)`` build a 2D
stream (below), three entries ``(X, Y, Z)`` the 3D one (METHOD.md §3, 3D column):

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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .augment import augment_2d
from .batch import Batch
from .folder_stream import FolderTrainStream
from .folders import FolderDataset
from .guards import DEFAULT_MAX_IMAGE_PIXELS, DataError, fingerprint_lines
from .manifest import ManifestStream
from .ssl4mis import SSL4MISDataset, slices_of_first_patients
from .stream import TrainStream, _torch_seed
from .stream3d import VolumeStream
from .volumes import VolumeDataset

__all__ = ["FOLDER_CACHE_MAX_BYTES", "ManifestTrainStream", "augment_kwargs", "build_train_stream", "safety_options"]

#: torch backend, image folders: the unlabeled split is cached on the device up to this decoded
#: size (N x C x H x W x 4 bytes), else streamed from its files (`FolderTrainStream`).
FOLDER_CACHE_MAX_BYTES = 4 << 30


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


class ManifestTrainStream:
    """torch backend with an unlabeled manifest: labeled batches from a `TrainStream` (cache on the
    device), unlabeled images decoded on the CPU from the manifest, augmented on the device."""

    def __init__(self, labeled: TrainStream | FolderTrainStream, manifest: ManifestStream, unlabeled_bs: int,
                 augment: dict[str, Any], seed: int, rank: int) -> None:
        self.labeled, self.manifest, self.unlabeled_bs = labeled, manifest, int(unlabeled_bs)
        self.augment = augment
        self.device = labeled.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_torch_seed(seed + 1, rank))
        self.n_labeled = labeled.n_labeled

    @property
    def epoch_length(self) -> int:
        return self.labeled.epoch_length

    @property
    def img_size(self) -> tuple[int, int]:
        return self.labeled.img_size

    @property
    def skipped_files(self) -> int:
        """Manifest files skipped so far (unreadable, too large, not a file)."""
        return self.manifest.skipped_files

    def set_identity(self, labeled: Any = None, unlabeled: Any = None, *,
                     resume_changed_data: bool | None = None) -> None:
        """Fingerprint of the labeled list (the manifest fingerprints itself)."""
        self.labeled.set_identity(labeled, None, resume_changed_data=resume_changed_data)
        if resume_changed_data is not None:
            self.manifest.resume_changed_data = bool(resume_changed_data)

    def close(self) -> None:
        """Stop the manifest's decode threads."""
        self.manifest.close()

    def next(self) -> Batch:
        b = self.labeled.next()
        x_u = torch.from_numpy(self.manifest.next_batch(self.unlabeled_bs))
        # [B, H, W] gray, or [B, 3, H, W] when the manifest reader decodes colour (RGB folders)
        x_u_BCHW = x_u.unsqueeze(1) if x_u.dim() == 3 else x_u
        if self.device.type == "cuda":
            x_u_BCHW = x_u_BCHW.pin_memory()
        x_u_BCHW = x_u_BCHW.to(self.device, non_blocking=True)
        x_u_BCHW, _ = augment_2d(x_u_BCHW, None, self.generator, **self.augment)
        c = b.x_l.shape[1]
        if x_u_BCHW.shape[1] != c:
            x_u_BCHW = x_u_BCHW.expand(-1, c, -1, -1)
        return Batch(x_l=b.x_l, y_l=b.y_l, x_u=x_u_BCHW.contiguous())

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        import base64

        return {"labeled": self.labeled.state_dict(), "manifest": self.manifest.state_dict(),
                "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import base64

        self.labeled.load_state_dict(state["labeled"])
        self.manifest.load_state_dict(state["manifest"])
        raw = base64.b64decode(state["generator"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def _rgb_reader(path: str) -> Any:
    """Manifest reader of RGB training: image files decoded as ``[3, H, W]``; 2-D ``.npy`` /
    ``.h5`` entries (gray by construction) repeated to 3 channels. (`ManifestStream` with
    ``channels=3`` does this itself.)"""
    from .manifest import read_unlabeled_image

    return read_unlabeled_image(path, channels=3)


def _folder_cache(data: Any, workers: int = 0) -> tuple[FolderDataset, torch.Tensor, torch.Tensor, int, list[Path]]:
    cap, _, _ = safety_options(data)
    ds = FolderDataset(data.root, num_classes=data.num_classes, mask_mode=data.mask_mode, max_image_pixels=cap)
    size = tuple(data.img_size)
    x_l, y_l = ds.load_split("labeled", size, workers=workers)
    assert y_l is not None
    return ds, x_l, y_l, int(x_l.shape[0]), ds.images("unlabeled")


def build_train_stream(
    data: Any,
    *,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    channels: int = 3,
):
    """Build the training stream described by ``data`` (a `DataConfig`).

    Args:
        data: the ``[data]`` section: ``root``, ``format``, ``backend``, ``num_classes``,
            ``labeled_patients`` (ssl4mis; labeled volumes in 3D), ``img_size`` (``(H, W)`` or the
            3D patch ``(X, Y, Z)``), ``labeled_bs``, ``unlabeled_bs``,
            augmentation fields, ``unlabeled_manifest``, ``mask_mode`` (folder).
        device: training device (cache, augmentation and batches live there).
        seed: ``train.seed``; rank/world_size: data-parallel replica.
        channels: ``model.in_channels`` (gray repeated).

    Returns:
        `TrainStream`, `ManifestTrainStream` or `DaliTrainStream` (2-entry ``img_size``);
        `VolumeStream` or `DaliVolumeStream` (3-entry ``img_size``).
    """
    if len(data.img_size) == 3:
        return _build_volume_stream(data, device=device, seed=seed, rank=rank, world_size=world_size,
                                    channels=channels)
    if len(data.img_size) != 2:
        raise ValueError(f"data.img_size = {tuple(data.img_size)!r}; need 2 (H, W) or 3 (X, Y, Z) sizes")
    aug = augment_kwargs(data)
    size = (int(data.img_size[0]), int(data.img_size[1]))
    cap, workers, resume_changed = safety_options(data)
    manifest = None
    if data.unlabeled_manifest:
        # DALI decodes the manifest's files itself (it reads their bytes through the stream)
        manifest = ManifestStream(data.unlabeled_manifest, rank=rank, world_size=world_size, size=size,
                                  max_image_pixels=cap, decode_workers=workers if data.backend == "torch" else 0,
                                  resume_changed_data=resume_changed)
    fp_lab: dict[str, Any] | None = None
    fp_unl: dict[str, Any] | None = None
    fds: FolderDataset | None = None
    if data.format == "ssl4mis":
        ds = SSL4MISDataset(data.root, num_classes=data.num_classes)
        names = ds.train_slices
        n_l = slices_of_first_patients(names, data.labeled_patients)
        if manifest is None and n_l >= len(names):
            raise DataError(f"{data.root}: train_slices.list has {len(names)} slices, all labeled "
                            f"with {data.labeled_patients} patients: no unlabeled data")
        src = str(ds.root / "train_slices.list")
        fp_lab = fingerprint_lines(names[:n_l], f"{src} (labeled lines)")
        if manifest is not None:
            names = names[:n_l]
        else:
            fp_unl = fingerprint_lines(names[n_l:], f"{src} (unlabeled lines)")
        images, labels = ds.load_slices(names, size=size)
        unlabeled_files: list[Path] = []
    elif data.format == "folder":
        fds, images, labels, n_l, unlabeled_files = _folder_cache(data, workers)
        fp_lab = fds.fingerprint("labeled")
        if manifest is not None and images.dim() == 4 and images.shape[1] == 3:
            manifest.channels = 3  # colour labeled images: colour unlabeled ones too
        if manifest is None:
            if not unlabeled_files:
                raise DataError(f"{data.root}: no unlabeled/image files and no data.unlabeled_manifest")
            fp_unl = fds.fingerprint("unlabeled", unlabeled_files)
    elif data.format == "nifti":
        from .nifti import NiftiDataset, resolve_intensity

        normalize = resolve_intensity(getattr(data, "intensity", "auto"), 2)
        nds = NiftiDataset(data.root, num_classes=data.num_classes, normalize=normalize)
        images, labels, n_l, slice_names = nds.load_slices_named(data.labeled_patients, size)
        fp_lab = nds.fingerprint(slice_names[:n_l], "labeled")
        if manifest is not None:
            images, labels = images[:n_l], labels[:n_l]
        elif n_l >= images.shape[0]:
            raise DataError(f"{data.root}: every imagesTr slice is labeled with "
                            f"{data.labeled_patients} labeled cases: no unlabeled data")
        else:
            fp_unl = nds.fingerprint(slice_names[n_l:], "unlabeled")
        unlabeled_files = []
    else:
        raise ValueError(f"data.format = {data.format!r}; choose 'ssl4mis', 'folder' or 'nifti'")

    common = dict(labeled_bs=data.labeled_bs, seed=seed, device=device, rank=rank, world_size=world_size,
                  channels=channels)
    identity = dict(labeled=fp_lab, unlabeled=fp_unl, resume_changed_data=resume_changed)
    if data.backend == "dali":
        from .dali import DaliTrainStream

        stream = DaliTrainStream(
            images, labels, n_labeled=n_l, unlabeled_bs=data.unlabeled_bs, augment=aug,
            unlabeled_files=unlabeled_files if (data.format == "folder" and manifest is None) else None,
            unlabeled_manifest=manifest, max_image_pixels=cap, **common)
        stream.set_identity(**identity)
        return stream
    if data.backend != "torch":
        raise ValueError(f"data.backend = {data.backend!r}; choose 'torch' or 'dali'")
    if manifest is not None:
        lab = _from_cache(images, labels, n_l, 0, aug, common)
        out = ManifestTrainStream(lab, manifest, data.unlabeled_bs, aug, seed, rank)
        out.set_identity(**identity)
        return out
    if fds is not None:
        # torch backend: the unlabeled folder is cached too (decoded once, on the CPU, by
        # `decode_workers` threads) unless it is too large; then it is decoded per step.
        nbytes = len(unlabeled_files) * fds.channels * size[0] * size[1] * 4
        if nbytes > FOLDER_CACHE_MAX_BYTES:
            fstream = FolderTrainStream(images, labels, unlabeled_files, unlabeled_bs=data.unlabeled_bs,
                                        augment=aug, max_image_pixels=cap, decode_workers=workers, **common)
            fstream.set_identity(**identity)
            return fstream
        x_u, _ = fds.load_split("unlabeled", size, with_labels=False, workers=workers, paths=unlabeled_files)
        images = torch.cat([images, x_u])
        labels = torch.cat([labels, torch.zeros((x_u.shape[0], *size), dtype=labels.dtype)])
    stream = _from_cache(images, labels, n_l, data.unlabeled_bs, aug, common)
    stream.set_identity(**identity)
    return stream


def _build_volume_stream(data: Any, *, device: torch.device | str, seed: int, rank: int, world_size: int,
                         channels: int) -> VolumeStream:
    """The 3D branch of `build_train_stream` (UA-MT / SSL4MIS or NIfTI volumes): a `VolumeStream`
    (``backend="torch"``) or a `DaliVolumeStream` (``backend="dali"``: same draws and batches,
    geometry by DALI operators)."""
    size = tuple(int(s) for s in data.img_size)
    if data.format not in ("ssl4mis", "nifti"):
        raise ValueError(f"data.format = {data.format!r} with a 3-D data.img_size {size}; 3D training "
                         f"reads SSL4MIS / UA-MT or NIfTI volumes: format = 'ssl4mis' or 'nifti'")
    if data.backend not in ("torch", "dali"):
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
    if data.format == "nifti":
        from .nifti import NiftiDataset, resolve_intensity

        nds = NiftiDataset(data.root, num_classes=data.num_classes,
                           normalize=resolve_intensity(getattr(data, "intensity", "auto"), 3), dims=3)
        images, labels, n_l, names = nds.load_volumes(int(data.labeled_patients))
        stream = cls.from_arrays(
            images, labels, n_labeled=n_l, labeled_bs=data.labeled_bs, unlabeled_bs=data.unlabeled_bs,
            seed=seed, device=device, patch_size=size, rank=rank, world_size=world_size,
            channels=channels, rot_flip=bool(data.augment))
        stream.names = names
        stream.set_identity(nds.fingerprint(names[:n_l], "labeled"), nds.fingerprint(names[n_l:], "unlabeled"),
                            resume_changed_data=resume_changed)
        return stream
    holdout = int(data.val_holdout)
    ds = VolumeDataset(data.root, num_classes=data.num_classes, val_holdout=holdout)
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
    stream = cls(ds, n_labeled=n_l, labeled_bs=data.labeled_bs, unlabeled_bs=data.unlabeled_bs,
                 seed=seed, device=device, patch_size=size, rank=rank, world_size=world_size,
                 channels=channels, rot_flip=bool(data.augment))
    stream.set_identity(resume_changed_data=resume_changed)  # train.list fingerprints: set by VolumeStream
    return stream


def _from_cache(images: torch.Tensor, labels: torch.Tensor, n_l: int, unlabeled_bs: int,
                aug: dict[str, Any], common: dict[str, Any]) -> TrainStream:
    if images.dim() == 3 or images.shape[1] == 1:
        return TrainStream.from_tensors(images.reshape(images.shape[0], *images.shape[-2:]), labels,
                                        n_labeled=n_l, unlabeled_bs=unlabeled_bs, augment=aug, **common)
    # RGB cache: TrainStream stores [N, 1, H, W]; give it the first channel, then swap in the
    # full [N, 3, H, W] cache (its augmentation and channel expand work for any C).
    stream = TrainStream.from_tensors(images[:, 0], labels, n_labeled=n_l, unlabeled_bs=unlabeled_bs,
                                      augment=aug, **common)
    stream.images_N1HW = images.to(stream.device, torch.float32).contiguous()
    return stream
