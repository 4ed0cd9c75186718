"""The torch backend for 2D ACDC-style training: a device-resident cache, two-stream sampling and
on-device augmentation, producing one `Batch` per call with no worker processes.

The whole training set (the reference's ``Resize(256, 256, INTER_NEAREST)`` already applied)
lives on the training device: 1312 slices x 256² x 5 B = 430 MB for full ACDC. A step gathers
``labeled_bs + unlabeled_bs`` slices with ``index_select``, augments them together with
`augment_2d` (the reference applies the identical pipeline, single view, to both streams) and
repeats the gray channel three times (the reference's ``in_channels 3``). The only host->device
traffic per step is the index vector (pinned, asynchronous).

`TorchStream2D` is what the 2D torch streams share (cache, sampler, augmentation generator,
batch tail, state format); `TrainStream` draws its unlabeled images from the cache, and
`folder_stream.FolderTrainStream` decodes them from files.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .augment import augment_2d
from .base import (
    Identity,
    Stream,
    check_generator_device,
    generator_state,
    restore_generator,
    torch_seed,
)
from .batch import Batch
from .guards import fingerprint_lines
from .sampler import TwoStreamSampler
from .ssl4mis import SSL4MISDataset

__all__ = ["TorchStream2D", "TrainStream", "augmented_batch", "check_augment", "to_device"]

_AUGMENT_KEYS = frozenset(inspect.signature(augment_2d).parameters) - {"images", "labels", "generator"}
# Former names, still importable from here.
_torch_seed = torch_seed


def check_augment(augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """``augment`` as a dict of `augment_2d` keyword arguments; unknown keys are a TypeError."""
    unknown = set(augment or {}) - _AUGMENT_KEYS
    if unknown:
        raise TypeError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(_AUGMENT_KEYS)}")
    return dict(augment or {})


class TorchStream2D(Stream):
    """The torch backend's 2D stream: labeled images cached on the training device, a
    `TwoStreamSampler` over ``n_labeled`` labeled and ``n_unlabeled`` unlabeled indices (labeled
    ``0..n_labeled-1``, unlabeled after them), one ``torch.Generator`` driving `augment_2d`.
    A subclass says where the unlabeled images of a step come from (`next`).

    State (`state_dict`): ``{"sampler": ..., "generator": ..., "generator_device": ...}``; the
    sampler part is `_sampler_state` (a stream reading ahead returns the state before the first
    batch not yet returned), `_reset_ahead` drops what was read ahead when a state is loaded.
    """

    def __init__(
        self,
        images_NCHW: torch.Tensor,
        labels_NHW: torch.Tensor,
        *,
        n_labeled: int,
        n_unlabeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str,
        augment: Mapping[str, Any] | None,
        rank: int,
        world_size: int,
        channels: int,
        identity: Identity | None,
    ) -> None:
        self.augment_kwargs: dict[str, Any] = check_augment(augment)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        super().__init__(device=device, img_size=tuple(images_NCHW.shape[-2:]), n_labeled=n_labeled)
        self.channels = int(channels)
        self.images_NCHW = images_NCHW.to(self.device, torch.float32).contiguous()
        self.labels_NHW = labels_NHW.to(self.device)
        self.sampler = TwoStreamSampler(
            np.arange(n_labeled), np.arange(n_labeled, n_labeled + n_unlabeled), labeled_bs, unlabeled_bs, seed,
            rank=rank, world_size=world_size,
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(torch_seed(seed, rank))
        self._apply_identity(identity)

    # ------------------------------------------------------------------ resume
    def _sampler_state(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def _reset_ahead(self) -> None:
        """Forget batches prepared ahead (nothing here)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: sampler position + augmentation generator state."""
        return {"sampler": self._sampler_state(), **generator_state(self.generator, self.device)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken (same data, same device type; any 2D torch
        stream's state: a cached stream's loads into a file-decoding one and back)."""
        check_generator_device(state, self.device)
        self.sampler.load_state_dict(dict(state["sampler"]))  # first: a refused state changes nothing
        self._reset_ahead()
        restore_generator(self.generator, state)


