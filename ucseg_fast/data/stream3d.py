"""The torch backend for 3D (LA / Pancreas) training: a host-resident volume cache, two-stream
sampling and the reference's ``RandomRotFlip`` -> ``RandomCrop(96³)``, one `Batch` per call.

docs/method.md §3 (3D column): batch 2 labeled + 2 unlabeled patches of 96×96×96, one channel; the
labeled volumes are the first ``n_l`` lines of ``train.list``; SSL4MIS ``TwoStreamBatchSampler``.

The training volumes differ in size and full LA is ~0.9 GB (80 x ~2.3 M voxels x 5 B), so the
cache (one ``[X, Y, Z]`` float32 image + uint8 label tensor per volume) stays on the CPU by
default. A step draws the sampler's indices and every sample's augmentation parameters on the
host (numpy, no device sync), copies each crop window, axes permuted, straight from the cache
into a pinned staging batch (`RotFlipCrop.crop_into`, ~p³ voxels per sample), moves that batch
asynchronously and applies the remaining axis reversals on the training device
(`RotFlipCrop.orient`). The result is
bit-identical to the reference's per-sample numpy pipeline with the same drawn parameters.

Differences from the reference (deliberate): parameters come from a private per-rank
``numpy.random.Generator`` instead of the worker-reseeded global numpy RNG; labels travel as
uint8 and become int64 on the device.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .augment3d import RotFlipCrop, draw_rot_flip_crop
from .base import Identity, Stream
from .batch import Batch
from .guards import fingerprint_lines
from .sampler import TwoStreamSampler
from .volumes import VolumeDataset

__all__ = ["VolumeStream"]

_STATE_VERSION = 1
_ENTROPY = 0x726F_7433  # "rot3": distinct from the sampler's SeedSequence and stream._torch_seed


def _numpy_rng(seed: int, rank: int) -> np.random.Generator:
    # Independent of the sampler's stream (different entropy words), distinct per rank.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(rank), _ENTROPY])))


def _as_tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


class VolumeStream(Stream):
    """Infinite source of augmented 3D training batches.

    Args:
        dataset: the 3D folder; its ``train_volumes`` in list order, the first ``n_labeled``
            labeled and the rest unlabeled (docs/method.md §3). The held-out validation volumes of a
            dataset with ``val_holdout > 0`` are not among them and are never read here.
        n_labeled: number of labeled volumes (LA 10 %: 8).
        labeled_bs, unlabeled_bs: per-step batch sizes (the reference: 2 + 2).
        seed: seeds the sampler and the augmentation generator.
        device: where batches are delivered (and the axis reversals run).
        patch_size: the ``RandomCrop`` size ``(p_0, p_1, p_2)`` = ``img_size`` of every batch.
        rank, world_size: data-parallel replica (independent streams per rank, see `TwoStreamSampler`).
        channels: gray is repeated to this many channels (1 in the reference).
        rot_flip: apply ``RandomRotFlip`` before the crop (False: crop only).
        cache_device: where the volume cache lives and the crop is cut (default: the CPU).
        identity: resume identity (`base.Identity`). Built from a dataset, the state carries a
            fingerprint of the labeled and unlabeled lines of ``train.list`` it trains on
            (held-out lines excluded); ``identity`` adds to it (``resume_changed_data``).
        **options: options of a subclass (`dali3d.DaliVolumeStream`: ``feed``, ``num_threads``).

    `from_arrays` builds one over in-memory volumes. Nothing is skipped: `skipped_files` is 0.
    """

    def __init__(
        self,
        dataset: VolumeDataset,
        *,
        n_labeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        patch_size: Sequence[int] = (96, 96, 96),
        rank: int = 0,
        world_size: int = 1,
        channels: int = 1,
        rot_flip: bool = True,
        cache_device: torch.device | str = "cpu",
        identity: Identity | None = None,
        **options: Any,
    ) -> None:
        self._configure(**options)
        names = dataset.train_volumes
        if not 1 <= n_labeled <= len(names):
            raise ValueError(f"n_labeled={n_labeled} outside [1, {len(names)}] (volumes in {dataset.root})")
        images, labels = dataset.load_volumes(names)
        # The fingerprints cover the lines this stream trains on: without the held-out tail.
        src = str(dataset.root / "train.list")
        holdout = int(getattr(dataset, "val_holdout", 0))
        tail = f", the last {holdout} lines held out for validation" if holdout else ""
        own = Identity(fingerprint_lines(names[:n_labeled], f"{src} (labeled lines{tail})"),
                       fingerprint_lines(names[n_labeled:], f"{src} (unlabeled lines{tail})"))
        self._setup(images, labels, names, n_labeled=n_labeled, labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs,
                    seed=seed, device=device, patch_size=patch_size, rank=rank, world_size=world_size,
                    channels=channels, rot_flip=rot_flip, cache_device=cache_device, identity=own)
        self._apply_identity(identity)

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray | torch.Tensor],
        labels: Sequence[np.ndarray | torch.Tensor],
        *,
        n_labeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        patch_size: Sequence[int] = (96, 96, 96),
        rank: int = 0,
        world_size: int = 1,
        channels: int = 1,
        rot_flip: bool = True,
        cache_device: torch.device | str = "cpu",
        names: Sequence[str] | None = None,
        identity: Identity | None = None,
        **options: Any,
    ) -> VolumeStream:
        """Build from in-memory volumes (``images[i] [X_i, Y_i, Z_i]`` float, ``labels[i]`` integer,
        same shape; sizes may differ between volumes). Unlabeled volumes still need a label
        array of the right shape (it is never read; zeros do). ``names``: the volumes' names
        (default ``volume0``, ``volume1``, ...); ``identity``: their resume identity."""
        self = cls.__new__(cls)
        self._configure(**options)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not 1 <= n_labeled <= len(images):
            raise ValueError(f"n_labeled={n_labeled} outside [1, {len(images)}]")
        imgs: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        for i, (image, label) in enumerate(zip(images, labels)):
            x, y = _as_tensor(image), _as_tensor(label)
            if x.dim() != 3 or tuple(y.shape) != tuple(x.shape):
                raise ValueError(f"volume {i}: need image [X, Y, Z] and a label of the same shape, got "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex():
                raise ValueError(f"volume {i}: label must be an integer tensor, got {y.dtype}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > 255):
                raise ValueError(f"volume {i}: label values must lie in [0, 255] (uint8 cache)")
            imgs.append(x.to(torch.float32))
            labs.append(y.to(torch.uint8))
        names = [f"volume{i}" for i in range(len(imgs))] if names is None else list(names)
        if len(names) != len(imgs):
            raise ValueError(f"{len(names)} names for {len(imgs)} volumes")
        self._setup(imgs, labs, names, n_labeled=n_labeled, labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs,
                    seed=seed, device=device, patch_size=patch_size, rank=rank, world_size=world_size,
                    channels=channels, rot_flip=rot_flip, cache_device=cache_device, identity=identity)
        return self

    def _configure(self, **options: Any) -> None:
        """Options of a subclass, set before the cache is built (none here)."""
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {sorted(options)}")

    def _setup(
        self, images: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], *, n_labeled: int,
        labeled_bs: int, unlabeled_bs: int, seed: int, device: torch.device | str, patch_size: Sequence[int],
        rank: int, world_size: int, channels: int, rot_flip: bool, cache_device: torch.device | str,
        identity: Identity | None,
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes, got {tuple(patch_size)}")
        Stream.__init__(self, device=device, img_size=patch, n_labeled=n_labeled)
        self.names: list[str] = names
        self.cache_device = torch.device(cache_device)
        self.patch: tuple[int, int, int] = patch  # type: ignore[assignment]
        self.channels = int(channels)
        self.rot_flip = bool(rot_flip)
        self.images: list[torch.Tensor] = [x.to(self.cache_device).contiguous() for x in images]
        self.labels: list[torch.Tensor] = [y.to(self.cache_device).contiguous() for y in labels]
        n = len(self.images)
        self.sampler = TwoStreamSampler(
            np.arange(n_labeled), np.arange(n_labeled, n), labeled_bs, unlabeled_bs, seed,
            rank=rank, world_size=world_size,
        )
        self.rng = _numpy_rng(seed, rank)
        # Staging batches in page-locked memory when the crop is cut on the host for a GPU.
        self._pin = self.cache_device.type == "cpu" and self.device.type == "cuda"
        self._apply_identity(identity)

    @property
    def n_unlabeled(self) -> int:
        return len(self.images) - self.n_labeled

    # ------------------------------------------------------------------ batches
    def draw(self) -> tuple[np.ndarray, list[RotFlipCrop]]:
        """Host-side draws of the next step: volume indices (labeled first) and their parameters."""
        lab, unl = next(self.sampler)
        idx = np.concatenate([lab, unl])
        params = [
            draw_rot_flip_crop(self.images[i].shape, self.patch, self.rng, rot_flip=self.rot_flip)
            for i in idx.tolist()
        ]
        return idx, params

    def next(self) -> Batch:
        """The next augmented batch, on ``device``; no device->host sync."""
        idx, params = self.draw()
        bl = self.sampler.labeled_bs
        x_stage = torch.empty((len(idx), *self.patch), dtype=torch.float32, device=self.cache_device,
                              pin_memory=self._pin)
        y_stage = torch.empty((bl, *self.patch), dtype=torch.uint8, device=self.cache_device,
                              pin_memory=self._pin)
        for b, (i, p) in enumerate(zip(idx.tolist(), params)):
            p.crop_into(x_stage[b], self.images[i])
            if b < bl:
                p.crop_into(y_stage[b], self.labels[i])
        # The caching host allocator keeps a pinned buffer alive until its async copy has run.
        x_dev = x_stage.to(self.device, non_blocking=True)
        y_dev = y_stage.to(self.device, non_blocking=True)
        x_BS = torch.stack([p.orient(x_dev[b]) for b, p in enumerate(params)])
        y_BlS = torch.stack([p.orient(y_dev[b]) for b, p in enumerate(params[:bl])]).long()
        x_BCS = x_BS.unsqueeze(1).expand(-1, self.channels, -1, -1, -1).contiguous()
        return Batch(x_l=x_BCS[:bl], y_l=y_BlS, x_u=x_BCS[bl:])

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: sampler position + augmentation generator state."""
        return {
            "version": _STATE_VERSION,
            "sampler": self.sampler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "patch": list(self.patch),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken (same volumes, same patch)."""
        self._restore(state)

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Validate ``state``, then set the sampler and the generator (no read-ahead to drop)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"3D stream state version {state.get('version')!r} != {_STATE_VERSION}")
        patch = tuple(state.get("patch", ()))
        if patch != self.patch:
            raise ValueError(f"3D stream state has patch {patch}, this stream {self.patch}")
        rng_state = dict(state["rng"])
        kind = rng_state.get("bit_generator")
        if kind != "PCG64":
            raise ValueError(f"3D stream state holds a {kind!r} generator, need PCG64")
        self.sampler.load_state_dict(dict(state["sampler"]))
        self.rng.bit_generator.state = rng_state
