"""The DALI backend: GPU decoding (``fn.decoders.image(device="mixed")``) and the reference's 2D
augmentations (DALI operators, then a torch post-stage), producing the same `Batch` as `TrainStream`.

Two pipeline kinds, both fed by ``fn.external_source`` so that sampling, augmentation
parameters and resume are *ours* (identical to the torch backend), and only pixels go through
DALI:

* ``array``: an in-memory cache (SSL4MIS HDF5 slices, the labeled part of an image folder;
  DALI has no HDF5 reader) -> ``external_source`` of ``HWC`` float32 images + uint8 labels.
* ``encoded``: PNG/JPEG bytes (the unlabeled part of an image folder, or a `ManifestStream`
  archive) -> ``fn.decoders.image(device="mixed")`` on a GPU, ``device="cpu"`` without one ->
  OpenCV-rule nearest resize to ``img_size`` (a ``warp_affine`` with NN interpolation).

Augmentation, per sample, in the reference's order. In DALI: ``fn.flip`` (horizontal, vertical)
-> ``fn.warp_affine`` shift-scale-rotate (bilinear image, **nearest labels**, the same matrix for
both). Then a torch post-stage on the training device, `augment.apply_stages(flips=False,
ssr=False)`: OneOf(grid distortion | elastic) (``distort_p``; its own resampling with the
reflect-101 border, nearest labels) -> CoarseDropout (image holes 0, label holes background).
All random parameters come from ONE `augment.draw_params` call per batch on a CPU
``torch.Generator`` seeded exactly like `TrainStream`'s, so the DALI and torch backends draw the
*same* parameters for the same seed; the post-stage gets the very `AugmentParams` object whose
flips and matrices went into the DALI batch (a FIFO beside the resume snapshots keeps them
paired through DALI's prefetching). With shift-scale-rotate off the two backends' batches are
equal pixel for pixel (tests), distortion and dropout included.

Deliberate differences from the torch backend (docs/reference-differences.md material):

* Two resamplings when shift-scale-rotate and distortion both hit a sample (DALI's warp, then
  the post-stage's ``grid_sample``), the reference's way; the torch backend composes the two maps
  into one resampling. Slightly more interpolation blur, labels rounded twice, and the distortion
  reflects the shift-scale-rotate output at the border (as the reference does).
* Border of the shift-scale-rotate warp: ``warp_affine`` repeats the edge pixel (clamp) where
  OpenCV/torch reflect (reflect-101). (The distortion's border is reflect-101, as torch's.)
* Bilinear weights of that warp: DALI's, not torch's exact ones (differences ~1e-6 on [0, 1]
  images).
* The parameters come from a CPU generator on every device (the torch backend draws on the
  training device's generator), so on CUDA the two backends draw different, equally distributed
  parameters.

No CUDA at import time: ``nvidia.dali`` is imported when a stream is built. On a machine
without a GPU (or ``device="cpu"``) the same graph runs with CPU operators (``device_id=None``).

Batches: `DaliTrainStream.next` returns fresh tensors on the training device (``x`` expanded to
``channels``, ``y`` int64), like `TrainStream`. Resume: DALI prefetches, so the stream keeps, per
prefetched batch, a snapshot of the sampler/generator state taken *before* it was drawn (plus its
`AugmentParams` for the post-stage) and `state_dict` returns the one of the oldest batch not yet
consumed: resume is exact (the post-stage's parameters are redrawn from that state).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import AugmentParams, apply_stages, draw_params
from .base import Identity, Stream, decode_generator, encode_generator, torch_seed
from .batch import Batch
from .dali_pipeline import Runner, SnapshotSource, nearest_resize_matrix, post_params_to, ssr_matrices
from .errors import DataError
from .guards import DEFAULT_MAX_IMAGE_PIXELS, check_file, check_pixels
from .manifest import ManifestStream
from .sampler import TwoStreamSampler
from .stream import check_augment

__all__ = ["DaliTrainStream", "dali_unavailable_reason", "nearest_resize_matrix", "ssr_matrices"]


def dali_unavailable_reason() -> str | None:
    """None when ``nvidia.dali`` imports, else why not (tests skip with this text)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"nvidia.dali cannot be imported ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------- sources
