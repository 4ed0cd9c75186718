"""`ucseg-fast train | eval | predict | prepare | bench | demo`.

One module per subcommand (`train`, `infer` for eval and predict, `prepare`, `bench`, `demo`),
each with the `add_parser` that registers it; `common` holds what they share. Nothing here
reads files relative to the source tree: presets ship with the package (`--config NAME`),
and every other path is the user's or relative to the current directory.
"""
from __future__ import annotations

import argparse
import sys

from . import bench, demo, infer, prepare, train
from .bench import cmd_bench
from .common import config_from_args, positive, user_error_line
from .demo import cmd_demo
from .infer import (check_image_array, cmd_eval, cmd_predict, load_for_inference,
                    predict_array, read_input)
from .prepare import cmd_prepare
from .train import cmd_train

__all__ = ["build_parser", "check_image_array", "cmd_bench", "cmd_demo", "cmd_eval",
           "cmd_predict", "cmd_prepare", "cmd_train", "config_from_args", "load_for_inference",
           "main", "positive", "predict_array", "read_input", "user_error_line"]

#: subcommands that take --section.key=value config overrides after their options
_TAKE_OVERRIDES = ("train", "demo", "eval", "predict", "bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucseg-fast", description=(
        "UC-Seg semi-supervised segmentation: fast training, evaluation and fused ops. "
        "Config overrides: --section.key=value (e.g. --train.max_iterations=300)."))
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    infer.add_parsers(sub)
    prepare.add_parser(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI. A user error -- a config key or value, a file, a folder, a device, a full or
    read-only disk -- prints one line, `error: <message>` naming the file, key or value, and
    returns 2; anything else is a bug and raises with its traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _TAKE_OVERRIDES:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.fn(args, extra)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
