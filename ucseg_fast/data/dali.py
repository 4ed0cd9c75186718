"""The DALI backend: GPU decoding (``fn.decoders.image(device="mixed")``) and the reference's 2D
augmentations as DALI operators, producing the same `Batch` as `TrainStream`.

Two pipeline kinds, both fed by ``fn.external_source`` so that sampling, augmentation
parameters and resume are *ours* (identical to the torch backend), and only pixels go through
DALI:

* ``array``: an in-memory cache (SSL4MIS HDF5 slices, the labeled part of an image folder;
  DALI has no HDF5 reader) -> ``external_source`` of ``HWC`` float32 images + uint8 labels.
* ``encoded``: PNG/JPEG bytes (the unlabeled part of an image folder, or a `ManifestStream`
  archive) -> ``fn.decoders.image(device="mixed")`` on a GPU, ``device="cpu"`` without one ->
  OpenCV-rule nearest resize to ``img_size`` (a ``warp_affine`` with NN interpolation).

Augmentation, per sample, in the reference's order: ``fn.flip`` (horizontal, vertical) ->
``fn.warp_affine`` shift-scale-rotate (bilinear image, **nearest labels**, the same matrix for
both) -> ``fn.erase`` coarse dropout (5..8 holes, labels set to background). All random
parameters come from `augment.draw_params` on a CPU ``torch.Generator`` seeded exactly like
`TrainStream`'s, so with the distortion stage off the DALI and torch backends draw the *same*
parameters for the same seed (tests compare them pixel for pixel).

Deliberate differences from the torch backend (docs/reference-differences.md material):

* ``GridDistortion`` / ``ElasticTransform`` (``distort_p``) are **not applied**: DALI has no CPU
  remap and its GPU ``experimental.remap`` only pads with zeros. A warning says so once. (Elastic
  with sigma 50 is a near no-op; grid distortion moves pixels by at most ~5 % of a cell.)
* Border: ``warp_affine`` repeats the edge pixel (clamp) where OpenCV/torch reflect (reflect-101).
* Bilinear weights: DALI's, not torch's exact ones (differences ~1e-6 on [0, 1] images).

No CUDA at import time: ``nvidia.dali`` is imported when a stream is built. On a machine
without a GPU (or ``device="cpu"``) the same graph runs with CPU operators (``device_id=None``).

Batches: `DaliTrainStream.next` returns fresh tensors on the training device (``x`` expanded to
``channels``, ``y`` int64), like `TrainStream`. Resume: DALI prefetches, so the stream keeps a
snapshot of the sampler/generator state taken *before* each prefetched batch was drawn and
`state_dict` returns the one of the oldest batch not yet consumed: resume is exact.
"""
from __future__ import annotations

import base64
import math
import threading
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import AugmentParams, draw_params
from .batch import Batch
from .manifest import ManifestStream
from .sampler import TwoStreamSampler
from .ssl4mis import DataError
from .stream import _AUGMENT_KEYS, _torch_seed

__all__ = ["DaliTrainStream", "dali_unavailable_reason", "nearest_resize_matrix", "ssr_matrices"]


def dali_unavailable_reason() -> str | None:
    """None when ``nvidia.dali`` imports, else why not (tests skip with this text)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"nvidia.dali cannot be imported ({type(exc).__name__}: {exc})"
    return None


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


def _hole_regions(p: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """``fn.erase`` anchors/shapes ``[B, 2K]`` (y, x pairs); inactive slots get a 0x0 region."""
    b, k = p.hole_y.shape
    anchors = np.stack([p.hole_y.numpy(), p.hole_x.numpy()], axis=-1).reshape(b, 2 * k).astype(np.float32)
    if not p.dropout or k == 0:
        return anchors, np.zeros_like(anchors)
    active = p.dropout_on.numpy()[:, None] & (np.arange(k)[None, :] < p.n_holes.numpy()[:, None])
    shapes = np.stack([active * p.hole_h, active * p.hole_w], axis=-1).reshape(b, 2 * k).astype(np.float32)
    return anchors, shapes


# ---------------------------------------------------------------------------- sources
class _Source:
    """Host-side producer of one pipeline's inputs; its state is snapshotted per batch."""

    def __init__(self, batch: int, img_size: tuple[int, int], seed: int, rank: int, aug: dict[str, Any]) -> None:
        self.batch = batch
        self.h, self.w = img_size
        self.aug = aug
        self.generator = torch.Generator()
        self.generator.manual_seed(_torch_seed(seed, rank))
        self.snapshots: deque[dict[str, Any]] = deque()
        self.lock = threading.Lock()

    def _params(self, b: int) -> tuple[list[np.ndarray], ...]:
        p = draw_params(b, self.h, self.w, self.generator, device="cpu", **self.aug)
        m = ssr_matrices(p, self.h, self.w)
        anc, shp = _hole_regions(p)
        hf, vf = p.hflip.numpy().astype(np.int32), p.vflip.numpy().astype(np.int32)
        if not p.flips:
            hf, vf = np.zeros_like(hf), np.zeros_like(vf)
        return ([np.int32(v) for v in hf], [np.int32(v) for v in vf], list(m), list(anc), list(shp))

    def _gen_state(self) -> str:
        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")

    def _set_gen_state(self, s: str) -> None:
        self.generator.set_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def draw(self) -> tuple[list[np.ndarray], ...]:
        raise NotImplementedError

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        with self.lock:
            self.snapshots.append(self.snapshot())
            return self.draw()


