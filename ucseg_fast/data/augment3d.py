"""The reference's 3D augmentation, ``RandomRotFlip`` then ``RandomCrop(patch)``, computed on the patch only.

Reference (UA-MT / SSL4MIS ``la_heart.py``, docs/method.md §3), per sample, numpy::

    k = randint(0, 4);   image = rot90(image, k)          # plane of axes (0, 1)
    a = randint(0, 2);   image = flip(image, axis=a)      # always applied
    if any(s_i <= p_i):  image = pad(image, max((p_i - s_i) // 2 + 3, 0) on both sides of EVERY axis i)
    o_i = randint(0, s_i - p_i) for i = 0, 1, 2           # s = shape after rotation and padding
    image = image[o_0:o_0 + p_0, o_1:o_1 + p_1, o_2:o_2 + p_2]     (label identically, pad value 0)

Here the parameters are drawn in that order from a ``numpy.random.Generator`` (`draw_rot_flip_crop`,
host only, so no device sync), and the result is computed without rotating or padding the whole
volume: rotation and flip only permute and reverse the axes (0, 1), so the crop window maps back
to a box of the *source* volume. `RotFlipCrop.crop_into` copies that box (zeros where it reaches
into the padding) into a patch-sized buffer with the axes permuted (a strided copy of ~p³ voxels
instead of three full-volume copies), and `RotFlipCrop.orient` applies the remaining reversals.
The result is bit-identical to the literal numpy pipeline (tests/test_data_3d.py holds that
oracle). Both steps are torch ops on whatever device holds their input, so the training stream
can crop on the CPU (where the volume cache lives), move the patch, and orient it on the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RotFlipCrop", "crop_pad", "draw_rot_flip_crop", "rot_flip_crop"]


def crop_pad(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """The reference ``RandomCrop`` padding (per side) of a volume of ``shape`` for ``patch``."""
    if not any(s <= p for s, p in zip(shape, patch)):
        return (0, 0, 0)
    pad = tuple(max((int(p) - int(s)) // 2 + 3, 0) for s, p in zip(shape, patch))
    return pad  # type: ignore[return-value]


@dataclass(frozen=True)
class RotFlipCrop:
    """One sample's drawn parameters (see the module docstring).

    Attributes:
        shape: the source volume's ``[X, Y, Z]``.
        patch: the crop size ``(p_0, p_1, p_2)``.
        k: quarter turns of ``np.rot90`` in the plane of axes (0, 1); 0 with no rotation.
        flip_axis: axis (0 or 1) of the rotated volume that is flipped; -1 = no flip.
        pad: padding per side of each axis of the rotated volume.
        offset: crop start in the rotated, padded volume.
    """

    shape: tuple[int, int, int]
    patch: tuple[int, int, int]
    k: int
    flip_axis: int
    pad: tuple[int, int, int]
    offset: tuple[int, int, int]

    # ------------------------------------------------------------------ geometry
    @property
    def perm(self) -> tuple[int, int, int]:
        """Source axis of each patch axis (rot90 by an odd ``k`` swaps axes 0 and 1)."""
        return (1, 0, 2) if self.k % 2 else (0, 1, 2)

    @property
    def reversed_axes(self) -> tuple[int, ...]:
        """Patch axes that run backwards through the source volume."""
        # np.rot90: k=1 -> R[i, j] = V[j, n1-1-i]; k=2 -> V[n0-1-i, n1-1-j]; k=3 -> V[n0-1-j, i]
        rev = [(False, False), (True, False), (True, True), (False, True)][self.k % 4]
        rev_l = list(rev)
        if self.flip_axis in (0, 1):
            rev_l[self.flip_axis] = not rev_l[self.flip_axis]
        return tuple(d for d in (0, 1) if rev_l[d])

    def source_box(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Half-open source interval ``[lo, lo + p)`` feeding each patch axis (may leave the volume).

        Entry ``d`` is along source axis ``perm[d]``; the voxels outside ``[0, shape)`` are padding.
        """
        rev = self.reversed_axes
        box = []
        for d in range(3):
            n = self.shape[self.perm[d]]
            start = self.offset[d] - self.pad[d]  # window start in the rotated, unpadded volume
            lo = n - start - self.patch[d] if d in rev else start
            box.append((lo, lo + self.patch[d]))
        return tuple(box)  # type: ignore[return-value]

    # ------------------------------------------------------------------ application
    def crop_into(self, out: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        """Write the source box of ``volume [X, Y, Z]`` into ``out [p_0, p_1, p_2]``, axes permuted,
        zeros outside the volume, NOT yet reversed (`orient` finishes). ``out`` may live on any
        device (e.g. pinned host memory); returns ``out``."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"RotFlipCrop drawn for a volume of shape {self.shape}, got {tuple(volume.shape)}")
        if tuple(out.shape) != self.patch:
            raise ValueError(f"RotFlipCrop: out must have shape {self.patch}, got {tuple(out.shape)}")
        src: list[slice] = [slice(0, 0)] * 3
        dst: list[slice] = []
        full = True
        for d, (lo, hi) in enumerate(self.source_box()):
            axis = self.perm[d]
            a, b = max(lo, 0), min(hi, self.shape[axis])
            if b <= a:  # the window lies entirely in the padding
                out.zero_()
                return out
            full = full and a == lo and b == hi
            src[axis] = slice(a, b)
            dst.append(slice(a - lo, b - lo))
        if not full:
            out.zero_()
        out[tuple(dst)].copy_(volume[tuple(src)].permute(self.perm))
        return out

    def orient(self, patch: torch.Tensor) -> torch.Tensor:
        """Apply the axis reversals to a `crop_into` result (``[p_0, p_1, p_2]``, any device)."""
        rev = self.reversed_axes
        return torch.flip(patch, rev) if rev else patch

    def apply(self, volume: torch.Tensor) -> torch.Tensor:
        """The augmented patch of ``volume [X, Y, Z]``, on ``volume``'s device, same dtype."""
        out = torch.empty(self.patch, dtype=volume.dtype, device=volume.device)
        return self.orient(self.crop_into(out, volume)).contiguous()


def draw_rot_flip_crop(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, *, rot_flip: bool = True
) -> RotFlipCrop:
    """Draw one sample's parameters in the reference's order (k, flip axis, then o_0, o_1, o_2).

    ``rot_flip=False`` skips ``RandomRotFlip`` (no draws for it): crop only.
    """
    shape_t = tuple(int(s) for s in shape)
    patch_t = tuple(int(p) for p in patch)
    if len(shape_t) != 3 or len(patch_t) != 3:
        raise ValueError(f"need a 3-D shape and patch, got {shape_t} and {patch_t}")
    if min(patch_t) < 1 or min(shape_t) < 1:
        raise ValueError(f"shape {shape_t} and patch {patch_t} must be positive")
    k, flip_axis = 0, -1
    if rot_flip:
        k = int(rng.integers(0, 4))
        flip_axis = int(rng.integers(0, 2))
    rotated = (shape_t[1], shape_t[0], shape_t[2]) if k % 2 else shape_t
    pad = crop_pad(rotated, patch_t)
    padded = [s + 2 * q for s, q in zip(rotated, pad)]
    offset = tuple(int(rng.integers(0, s - p)) for s, p in zip(padded, patch_t))
    return RotFlipCrop(shape_t, patch_t, k, flip_axis, pad, offset)  # type: ignore[arg-type]


def rot_flip_crop(
    image: torch.Tensor,
    label: torch.Tensor | None,
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    rot_flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, RotFlipCrop]:
    """``RandomRotFlip`` -> ``RandomCrop(patch)`` of one ``image [X, Y, Z]`` (and its label map).

    Returns the image patch, the label patch (None without a label) and the drawn parameters;
    both patches are computed on the input's device, in the input's dtype.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [X, Y, Z], got {tuple(image.shape)}")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"label {tuple(label.shape)} and image {tuple(image.shape)} differ in shape")
    params = draw_rot_flip_crop(image.shape, patch, rng, rot_flip=rot_flip)
    return params.apply(image), None if label is None else params.apply(label), params
