"""What the DALI backends (`dali` 2D, `dali3d` 3D) share: the affine matrices of the 2D graph,
the snapshotting ``fn.external_source`` producer and the lazily built pipeline + iterator.

Resume with prefetching: DALI asks the producer for batches ahead of the one the trainer
consumes. The producer (`SnapshotSource`) keeps, per batch handed to DALI and not yet returned,
the resume snapshot taken *before* it was drawn (and what it drew beside the data, e.g. the 2D
post-stage's `AugmentParams`); `Runner.state` is the oldest one, so a state never counts a
prefetched batch as consumed, and `Runner.load` drops the pipeline (rebuilt at the next batch).

No CUDA and no ``nvidia.dali`` at import time.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .augment import AugmentParams

__all__ = ["Runner", "SnapshotSource", "nearest_resize_matrix", "post_params_to", "ssr_matrices"]


# ---------------------------------------------------------------------------- matrices
def ssr_matrices(p: AugmentParams, height: int, width: int) -> np.ndarray:
    """``[B, 2, 3]`` float32 destination->source matrices of the shift-scale-rotate stage in
    DALI's convention (``[0, 0]`` = corner of the first pixel), equal to `augment`'s map.

    torch/OpenCV (pixel centres at integers): ``src = A (dst - c - t) + c`` with
    ``A = R(-angle) / scale``, ``c = ((W-1)/2, (H-1)/2)``. With corner coordinates
    (``+0.5``) the centre becomes ``c' = (W/2, H/2)``: ``src' = A dst' + c' - A (c' + t)``.
    """
    on = p.ssr_on.numpy()
    ang = np.where(on, p.angle_deg.double().numpy(), 0.0) * (math.pi / 180.0)
    scale = np.where(on, p.scale.double().numpy(), 1.0)
    tx = np.where(on, p.shift_x.double().numpy() * width, 0.0)
    ty = np.where(on, p.shift_y.double().numpy() * height, 0.0)
    cos, sin = np.cos(ang) / scale, np.sin(ang) / scale
    cx, cy = width / 2.0, height / 2.0
    m = np.empty((len(on), 2, 3), np.float64)
    m[:, 0, 0], m[:, 0, 1] = cos, -sin
    m[:, 1, 0], m[:, 1, 1] = sin, cos
    m[:, 0, 2] = cx - (cos * (cx + tx) - sin * (cy + ty))
    m[:, 1, 2] = cy - (sin * (cx + tx) + cos * (cy + ty))
    return m.astype(np.float32)


def nearest_resize_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """``[2, 3]`` matrix for ``warp_affine(interp NN)`` reproducing `cv2_nearest_indices`:
    destination pixel ``i`` (centre ``i + 0.5``) maps to ``i * src / dst``, which lies in source pixel
    ``floor(i * src / dst)`` (DALI NN picks the pixel containing the point). A 1e-4 px nudge
    keeps exact integers from rounding down in float32 (harmless below 10^4 px)."""
    fy = 1.0 / (float(dst_hw[0]) / float(src_hw[0]))
    fx = 1.0 / (float(dst_hw[1]) / float(src_hw[1]))
    return np.array([[fx, 0.0, -0.5 * fx + 1e-4], [0.0, fy, -0.5 * fy + 1e-4]], np.float32)


# Fields the 2D post-stage (distortion + dropout) reads; only these travel to the training device.
_POST_FIELDS = ("distort_on", "use_grid", "steps_x", "steps_y", "elastic_noise", "dropout_on", "n_holes",
                "hole_y", "hole_x")


def post_params_to(p: AugmentParams, device: torch.device) -> AugmentParams:
    """``p`` with the post-stage's fields on ``device`` (asynchronous copies; CPU: ``p`` itself)."""
    if device.type == "cpu":
        return p
    moved = {k: getattr(p, k).to(device, non_blocking=True) for k in _POST_FIELDS if getattr(p, k) is not None}
    return dataclasses.replace(p, **moved)


# ---------------------------------------------------------------------------- producer
class SnapshotSource:
    """Host-side producer of one pipeline's inputs (the ``fn.external_source`` callable); its
    state is snapshotted per batch. Subclasses: `snapshot`, `restore`, `draw` (the 2D sources of
    `dali`, the 3D one of `dali3d`)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        # One entry per batch handed to DALI and not yet returned by `Runner.next`, oldest first:
        # (resume snapshot taken before it was drawn, what `draw` returned beside the data: the
        # AugmentParams for the 2D post-stage).
        self.pending: deque[tuple[dict[str, Any], Any]] = deque()
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def draw(self) -> tuple[tuple[list[np.ndarray], ...], Any]:
        raise NotImplementedError

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        with self.lock:
            snap = self.snapshot()
            out, p = self.draw()
            self.pending.append((snap, p))
            return out


# ---------------------------------------------------------------------------- pipeline
class Runner:
    """One DALI pipeline + iterator, built lazily (and rebuilt after a resume).

    ``build(source, **build_kw)`` makes the pipeline, whose outputs are ``names``."""

    def __init__(self, source: SnapshotSource, build: Callable[..., Any], names: Sequence[str],
                 **build_kw: Any) -> None:
        self.source, self.build, self.build_kw = source, build, build_kw
        self.names = list(names)
        self.iterator = None

    def next(self) -> tuple[list[torch.Tensor], Any]:
        """The next DALI batch and the parameters it was drawn with."""
        if self.iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator

            pipe = self.build(self.source, **self.build_kw)
            # size=-1: the external source never ends; prefetching is accounted for by `pending`.
            self.iterator = DALIGenericIterator([pipe], self.names, size=-1, auto_reset=False)
        out = next(self.iterator)[0]
        with self.source.lock:
            # DALI returns batches in the order the source produced them: the oldest entry is this one.
            _, params = self.source.pending.popleft()
        return [out[n] for n in self.names], params

    def state(self) -> dict[str, Any]:
        with self.source.lock:
            return self.source.pending[0][0] if self.source.pending else self.source.snapshot()

    def load(self, state: Mapping[str, Any]) -> None:
        with self.source.lock:
            self.source.restore(state)  # first: a rejected state leaves the runner as it was
            self.source.pending.clear()
        self.iterator = None  # drop prefetched batches; the next call rebuilds the pipeline
