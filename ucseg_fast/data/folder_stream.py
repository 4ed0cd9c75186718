"""The torch backend over an image folder whose unlabeled split is too large to cache: labeled
images cached on the device (as `TrainStream`), unlabeled images decoded from their files for
every step by ``decode_workers`` threads, ahead of the step.

Same sampler, same augmentation generator, same order of work as `TrainStream` over the full
cache: the batches are identical to the cached stream's for the same seed (the decoded images
are exactly what `FolderDataset.load_split` would have cached), and so is the state format, so
a checkpoint of one resumes on the other.

Read-ahead: the stream draws the sampler's next batches ahead (``prefetch_batches``), keeping
for each the sampler state taken *before* it was drawn, and submits their files to the decode
threads in draw order; `next` takes the oldest. `state_dict` is the snapshot of the oldest batch
not yet returned: images decoded ahead and not consumed are not counted as consumed, so resume
is exact whatever the number of workers (0 = decode in the calling thread, no read-ahead).
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .batch import Batch
from .folders import decode_image
from .guards import DEFAULT_MAX_IMAGE_PIXELS
from .prefetch import DecodeAhead
from .sampler import TwoStreamSampler
from .stream import (_AUGMENT_KEYS, _torch_seed, augmented_batch, check_generator_device,
                     generator_state, restore_generator, to_device)

__all__ = ["FolderTrainStream"]


def _decode(path: str, channels: int, size: tuple[int, int], cap: int | None) -> np.ndarray:
    return decode_image(path, channels=channels, max_pixels=cap, size=size)


class FolderTrainStream:
    """Infinite source of augmented batches: labeled from a device cache, unlabeled decoded from files.

    Args:
        images_NCHW: labeled images float32 ``[n_l, C, H, W]`` at ``img_size`` (``C`` 1 or 3).
        labels_NHW: their labels (uint8 range).
        unlabeled_files: the unlabeled image files, in the order their sampler indices refer to
            (index ``n_l + i`` is ``unlabeled_files[i]``; `FolderDataset.images` order).
        labeled_bs, unlabeled_bs, seed, device, augment, rank, world_size, channels: as `TrainStream`.
        max_image_pixels: images above this many pixels are an error naming the file.
        decode_workers: decoding threads (0: in the calling thread).
        prefetch_batches: batches drawn and decoded ahead when ``decode_workers > 0``.
    """

    #: nothing is skipped: a bad file in a folder is an error naming it
    skipped_files: int = 0

    def __init__(
        self,
        images_NCHW: torch.Tensor,
        labels_NHW: torch.Tensor,
        unlabeled_files: Sequence[str | os.PathLike[str]],
        *,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode_workers: int = 2,
        prefetch_batches: int = 2,
    ) -> None:
        unknown = set(augment or {}) - _AUGMENT_KEYS
        if unknown:
            raise TypeError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(_AUGMENT_KEYS)}")
        if images_NCHW.dim() == 3:
            images_NCHW = images_NCHW.unsqueeze(1)
        if images_NCHW.dim() != 4 or labels_NHW.shape != images_NCHW.shape[:1] + images_NCHW.shape[2:]:
            raise ValueError(f"need images [N, C, H, W] and labels [N, H, W], got {tuple(images_NCHW.shape)} "
                             f"and {tuple(labels_NHW.shape)}")
        if images_NCHW.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {images_NCHW.shape[1]}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if decode_workers < 0 or prefetch_batches < 1:
            raise ValueError(f"need decode_workers >= 0 and prefetch_batches >= 1, got {decode_workers}, "
                             f"{prefetch_batches}")
        self.device = torch.device(device)
        self.augment_kwargs: dict[str, Any] = dict(augment or {})
        self.channels = int(channels)
        self.images_NCHW = images_NCHW.to(self.device, torch.float32).contiguous()
        self.labels_NHW = labels_NHW.to(self.device)
        self.files = [os.fspath(f) for f in unlabeled_files]
        self.n_labeled = int(images_NCHW.shape[0])
        self._decode_args = (int(images_NCHW.shape[1]), (int(images_NCHW.shape[2]), int(images_NCHW.shape[3])),
                             max_image_pixels)
        n_l, n_u = self.n_labeled, len(self.files)
        self.sampler = TwoStreamSampler(np.arange(n_l), np.arange(n_l, n_l + n_u), labeled_bs, unlabeled_bs,
                                        seed, rank=rank, world_size=world_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_torch_seed(seed, rank))
        self.decode_workers = int(decode_workers)
        self.prefetch_batches = int(prefetch_batches)
        self._ahead = DecodeAhead(self.decode_workers) if self.decode_workers else None
        # per batch drawn ahead: (sampler state before the draw, labeled idx, unlabeled idx, #files)
        self._pending: deque[tuple[dict[str, Any], np.ndarray, np.ndarray]] = deque()

    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Fingerprints of the labeled / unlabeled file lists (`TwoStreamSampler.set_identity`)."""
        self.sampler.set_identity(labeled, unlabeled, resume_changed_data=resume_changed_data)

    # ------------------------------------------------------------------ properties
    @property
    def n_unlabeled(self) -> int:
        return len(self.files)

    @property
    def epoch_length(self) -> int:
        return self.sampler.epoch_length

    @property
    def img_size(self) -> tuple[int, int]:
        return self._decode_args[1]

    # ------------------------------------------------------------------ batches
    def _file(self, i: int) -> str:
        return self.files[int(i) - self.n_labeled]

    def _fill(self) -> None:
        assert self._ahead is not None
        while len(self._pending) < self.prefetch_batches:
            snap = self.sampler.state_dict()
            lab, unl = next(self.sampler)
            for i in unl:
                self._ahead.submit(None, _decode, self._file(i), *self._decode_args)
            self._pending.append((snap, lab, unl))

    def _draw(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        if self._ahead is None:
            lab, unl = next(self.sampler)
            return lab, unl, [_decode(self._file(i), *self._decode_args) for i in unl]
        self._fill()
        _, lab, unl = self._pending[0]
        try:
            imgs = [self._ahead.pop()[1].result() for _ in range(len(unl))]
        except BaseException:
            self._drop_ahead()  # the position stays before this batch
            raise
        self._pending.popleft()
        self._fill()  # the threads decode the next batches while the caller trains
        return lab, unl, imgs

    def _drop_ahead(self) -> None:
        if self._pending:
            snap = self._pending[0][0]
            self._pending.clear()
            if self._ahead is not None:
                self._ahead.clear()
            self.sampler.load_state_dict(snap)

    def next(self) -> Batch:
        """The next augmented batch, on ``device`` (equal to `TrainStream`'s over the full cache)."""
        lab, unl, imgs = self._draw()
        lab_idx = to_device(lab, self.device)
        x_l = self.images_NCHW.index_select(0, lab_idx)
        if imgs:
            x_u = torch.from_numpy(np.stack(imgs))
            if self.device.type == "cuda":
                x_u = x_u.pin_memory()
            x = torch.cat([x_l, x_u.to(self.device, non_blocking=True)])
        else:
            x = x_l
        return augmented_batch(self, x, self.labels_NHW.index_select(0, lab_idx))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """`TrainStream`'s format, at the next batch `next` returns (batches decoded ahead excluded)."""
        sampler = self._pending[0][0] if self._pending else self.sampler.state_dict()
        return {"sampler": sampler, **generator_state(self.generator, self.device)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken (this stream's or `TrainStream`'s)."""
        check_generator_device(state, self.device)
        self.sampler.load_state_dict(dict(state["sampler"]))  # first: a refused state changes nothing
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.clear()
        restore_generator(self.generator, state)

    def close(self) -> None:
        """Stop the decode threads."""
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.close(wait=True)

    def __del__(self) -> None:  # pragma: no cover - best effort
        ahead = getattr(self, "_ahead", None)
        if ahead is not None:
            ahead.close(wait=False)

    def __repr__(self) -> str:
        return (f"FolderTrainStream(n_labeled={self.n_labeled}, n_unlabeled={self.n_unlabeled}, "
                f"decode_workers={self.decode_workers}, img_size={self.img_size})")