class TrainStream(TorchStream2D):
    """Infinite source of augmented training batches, labeled and unlabeled images from one
    device cache.

    Args:
        dataset: the SSL4MIS folder; its ``train_slices`` in list order, the first ``n_labeled``
            labeled and the rest unlabeled (docs/method.md §3).
        n_labeled: number of labeled slices (e.g. ``labeled_slice_count(7) == 136``).
        labeled_bs, unlabeled_bs: per-step batch sizes (the reference: 12 + 12).
        seed: seeds the sampler and the augmentation generator.
        device: where the cache lives and augmentation runs.
        augment: keyword arguments of `augment_2d` (probabilities, limits); None = reference values.
        img_size: ``(H, W)`` of the cache and of every batch.
        rank, world_size: data-parallel replica (independent streams per rank, see `TwoStreamSampler`).
        channels: gray is repeated to this many channels (3 in the reference).
        identity: resume identity (`base.Identity`); the fingerprints of the labeled and
            unlabeled lines of ``train_slices.list`` are set from the dataset.

    `from_tensors` builds one over an in-memory cache. Nothing is skipped: `skipped_files` is 0.
    """

    def __init__(
        self,
        dataset: SSL4MISDataset,
        *,
        n_labeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: Mapping[str, Any] | None = None,
        img_size: tuple[int, int] = (256, 256),
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        identity: Identity | None = None,
    ) -> None:
        names = dataset.train_slices
        if not 1 <= n_labeled <= len(names):
            raise ValueError(f"n_labeled={n_labeled} outside [1, {len(names)}] (slices in {dataset.root})")
        images_NHW, labels_NHW = dataset.load_slices(names, size=img_size)
        src = str(dataset.root / "train_slices.list")
        own = Identity(fingerprint_lines(names[:n_labeled], f"{src} (labeled lines)"),
                       fingerprint_lines(names[n_labeled:], f"{src} (unlabeled lines)"))
        super().__init__(
            images_NHW.unsqueeze(1), labels_NHW, n_labeled=n_labeled, n_unlabeled=len(names) - n_labeled,
            labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs, seed=seed, device=device, augment=augment,
            rank=rank, world_size=world_size, channels=channels, identity=own,
        )
        self._apply_identity(identity)

    @classmethod
    def from_tensors(
        cls,
        images: torch.Tensor,
        labels_NHW: torch.Tensor,
        *,
        n_labeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        identity: Identity | None = None,
    ) -> TrainStream:
        """Build from an in-memory cache: ``images`` float ``[N, H, W]`` (gray) or ``[N, C, H, W]``
        (``C`` 1 gray, 3 colour: kept as is, never reduced), ``labels [N, H, W]`` integer (the
        unlabeled entries' labels are never read)."""
        images_NCHW = images.unsqueeze(1) if images.dim() == 3 else images
        if images_NCHW.dim() != 4 or labels_NHW.shape != images_NCHW.shape[:1] + images_NCHW.shape[2:]:
            raise ValueError(
                f"need images [N, H, W] (or [N, C, H, W]) and labels [N, H, W] of the same N, H, W, got "
                f"{tuple(images.shape)} and {tuple(labels_NHW.shape)}"
            )
        n = images_NCHW.shape[0]
        if not 1 <= n_labeled <= n:
            raise ValueError(f"n_labeled={n_labeled} outside [1, {n}]")
        self = cls.__new__(cls)
        TorchStream2D.__init__(
            self, images_NCHW, labels_NHW, n_labeled=n_labeled, n_unlabeled=n - n_labeled, labeled_bs=labeled_bs,
            unlabeled_bs=unlabeled_bs, seed=seed, device=device, augment=augment, rank=rank,
            world_size=world_size, channels=channels, identity=identity,
        )
        return self

    @property
    def n_unlabeled(self) -> int:
        return int(self.images_NCHW.shape[0]) - self.n_labeled

    def next(self) -> Batch:
        """The next augmented batch, on ``device``; no host sync."""
        lab, unl = next(self.sampler)
        idx = to_device(np.concatenate([lab, unl]), self.device)
        x_BCHW = self.images_NCHW.index_select(0, idx)
        y_BlHW = self.labels_NHW.index_select(0, idx[:len(lab)])
        return augmented_batch(self, x_BCHW, y_BlHW)


# ---------------------------------------------------------------------- shared by the 2D streams
def to_device(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """An index array on the training device; on CUDA from pinned memory, so the copy is truly
    asynchronous (the caching host allocator keeps the buffer alive until it has run)."""
    t = torch.from_numpy(idx)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augmented_batch(stream: TorchStream2D, x_BCHW: torch.Tensor, y_BlHW: torch.Tensor) -> Batch:
    """The stream's augmentation of [labeled; unlabeled] images and the labeled masks, gray
    repeated to `stream.channels` (colour kept), as a `Batch` (labeled first)."""
    bl = y_BlHW.shape[0]
    x_BCHW, y_BlHW = augment_2d(x_BCHW, y_BlHW, stream.generator, **stream.augment_kwargs)
    assert y_BlHW is not None
    x_BCHW = x_BCHW.expand(-1, stream.channels, -1, -1).contiguous()
    return Batch(x_l=x_BCHW[:bl], y_l=y_BlHW.long(), x_u=x_BCHW[bl:])
