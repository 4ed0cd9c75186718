"""The `Batch` contract between every data backend and the trainer.

A training step consumes labeled images, their label maps and unlabeled images with fixed
shapes. Every backend (torch/GPU augmentation, DALI, CPU fallback, the 3D volume stream)
produces exactly this, so the step body can be captured once and fed by copying into static
buffers. Spatial shape ``S`` is ``(H, W)`` in 2D and ``(X, Y, Z)`` for 3D patches (docs/method.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """Labeled images + labels + unlabeled images, one training step's worth.

    Attributes:
        x_l: labeled images ``[Bl, C, *S]`` float (float32 by convention), ``S = (H, W)`` in 2D or
            ``(X, Y, Z)`` in 3D.
        y_l: labels ``[Bl, *S]`` int64 class indices (0 = background).
        x_u: unlabeled images ``[Bu, C, *S]``, same dtype, ``C, *S`` as ``x_l``; ``Bu`` may be 0.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor

    def __post_init__(self) -> None:
        # Shape metadata only: no device work, safe inside a loop that must not sync.
        if self.x_l.dim() not in (4, 5) or self.x_u.dim() != self.x_l.dim():
            raise ValueError(
                f"Batch: x_l and x_u must be [B, C, H, W] or [B, C, X, Y, Z] alike, got "
                f"{tuple(self.x_l.shape)} and {tuple(self.x_u.shape)}"
            )
        spatial = self.x_l.dim() - 2
        dims = "H, W" if spatial == 2 else "X, Y, Z"
        if self.y_l.dim() != spatial + 1:
            raise ValueError(f"Batch: y_l must be [Bl, {dims}], got {tuple(self.y_l.shape)}")
        bl = self.x_l.shape[0]
        if tuple(self.y_l.shape) != (bl, *self.x_l.shape[2:]):
            raise ValueError(
                f"Batch: y_l shape {tuple(self.y_l.shape)} does not match x_l {tuple(self.x_l.shape)}"
            )
        if self.x_u.shape[1:] != self.x_l.shape[1:]:
            raise ValueError(
                f"Batch: x_u {tuple(self.x_u.shape)} and x_l {tuple(self.x_l.shape)} differ in C, {dims}"
            )
        if self.y_l.is_floating_point() or self.y_l.is_complex():
            raise ValueError(f"Batch: y_l must be an integer tensor, got {self.y_l.dtype}")

    @property
    def labeled_bs(self) -> int:
        return int(self.x_l.shape[0])

    @property
    def unlabeled_bs(self) -> int:
        return int(self.x_u.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move all three tensors; asynchronous when the source is pinned and ``non_blocking``."""
        return Batch(
            self.x_l.to(device, non_blocking=non_blocking),
            self.y_l.to(device, non_blocking=non_blocking),
            self.x_u.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy (CPU tensors only) so that a later ``to(cuda)`` overlaps compute."""
        return Batch(self.x_l.pin_memory(), self.y_l.pin_memory(), self.x_u.pin_memory())
