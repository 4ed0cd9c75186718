"""The data layer's error types, shared by every format and stream.

* `DataError`: a data file or list is wrong (corrupt, missing key, bad shape or value, too
  large, not a file, changed since a checkpoint). A `ValueError`.
* `DataPathError`: a path where a data file belongs is missing or is not a usable file; both a
  `DataError` and a `FileNotFoundError`, so callers catching either keep working.

Also importable from `ucseg_fast.data`, `ucseg_fast.data.guards` and `ucseg_fast.data.ssl4mis`.
"""
from __future__ import annotations

__all__ = ["DataError", "DataPathError"]


class DataError(ValueError):
    """A data file is wrong: corrupt, missing key, bad shape or value, too large, not a file."""


class DataPathError(DataError, FileNotFoundError):
    """A path where a data file belongs is missing or is not a usable file (a directory, a
    dangling symlink, a symlink loop, a special file). Both a `DataError` and a
    `FileNotFoundError`."""
