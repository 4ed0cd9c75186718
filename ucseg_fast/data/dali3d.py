"""The DALI backend for 3D (LA / Pancreas) training: `VolumeStream`'s sampling and parameters,
the reference's ``RandomRotFlip`` -> ``RandomCrop`` geometry done by DALI operators.

`DaliVolumeStream` is a `VolumeStream` (same constructors, cache, `TwoStreamSampler` and
numpy-Generator draws, `VolumeStream.draw` -> `draw_rot_flip_crop`) whose batches come out of a
DALI pipeline fed by ``fn.external_source``. Per sample the host hands DALI

* the source window of the crop: the box of the *source* volume that feeds the patch
  (`RotFlipCrop.source_box`), clipped to the volume (``feed="window"``, the default: ~p³ voxels
  per sample; ``feed="volume"`` hands the whole cached volume instead and lets DALI cut it),
  image float32 and label uint8, as ``[1, X, Y, Z]`` (layout ``CDHW``: D = axis 0, H = axis 1);
* the per-sample parameters: slice start (relative to what was fed, negative = padding) and
  shape in source axis order, whether ``k`` is odd, and the reversals of patch axes 0 and 1.

and DALI does the geometry, for image and label alike (GPU operators on a CUDA training device,
CPU operators otherwise):

1. ``fn.slice(..., out_of_bounds_policy="pad", fill_values=0)``: the crop window with the
   reference's zero padding (``np.pad`` + ``RandomCrop``), still in source axis order;
2. ``if k is odd: fn.transpose(perm=[0, 2, 1, 3])`` (DALI conditionals, per sample): the axis
   swap of ``np.rot90`` in the plane of axes (0, 1);
3. ``fn.flip(depthwise=rev_0, vertical=rev_1)``: the axis reversals of the rotation and of the
   always-applied flip along axis 0 or 1 (`RotFlipCrop.reversed_axes`).

This is exactly `RotFlipCrop.crop_into` + `RotFlipCrop.orient` (pure data movement), so a batch
equals `VolumeStream`'s for the same seed bit for bit, image and label (tests/test_dali3d.py).
Labels of the unlabeled samples are never read: they are fed as one zero voxel (padded to the
patch, dropped after the pipeline). Output: ``x`` ``[B, channels, X, Y, Z]`` float32 (gray
repeated) and ``y_l`` ``[Bl, X, Y, Z]`` int64 on the training device.

Resume: DALI prefetches, so the source keeps per prefetched batch a snapshot (sampler +
generator state taken *before* its draws), as the 2D backend (`dali_pipeline.SnapshotSource`,
`dali_pipeline.Runner`); `state_dict` returns the oldest unconsumed batch's, in `VolumeStream`'s format.
The two 3D backends draw identically, so either one resumes the other's state exactly.

No CUDA and no ``nvidia.dali`` at import time.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import dali as _dali
from .augment3d import RotFlipCrop
from .batch import Batch
from .dali_pipeline import Runner, SnapshotSource
from .stream3d import _STATE_VERSION, VolumeStream

__all__ = ["DaliVolumeStream", "source_window"]

_FEEDS = ("window", "volume")


def source_window(p: RotFlipCrop, *, clip: bool = True) -> tuple[tuple[slice, ...] | None, np.ndarray, np.ndarray]:
    """What to feed DALI for one sample, in source axis order (``X, Y, Z`` of the volume).

    Returns ``(window, start, shape)``: ``window`` the slices of the source volume to hand over
    (the source box clipped to the volume; None when the box lies entirely in the padding;
    ``clip=False``: the whole volume), ``start`` int32 ``[3]`` the slice start relative to that
    window (negative or past its end = zero padding) and ``shape`` int32 ``[3]`` the slice extent
    (the patch, axes permuted back to the source's)."""
    sl: list[slice] = [slice(None)] * 3
    start = np.zeros(3, np.int32)
    shape = np.zeros(3, np.int32)
    empty = False
    for d, (lo, hi) in enumerate(p.source_box()):
        axis = p.perm[d]
        a, b = max(lo, 0), min(hi, p.shape[axis])
        empty = empty or b <= a
        if clip:
            sl[axis] = slice(a, b)
        start[axis] = lo - a if clip else lo
        shape[axis] = p.patch[d]
    if clip and empty:
        return None, np.zeros(3, np.int32), shape
    return tuple(sl), start, shape


_ZERO_IMAGE = np.zeros((1, 1, 1, 1), np.float32)
_ZERO_LABEL = np.zeros((1, 1, 1, 1), np.uint8)


class _VolumeSource(SnapshotSource):
    """``fn.external_source`` callable: `VolumeStream.draw` of the stream, then the windows and
    per-sample DALI arguments. Snapshot = the stream's sampler + generator state."""

    def __init__(self, stream: DaliVolumeStream) -> None:
        super().__init__(stream.sampler.labeled_bs + stream.sampler.unlabeled_bs)
        self.stream = stream

    def snapshot(self) -> dict[str, Any]:
        return {"sampler": self.stream.sampler.state_dict(), "rng": self.stream.rng.bit_generator.state}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.stream._restore(state)  # validates, then sets sampler + generator

    def draw(self) -> tuple[tuple[list[np.ndarray], ...], list[RotFlipCrop]]:
        s = self.stream
        idx, params = s.draw()
        bl = s.sampler.labeled_bs
        clip = s.feed == "window"
        xs, ys, starts, shapes, odd, rev0, rev1 = [], [], [], [], [], [], []
        for b, (i, p) in enumerate(zip(idx.tolist(), params)):
            window, start, shape = source_window(p, clip=clip)
            if window is None:  # only padding: one zero voxel, padded to the patch by the slice
                xs.append(_ZERO_IMAGE)
                ys.append(_ZERO_LABEL)
            else:
                xs.append(np.ascontiguousarray(s._np_images[i][window])[None])
                ys.append(np.ascontiguousarray(s._np_labels[i][window])[None] if b < bl else _ZERO_LABEL)
            # One start/shape per sample serves image and label: an unlabeled sample's label is one
            # zero voxel, which any start slices (and pads) to zeros.
            starts.append(start)
            shapes.append(shape)
            rev = p.reversed_axes
            odd.append(np.array(p.k % 2 == 1))
            rev0.append(np.int32(0 in rev))
            rev1.append(np.int32(1 in rev))
        return (xs, ys, starts, shapes, odd, rev0, rev1), params


def _build_pipeline(source: _VolumeSource, *, device_id: int | None, num_threads: int, seed: int):
    """The DALI graph (see the module docstring): slice with zero padding -> per-sample
    transpose (conditional) -> flips, image and label alike; outputs ``[B, 1, X, Y, Z]``."""
    from nvidia.dali import fn, pipeline_def

    gpu = device_id is not None

    @pipeline_def(batch_size=source.batch, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_conditionals=True, **_dali._queue_kw(gpu))
    def pipe():
        x, y, start, shape, odd, rev0, rev1 = fn.external_source(
            source=source, num_outputs=7, batch=True, layout=["CDHW", "CDHW", "", "", "", "", ""])
        if gpu:
            x, y = x.gpu(), y.gpu()
        # RandomCrop of the padded volume = a slice of the source reaching into zeros.
        x = fn.slice(x, start=start, shape=shape, axis_names="DHW", out_of_bounds_policy="pad", fill_values=0)
        y = fn.slice(y, start=start, shape=shape, axis_names="DHW", out_of_bounds_policy="pad", fill_values=0)
        if odd:  # rot90 by an odd k swaps axes 0 and 1 (layout names kept: D, H = patch axes 0, 1)
            x = fn.transpose(x, perm=[0, 2, 1, 3], transpose_layout=False)
            y = fn.transpose(y, perm=[0, 2, 1, 3], transpose_layout=False)
        # the rotation's and the flip's reversals of patch axes 0 (D) and 1 (H)
        x = fn.flip(x, depthwise=rev0, vertical=rev1, horizontal=0)
        y = fn.flip(y, depthwise=rev0, vertical=rev1, horizontal=0)
        return x, y

    return pipe()


class DaliVolumeStream(VolumeStream):
    """`VolumeStream` whose geometry runs in DALI: same constructors and arguments (plus the two
    below), same draws, same `Batch`, same state format.

    Extra keyword arguments (``__init__`` and ``from_arrays``, `_configure`):
        feed: ``"window"`` (default) hands DALI the clipped source window of each sample (~p³
            voxels: the host copy the torch backend's staging does too); ``"volume"`` hands it the
            whole cached volume and lets ``fn.slice`` cut the window (more host/PCIe traffic).
        num_threads: DALI CPU threads.

    The cache must live on the CPU (``cache_device="cpu"``): ``external_source`` reads host
    arrays. On a CUDA ``device`` the operators run on that GPU and batches arrive there.
    """

    feed: str = "window"
    num_threads: int = 2

    def _configure(self, *, feed: str = "window", num_threads: int = 2) -> None:
        if feed not in _FEEDS:
            raise ValueError(f"feed = {feed!r}; choose one of {_FEEDS}")
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.feed, self.num_threads = feed, int(num_threads)

    def _setup(self, images: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], *,
               cache_device: torch.device | str, **kw: Any) -> None:
        reason = _dali.dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"data.backend = 'dali': {reason}")
        if torch.device(cache_device).type != "cpu":
            raise ValueError(f"DaliVolumeStream keeps the volume cache on the CPU (fn.external_source "
                             f"reads host arrays); got cache_device = {str(cache_device)!r}")
        super()._setup(images, labels, names, cache_device="cpu", **kw)
        self._pin = False  # no torch staging batches here
        # zero-copy numpy views of the cache (windows are cut from these)
        self._np_images = [x.numpy() for x in self.images]
        self._np_labels = [y.numpy() for y in self.labels]
        self._runner = Runner(_VolumeSource(self), self._pipeline, ["x", "y"])

    def _pipeline(self, source: _VolumeSource):
        dev_id = None
        if self.device.type == "cuda":
            dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # seed: the graph has no random operator (every parameter comes from `draw`)
        return _build_pipeline(source, device_id=dev_id, num_threads=self.num_threads, seed=0)

    # ------------------------------------------------------------------ batches
    def next(self) -> Batch:
        """The next augmented batch on ``device`` (fresh tensors; no host sync on CUDA)."""
        (x_B1S, y_B1S), _ = self._runner.next()
        bl = self.sampler.labeled_bs
        x_B1S = x_B1S.to(self.device, non_blocking=True)
        y_BlS = y_B1S[:bl, 0].to(self.device, non_blocking=True).long()
        x_BCS = x_B1S.expand(-1, self.channels, -1, -1, -1).contiguous()
        return Batch(x_l=x_BCS[:bl], y_l=y_BlS, x_u=x_BCS[bl:])

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """`VolumeStream`'s format, at the next batch `next` returns (prefetched ones included)."""
        snap = copy.deepcopy(self._runner.state())
        return {"version": _STATE_VERSION, "sampler": snap["sampler"], "rng": snap["rng"], "patch": list(self.patch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly at ``state`` (this backend's or the torch `VolumeStream`'s); batches
        in flight are dropped and the pipeline rebuilt at the next `next`."""
        self._runner.load(state)
