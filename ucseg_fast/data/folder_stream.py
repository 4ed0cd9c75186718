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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import Identity
from .batch import Batch
from .folders import FolderDataset, decode_image
from .guards import DEFAULT_MAX_IMAGE_PIXELS
from .prefetch import DecodeAhead
from .stream import TorchStream2D, augmented_batch, to_device

__all__ = ["FolderTrainStream"]


def _decode(path: str, channels: int, size: tuple[int, int], cap: int | None) -> np.ndarray:
    return decode_image(path, channels=channels, max_pixels=cap, size=size)


class FolderTrainStream(TorchStream2D):
    """Infinite source of augmented batches: labeled from a device cache, unlabeled decoded from files.

    Args:
        images_NCHW: labeled images float32 ``[n_l, C, H, W]`` at ``img_size`` (``C`` 1 or 3).
        labels_NHW: their labels (uint8 range).
        unlabeled_files: the unlabeled image files, in the order their sampler indices refer to
            (index ``n_l + i`` is ``unlabeled_files[i]``; `FolderDataset.images` order).
        labeled_bs, unlabeled_bs, seed, device, augment, rank, world_size, channels, identity:
            as `TrainStream`.
        max_image_pixels: images above this many pixels are an error naming the file.
        decode_workers: decoding threads (0: in the calling thread).
        prefetch_batches: batches drawn and decoded ahead when ``decode_workers > 0``.

    `from_folder` builds one from an opened `FolderDataset`. Nothing is skipped: a bad file in a
    folder is an error naming it (`skipped_files` is 0).
    """

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
        identity: Identity | None = None,
    ) -> None:
        if images_NCHW.dim() == 3:
            images_NCHW = images_NCHW.unsqueeze(1)
        if images_NCHW.dim() != 4 or labels_NHW.shape != images_NCHW.shape[:1] + images_NCHW.shape[2:]:
            raise ValueError(f"need images [N, C, H, W] and labels [N, H, W], got {tuple(images_NCHW.shape)} "
                             f"and {tuple(labels_NHW.shape)}")
        if images_NCHW.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {images_NCHW.shape[1]}")
        if decode_workers < 0 or prefetch_batches < 1:
            raise ValueError(f"need decode_workers >= 0 and prefetch_batches >= 1, got {decode_workers}, "
                             f"{prefetch_batches}")
        self.files = [os.fspath(f) for f in unlabeled_files]
        self._decode_args = (int(images_NCHW.shape[1]), (int(images_NCHW.shape[2]), int(images_NCHW.shape[3])),
                             max_image_pixels)
        self.decode_workers = int(decode_workers)
        self.prefetch_batches = int(prefetch_batches)
        # per batch drawn ahead: (sampler state before the draw, labeled idx, unlabeled idx)
        self._pending: deque[tuple[dict[str, Any], np.ndarray, np.ndarray]] = deque()
        self._ahead: DecodeAhead | None = None
        super().__init__(
            images_NCHW, labels_NHW, n_labeled=int(images_NCHW.shape[0]), n_unlabeled=len(self.files),
            labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs, seed=seed, device=device, augment=augment,
            rank=rank, world_size=world_size, channels=channels, identity=identity,
        )
        self._ahead = DecodeAhead(self.decode_workers) if self.decode_workers else None

    @classmethod
    def from_folder(
        cls,
        dataset: FolderDataset,
        images_NCHW: torch.Tensor,
        labels_NHW: torch.Tensor,
        unlabeled_files: Sequence[str | os.PathLike[str]] | None = None,
        **kw: Any,
    ) -> FolderTrainStream:
        """Over an opened image folder: its labeled split already cached (``images_NCHW``,
        ``labels_NHW``; `FolderDataset.load_split`), ``unlabeled_files`` (default: the
        ``unlabeled`` split, listed now) decoded as the dataset decodes (its pixel cap). Other
        keyword arguments: as the constructor."""
        files = dataset.images("unlabeled") if unlabeled_files is None else unlabeled_files
        kw.setdefault("max_image_pixels", dataset.max_image_pixels)
        return cls(images_NCHW, labels_NHW, files, **kw)

    # ------------------------------------------------------------------ properties
    @property
    def n_unlabeled(self) -> int:
        return len(self.files)

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

    # ------------------------------------------------------------------ resume
    def _sampler_state(self) -> dict[str, Any]:
        """At the next batch `next` returns: batches decoded ahead are not counted."""
        return self._pending[0][0] if self._pending else self.sampler.state_dict()

    def _reset_ahead(self) -> None:
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.clear()

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
