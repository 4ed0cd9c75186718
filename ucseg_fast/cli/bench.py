"""`ucseg-fast bench step | e2e | curves | report | ledger`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import InputError
from .common import add_config_option, config_from_args


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: one training step, time-to-accuracy, loss "
                                     "curves of variants",
                       description="bench step: ms/step of the ACDC-shape (--dims 3: LA-shape) step on synthetic "
                                   "device data. bench e2e: train a preset for --minutes of "
                                   "training time, Dice vs time JSON + PNG in --out. bench curves: "
                                   "train variants of a preset from identical seeds for --steps "
                                   "(default 200) and compare their loss curves (default: the fused "
                                   "UPG vs the PyTorch modules, with the bf16 noise floor), "
                                   "curves.json + curves.png in --out; exit 1 when a variant is "
                                   "not within tolerance. e2e and curves take config overrides "
                                   "--section.key=value. bench report: the whole engine on this "
                                   "card within --minutes (step table, connected components, "
                                   "fused ops, UPG, data, graph-vs-eager equality, with --data "
                                   "time to Dice), report.md + report.json in --out. bench "
                                   "ledger: kernels, bytes and FLOPs of one training step of "
                                   "each phase of --config, "
                                   "counted on the CPU with the options the CUDA path uses, with a "
                                   "roofline estimate for --card; fails on a host sync.")
    b.add_argument("what", choices=("step", "e2e", "curves", "report", "ledger"))
    b.add_argument("--mode", choices=("auto", "eager", "compile", "graph"), default="auto",
                   help="step: how the step runs; auto = the default (one CUDA graph per phase "
                        "on a GPU, eager on CPU). e2e: use --train.step_mode=...")
    b.add_argument("--ops", choices=("auto", "fused", "torch"), default="auto",
                   help="step: the fused ops or the PyTorch modules (auto = the default: fused "
                        "on CUDA)")
    b.add_argument("--compile-mode", default="default")
    b.add_argument("--compile-backend", default="inductor",
                   help="step: torch.compile's backend with --mode compile (e.g. aot_eager)")
    b.add_argument("--no-nms", action="store_true",
                   help="step: pseudo-labels without the largest-component filter")
    add_config_option(b, what="e2e / curves / ledger: ")
    b.add_argument("--minutes", type=float, default=None,
                   help="e2e: wall-clock budget of each run, validation included (default "
                        "10); report: the whole report's budget (default 8)")
    b.add_argument("--data", default=None, metavar="ROOT",
                   help="report: also measure data throughput and time to Dice on this "
                        "SSL4MIS-layout dataset")
    b.add_argument("--card", default="H100",
                   help="ledger: the card of the roofline estimate (H100, H200, A100)")
    b.add_argument("--json", default=None, metavar="FILE", help="ledger: also write JSON here")
    b.add_argument("--top", type=int, default=8,
                   help="ledger: list the N most frequent ops of each part")
    b.add_argument("--no-sizes", action="store_true",
                   help="ledger: count kernels only (skip the fake-tensor pass at the real shape)")
    b.add_argument("--stream", action="store_true",
                   help="ledger: also count the training stream's kernels for one batch")
    b.add_argument("--smoke", action="store_true",
                   help="report: tiny shapes, the CPU-capable parts only (a test of the command)")
    b.add_argument("--val-every", type=int, default=None,
                   help="e2e: validate every K iterations (default: the preset's val_every)")
    b.add_argument("--out", default=None,
                   help="e2e / curves: output folder (default benchmarks/results/e2e, "
                        "benchmarks/results/curves); report: required")
    b.add_argument("--steps", type=int, default=None,
                   help="step: timed steps (default 20); curves: steps per variant (default 200)")
    b.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="e2e: plot this run folder's validation Dice against time (repeatable; "
                        "nothing is trained)")
    b.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                   help="curves: a variant, e.g. \"fused:model.upg_head='fused' "
                        "model.uncertainty='fused'\" (repeatable; the first is the baseline "
                        "unless --baseline); e2e: a run, e.g. ssl: and "
                        "\"supervised:loss.semi_supervised=false\"")
    b.add_argument("--baseline", default=None, help="curves: the variant compared against")
    b.add_argument("--noise", default=None,
                   help="curves: the variant whose distance to the baseline is the noise floor")
    b.add_argument("--window", type=int, default=20, help="curves: steps per window mean")
    b.add_argument("--factor", type=float, default=2.0,
                   help="curves: tolerance = max(factor x noise floor, --rtol)")
    b.add_argument("--rtol", type=float, default=2e-3, help="curves: tolerance without a floor")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--phase2", action="store_true")
    b.add_argument("--device", default="auto")
    b.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="step: 2 = the ACDC recipe's step, 3 = the LA recipe's (3D pair, C = 2; "
                        "defaults --batch 2 --img 96)")
    b.add_argument("--batch", type=int, default=None,
                   help="labeled (= unlabeled) batch size (default 12 in 2D, 2 in 3D)")
    b.add_argument("--img", type=int, default=None, help="image side (default 256 in 2D, 96 in 3D)")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args, extra) -> int:
    if args.what == "report":
        return _bench_report(args, extra)
    if args.what == "ledger":
        return _bench_ledger(args, extra)
    if args.minutes is None:
        args.minutes = 10.0
    if args.out is None:
        args.out = f"benchmarks/results/{'curves' if args.what == 'curves' else 'e2e'}"
    from ..preflight import check_device
    if args.what == "e2e":
        return _bench_e2e(args, extra)
    if args.what == "curves":
        cfg = config_from_args(args, extra)
        check_device(cfg.train.device)
        return _bench_curves(args, cfg)
    if extra:
        raise InputError(f"unrecognised arguments {extra} (config overrides are for "
                         "'bench e2e' and 'bench curves')")
    check_device(args.device, key="--device")
    from ..train.bench import bench_step
    res = bench_step(steps=args.steps or 20, warmup=args.warmup, phase2=args.phase2, device=args.device,
                     labeled_bs=args.batch or (2 if args.dims == 3 else 12),
                     img=args.img or (96 if args.dims == 3 else 256), mode=args.mode,
                     compile_mode=args.compile_mode, compile_backend=args.compile_backend,
                     nms=not args.no_nms, dims=args.dims,
                     fused={"auto": "auto", "fused": True, "torch": False}[args.ops])
    print(json.dumps(res, indent=1))
    return 0


def _bench_ledger(args, extra) -> int:
    """`bench ledger`: kernels, bytes and FLOPs of one step of each phase, counted on the CPU with
    the options the CUDA path uses, and a roofline estimate for --card."""
    if "ucseg_fast.ops" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        # the fused ops' Triton kernels run in the interpreter on the CPU (set before any
        # @triton.jit is defined, i.e. before the ops are imported)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from ..bench.ledger import CARDS, HostSyncError, step_ledger
    from ..ops._triton_utils import HAS_TRITON, interpret_mode
    from ..train.recipe import resolve_ops
    cfg = config_from_args(args, extra)
    # "auto" op choices as a CUDA machine resolves them: the fused ops when Triton exists
    cfg = resolve_ops(cfg, torch.device("cuda"))
    uses_triton = (cfg.model.upg_head == "fused" or cfg.model.uncertainty == "fused"
                   or cfg.loss.fused_losses is True or cfg.loss.nms)
    if uses_triton and HAS_TRITON and not interpret_mode():
        raise InputError("bench ledger runs the Triton kernels in the interpreter: set "
                         "TRITON_INTERPRET=1 before the package is imported")
    if args.card not in CARDS:
        raise InputError(f"--card {args.card!r}; known: {', '.join(CARDS)}")
    try:
        led = step_ledger(cfg, card=args.card, sizes=not args.no_sizes, stream=args.stream)
    except HostSyncError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(led.markdown(top=args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(led.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0


def _bench_report(args, extra) -> int:
    """`bench report`: the whole engine on this card, report.md + report.json in --out."""
    if extra:
        raise InputError(f"unrecognised arguments {extra} for 'bench report'")
    if not args.out:
        raise InputError("bench report needs --out DIR")
    from ..bench.report import main_report
    return main_report(args.out, data=args.data, minutes=8.0 if args.minutes is None
                       else args.minutes, smoke=args.smoke)


def _bench_e2e(args, extra) -> int:
    """`bench e2e`: Dice against wall-clock time of one or several runs on one plot -- runs it
    trains within --minutes each (the configuration, or each --variant), or, with --run, run
    folders that exist (their metrics.jsonl)."""
    from ..train.bench import bench_e2e, plot_dice_curves, read_run_curve
    from ..train.curves import parse_variant
    from ..preflight import check_device
    out = Path(args.out)
    if args.run:
        if args.variant or extra:
            raise InputError("bench e2e --run plots existing runs: it takes no --variant or "
                             "config overrides")
        curves = {}
        for folder in args.run:
            name = Path(folder).name
            try:
                curves[name if name not in curves else folder] = read_run_curve(folder)
            except FileNotFoundError:
                raise InputError(f"--run {folder}: no metrics.jsonl in this folder") from None
            except ValueError as e:
                raise InputError(f"--run {folder}: {e}") from None
        png = plot_dice_curves(curves, out / "dice_vs_time.png",
                               " vs ".join(curves) + ": validation Dice")
        js = out / "dice_vs_time.json"
        js.write_text(json.dumps({"runs": {n: {"folder": f, "curve": c} for (n, c), f in
                                           zip(curves.items(), args.run)}}, indent=1))
        for n, c in curves.items():
            best = max(c, key=lambda r: r["val_dice"])
            print(f"{n}: {len(c)} validations, best Dice {best['val_dice']:.4f} at iteration "
                  f"{best['iteration']}, last {c[-1]['val_dice']:.4f} at {c[-1]['iteration']}")
        print(f"wrote {js} and {png}")
        return 0
    if not args.minutes > 0:
        raise InputError(f"--minutes {args.minutes} must be > 0")
    cfg = config_from_args(args, extra)
    check_device(cfg.train.device)
    try:
        variants = dict(parse_variant(v) for v in args.variant) or None
    except ValueError as e:
        raise InputError(f"{e}") from None
    res = bench_e2e(cfg, minutes=args.minutes, out_dir=out, val_every=args.val_every,
                    variants=variants)
    print(json.dumps({n: {k: v for k, v in r.items() if k != "curve"}
                      for n, r in res["runs"].items()}, indent=1))
    print(f"wrote {out / 'dice_vs_time.json'} and {out / 'dice_vs_time.png'}")
    return 0


def _bench_curves(args, cfg) -> int:
    """`bench curves`: loss curves of variants from identical seeds (default: the fused UPG
    against the PyTorch modules, with the bf16-vs-fp32 noise floor of the latter)."""
    from ..train.curves import (UPG_VARIANTS, format_comparison, loss_curves, parse_variant,
                               write_curves)
    from ..preflight import check_device
    try:
        variants = dict(parse_variant(v) for v in args.variant)
    except ValueError as e:
        raise InputError(f"{e}") from None
    noise = args.noise
    if not variants:
        variants = dict(UPG_VARIANTS)
        if cfg.train.amp == "none" or check_device(cfg.train.device).type != "cuda":
            variants.pop("oracle_fp32")  # no autocast here: the fp32 run would be the oracle
        elif noise is None:
            noise = "oracle_fp32"
    steps = args.steps or 200
    res = loss_curves(cfg, variants, steps=steps, window=args.window, baseline=args.baseline,
                      noise=noise, factor=args.factor, rtol=args.rtol,
                      log=lambda s: print(s, flush=True))
    jpath, ppath = write_curves(res, args.out)
    print(format_comparison(res))
    print(f"wrote {jpath} and {ppath}")
    off = [n for n, v in res["comparison"]["variants"].items() if not v["within"]]
    if off:
        print(f"not within tolerance: {', '.join(off)}", file=sys.stderr)
        return 1
    return 0

