"""Unlabeled-only archives: a manifest text file of image paths, streamed, sharded, resumable.

Hospital archives hold millions of unlabeled slices; listing them (or even the manifest) in
memory per rank is wasteful, so `ManifestStream` reads the manifest line by line from a byte
offset and never holds more than one line (plus one batch of decoded images).

* **Sharding**: line ``i`` (0-based, counting non-empty, non-comment lines) belongs to rank
  ``i % world_size``: ranks are disjoint and together cover every line, whatever the length.
* **Order**: file order, endlessly (epoch ``e`` restarts at the top). Shuffle the manifest once
  offline (``shuf``) if the archive is sorted by patient; a streamed global shuffle would need the
  whole list.
* **Resume**: `state_dict` = byte offset + line counter + epoch + corrupt count, all JSON; the
  manifest's size and mtime are stored and checked, so a rewritten manifest is refused.
* **Bad files**: an unreadable/corrupt image is *counted and logged with its file name*
  (``logging`` warning, the running count in `corrupt_count` and `corrupt_files` (the last 100)),
  then the next line is taken. A manifest with no readable line in a whole epoch is an error.

Relative paths in the manifest are resolved against the manifest's folder. Lines starting with
``#`` are comments.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .ssl4mis import DataError, resize_nearest

__all__ = ["ManifestStream", "read_unlabeled_image"]

log = logging.getLogger(__name__)
_STATE_VERSION = 1


def read_unlabeled_image(path: str) -> np.ndarray:
    """Decode one unlabeled image as float32 ``[H, W]`` gray in [0, 1] (PNG/JPEG/BMP/TIFF) or as
    stored (``.npy`` 2-D, ``.h5`` dataset ``image`` 2-D). Raises `DataError` naming the file."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                arr = np.asarray(f["image"][()])
        else:
            from .folders import decode_image

            return decode_image(path, channels=1)[0]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{path}: expected a 2-D numeric image, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


class ManifestStream:
    """Endless, sharded, resumable stream of unlabeled images named by a manifest file.

    Args:
        manifest: text file, one image path a line.
        rank, world_size: this replica's shard (line ``i`` -> rank ``i % world_size``).
        size: ``(H, W)`` every image is resized to (OpenCV INTER_NEAREST rule, as the reference's
            first transform); None keeps the stored size (then `next_batch` needs equal sizes).
        reader: ``path -> float32 [H, W]``; default `read_unlabeled_image`.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        size: tuple[int, int] | None = (256, 256),
        reader: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"unlabeled manifest not found: {self.manifest}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.reader = reader or read_unlabeled_image
        self._base = str(self.manifest.resolve().parent)
        st = self.manifest.stat()
        self._fingerprint = (int(st.st_size), int(st.st_mtime_ns))
        self._fh = open(self.manifest, "rb")  # binary: tell()/seek() are exact byte offsets
        self._epoch = 0
        self._line = 0  # index of the next path line (all ranks' lines counted)
        self._yielded_in_epoch = 0
        self.corrupt_count = 0
        self.corrupt_files: deque[str] = deque(maxlen=100)

    # ------------------------------------------------------------------ paths
    def _next_line(self) -> str | None:
        """Next path line of the whole manifest (any rank), or None at end of file."""
        while True:
            raw = self._fh.readline()
            if not raw:
                return None
            # a non-UTF-8 name is kept (surrogate-escaped) and then fails as a file, counted
            # and logged with its name like any unreadable entry, instead of crashing the stream
            text = raw.decode("utf-8", errors="surrogateescape").strip()
            if text and not text.startswith("#"):
                return text

    def next_path(self) -> str:
        """The next path of this rank's shard (wrapping to a new epoch at the end of the file).

        A ``str``, not a ``Path``: pathlib interns every path component (``sys.intern``), which
        would keep millions of file names alive for the life of the process."""
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

    def iter_paths(self) -> Iterator[str]:
        """Endless iterator over this rank's paths (no decoding)."""
        while True:
            yield self.next_path()

    # ------------------------------------------------------------------ images
    def next_image(self) -> tuple[str, np.ndarray]:
        """Next readable image (float32 ``[H, W]``, resized to ``size``); corrupt files are counted,
        logged with their name and skipped. An epoch without one readable file is an error."""
        bad_run = 0
        start_epoch, start_line = self._epoch, self._line
        while True:
            path = self.next_path()
            try:
                img = self.reader(path)
            except (DataError, FileNotFoundError, OSError) as exc:
                self.corrupt_count += 1
                self.corrupt_files.append(path)
                log.warning("unlabeled manifest %s: skipping corrupt file %s (%s); %d skipped so far",
                            self.manifest, path, exc, self.corrupt_count)
                bad_run += 1
                if self._epoch > start_epoch + 1 or (self._epoch == start_epoch + 1 and self._line >= start_line):
                    raise DataError(
                        f"{self.manifest}: no readable file for rank {self.rank} in a whole pass "
                        f"({bad_run} corrupt in a row, last {path})"
                    ) from exc
                continue
            if self.size is not None and img.shape != self.size:
                img = resize_nearest(img, self.size)
            return path, np.ascontiguousarray(img, dtype=np.float32)

    def next_batch(self, n: int) -> np.ndarray:
        """``[n, H, W]`` float32 of the next ``n`` readable images."""
        imgs = [self.next_image()[1] for _ in range(n)]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise DataError(f"{self.manifest}: images of different sizes {sorted(shapes)}; set a size")
        return np.stack(imgs) if imgs else np.zeros((0, *(self.size or (0, 0))), np.float32)

    # ------------------------------------------------------------------ resume
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def line(self) -> int:
        return self._line

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position (byte offset of the next line, counters, manifest identity)."""
        return {
            "version": _STATE_VERSION,
            "manifest": str(self.manifest),
            "fingerprint": list(self._fingerprint),
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "line": self._line,
            "offset": int(self._fh.tell()),
            "yielded_in_epoch": self._yielded_in_epoch,
            "corrupt_count": self.corrupt_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly at the saved position; refuses another manifest, shard or version."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"manifest state version {state.get('version')!r} != {_STATE_VERSION}")
        if tuple(state["fingerprint"]) != self._fingerprint:
            raise ValueError(
                f"manifest state was saved for {state['manifest']} with (size, mtime) "
                f"{tuple(state['fingerprint'])}; {self.manifest} now has {self._fingerprint}: it changed"
            )
        if (int(state["rank"]), int(state["world_size"])) != (self.rank, self.world_size):
            raise ValueError(
                f"manifest state is for rank {state['rank']}/{state['world_size']}, "
                f"this stream is rank {self.rank}/{self.world_size}"
            )
        self._fh.seek(int(state["offset"]))
        self._epoch = int(state["epoch"])
        self._line = int(state["line"])
        self._yielded_in_epoch = int(state["yielded_in_epoch"])
        self.corrupt_count = int(state["corrupt_count"])

    def close(self) -> None:
        self._fh.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def __repr__(self) -> str:
        return (f"ManifestStream({str(self.manifest)!r}, rank={self.rank}/{self.world_size}, "
                f"epoch={self._epoch}, line={self._line}, corrupt={self.corrupt_count})")
