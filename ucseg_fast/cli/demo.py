"""`ucseg-fast demo`: a small CPU-friendly run of the packaged `demo` preset, evaluated.

Everything is relative to the current directory: the data is `data/ACDC` there when it holds
an SSL4MIS ACDC set (or `--data.root=...`), else a synthetic ACDC-like set written to
`runs/synthetic_acdc`; the run goes to the preset's `runs/demo`."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from .common import add_config_option

#: where the demo looks for a real ACDC set (SSL4MIS layout), relative to the current directory
ACDC = Path("data") / "ACDC"
#: where it writes the synthetic stand-in when there is none
SYNTHETIC = Path("runs") / "synthetic_acdc"


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="small CPU-friendly training run + per-class Dice table",
                       description="Train the packaged 'demo' preset into runs/demo under the "
                                   "current directory, replacing the previous demo run there, "
                                   "then evaluate its best checkpoint. The data: "
                                   "--data.root=... when given, else data/ACDC under the "
                                   "current directory when it holds an SSL4MIS ACDC set "
                                   "(train_slices.list, val.list, data/), else a synthetic "
                                   "ACDC-like set written to runs/synthetic_acdc. Any "
                                   "--section.key=value overrides the preset.")
    add_config_option(d, default="demo")
    d.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds a run (its files are removed); "
                        "the demo's own runs/demo is always replaced")
    d.set_defaults(fn=cmd_demo)


def demo_data(cfg, given: bool) -> tuple[list[str], str, str]:
    """The data.root override of the demo (none when `given` on the command line), the words
    that say which data it is, and a note on why: data/ACDC under the current directory when it
    holds an SSL4MIS set, else the synthetic set under runs/ (written on first use)."""
    if given:
        return [], f"the data at {cfg.data.root}", ""
    spec = cfg.spec
    if spec.dims != 2 or spec.binary or cfg.data.format != "ssl4mis" or cfg.data.num_classes != 4:
        raise InputError(f"demo finds or writes ACDC-like data (4 classes, 2D SSL4MIS) only; "
                         f"{cfg.name} (recipe {cfg.recipe}, data.format {cfg.data.format!r}) "
                         "needs --data.root=...")
    if (ACDC / "train_slices.list").is_file():
        return [f"--data.root='{ACDC}'"], f"the ACDC set at {ACDC.resolve()}", ""
    from ..data.synthetic import write_synthetic_acdc
    if not (SYNTHETIC / "train_slices.list").is_file():
        write_synthetic_acdc(SYNTHETIC, n_train_patients=14, seed=0)
    return ([f"--data.root='{SYNTHETIC}'"], f"synthetic cardiac-like data at {SYNTHETIC.resolve()}",
            f" (no ACDC set at {ACDC.resolve()}: put one there or give --data.root=...)")


def cmd_demo(args, extra) -> int:
    """Train the demo preset on data/ACDC when present, else on synthetic data, then evaluate
    the best-on-validation checkpoint and print the per-class table."""
    from ..config import load_config
    from ..eval.protocol import evaluate, evaluation_items, open_dataset
    from ..eval.report import format_table
    from ..train import Trainer
    from .common import config_from_args
    from .infer import load_for_inference, predict_array
    cfg = config_from_args(args, extra)  # unknown arguments and bad keys: before any data
    root, which, why = demo_data(cfg, any(a.startswith("--data.root=") for a in extra))
    if root:
        cfg = load_config(args.config, [*root, *extra])
    # the preset's runs/demo is the demo's own folder: a second `make demo` replaces the first
    # run there; another train.out_dir is only cleared with --overwrite
    out = Path(cfg.train.out_dir)
    own = out == Path(load_config(args.config).train.out_dir)
    overwrite = args.overwrite or own
    from ..preflight import preflight
    preflight(cfg)
    held = any((out / n).is_file() for n in ("metrics.jsonl", "last.json", "best.json"))
    note = f"{why}; output {out}"
    if held and overwrite:
        note += " (replaces the previous demo run there)" if own else " (--overwrite: replaces the run there)"
    print(f"demo: training {cfg.name} on {which}{note}")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=overwrite)
    summary = trainer.train()
    print(f"demo: {summary['iterations']} iterations in {time.perf_counter() - t0:.0f} s; "
          f"best validation Dice {summary['best_val_dice']:.4f} at iteration "
          f"{summary['best_iteration']}")
    cfg_, meta, device, predict = load_for_inference(str(out / "best.json"), [],
                                                     cfg.train.device, "train.device")
    vols = evaluation_items(cfg_, open_dataset(cfg_), "val")
    res = evaluate(cfg_, predict, vols, device=device, batch_size=cfg.train.val_batch_size)
    print(f"demo: best checkpoint (iteration {meta['iteration']}) on {len(vols)} validation volumes "
          f"({which}):")
    print(format_table(res))
    # what it learned, to look at: a few slices of the first validation volume, and the curve
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # the optional [plot] extra
        print("demo: figures skipped: matplotlib is not installed "
              "(pip install 'ucseg-fast[plot]')")
        return 0
    from ..eval.report import save_overlay_figure
    from ..train.bench import dice_curve, plot_dice_curves
    name, img, lab = vols[0][:3]
    pred = predict_array(cfg_, predict, img, cfg.train.val_batch_size, device)
    fig = save_overlay_figure(out / "demo_predictions.png", img, lab, pred)
    curve = plot_dice_curves({cfg.name: dice_curve(summary["history"])}, out / "dice_vs_time.png",
                             f"{cfg.name}: validation Dice ({which.split(' at ')[0]})")
    print(f"demo: wrote {out / 'demo_predictions.png'} (image / ground truth / prediction, "
          f"slices {fig} of {name}) and {curve} (validation Dice against time)")
    return 0
