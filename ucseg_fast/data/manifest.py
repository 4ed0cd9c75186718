"""Unlabeled-only archives: a manifest text file of image paths, streamed, sharded, resumable,
decoded ahead of the step by a few threads.

Hospital archives hold millions of unlabeled slices; listing them (or even the manifest) in
memory per rank is wasteful, so `ManifestStream` reads the manifest line by line from a byte
offset and never holds more than a bounded read-ahead of lines (plus their decoded images).

* **Sharding**: line ``i`` (0-based, counting non-empty, non-comment lines) belongs to rank
  ``i % world_size``: ranks are disjoint and together cover every line, whatever the length.
* **Order**: file order, endlessly (epoch ``e`` restarts at the top). Shuffle the manifest once
  offline (``shuf``) if the archive is sorted by patient; a streamed global shuffle would need the
  whole list.
* **Parallel decoding** (``decode_workers``, ``data.decode_workers``): that many threads decode
  and resize the next images into a bounded queue (PIL releases the GIL) while the training
  step runs. The images come out in manifest order whatever thread finishes first, so the batches
  (and resume) are the same for any number of workers; 0 decodes in the calling thread.
* **Resume**: `state_dict` = byte offset + line counter + epoch + skip count of the *consumed*
  position (images decoded ahead and not yet returned are not counted as consumed), plus the
  manifest's identity: the number of path lines and a SHA-256 of their text (not its size or
  timestamp: a ``touch``, a copy or an rsync to another machine resume). A manifest whose path
  lines changed is refused in one line naming it, unless ``resume_changed_data``: then the stream
  continues from the saved line counter on the new content (clamped to its length: past the end,
  the next image starts the next epoch) with a logged warning. Checkpoints written before the
  fingerprint (state version 1: size + mtime) still load when neither changed.
* **Bad files**: an unreadable/corrupt image, an image above ``max_image_pixels`` pixels or a
  path that is not a file (missing, a directory, a dangling symlink, a loop: `guards.check_file`)
  is *counted and logged with its file name* (``logging`` warning, the running count in
  `skipped_files` / `corrupt_count` and `corrupt_files` (the last 100)), then the next line is
  taken. A manifest with no readable line in a whole pass is an error.

Relative paths in the manifest are resolved against the manifest's folder. Lines starting with
``#`` are comments.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import DataError
from .guards import (
    DEFAULT_MAX_IMAGE_PIXELS,
    LineHasher,
    check_file,
    check_pixels,
    check_same_content,
)
from .prefetch import DecodeAhead
from .ssl4mis import resize_nearest

__all__ = ["ManifestStream", "read_unlabeled_image"]

log = logging.getLogger(__name__)
_STATE_VERSION = 2
_T = TypeVar("_T")
# What a bad file raises (DataPathError is both a DataError and a FileNotFoundError).
_SKIPPABLE = (DataError, OSError)


def read_unlabeled_image(path: str, *, channels: int = 1, size: tuple[int, int] | None = None,
                         max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one unlabeled image as float32 ``[H, W]`` gray in [0, 1] (PNG/JPEG/BMP/TIFF) or as
    stored (``.npy`` 2-D, ``.h5`` dataset ``image`` 2-D); ``channels=3``: ``[3, H, W]`` (image files
    decoded as RGB, 2-D arrays repeated). ``size``: resized with the OpenCV nearest rule. Images
    above ``max_pixels`` pixels are refused from their header. Raises `DataError` naming the file
    (`DataPathError` for a path that is not a file). Thread-safe."""
    from .folders import decode_image

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".h5", ".hdf5"):
        out = decode_image(path, channels=channels, max_pixels=max_pixels, size=size)
        return out if channels == 3 else out[0]
    check_file(path, "image file")
    try:
        if suffix == ".npy":
            mm = np.load(path, mmap_mode="r", allow_pickle=False)  # header only
            if mm.ndim == 2:
                check_pixels(path, mm.shape[1], mm.shape[0], max_pixels)
            arr = np.array(mm)
            del mm
        else:
            import h5py

            with h5py.File(path, "r") as f:
                ds = f["image"]
                if len(ds.shape) == 2:
                    check_pixels(path, ds.shape[1], ds.shape[0], max_pixels)
                arr = np.asarray(ds[()])
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, TypeError) as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{path}: expected a 2-D numeric image, got shape {arr.shape} dtype {arr.dtype}")
    if size is not None:
        arr = resize_nearest(arr, size)
    arr = arr.astype(np.float32, copy=False)
    return np.repeat(arr[None], 3, axis=0) if channels == 3 else arr


