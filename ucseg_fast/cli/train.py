"""`ucseg-fast train`: a preflight of the whole run, then the trainer (or a --time-budget plan)."""
from __future__ import annotations

import json
import os
import time

from ..errors import InputError
from .common import add_config_option, config_from_args, positive, user_error_line


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train UC-Seg from a preset or a TOML file",
                       description="Train UC-Seg. --config names a packaged preset or a TOML "
                                   "file; without it the built-in defaults (the acdc_2d recipe) "
                                   "are trained. Any --section.key=value after the options "
                                   "overrides the preset (unknown keys are errors).")
    add_config_option(t)
    t.add_argument("--resume", help="checkpoint (.json/.safetensors/stem) to continue exactly")
    t.add_argument("--stop-at", type=int, metavar="N",
                   help="stop after iteration N (saving 'last'); schedules still follow "
                        "train.max_iterations, so --resume continues the same run")
    t.add_argument("--time-budget", type=float, metavar="MINUTES", dest="time_budget",
                   help="fit the whole run (validation included) into MINUTES of wall-clock "
                        "time: a short probe measures a step and a validation, then "
                        "max_iterations and val_every are planned, with proportional schedules")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds a run (its files are removed)")
    t.set_defaults(fn=cmd_train)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_train(args, extra) -> int:
    from ..preflight import preflight
    started = time.perf_counter()  # a --time-budget counts from here
    cfg = config_from_args(args, extra)
    if args.config is None and _is_main_rank():
        print("config: the built-in defaults (the acdc_2d recipe); --config names a preset "
              "or a TOML file", flush=True)
    if args.stop_at is not None:
        positive(args.stop_at, "--stop-at")
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise InputError(f"--time-budget {args.time_budget} must be > 0 minutes")
        if args.resume or args.stop_at is not None:
            raise InputError("--time-budget plans a whole run from its start: it does not "
                             "combine with --resume or --stop-at")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("--time-budget is single-process (ranks would stop at different "
                             "iterations); run it without torchrun")
    # device, recipe, output folder, data root and list files, labeled patients, resume
    # sidecar: before any data is loaded or model built
    preflight(cfg, resume=args.resume)
    if args.time_budget is not None:
        from ..train.budget import train_for_budget
        summary = train_for_budget(cfg, args.time_budget, overwrite=args.overwrite,
                                   started=started)
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
        print(f"time budget {args.time_budget:g} min: {summary['iterations']} iterations, "
              f"{summary['elapsed_s']:.0f} s in all, validation {summary['val_s']:.0f} s "
              f"({100 * summary['val_share']:.0f} % of the run); best validation Dice "
              f"{summary['best_val_dice']:.4f} at iteration {summary['best_iteration']}")
        return 0
    from ..train import Trainer
    trainer = Trainer(cfg, overwrite=args.overwrite)
    if args.resume:
        resume(trainer, args.resume)
        print(f"resumed from {args.resume} at iteration {trainer.iteration}")
    try:
        summary = trainer.train(stop_at=args.stop_at)
    finally:
        if trainer.dist.enabled:  # torchrun: leave the process group cleanly
            import torch.distributed as dist
            dist.destroy_process_group()
    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


def resume(trainer, path: str) -> None:
    """`Trainer.load` with the data layer's refusals as user errors: a ValueError or KeyError
    there means the checkpoint's saved state does not fit this run (e.g. a list file that
    gained or lost lines since the checkpoint, so the sampler state has other counts)."""
    try:
        trainer.load(path)
    except (ValueError, KeyError) as e:
        if user_error_line(e) is not None:  # DataError, ConfigError: already one clear line
            raise
        what = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
        raise InputError(f"--resume {path}: the checkpoint does not fit this run's data or "
                         f"model ({what}); resume with the data and config it was saved "
                         "with") from e