class _CacheSource(_Source):
    """Samples of an in-memory cache, indices from a `TwoStreamSampler` (labeled + unlabeled)."""

    def __init__(self, images_NHWC: np.ndarray, labels_NHW1: np.ndarray, sampler: TwoStreamSampler, **kw: Any) -> None:
        super().__init__(sampler.labeled_bs + sampler.unlabeled_bs, **kw)
        self.images, self.labels, self.sampler = images_NHWC, labels_NHW1, sampler

    def snapshot(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "generator": self._gen_state()}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(dict(state["sampler"]))
        self._set_gen_state(state["generator"])

    def draw(self) -> tuple[list[np.ndarray], ...]:
        lab, unl = next(self.sampler)
        idx = np.concatenate([lab, unl])
        # Same draw shape as TrainStream (labeled + unlabeled together) -> same parameters.
        hf, vf, m, anc, shp = self._params(len(idx))
        return ([self.images[i] for i in idx], [self.labels[i] for i in idx], hf, vf, m, anc, shp)


class _EncodedSource(_Source):
    """Encoded PNG/JPEG bytes of unlabeled files: a file list (epoch permutations) or a manifest."""

    def __init__(self, batch: int, files: Sequence[Path] | None, manifest: ManifestStream | None,
                 sampler_seed: int, rank: int, world_size: int, **kw: Any) -> None:
        super().__init__(batch, rank=rank, **kw)
        self.files, self.manifest = files, manifest
        self.sampler = None
        if files is not None:
            self.sampler = TwoStreamSampler(np.arange(len(files)), [], batch, 0, sampler_seed ^ 0x756E6C,
                                            rank=rank, world_size=world_size)

    def snapshot(self) -> dict[str, Any]:
        pos = self.sampler.state_dict() if self.sampler is not None else self.manifest.state_dict()  # type: ignore[union-attr]
        return {"files": pos, "generator": self._gen_state()}

    def restore(self, state: Mapping[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(dict(state["files"]))
        else:
            self.manifest.load_state_dict(dict(state["files"]))  # type: ignore[union-attr]
        self._set_gen_state(state["generator"])

    def _read(self, path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        from PIL import Image

        data = np.fromfile(path, dtype=np.uint8)
        try:  # header only: size for the resize matrix, and a cheap corruption check
            with Image.open(path) as im:
                w, h = im.size
                if im.format not in ("PNG", "JPEG"):
                    raise DataError(f"{path}: {im.format} is not decoded by the DALI path (PNG/JPEG only)")
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: unreadable image header ({exc})") from exc
        return data, (h, w)

    def _next_file(self) -> tuple[np.ndarray, tuple[int, int]]:
        if self.sampler is not None:
            raise AssertionError  # pragma: no cover
        assert self.manifest is not None
        # The manifest's own skip logic (count + log with the file name) applies to headers too.
        holder: dict[str, Any] = {}

        def reader(path: str) -> np.ndarray:
            holder["data"], holder["hw"] = self._read(path)
            return np.zeros(holder["hw"], np.float32)  # unused: size=None keeps the shape

        self.manifest.reader, self.manifest.size = reader, None
        self.manifest.next_image()
        return holder["data"], holder["hw"]

    def draw(self) -> tuple[list[np.ndarray], ...]:
        if self.sampler is not None:
            idx, _ = next(self.sampler)
            items = [self._read(self.files[i]) for i in idx]  # type: ignore[index]
        else:
            items = [self._next_file() for _ in range(self.batch)]
        hf, vf, m, anc, shp = self._params(self.batch)
        rm = [nearest_resize_matrix(hw, (self.h, self.w)) for _, hw in items]
        return ([d for d, _ in items], rm, hf, vf, m, anc, shp)


# ---------------------------------------------------------------------------- pipelines
def _build(kind: str, source: _Source, *, device_id: int | None, channels: int, img_size: tuple[int, int],
           num_threads: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    h, w = img_size

    @pipeline_def(batch_size=source.batch, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_async=gpu, exec_pipelined=gpu, prefetch_queue_depth=2 if gpu else 1)
    def pipe():
        if kind == "array":
            x, y, hf, vf, m, anc, shp = fn.external_source(
                source=source, num_outputs=7, batch=True, layout=["HWC", "HWC", "", "", "", "", ""])
            if gpu:
                x, y = x.gpu(), y.gpu()
        else:
            enc, rm, hf, vf, m, anc, shp = fn.external_source(source=source, num_outputs=7, batch=True)
            x = fn.decoders.image(enc, device="mixed" if gpu else "cpu",
                                  output_type=types.GRAY if channels == 1 else types.RGB)
            # The reference's first transform, Resize(INTER_NEAREST), with OpenCV's index rule.
            x = fn.warp_affine(x, matrix=rm, size=[h, w], interp_type=types.INTERP_NN)
            x = fn.cast(x, dtype=types.FLOAT) * (1.0 / 255.0)
            y = None
        x = fn.flip(x, horizontal=hf, vertical=vf)
        x = fn.warp_affine(x, matrix=m, interp_type=types.INTERP_LINEAR)
        x = fn.erase(x, anchor=anc, shape=shp, axis_names="HW", fill_value=0.0)
        x = fn.transpose(x, perm=[2, 0, 1])
        if y is None:
            return x
        y = fn.flip(y, horizontal=hf, vertical=vf)
        y = fn.warp_affine(y, matrix=m, interp_type=types.INTERP_NN)  # labels stay in the class set
        y = fn.erase(y, anchor=anc, shape=shp, axis_names="HW", fill_value=0)  # holes = background
        return x, y

    return pipe()


class _Runner:
    """One DALI pipeline + iterator, built lazily (and rebuilt after a resume)."""

    def __init__(self, kind: str, source: _Source, **build_kw: Any) -> None:
        self.kind, self.source, self.build_kw = kind, source, build_kw
        self.iterator = None

    def next(self) -> list[torch.Tensor]:
        if self.iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator

            names = ["x", "y"] if self.kind == "array" else ["x"]
            pipe = _build(self.kind, self.source, **self.build_kw)
            # size=-1: the external source never ends; prefetching is accounted for by snapshots.
            self.iterator = DALIGenericIterator([pipe], names, size=-1, auto_reset=False)
        out = next(self.iterator)[0]
        with self.source.lock:
            self.source.snapshots.popleft()
        return [out["x"], out["y"]] if self.kind == "array" else [out["x"]]

    def state(self) -> dict[str, Any]:
        with self.source.lock:
            return self.source.snapshots[0] if self.source.snapshots else self.source.snapshot()

    def load(self, state: Mapping[str, Any]) -> None:
        with self.source.lock:
            self.source.snapshots.clear()
            self.source.restore(state)
        self.iterator = None  # drop prefetched batches; the next call rebuilds the pipeline


class DaliTrainStream:
    """DALI twin of `TrainStream`: same constructor data, same `Batch`, same resume protocol.

    Args:
        images_NCHW: float32 cache ``[N, C, H, W]`` (``C`` = 1 gray or 3 RGB) at ``img_size``;
            ``[N, H, W]`` is taken as gray.
        labels_NHW: integer labels of the cache (uint8 range).
        n_labeled: the first ``n_labeled`` cache entries are labeled; with neither
            ``unlabeled_files`` nor ``unlabeled_manifest``, the rest of the cache is the
            unlabeled stream (one pipeline, exactly `TrainStream`'s sampling and parameters).
        unlabeled_files: PNG/JPEG files decoded by DALI (``mixed`` on a GPU) as the unlabeled stream.
        unlabeled_manifest: a `ManifestStream` (already sharded) as the unlabeled stream.
        device: training device; CUDA -> GPU operators on that device, CPU -> ``device_id=None``.
        augment: `augment_2d` keyword arguments (``distort_p`` is not applied, with a warning).
        channels: output channels (gray is repeated, as `TrainStream`).
    """

    def __init__(
        self,
        images_NCHW: torch.Tensor,
        labels_NHW: torch.Tensor,
        *,
        n_labeled: int,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: Mapping[str, Any] | None = None,
        unlabeled_files: Sequence[str | Path] | None = None,
        unlabeled_manifest: ManifestStream | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        num_threads: int = 2,
    ) -> None:
        reason = dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"data.backend = 'dali': {reason}")
        unknown = set(augment or {}) - _AUGMENT_KEYS
        if unknown:
            raise TypeError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(_AUGMENT_KEYS)}")
        aug = dict(augment or {})
        for k in ("elastic_alpha", "elastic_sigma"):
            aug.pop(k, None)
        if aug.get("distort_p", 0.25) > 0:
            warnings.warn("data.backend = 'dali': grid distortion / elastic (distort_p) are not applied "
                          "(no DALI remap with reflect border); the other augmentations are", stacklevel=2)
        aug["distort_p"] = 0.0
        if images_NCHW.dim() == 3:
            images_NCHW = images_NCHW.unsqueeze(1)
        if images_NCHW.dim() != 4 or labels_NHW.shape != images_NCHW.shape[:1] + images_NCHW.shape[2:]:
            raise ValueError(f"need images [N, C, H, W] and labels [N, H, W], got {tuple(images_NCHW.shape)} "
                             f"and {tuple(labels_NHW.shape)}")
        if unlabeled_files is not None and unlabeled_manifest is not None:
            raise ValueError("give unlabeled_files or unlabeled_manifest, not both")
        n = images_NCHW.shape[0]
        if not 1 <= n_labeled <= n:
            raise ValueError(f"n_labeled={n_labeled} outside [1, {n}]")
        self.device = torch.device(device)
        self.channels = int(channels)
        self.n_labeled = int(n_labeled)
        self.labeled_bs, self.unlabeled_bs = int(labeled_bs), int(unlabeled_bs)
        cached_unlabeled = unlabeled_files is None and unlabeled_manifest is None
        c = images_NCHW.shape[1]
        self._img_size = (int(images_NCHW.shape[2]), int(images_NCHW.shape[3]))
        images_NHWC = np.ascontiguousarray(images_NCHW.float().permute(0, 2, 3, 1).cpu().numpy())
        labels = labels_NHW.cpu()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 255):
            raise DataError(f"labels outside the uint8 range [{int(labels.min())}, {int(labels.max())}]")
        labels_NHW1 = np.ascontiguousarray(labels.to(torch.uint8).numpy()[..., None])
        n_cache_unl = n - n_labeled if cached_unlabeled else 0
        self.sampler = TwoStreamSampler(
            np.arange(n_labeled), np.arange(n_labeled, n_labeled + n_cache_unl), labeled_bs,
            unlabeled_bs if cached_unlabeled else 0, seed, rank=rank, world_size=world_size)
        dev_id = (self.device.index or 0) if self.device.type == "cuda" else None
        common = dict(img_size=self._img_size, seed=seed, rank=rank, aug=aug)
        build = dict(device_id=dev_id, img_size=self._img_size, num_threads=num_threads,
                     seed=_torch_seed(seed, rank) % (2**31))
        self._lab = _Runner("array", _CacheSource(images_NHWC, labels_NHW1, self.sampler, **common),
                            channels=c, **build)
        self._unl: _Runner | None = None
        if not cached_unlabeled and unlabeled_bs > 0:
            files = None if unlabeled_files is None else [Path(f) for f in unlabeled_files]
            if files is not None and len(files) < unlabeled_bs:
                raise ValueError(f"{len(files)} unlabeled files cannot fill one batch of {unlabeled_bs}")
            src = _EncodedSource(unlabeled_bs, files, unlabeled_manifest, seed, rank, world_size,
                                 img_size=self._img_size, seed=seed + 1, aug=aug)
            self._unl = _Runner("encoded", src, channels=c, **build)
        self.unlabeled_manifest = unlabeled_manifest

    # ------------------------------------------------------------------ properties
    @property
    def epoch_length(self) -> int:
        return self.sampler.epoch_length

    @property
    def img_size(self) -> tuple[int, int]:
        return self._img_size

    # ------------------------------------------------------------------ batches
    def _to_device(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = x_BCHW.to(self.device, non_blocking=True)
        return x_BCHW.expand(-1, self.channels, -1, -1).contiguous() if x_BCHW.shape[1] == 1 \
            else x_BCHW.contiguous()

    def next(self) -> Batch:
        """The next augmented batch on ``device`` (fresh tensors; no host sync on CUDA)."""
        x_BCHW, y_BHW1 = self._lab.next()
        bl = self.labeled_bs
        x = self._to_device(x_BCHW)
        y_l = y_BHW1[:bl, :, :, 0].to(self.device, non_blocking=True).long()
        if self._unl is None:
            return Batch(x_l=x[:bl], y_l=y_l, x_u=x[bl:])
        x_u = self._to_device(self._unl.next()[0]) if self.unlabeled_bs > 0 else x[:0]
        return Batch(x_l=x, y_l=y_l, x_u=x_u)

    def __iter__(self) -> DaliTrainStream:
        return self

    def __next__(self) -> Batch:
        return self.next()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next batch `next` will return."""
        return {"backend": "dali", "labeled": self._lab.state(),
                "unlabeled": None if self._unl is None else self._unl.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("backend") != "dali":
            raise ValueError(f"stream state is for backend {state.get('backend', 'torch')!r}, not 'dali'")
        self._lab.load(state["labeled"])
        if self._unl is not None:
            self._unl.load(state["unlabeled"])