def _decode_one(reader: Callable[[str], np.ndarray], size: tuple[int, int] | None, path: str) -> np.ndarray:
    """Worker body: read, resize (if the reader did not), float32 contiguous. No reference to the
    stream, so a queued call never keeps it alive."""
    img = reader(path)
    if size is not None and tuple(img.shape[-2:]) != size:
        img = resize_nearest(img, size)
    return np.ascontiguousarray(img, dtype=np.float32)


def _path_text(raw: bytes) -> str | None:
    """The path of one manifest line, or None for a blank / comment line. A non-UTF-8 name is
    kept (surrogate-escaped) and then fails as a file, counted and logged with its name like any
    unreadable entry, instead of crashing the stream."""
    text = raw.decode("utf-8", errors="surrogateescape").strip()
    return text if text and not text.startswith("#") else None


def _scan(path: Path) -> tuple[dict[str, Any], str]:
    """(fingerprint of the path lines, SHA-256 of the raw bytes) in one streaming pass."""
    lines = LineHasher()
    raw_hash = hashlib.sha256()
    with open(path, "rb") as fh:
        for raw in fh:
            raw_hash.update(raw)
            text = _path_text(raw)
            if text is not None:
                lines.add(text)
    return lines.result(str(path)), raw_hash.hexdigest()


