"""The torch backend with an unlabeled manifest: labeled batches from a 2D torch stream (cache on
the device), unlabeled images read from a `ManifestStream` (decoded on the CPU, ahead of the
step by its threads), moved to the device and augmented there by a generator of their own."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .augment import augment_2d
from .base import Identity, Stream, decode_generator, encode_generator, torch_seed
from .batch import Batch
from .manifest import ManifestStream
from .stream import TorchStream2D, check_augment

__all__ = ["ManifestTrainStream"]


class ManifestTrainStream(Stream):
    """Labeled part from ``labeled`` (a `TrainStream` / `FolderTrainStream` built with
    ``unlabeled_bs=0``), ``unlabeled_bs`` unlabeled images per step from ``manifest``.

    Args:
        labeled: the labeled stream (its sampler, cache and augmentation generator).
        manifest: the unlabeled archive (already sharded by rank).
        unlabeled_bs: unlabeled images per step.
        augment: `augment_2d` keyword arguments for the unlabeled images.
        seed, rank: seed the unlabeled augmentation generator (``seed + 1``: independent of the
            labeled stream's).
        identity: resume identity of the labeled list (the manifest fingerprints itself; its
            ``resume_changed_data`` is passed on to the manifest).

    State: ``{"labeled", "manifest", "generator"}``. `skipped_files`: the manifest's.
    """

    def __init__(self, labeled: TorchStream2D, manifest: ManifestStream, unlabeled_bs: int,
                 augment: Mapping[str, Any] | None, seed: int, rank: int, *, identity: Identity | None = None) -> None:
        super().__init__(device=labeled.device, img_size=labeled.img_size, n_labeled=labeled.n_labeled)
        self.labeled, self.manifest, self.unlabeled_bs = labeled, manifest, int(unlabeled_bs)
        self.augment = check_augment(augment)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(torch_seed(seed + 1, rank))
        self._apply_identity(identity)

    @property
    def epoch_length(self) -> int:
        return self.labeled.epoch_length

    @property
    def skipped_files(self) -> int:
        """Manifest files skipped so far (unreadable, too large, not a file)."""
        return self.manifest.skipped_files

    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Fingerprint of the labeled list (the manifest fingerprints itself)."""
        self.labeled.set_identity(labeled, None, resume_changed_data=resume_changed_data)
        if resume_changed_data is not None:
            self.manifest.resume_changed_data = bool(resume_changed_data)

    def close(self) -> None:
        """Stop the manifest's decode threads and close it."""
        self.manifest.close()
        self.labeled.close()

    # ------------------------------------------------------------------ batches
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

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"labeled": self.labeled.state_dict(), "manifest": self.manifest.state_dict(),
                "generator": encode_generator(self.generator)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.manifest.load_state_dict(state["manifest"])
        decode_generator(self.generator, state["generator"])