class _Source(SnapshotSource):
    """2D producer: parameters from one `draw_params` call per batch on a CPU torch generator."""

    def __init__(self, batch: int, img_size: tuple[int, int], seed: int, rank: int, aug: dict[str, Any]) -> None:
        super().__init__(batch)
        self.h, self.w = img_size
        self.aug = aug
        self.generator = torch.Generator()
        self.generator.manual_seed(torch_seed(seed, rank))

    def _params(self, b: int) -> tuple[tuple[list[np.ndarray], ...], AugmentParams]:
        """DALI's per-sample flip flags and SSR matrices, and the whole `AugmentParams` (one draw)."""
        p = draw_params(b, self.h, self.w, self.generator, device="cpu", **self.aug)
        m = ssr_matrices(p, self.h, self.w)
        hf, vf = p.hflip.numpy().astype(np.int32), p.vflip.numpy().astype(np.int32)
        if not p.flips:
            hf, vf = np.zeros_like(hf), np.zeros_like(vf)
        return ([np.int32(v) for v in hf], [np.int32(v) for v in vf], list(m)), p

    def _gen_state(self) -> str:
        return encode_generator(self.generator)

    def _set_gen_state(self, s: str) -> None:
        decode_generator(self.generator, s)


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

    def draw(self) -> tuple[tuple[list[np.ndarray], ...], AugmentParams]:
        lab, unl = next(self.sampler)
        idx = np.concatenate([lab, unl])
        # Same draw shape as TrainStream (labeled + unlabeled together) -> same parameters.
        (hf, vf, m), p = self._params(len(idx))
        return ([self.images[i] for i in idx], [self.labels[i] for i in idx], hf, vf, m), p


class _EncodedSource(_Source):
    """Encoded PNG/JPEG bytes of unlabeled files: a file list (epoch permutations) or a manifest."""

    def __init__(self, batch: int, files: Sequence[Path] | None, manifest: ManifestStream | None,
                 sampler_seed: int, rank: int, world_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 **kw: Any) -> None:
        super().__init__(batch, rank=rank, **kw)
        self.files, self.manifest = files, manifest
        self.max_pixels = max_pixels
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

        check_file(path, "image file")
        try:  # header only: size for the resize matrix and the pixel cap, a cheap corruption check
            with Image.open(path) as im:
                w, h = im.size
                fmt = im.format
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: unreadable image header ({exc})") from exc
        if fmt not in ("PNG", "JPEG"):
            raise DataError(f"{path}: {fmt} is not decoded by the DALI path (PNG/JPEG only)")
        check_pixels(path, w, h, self.max_pixels)
        return np.fromfile(path, dtype=np.uint8), (h, w)

    def _next_file(self) -> tuple[np.ndarray, tuple[int, int]]:
        if self.sampler is not None:
            raise AssertionError  # pragma: no cover
        assert self.manifest is not None
        # The manifest's own skip logic (count + log with the file name) applies to headers too.
        return self.manifest.next_readable(self._read)[1]

    def draw(self) -> tuple[tuple[list[np.ndarray], ...], AugmentParams]:
        if self.sampler is not None:
            idx, _ = next(self.sampler)
            items = [self._read(self.files[i]) for i in idx]  # type: ignore[index]
        else:
            items = [self._next_file() for _ in range(self.batch)]
        (hf, vf, m), p = self._params(self.batch)
        rm = [nearest_resize_matrix(hw, (self.h, self.w)) for _, hw in items]
        return ([d for d, _ in items], rm, hf, vf, m), p


# ---------------------------------------------------------------------------- pipelines
# DALI prefetch queue depths (batches in flight beyond the one being consumed). Tests raise the CPU
# one to check that snapshots and post-stage parameters stay paired with deep prefetching.
_PREFETCH_DEPTH = 2
_PREFETCH_DEPTH_CPU = 1


