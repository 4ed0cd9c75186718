"""The torch backend for 2D ACDC-style training: a device-resident cache, two-stream sampling and
on-device augmentation, producing one `Batch` per call with no worker processes.

The whole training set (the reference's ``Resize(256, 256, INTER_NEAREST)`` already applied)
lives on the training device: 1312 slices x 256² x 5 B = 430 MB for full ACDC. A step gathers
``labeled_bs + unlabeled_bs`` slices with ``index_select``, augments them together with
`augment_2d` (the reference applies the identical pipeline, single view, to both streams) and
repeats the gray channel three times (the reference's ``in_channels 3``). The only host->device
traffic per step is the index vector (pinned, asynchronous).
"""
from __future__ import annotations

import base64
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .augment import augment_2d
from .batch import Batch
from .guards import fingerprint_lines
from .sampler import TwoStreamSampler
from .ssl4mis import SSL4MISDataset

__all__ = ["TrainStream"]

_AUGMENT_KEYS = frozenset(inspect.signature(augment_2d).parameters) - {"images", "labels", "generator"}


def _torch_seed(seed: int, rank: int) -> int:
    # Independent of the sampler's stream (different entropy words), distinct per rank.
    words = np.random.SeedSequence([int(seed), int(rank), 0x6175_676D]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class TrainStream:
    """Infinite source of augmented training batches.

    Args:
        dataset: the SSL4MIS folder; its ``train_slices`` in list order, the first ``n_labeled``
            labeled and the rest unlabeled (METHOD.md §3).
        n_labeled: number of labeled slices (e.g. ``labeled_slice_count(7) == 136``).
        labeled_bs, unlabeled_bs: per-step batch sizes (the reference: 12 + 12).
        seed: seeds the sampler and the augmentation generator.
        device: where the cache lives and augmentation runs.
        augment: keyword arguments of `augment_2d` (probabilities, limits); None = reference values.
        img_size: ``(H, W)`` of the cache and of every batch.
        rank, world_size: data-parallel replica (independent streams per rank, see `TwoStreamSampler`).
        channels: gray is repeated to this many channels (3 in the reference).

    Resume identity: built from a dataset, the state carries a fingerprint of the labeled and
    unlabeled lines of ``train_slices.list`` (`set_identity`; `TwoStreamSampler`). Nothing is
    skipped here: `skipped_files` is 0.
    """

    #: files skipped so far (the trainer logs ``getattr(stream, "skipped_files", 0)``)
    skipped_files: int = 0

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
    ) -> None:
        names = dataset.train_slices
        if not 1 <= n_labeled <= len(names):
            raise ValueError(f"n_labeled={n_labeled} outside [1, {len(names)}] (slices in {dataset.root})")
        images_NHW, labels_NHW = dataset.load_slices(names, size=img_size)
        self._setup(
            images_NHW, labels_NHW, n_labeled=n_labeled, labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs,
            seed=seed, device=device, augment=augment, rank=rank, world_size=world_size, channels=channels,
        )
        src = str(dataset.root / "train_slices.list")
        self.set_identity(fingerprint_lines(names[:n_labeled], f"{src} (labeled lines)"),
                          fingerprint_lines(names[n_labeled:], f"{src} (unlabeled lines)"))

    @classmethod
    def from_tensors(
        cls,
        images_NHW: torch.Tensor,
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
    ) -> TrainStream:
        """Build from an in-memory cache (``images [N, H, W]`` float, ``labels [N, H, W]`` integer)."""
        if images_NHW.dim() != 3 or labels_NHW.shape != images_NHW.shape:
            raise ValueError(
                f"need images [N, H, W] and labels of the same shape, got {tuple(images_NHW.shape)} "
                f"and {tuple(labels_NHW.shape)}"
            )
        if not 1 <= n_labeled <= images_NHW.shape[0]:
            raise ValueError(f"n_labeled={n_labeled} outside [1, {images_NHW.shape[0]}]")
        self = cls.__new__(cls)
        self._setup(
            images_NHW, labels_NHW, n_labeled=n_labeled, labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs,
            seed=seed, device=device, augment=augment, rank=rank, world_size=world_size, channels=channels,
        )
        return self

    def _setup(
        self, images_NHW: torch.Tensor, labels_NHW: torch.Tensor, *, n_labeled: int, labeled_bs: int,
        unlabeled_bs: int, seed: int, device: torch.device | str, augment: Mapping[str, Any] | None,
        rank: int, world_size: int, channels: int,
    ) -> None:
        unknown = set(augment or {}) - _AUGMENT_KEYS
        if unknown:
            raise TypeError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(_AUGMENT_KEYS)}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.device = torch.device(device)
        self.augment_kwargs: dict[str, Any] = dict(augment or {})
        self.channels = int(channels)
        self.images_N1HW = images_NHW.to(self.device, torch.float32).unsqueeze(1).contiguous()
        self.labels_NHW = labels_NHW.to(self.device)
        n = images_NHW.shape[0]
        self.n_labeled = int(n_labeled)
        self.sampler = TwoStreamSampler(
            np.arange(n_labeled), np.arange(n_labeled, n), labeled_bs, unlabeled_bs, seed,
            rank=rank, world_size=world_size,
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_torch_seed(seed, rank))

    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Content fingerprints of the labeled / unlabeled lists, kept in the state and checked on
        resume (`TwoStreamSampler.set_identity`)."""
        self.sampler.set_identity(labeled, unlabeled, resume_changed_data=resume_changed_data)

    # ------------------------------------------------------------------ properties
    @property
    def n_unlabeled(self) -> int:
        return int(self.images_N1HW.shape[0]) - self.n_labeled

    @property
    def epoch_length(self) -> int:
        """Steps per reference epoch, ``floor(n_labeled / labeled_bs)``."""
        return self.sampler.epoch_length

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.images_N1HW.shape[2]), int(self.images_N1HW.shape[3])

    # ------------------------------------------------------------------ batches
    def next(self) -> Batch:
        """The next augmented batch, on ``device``; no host sync."""
        lab, unl = next(self.sampler)
        idx = to_device(np.concatenate([lab, unl]), self.device)
        x_B1HW = self.images_N1HW.index_select(0, idx)
        y_BlHW = self.labels_NHW.index_select(0, idx[:len(lab)])
        return augmented_batch(self, x_B1HW, y_BlHW)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: sampler position + augmentation generator state."""
        return {"sampler": self.sampler.state_dict(), **generator_state(self.generator, self.device)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken (same data, same device type)."""
        check_generator_device(state, self.device)
        self.sampler.load_state_dict(dict(state["sampler"]))
        restore_generator(self.generator, state)


# ---------------------------------------------------------------------- shared by the 2D streams
def to_device(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """An index array on the training device; on CUDA from pinned memory, so the copy is truly
    asynchronous (the caching host allocator keeps the buffer alive until it has run)."""
    t = torch.from_numpy(idx)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augmented_batch(stream, x_B1HW: torch.Tensor, y_BlHW: torch.Tensor) -> Batch:
    """The stream's augmentation of [labeled; unlabeled] images and the labeled masks, gray
    repeated to `stream.channels`, as a `Batch` (labeled first)."""
    bl = y_BlHW.shape[0]
    x_B1HW, y_BlHW = augment_2d(x_B1HW, y_BlHW, stream.generator, **stream.augment_kwargs)
    assert y_BlHW is not None
    x_BCHW = x_B1HW.expand(-1, stream.channels, -1, -1).contiguous()
    return Batch(x_l=x_BCHW[:bl], y_l=y_BlHW.long(), x_u=x_BCHW[bl:])


def generator_state(generator: torch.Generator, device: torch.device) -> dict[str, str]:
    """The augmentation generator's state, JSON-serialisable (the streams' checkpoint format)."""
    return {"generator": base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii"),
            "generator_device": device.type}


def check_generator_device(state: Mapping[str, Any], device: torch.device) -> None:
    if state.get("generator_device") != device.type:
        raise ValueError(f"stream state was saved for a {state.get('generator_device')!r} "
                         f"generator, this stream runs on {device.type!r}")


def restore_generator(generator: torch.Generator, state: Mapping[str, Any]) -> None:
    raw = base64.b64decode(state["generator"])
    generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
