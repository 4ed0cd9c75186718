"""Guards of the data layer: path checks that say what a bad path *is*, the
decoded-size cap, and content fingerprints of the lists a stream draws from (resume identity).

* `check_file`: every reader calls it before opening a data file. A missing path, a directory
  where a file belongs, a dangling symlink, a symlink loop and a special file (FIFO, socket,
  device) each get their own message naming the path; all are `DataPathError` (a `DataError`
  *and* a `FileNotFoundError`, so callers catching either keep working).
* `check_pixels`: a decoded image larger than ``data.max_image_pixels`` is refused from its header,
  before any pixel is decoded, naming the file and its size.
* `fingerprint_lines` / `check_same_content`: the number of lines + a SHA-256 of their text (never
  a timestamp), stored in a stream's state; resuming on different content is refused with one
  line naming the list, unless ``data.resume_changed_data = true``.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import DataError, DataPathError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DataError",
    "DataPathError",
    "check_file",
    "check_pixels",
    "check_same_content",
    "content_changed",
    "fingerprint_lines",
    "LineHasher",
]

log = logging.getLogger(__name__)

#: ``data.max_image_pixels`` default (a 7071² image); Pillow's own bomb check only refuses > 179 M.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

#: What to pass to continue on changed data (the CLI spelling of the config key).
RESUME_CHANGED_FLAG = "--data.resume_changed_data=true"


# ---------------------------------------------------------------------------- paths
def _link_chain(path: str, limit: int = 6) -> str:
    """``a -> b -> c`` (at most ``limit`` hops), for a loop message."""
    hops = [path]
    cur = path
    for _ in range(limit):
        try:
            target = os.readlink(cur)
        except OSError:
            break
        cur = os.path.normpath(os.path.join(os.path.dirname(cur), target))
        hops.append(cur)
        if cur in hops[:-1]:
            break
    else:
        hops.append("...")
    return " -> ".join(hops)


def check_file(path: str | os.PathLike[str], what: str = "file", *, listed_in: str | os.PathLike[str] | None = None
               ) -> str:
    """Raise `DataPathError` unless ``path`` is a regular file (symlinks followed); return it as str.

    The message names the path and says what it is: ``not found``, ``is a directory``, ``is a
    dangling symlink (-> target)``, ``is a symlink loop (a -> b -> a)``, ``is a FIFO / socket /
    device``, ``cannot be accessed``. ``listed_in`` adds where the path came from."""
    p = os.fspath(path)
    where = f" (listed in {os.fspath(listed_in)})" if listed_in is not None else ""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            try:
                target = os.readlink(p)
            except OSError:  # pragma: no cover - raced away
                target = "?"
            raise DataPathError(f"{what} {p}{where} is a dangling symlink (-> {target}, which does not exist)") \
                from None
        raise DataPathError(f"{what} not found: {p}{where}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataPathError(f"{what} {p}{where} is a symlink loop ({_link_chain(p)})") from None
        if exc.errno == errno.ENOTDIR:
            raise DataPathError(f"{what} not found: {p}{where} (a parent of it is a file, not a folder)") from None
        raise DataPathError(f"{what} {p}{where} cannot be accessed ({exc.strerror})") from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return p
    if stat.S_ISDIR(mode):
        raise DataPathError(f"{what} {p}{where} is a directory, not a file")
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
    raise DataPathError(f"{what} {p}{where} is {kind}, not a regular file")


def check_pixels(path: str | os.PathLike[str], width: int, height: int, max_pixels: int | None,
                 *, depth: int = 1) -> None:
    """Refuse an image of ``width x height`` (x ``depth`` frames/planes) pixels above ``max_pixels``
    (None or <= 0: no cap) with a `DataError` naming the file and its size."""
    if not max_pixels or max_pixels <= 0:
        return
    n = int(width) * int(height) * max(int(depth), 1)
    if n > max_pixels:
        size = f"{width}x{height}" + (f"x{depth}" if depth > 1 else "")
        raise DataError(f"{os.fspath(path)}: image of {size} = {n:,} pixels exceeds data.max_image_pixels = "
                        f"{max_pixels:,}; refused before decoding (raise data.max_image_pixels to read it)")


# ---------------------------------------------------------------------------- fingerprints
class LineHasher:
    """Incremental `fingerprint_lines`: ``add(line)`` per line, then ``result(source)``."""

    __slots__ = ("_h", "n")

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.n = 0

    def add(self, line: str) -> None:
        self._h.update(line.encode("utf-8", "surrogateescape"))
        self._h.update(b"\n")
        self.n += 1

    def result(self, source: str) -> dict[str, Any]:
        return {"source": source, "lines": self.n, "sha256": self._h.hexdigest()}


def fingerprint_lines(lines: Iterable[str], source: str) -> dict[str, Any]:
    """``{"source", "lines", "sha256"}``: the number of lines and a SHA-256 of their text (each
    line UTF-8 + ``\\n``). ``source`` names the list in messages; it is not compared (a moved
    or copied dataset keeps its identity)."""
    h = LineHasher()
    for line in lines:
        h.add(str(line))
    return h.result(source)


def content_changed(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> bool:
    """True when both fingerprints exist and differ (line count or hash)."""
    if not saved or not now:
        return False
    return int(saved["lines"]) != int(now["lines"]) or str(saved["sha256"]) != str(now["sha256"])


def _describe(fp: Mapping[str, Any]) -> str:
    return f"{int(fp['lines'])} lines, sha256 {str(fp['sha256'])[:12]}"


def check_same_content(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None, *,
                       resume_changed_data: bool, position: str = "the saved position") -> bool:
    """Compare a checkpoint's fingerprint with the current one. Equal (or either missing: an old
    checkpoint): False. Different: `DataError` in one line naming the list and the way to continue
    anyway, or, with ``resume_changed_data``, a logged warning and True (the caller continues
    on the new content from ``position``)."""
    if not content_changed(saved, now):
        return False
    assert saved is not None and now is not None
    source = str(now.get("source") or saved.get("source") or "the data list")
    if not resume_changed_data:
        raise DataError(
            f"{source}: content changed since the checkpoint ({_describe(saved)} then, {_describe(now)} "
            f"now); resume refused: restore it, or pass {RESUME_CHANGED_FLAG} to continue on the new "
            f"content from {position}")
    log.warning("%s: content changed since the checkpoint (%s then, %s now); data.resume_changed_data = "
                "true: continuing on the new content from %s", source, _describe(saved), _describe(now),
                position)
    return True
