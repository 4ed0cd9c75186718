"""What every subcommand shares: the configuration from `--config` and overrides, option
checks, and the one-line form of a user error."""
from __future__ import annotations

import errno

from ..errors import InputError, UserError

__all__ = ["add_config_option", "config_from_args", "positive", "user_error_line"]


def add_config_option(parser, *, default: str | None = None, what: str = "") -> None:
    """`--config NAME_OR_PATH`: a packaged preset (listed in the help) or a TOML file."""
    from ..config import preset_names
    names = ", ".join(preset_names())
    if default is None:
        fallback = "default: the built-in defaults, which are the acdc_2d recipe"
    else:
        fallback = f"default: {default}"
    parser.add_argument("--config", default=default, metavar="PRESET_OR_TOML",
                        help=f"{what}a packaged preset ({names}) or the path of a TOML file "
                             f"({fallback})")


def config_from_args(args, extra: list[str]):
    """The configuration of `--config` (None: the defaults) with the `--section.key=value`
    overrides in `extra`; anything else in `extra` is an unknown argument."""
    from ..config import load_config
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        raise InputError(f"unrecognised arguments {unknown}; config overrides look like "
                         "--train.max_iterations=300")
    return load_config(args.config, overrides)


def positive(value: int, option: str, minimum: int = 1) -> None:
    if value < minimum:
        raise InputError(f"{option} = {value} must be >= {minimum}")


#: OSError numbers that are the user's environment, not a bug: a full disk, a read-only file
#: system, an exhausted quota
_USER_ERRNOS = (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC))


def user_error_line(e: BaseException) -> str | None:
    """The one line `main` prints for a user error, or None when `e` is a bug (which keeps its
    traceback). User errors: `UserError` (`PreflightError`, `InputError`), `ConfigError`,
    `CheckpointError` (`RunFolderError`), `DataError`, the OSErrors of a path (not found, not a
    folder, a folder, permission) and of the disk (full, read-only, quota)."""
    from ..config import ConfigError
    from ..data.errors import DataError
    from ..train.checkpoint import CheckpointError
    if isinstance(e, (UserError, ConfigError, CheckpointError, DataError)):
        text = str(e)
    elif isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError)) or (isinstance(e, OSError) and e.errno in _USER_ERRNOS):
        if e.filename is not None and e.strerror:  # an OS call's error: name the file
            text = f"{e.filename}: {e.strerror}"
            if e.filename2 is not None:
                text += f" ({e.filename2})"
        else:  # raised with a message of ours
            text = str(e)
    else:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__