class ManifestStream:
    """Endless, sharded, resumable stream of unlabeled images named by a manifest file.

    Args:
        manifest: text file, one image path a line.
        rank, world_size: this replica's shard (line ``i`` -> rank ``i % world_size``).
        size: ``(H, W)`` every image is resized to (OpenCV INTER_NEAREST rule, as the reference's
            first transform); None keeps the stored size (then `next_batch` needs equal sizes).
        reader: ``path -> float32 [H, W]`` (or ``[C, H, W]``); default `read_unlabeled_image`
            with ``channels``, ``size`` and ``max_image_pixels``. Called from the decode threads
            when ``decode_workers > 0``: it must be thread-safe.
        channels: 1 (gray ``[H, W]`` images) or 3 (``[3, H, W]``, RGB) for the default reader.
        max_image_pixels: images above this many pixels are skipped and counted (``data.max_image_pixels``).
        decode_workers: threads decoding ahead (``data.decode_workers``); 0 = in the calling thread.
        prefetch: images decoded ahead (the queue bound); default: twice the largest `next_batch`
            seen, at least ``4 * decode_workers``.
        resume_changed_data: `load_state_dict` continues on a manifest whose lines changed
            (``data.resume_changed_data``) instead of refusing it.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        size: tuple[int, int] | None = (256, 256),
        reader: Callable[[str], np.ndarray] | None = None,
        channels: int = 1,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode_workers: int = 0,
        prefetch: int | None = None,
        resume_changed_data: bool = False,
    ) -> None:
        self.manifest = Path(manifest)
        check_file(self.manifest, "unlabeled manifest")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {decode_workers}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.max_image_pixels = max_image_pixels
        self._reader = reader
        self.decode_workers = int(decode_workers)
        self.prefetch = prefetch
        self._want = max(4 * self.decode_workers, 1)
        self.resume_changed_data = bool(resume_changed_data)
        self._base = str(self.manifest.resolve().parent)
        st = self.manifest.stat()
        self._stat = (int(st.st_size), int(st.st_mtime_ns))  # only for version-1 checkpoints
        self._content, self._bytes_sha = _scan(self.manifest)
        self._fh = open(self.manifest, "rb")  # binary: tell()/seek() are exact byte offsets
        self._epoch = 0
        self._line = 0  # index of the next path line (all ranks' lines counted)
        self._yielded_in_epoch = 0
        self.corrupt_count = 0
        self.corrupt_files: deque[str] = deque(maxlen=100)
        self._ahead: DecodeAhead | None = DecodeAhead(self.decode_workers) if self.decode_workers else None
        # reader position after the last *consumed* item while the read-ahead is not empty
        self._resume_pos: tuple[int, int, int, int] = self._pos()

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> dict[str, Any]:
        """The manifest's content identity: ``{"source", "lines", "sha256"}`` of its path lines."""
        return dict(self._content)

    @property
    def skipped_files(self) -> int:
        """Files skipped so far (unreadable, too large, not a file); = `corrupt_count`."""
        return self.corrupt_count

    @property
    def reader(self) -> Callable[[str], np.ndarray]:
        if self._reader is not None:
            return self._reader

        def default(path: str) -> np.ndarray:
            return read_unlabeled_image(path, channels=self.channels, size=self.size,
                                        max_pixels=self.max_image_pixels)
        return default

    @reader.setter
    def reader(self, fn: Callable[[str], np.ndarray] | None) -> None:
        self._drop_ahead()
        self._reader = fn

    def _worker_reader(self) -> Callable[[str], np.ndarray]:
        """The reader the decode threads call: bound to values, not to the stream."""
        if self._reader is not None:
            return self._reader
        channels, size, cap = self.channels, self.size, self.max_image_pixels

        def default(path: str) -> np.ndarray:
            return read_unlabeled_image(path, channels=channels, size=size, max_pixels=cap)
        return default

    # ------------------------------------------------------------------ paths
    def _pos(self) -> tuple[int, int, int, int]:
        return int(self._fh.tell()), self._line, self._epoch, self._yielded_in_epoch

    def _set_pos(self, pos: tuple[int, int, int, int]) -> None:
        self._fh.seek(pos[0])
        self._line, self._epoch, self._yielded_in_epoch = pos[1], pos[2], pos[3]

    def _next_line(self) -> str | None:
        """Next path line of the whole manifest (any rank), or None at end of file."""
        while True:
            raw = self._fh.readline()
            if not raw:
                return None
            text = _path_text(raw)
            if text is not None:
                return text

    def _take_path(self) -> str:
        """The next path of this rank's shard (wrapping to a new epoch at the end of the file)."""
        while True:
            text = self._next_line()
            if text is None:
                if self._line == 0:
                    raise DataError(f"{self.manifest}: the manifest names no file")
                if self._yielded_in_epoch == 0 and self._line <= self.rank:
                    raise DataError(
                        f"{self.manifest}: {self._line} lines, none for rank {self.rank} of {self.world_size}"
                    )
                self._fh.seek(0)
                self._epoch += 1
                self._line = 0
                self._yielded_in_epoch = 0
                continue
            i = self._line
            self._line += 1
            if i % self.world_size == self.rank:
                self._yielded_in_epoch += 1
                return text if os.path.isabs(text) else os.path.join(self._base, text)

    def _drop_ahead(self) -> None:
        """Forget the read-ahead: the reader goes back to the consumed position."""
        ahead = getattr(self, "_ahead", None)
        if ahead is not None and len(ahead):
            ahead.clear()
            self._set_pos(self._resume_pos)

    def next_path(self) -> str:
        """The next path of this rank's shard (wrapping to a new epoch at the end of the file).

        A ``str``, not a ``Path``: pathlib interns every path component (``sys.intern``), which
        would keep millions of file names alive for the life of the process."""
        self._drop_ahead()
        return self._take_path()

    def iter_paths(self) -> Iterator[str]:
        """Endless iterator over this rank's paths (no decoding)."""
        while True:
            yield self.next_path()

    # ------------------------------------------------------------------ images
    def _skip(self, path: str, exc: BaseException, bad_run: int, start: tuple[int, int], now: tuple[int, int]) -> None:
        """Count and log one bad file; raise when a whole pass had no readable file."""
        self.corrupt_count += 1
        self.corrupt_files.append(path)
        log.warning("unlabeled manifest %s: skipping file %s (%s); %d skipped so far",
                    self.manifest, path, exc, self.corrupt_count)
        (start_epoch, start_line), (epoch, line) = start, now
        if epoch > start_epoch + 1 or (epoch == start_epoch + 1 and line >= start_line):
            raise DataError(
                f"{self.manifest}: no readable file for rank {self.rank} in a whole pass "
                f"({bad_run} unreadable in a row, last {path})"
            ) from exc

    def next_readable(self, read: Callable[[str], _T]) -> tuple[str, _T]:
        """``(path, read(path))`` of the next path ``read`` accepts, in the calling thread: files it
        rejects (`DataError` / `OSError`) are counted, logged with their name and skipped. (The
        DALI backend reads its encoded bytes through this.)"""
        self._drop_ahead()
        bad_run = 0
        start = (self._epoch, self._line)
        while True:
            path = self._take_path()
            try:
                return path, read(path)
            except _SKIPPABLE as exc:
                bad_run += 1
                self._skip(path, exc, bad_run, start, (self._epoch, self._line))

    def _fill(self) -> None:
        assert self._ahead is not None
        depth = self.prefetch or self._want
        if not len(self._ahead):
            self._resume_pos = self._pos()
        reader = None
        while len(self._ahead) < depth:
            reader = reader or self._worker_reader()
            path = self._take_path()
            self._ahead.submit((path, self._pos()), _decode_one, reader, self.size, path)

    def next_image(self) -> tuple[str, np.ndarray]:
        """Next readable image (float32 ``[H, W]``, or ``[C, H, W]``, resized to ``size``); bad files
        are counted, logged with their name and skipped. A pass without one readable file is an
        error. With ``decode_workers`` the image was decoded ahead by a thread; same result."""
        if self._ahead is None:
            reader, size = self.reader, self.size
            return self.next_readable(lambda p: _decode_one(reader, size, p))
        self._fill()
        bad_run = 0
        start = (self._resume_pos[2], self._resume_pos[1])
        while True:
            (path, pos), fut = self._ahead.pop()
            try:
                img = fut.result()
            except _SKIPPABLE as exc:
                self._resume_pos = pos
                bad_run += 1
                self._skip(path, exc, bad_run, start, (pos[2], pos[1]))
                self._fill()
                continue
            except BaseException:
                self._ahead.clear()  # the position stays before this item
                self._set_pos(self._resume_pos)
                raise
            self._resume_pos = pos
            self._fill()  # keep the threads busy while the caller works
            return path, img

    def next_batch(self, n: int) -> np.ndarray:
        """``[n, H, W]`` (or ``[n, C, H, W]``) float32 of the next ``n`` readable images."""
        self._want = max(self._want, 2 * int(n))
        imgs = [self.next_image()[1] for _ in range(n)]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise DataError(f"{self.manifest}: images of different sizes {sorted(shapes)}; set a size")
        return np.stack(imgs) if imgs else np.zeros((0, *(self.size or (0, 0))), np.float32)

    # ------------------------------------------------------------------ resume
    @property
    def epoch(self) -> int:
        return self._epoch if not (self._ahead is not None and len(self._ahead)) else self._resume_pos[2]

    @property
    def line(self) -> int:
        return self._line if not (self._ahead is not None and len(self._ahead)) else self._resume_pos[1]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable consumed position (byte offset of the next line, counters) and the
        manifest's content identity."""
        pos = self._resume_pos if (self._ahead is not None and len(self._ahead)) else self._pos()
        return {
            "version": _STATE_VERSION,
            "manifest": str(self.manifest),
            "content": dict(self._content),
            "bytes_sha256": self._bytes_sha,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": pos[2],
            "line": pos[1],
            "offset": pos[0],
            "yielded_in_epoch": pos[3],
            "corrupt_count": self.corrupt_count,
        }

    def _seek_line(self, epoch: int, line: int) -> int:
        """Position the reader before path line ``line`` (clamped to the line count); returns the line."""
        self._fh.seek(0)
        n = 0
        while n < line and self._next_line() is not None:
            n += 1
        self._epoch, self._line = epoch, n
        self._yielded_in_epoch = len(range(self.rank, n, self.world_size))
        return n

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly at the saved position; refuses another shard, an unknown version, and
        (unless ``resume_changed_data``) a manifest whose path lines changed."""
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"manifest state version {version!r} not in (1, {_STATE_VERSION})")
        if (int(state["rank"]), int(state["world_size"])) != (self.rank, self.world_size):
            raise ValueError(
                f"manifest state is for rank {state['rank']}/{state['world_size']}, "
                f"this stream is rank {self.rank}/{self.world_size}"
            )
        epoch, line = int(state["epoch"]), int(state["line"])
        where = f"the saved line {line} of epoch {epoch}"
        if version == 1:  # (size, mtime) of the file: no content identity was recorded
            same = tuple(state["fingerprint"]) == self._stat
            if not same and not self.resume_changed_data:
                raise DataError(
                    f"{self.manifest}: the checkpoint predates content fingerprints and the manifest's "
                    f"(size, mtime) changed from {tuple(state['fingerprint'])} to {self._stat}; if its "
                    f"lines are the same (a touch, a copy), pass --data.resume_changed_data=true to "
                    f"continue from {where}")
            exact = same
            if not same:
                log.warning("%s: (size, mtime) changed since a checkpoint without a content fingerprint; "
                            "data.resume_changed_data = true: continuing from %s", self.manifest, where)
        else:
            changed = check_same_content(state.get("content"), self._content,
                                         resume_changed_data=self.resume_changed_data, position=where)
            exact = not changed and state.get("bytes_sha256") == self._bytes_sha
        if self._ahead is not None:
            self._ahead.clear()
        if exact:  # byte-identical file: the saved offset is valid
            self._set_pos((int(state["offset"]), line, epoch, int(state["yielded_in_epoch"])))
        else:  # same lines but other bytes (comments, blank lines, CRLF), or changed content: by line
            got = self._seek_line(epoch, line)
            if got < line:
                log.warning("%s: the saved line %d is past the manifest's %d path lines; the next image "
                            "starts epoch %d", self.manifest, line, got, epoch + 1)
        self._resume_pos = self._pos()
        self.corrupt_count = int(state["corrupt_count"])

    def close(self) -> None:
        """Stop the decode threads and close the manifest."""
        if self._ahead is not None:
            self._ahead.close(wait=True)
        self._fh.close()

    def __enter__(self) -> ManifestStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        ahead = getattr(self, "_ahead", None)
        if ahead is not None:
            ahead.close(wait=False)
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def __repr__(self) -> str:
        return (f"ManifestStream({str(self.manifest)!r}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch}, line={self.line}, skipped={self.corrupt_count}, "
                f"decode_workers={self.decode_workers})")
