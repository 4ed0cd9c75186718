"""The user-error type of the command line.

The CLI's rule (`ucseg_fast.cli.main`): every problem with the user's input -- a config key or
value, a file, a folder, a device -- is printed as one line, ``error: <message>`` naming the
file, key or value, and the command exits with code 2. Anything else that escapes is a bug and
keeps its traceback.

`UserError` is the base of the user errors raised by the CLI and the preflight
(`ucseg_fast.preflight`); `ConfigError`, `CheckpointError` (with `RunFolderError`) and
`DataError` predate it and are caught by the same rule.
"""
from __future__ import annotations

__all__ = ["InputError", "PreflightError", "UserError"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class PreflightError(UserError):
    """Found by the training preflight before any data is loaded or model built: the device,
    the output folder, the data root, its list files, the labeled patients, the resume
    checkpoint."""


class InputError(UserError):
    """A command's own input is wrong: a `predict` input file (format, dtype, rank, non-finite
    values), an output path, an option value."""