def _queue_kw(gpu: bool) -> dict[str, Any]:
    """``pipeline_def`` executor/queue arguments (read at build time, so tests can patch the depths)."""
    depth = _PREFETCH_DEPTH if gpu else _PREFETCH_DEPTH_CPU
    overlap = gpu or depth > 1
    return dict(exec_async=overlap, exec_pipelined=overlap, prefetch_queue_depth=depth)


def _build(kind: str, source: _Source, *, device_id: int | None, channels: int, img_size: tuple[int, int],
           num_threads: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    h, w = img_size

    @pipeline_def(batch_size=source.batch, num_threads=num_threads, device_id=device_id, seed=seed,
                  **_queue_kw(gpu))
    def pipe():
        if kind == "array":
            x, y, hf, vf, m = fn.external_source(
                source=source, num_outputs=5, batch=True, layout=["HWC", "HWC", "", "", ""])
            if gpu:
                x, y = x.gpu(), y.gpu()
        else:
            enc, rm, hf, vf, m = fn.external_source(source=source, num_outputs=5, batch=True)
            x = fn.decoders.image(enc, device="mixed" if gpu else "cpu",
                                  output_type=types.GRAY if channels == 1 else types.RGB)
            # The reference's first transform, Resize(INTER_NEAREST), with OpenCV's index rule.
            x = fn.warp_affine(x, matrix=rm, size=[h, w], interp_type=types.INTERP_NN)
            x = fn.cast(x, dtype=types.FLOAT) * (1.0 / 255.0)
            y = None
        x = fn.flip(x, horizontal=hf, vertical=vf)
        x = fn.warp_affine(x, matrix=m, interp_type=types.INTERP_LINEAR)
        x = fn.transpose(x, perm=[2, 0, 1])
        # Distortion and dropout follow in the torch post-stage (`DaliTrainStream._post`).
        if y is None:
            return x
        y = fn.flip(y, horizontal=hf, vertical=vf)
        y = fn.warp_affine(y, matrix=m, interp_type=types.INTERP_NN)  # labels stay in the class set
        return x, y

    return pipe()


class DaliTrainStream(Stream):
    """DALI twin of `TrainStream`: same constructor data, same `Batch`, same resume protocol.

    Args:
        images_NCHW: float32 cache ``[N, C, H, W]`` (``C`` = 1 gray or 3 RGB) at ``img_size``;
            ``[N, H, W]`` is taken as gray.
        labels_NHW: integer labels of the cache (uint8 range).
        n_labeled: the first ``n_labeled`` cache entries are labeled; with neither
            ``unlabeled_files`` nor ``unlabeled_manifest``, the rest of the cache is the
            unlabeled stream (one pipeline, exactly `TrainStream`'s sampling and parameters).
        unlabeled_files: PNG/JPEG files decoded by DALI (``mixed`` on a GPU) as the unlabeled stream.
        unlabeled_manifest: a `ManifestStream` (already sharded) as the unlabeled stream; its bad
            files are skipped and counted (`skipped_files`; the count includes batches DALI has
            prefetched). `close` closes it.
        device: training device; CUDA -> GPU operators on that device, CPU -> ``device_id=None``.
        augment: `augment_2d` keyword arguments (all applied: distortion and dropout in the
            torch post-stage).
        channels: output channels (gray is repeated, as `TrainStream`).
        max_image_pixels: unlabeled files above this many pixels are refused from their header
            (an error for ``unlabeled_files``, skipped and counted for a manifest).
        identity: resume identity (`base.Identity`, `set_identity`).
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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        identity: Identity | None = None,
    ) -> None:
        reason = dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"data.backend = 'dali': {reason}")
        aug = check_augment(augment)
        # draw_params takes every key but elastic_alpha (the post-stage's field amplitude).
        self._elastic = dict(elastic_alpha=float(aug.pop("elastic_alpha", 1.0)),
                             elastic_sigma=float(aug.get("elastic_sigma", 50.0)))
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
        img_size = (int(images_NCHW.shape[2]), int(images_NCHW.shape[3]))
        super().__init__(device=device, img_size=img_size, n_labeled=n_labeled)
        self.channels = int(channels)
        self.labeled_bs, self.unlabeled_bs = int(labeled_bs), int(unlabeled_bs)
        cached_unlabeled = unlabeled_files is None and unlabeled_manifest is None
        c = images_NCHW.shape[1]
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
        common = dict(img_size=img_size, seed=seed, rank=rank, aug=aug)
        build = dict(device_id=dev_id, img_size=img_size, num_threads=num_threads,
                     seed=torch_seed(seed, rank) % (2**31), channels=c)
        self._lab = Runner(_CacheSource(images_NHWC, labels_NHW1, self.sampler, **common),
                           functools.partial(_build, "array"), ["x", "y"], **build)
        self._unl: Runner | None = None
        if not cached_unlabeled and unlabeled_bs > 0:
            files = None if unlabeled_files is None else [Path(f) for f in unlabeled_files]
            if files is not None and len(files) < unlabeled_bs:
                raise ValueError(f"{len(files)} unlabeled files cannot fill one batch of {unlabeled_bs}")
            src = _EncodedSource(unlabeled_bs, files, unlabeled_manifest, seed, rank, world_size,
                                 max_pixels=max_image_pixels,
                                 img_size=img_size, seed=seed + 1, aug=aug)
            self._unl = Runner(src, functools.partial(_build, "encoded"), ["x"], **build)
        self.unlabeled_manifest = unlabeled_manifest
        self._apply_identity(identity)

    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Content fingerprints of the labeled / unlabeled lists (`TwoStreamSampler.set_identity`):
        the cache sampler's, and the unlabeled file list's sampler when files are decoded by DALI
        (a manifest fingerprints itself)."""
        self.sampler.set_identity(labeled, None if self._unl is not None else unlabeled,
                                  resume_changed_data=resume_changed_data)
        src = self._unl.source if self._unl is not None else None
        if isinstance(src, _EncodedSource) and src.sampler is not None:
            src.sampler.set_identity(unlabeled, resume_changed_data=resume_changed_data)

    @property
    def skipped_files(self) -> int:
        """Manifest files skipped so far (0 without a manifest)."""
        return 0 if self.unlabeled_manifest is None else self.unlabeled_manifest.skipped_files

    def close(self) -> None:
        """Close the unlabeled manifest (if any)."""
        if self.unlabeled_manifest is not None:
            self.unlabeled_manifest.close()

    # ------------------------------------------------------------------ batches
    def _post(self, x_BCHW: torch.Tensor, y_BlHW: torch.Tensor | None, p: AugmentParams,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stages after shift-scale-rotate, on the training device, with the batch's own
        parameters: OneOf(grid distortion | elastic), then CoarseDropout."""
        x_BCHW = x_BCHW.to(self.device, non_blocking=True)
        if y_BlHW is not None:
            y_BlHW = y_BlHW.to(self.device, non_blocking=True)
        return apply_stages(x_BCHW, y_BlHW, post_params_to(p, self.device), flips=False, ssr=False,
                            **self._elastic)

    def _expand(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return x_BCHW.expand(-1, self.channels, -1, -1).contiguous() if x_BCHW.shape[1] == 1 \
            else x_BCHW.contiguous()

    def next(self) -> Batch:
        """The next augmented batch on ``device`` (fresh tensors; no host sync on CUDA)."""
        (x_BCHW, y_BHW1), p = self._lab.next()
        bl = self.labeled_bs
        x, y_l = self._post(x_BCHW, y_BHW1[:bl, :, :, 0], p)
        assert y_l is not None
        x, y_l = self._expand(x), y_l.long()
        if self._unl is None:
            return Batch(x_l=x[:bl], y_l=y_l, x_u=x[bl:])
        if self.unlabeled_bs > 0:
            (x_u,), p_u = self._unl.next()
            x_u = self._expand(self._post(x_u, None, p_u)[0])
        else:
            x_u = x[:0]
        return Batch(x_l=x, y_l=y_l, x_u=x_u)

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
