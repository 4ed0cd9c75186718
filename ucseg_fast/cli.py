"""`ucseg-fast train | eval | predict | prepare | bench | demo`."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError, UserError

REPO = Path(__file__).resolve().parents[1]


def _config(args, extra: list[str]):
    from .config import load_config
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        raise InputError(f"unrecognised arguments {unknown}; config overrides look like "
                         "--train.max_iterations=300")
    return load_config(args.config, overrides)


def _positive(value: int, option: str, minimum: int = 1) -> None:
    if value < minimum:
        raise InputError(f"{option} = {value} must be >= {minimum}")


# ------------------------------------------------------------------------------------------
def cmd_train(args, extra) -> int:
    from .preflight import preflight
    started = time.perf_counter()  # a --time-budget counts from here
    cfg = _config(args, extra)
    if args.stop_at is not None:
        _positive(args.stop_at, "--stop-at")
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise InputError(f"--time-budget {args.time_budget} must be > 0 minutes")
        if args.resume or args.stop_at is not None:
            raise InputError("--time-budget plans a whole run from its start: it does not "
                             "combine with --resume or --stop-at")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("--time-budget is single-process (ranks would stop at different "
                             "iterations); run it without torchrun")
    # device, output folder, data root and list files, labeled patients, resume sidecar:
    # before any data is loaded or model built
    preflight(cfg, resume=args.resume)
    if args.time_budget is not None:
        from .train.budget import train_for_budget
        summary = train_for_budget(cfg, args.time_budget, overwrite=args.overwrite,
                                   started=started)
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
        print(f"time budget {args.time_budget:g} min: {summary['iterations']} iterations, "
              f"{summary['elapsed_s']:.0f} s in all, validation {summary['val_s']:.0f} s "
              f"({100 * summary['val_share']:.0f} % of the run); best validation Dice "
              f"{summary['best_val_dice']:.4f} at iteration {summary['best_iteration']}")
        return 0
    from .train import Trainer
    trainer = Trainer(cfg, overwrite=args.overwrite)
    if args.resume:
        _resume(trainer, args.resume)
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


def _resume(trainer, path: str) -> None:
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


def _load_for_inference(checkpoint: str, overrides: list[str], device_name: str,
                        device_option: str = "--device"):
    import torch
    from .config import ConfigError, config_from_dict, load_config
    from .preflight import check_device, check_sidecar
    from .train.checkpoint import load_checkpoint
    from .train.trainer import build_model, load_model_state
    check_sidecar(checkpoint)  # missing / not a sidecar / lacking a key: one line, before loading
    device = check_device(device_name, key=device_option)
    tensors, meta = load_checkpoint(checkpoint)
    cfg = config_from_dict(meta["config"], source=f"{checkpoint} (saved config)")
    if overrides:  # e.g. --data.root=/data/ACDC to evaluate on another copy of the data
        import dataclasses
        ov = load_config(None, overrides)
        bad = [o for o in overrides if not o.startswith("--data.root=")]
        if bad:
            raise ConfigError(f"only --data.root=... can be overridden here, not {bad}: the "
                              "rest of the configuration comes from the checkpoint")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=ov.data.root))
    model = build_model(cfg, device)
    load_model_state(model, tensors, checkpoint)
    model.to(device).eval()

    def predict(x):
        with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16)
                               if device.type == "cuda" and cfg.train.amp == "bf16"
                               else contextlib.nullcontext()):
            return model.predict(x).float()
    return cfg, meta, device, predict


def _predict_array(cfg, predict, img, batch_size: int, device):
    """Class map of one volume with the configuration's inference: slice-wise 2D (argmax, or
    σ(P)[:, 1] > 0.5 for binary runs) or the 3D sliding-window protocol."""
    from .eval.protocol import is_3d
    if is_3d(cfg):
        from .eval.sliding_window import predict_case_3d
        return predict_case_3d(predict, img, patch=tuple(cfg.data.img_size),
                               stride_xy=cfg.data.eval_stride_xy, stride_z=cfg.data.eval_stride_z,
                               nms=True, batch_size=batch_size, device=device,
                               in_channels=cfg.model.in_channels)
    from .eval.inference import binary_decision_logits, predict_volume
    fn = predict
    if cfg.loss.supervision == "sigmoid":  # binary runs segment with σ(P)[:, 1] > 0.5
        fn = lambda x: binary_decision_logits(predict(x))  # noqa: E731
    return predict_volume(fn, img, img_size=tuple(cfg.data.img_size), batch_size=batch_size,
                          device=device, in_channels=cfg.model.in_channels)


def cmd_eval(args, extra) -> int:
    import numpy as np
    from .eval.inference import ImageEvaluation
    from .eval.protocol import evaluate, evaluation_items, is_3d, open_dataset, selection_warning
    from .eval.report import (format_image_table, format_table, save_overlay_figure, write_csv,
                              write_image_reports, write_json)
    from .preflight import check_output_folder, check_output_path
    _positive(args.batch_size, "--batch-size")
    _positive(args.max_volumes, "--max-volumes", 0)
    # every output location is checked before the (possibly long) evaluation
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    check_output_folder(out, key="--out")
    if args.save_predictions:
        check_output_folder(args.save_predictions, key="--save-predictions")
    if args.figure:
        check_output_path(args.figure, key="--figure")
    cfg, meta, device, predict = _load_for_inference(args.checkpoint, extra, args.device)
    if args.figure and cfg.data.format == "folder":
        raise InputError("--figure draws slices of volumes; image folders have none")
    if cfg.data.format in ("folder", "nifti") and args.split != "val":
        kind = "an image folder" if cfg.data.format == "folder" else "a NIfTI set"
        raise InputError(f"--split {args.split}: the checkpoint was trained on {kind} "
                         f"(data.format = {cfg.data.format!r}), which has one held-out split: "
                         "--split val")
    if device.type == "cuda":  # exact HD95/ASD on the GPU instead of scipy on the CPU
        from .eval import surface_gpu
        surface_gpu.install()
    # "val" of a 3D run with data.val_holdout = k: the last k lines of train.list, the volumes
    # it validated on; "test": test.list, whatever the run validated on
    items = evaluation_items(cfg, open_dataset(cfg), args.split, args.max_volumes or None)
    warning = selection_warning(cfg)
    if warning and args.split == "test":
        print(warning, file=sys.stderr)
    res = evaluate(cfg, predict, items, device=device, batch_size=args.batch_size,
                   mode=args.mode, save_dir=args.save_predictions)
    holdout = cfg.data.val_holdout
    where = (f" (the last {holdout} lines of train.list, held out from training)"
             if args.split == "val" and holdout and is_3d(cfg) else "")
    print(f"checkpoint {args.checkpoint} (iteration {meta['iteration']}), split {args.split}"
          f"{where}, {len(items)} {'images' if cfg.data.format == 'folder' else 'volumes'}, data "
          f"{cfg.data.root}, metrics mode {args.mode}")
    if isinstance(res, ImageEvaluation):
        print(format_image_table(res))
        js, cs = write_image_reports(out, res)
    else:
        print(format_table(res))
        out.mkdir(parents=True, exist_ok=True)
        js, cs = write_json(out / "metrics.json", res), write_csv(out / "metrics.csv", res)
    print(f"wrote {js} and {cs}")
    if args.figure:
        name, img, lab = items[0][:3]
        pred = _predict_array(cfg, predict, img, args.batch_size, device)
        if is_3d(cfg):  # [X, Y, Z] volumes: the figure shows axial slices (the last axis)
            img, lab, pred = (np.moveaxis(np.asarray(v), -1, 0) for v in (img, lab, pred.cpu()))
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        save_overlay_figure(args.figure, img, lab, pred)
        print(f"wrote {args.figure} ({name})")
    return 0


# ------------------------------------------------------------------------------------------
# predict's input: read and checked before the model runs
_NIFTI = (".nii", ".nii.gz")
_DTYPE_HINTS = {
    "b": "a boolean array is a mask, not an image",
    "c": "take the magnitude (np.abs) or the real part first",
    "U": "a string array is not an image",
    "S": "a byte-string array is not an image",
    "O": "an array of Python objects is not an image",
    "V": "a structured or RGB array is not a single-channel image",
    "M": "a date array is not an image",
    "m": "a time-delta array is not an image",
}


def check_image_array(src: Path, arr, *, three_d: bool):
    """`predict`'s image rules, before the model runs: a real floating or integer dtype (ints
    are cast to float32), a 2D slice [H, W] or a 3D volume (the 3D model: [X, Y, Z] only), no
    empty axis, every value finite. Returns the float32 array; `InputError` names the file and
    what is wrong."""
    import numpy as np
    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind not in "fiu":
        hint = _DTYPE_HINTS.get(kind, "predict reads real floating or integer images")
        raise InputError(f"{src}: image dtype {arr.dtype} is not a real number type ({hint}); "
                         "predict reads floating or integer images")
    ranks = "a 3D volume [X, Y, Z]" if three_d else "a 2D slice [H, W] or a 3D volume [D, H, W]"
    if arr.ndim != 3 and (three_d or arr.ndim != 2):
        extra = ""
        if arr.ndim == 4:
            extra = (f"; take one channel / time point first, e.g. numpy a[..., 0] or a[0] "
                     f"(whichever axis of {arr.shape} is the channel)")
        raise InputError(f"{src}: expected {ranks} for this "
                         f"{'3D' if three_d else '2D'} model, got shape {arr.shape}{extra}")
    if arr.size == 0:
        raise InputError(f"{src}: empty image of shape {arr.shape}")
    img = arr.astype(np.float32, copy=False)
    bad = int(arr.size - np.count_nonzero(np.isfinite(img)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(img)))
        which = (f"all {arr.size} values are NaN" if nan == arr.size else
                 f"{bad} of {arr.size} values are NaN or infinite ({nan} NaN, {bad - nan} "
                 f"infinite{' after the cast to float32' if kind == 'f' and arr.dtype.itemsize > 4 else ''})")
        raise InputError(f"{src}: {which}; predict needs finite intensities")
    return img


def _read_npy(src: Path):
    import numpy as np
    try:
        return np.load(src, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise InputError(f"{src}: image dtype object (an array of Python objects) is not an "
                             "image; predict reads floating or integer images") from None
        raise InputError(f"{src}: not a readable .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{src}: not a readable .npy array ({type(e).__name__}: {e})") from None


def _read_h5(src: Path):
    import h5py
    import numpy as np
    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise InputError(f"{src}: not a readable HDF5 file ({e})") from None
    with f:
        node = f.get("image")
        if not isinstance(node, h5py.Dataset):
            raise InputError(f"{src} has no dataset 'image' (found: {sorted(f.keys())})")
        try:
            return np.asarray(node[()])
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{src}: cannot read dataset 'image' ({e})") from None


def _open_nifti(src: Path):
    """The nibabel image of `src`, after the checks its header allows: gzip magic of
    `.nii.gz`, a readable header, a 3D volume (or 4D with one frame), a real number dtype."""
    import numpy as np
    if src.name.endswith(".nii.gz"):
        with open(src, "rb") as f:
            magic = f.read(2)
        if magic != b"\x1f\x8b":
            raise InputError(f"{src}: named .nii.gz but not gzip-compressed (if it is an "
                             "uncompressed NIfTI, name it .nii)")
    import nibabel as nib
    try:
        nii = nib.load(str(src))
        shape, dtype = tuple(nii.shape), np.dtype(nii.get_data_dtype())
    except Exception as e:  # nibabel raises several types (ImageFileError, EOFError, zlib ...)
        raise InputError(f"{src}: unreadable NIfTI file ({type(e).__name__}: {e})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        hint = ""
        if len(shape) == 4:
            hint = (f"; {shape[3]} channels / time points: extract one volume first, e.g. "
                    f"`fslroi {src.name} frame0.nii.gz 0 1` or, in Python, nib.save(nib.Nifti1Image("
                    f"img.dataobj[..., 0], img.affine), 'frame0.nii.gz')")
        raise InputError(f"{src}: expected a 3D NIfTI volume (x, y, z), got shape "
                         f"{tuple(nii.shape)}{hint}")
    if dtype.kind not in "fiu":
        hint = _DTYPE_HINTS.get(dtype.kind, "")
        raise InputError(f"{src}: NIfTI data type {dtype} is not a real number type"
                         f"{f' ({hint})' if hint else ''}; predict reads floating or integer images")
    return nii


def read_input(cfg, src: Path):
    """`predict`'s input as the model reads it: (image, spacing or None, nibabel image or None).
    `.h5` (dataset `image`) and `.npy` as stored (integer images cast to float32); NIfTI as
    [Z, Y, X] axial slices for the 2D models and [X, Y, Z] for the 3D one, scaled like the
    training data when the model was trained on NIfTI (`data.intensity`). Every problem of the
    file -- format, dtype (bool, complex, string, object), rank, NaN / inf -- is an
    `InputError` naming it, raised before any inference (`check_image_array`)."""
    import numpy as np
    from .eval.protocol import is_3d
    three_d = is_3d(cfg)
    spacing, nii = None, None
    src = Path(src)
    if src.suffix in (".h5", ".hdf5"):
        img = check_image_array(src, _read_h5(src), three_d=three_d)
    elif src.name.endswith(_NIFTI):
        nii = _open_nifti(src)
        try:
            raw = np.asarray(nii.get_fdata(), dtype=np.float64)
        except Exception as e:  # a truncated or corrupt data block
            raise InputError(f"{src}: unreadable NIfTI data ({type(e).__name__}: {e})") from None
        if raw.ndim == 4:  # [X, Y, Z, 1]: one frame (_open_nifti refused the others)
            raw = raw[..., 0]
        img = check_image_array(src, raw, three_d=True)  # [X, Y, Z] float32, finite
        del raw
        if cfg.data.format == "nifti":  # the intensity scaling the model was trained with
            from .data.nifti import NiftiDataset, resolve_intensity
            dims = 3 if three_d else 2
            reader = NiftiDataset(None, num_classes=cfg.data.num_classes, dims=dims,
                                  normalize=resolve_intensity(cfg.data.intensity, dims))
            img, spacing = reader.read_image(src)  # [X, Y, Z] (3D) / [Z, Y, X] (2D)
        else:
            spacing = tuple(float(s) for s in nii.header.get_zooms()[:3])
            if not three_d:  # NIfTI is [X, Y, Z]; the 2D network works on axial slices [Z, Y, X]
                img, spacing = img.transpose(2, 1, 0), spacing[::-1]
    elif src.suffix == ".npy":
        img = check_image_array(src, _read_npy(src), three_d=three_d)
    else:
        raise InputError(f"{src}: unsupported input (use .h5 with 'image', .nii[.gz] or .npy)")
    return img, spacing, nii


def cmd_predict(args, extra) -> int:
    import numpy as np
    from .eval.inference import save_nifti
    from .eval.protocol import is_3d
    from .preflight import check_output_path, path_problem
    out = Path(args.output)
    check_output_path(out, key="--output")  # first: never find an unwritable output after inference
    if not out.name.endswith((".npy", *_NIFTI)):
        raise InputError(f"--output {out}: name a .nii.gz, .nii or .npy file")
    _positive(args.batch_size, "--batch-size")
    src = Path(args.input)
    why = path_problem(src, "file")
    if why is not None:
        raise InputError(f"--input {src} {why}")
    cfg, meta, device, predict = _load_for_inference(args.checkpoint, extra, args.device)
    three_d = is_3d(cfg)
    img, spacing, nii = read_input(cfg, src)  # dtype, rank, finiteness: checked here
    if img.ndim == 2:
        img = img[None]
    pred = _predict_array(cfg, predict, img, args.batch_size, device).cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.endswith(_NIFTI) and nii is not None:
        import nibabel as nib  # same grid and orientation as the input volume
        grid = pred if three_d else pred.transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(grid.astype(np.uint8), nii.affine), str(out))
    elif out.name.endswith(_NIFTI):
        save_nifti(out, pred, spacing)
    else:
        np.save(out, pred.astype(np.uint8))
    print(f"wrote {out} ({pred.shape}, classes {sorted(set(np.unique(pred).tolist()))})")
    return 0


def cmd_prepare(args, extra) -> int:
    from .data.synthetic import write_synthetic_acdc
    if args.what == "synthetic":
        root = write_synthetic_acdc(args.out, n_train_patients=args.patients, seed=args.seed)
        print(f"wrote a synthetic cardiac-like SSL4MIS dataset to {root or args.out}")
        return 0
    if args.what == "synthetic3d":
        from .data.synthetic import write_synthetic_la
        root = write_synthetic_la(args.out, n_train=args.patients, seed=args.seed)
        print(f"wrote a synthetic left-atrium-like 3D set (UA-MT layout) to {root}")
        return 0
    if args.what in ("npy", "export"):
        from .data.folders import export_folder, ssl4mis_to_npy
        if not args.src:
            raise InputError(f"prepare {args.what} needs --src <SSL4MIS folder>")
        if args.what == "npy":
            n = ssl4mis_to_npy(args.src, args.out)
            print(f"wrote {n} .npy pairs (image float32, label uint8) to {args.out}")
        else:
            counts = export_folder(args.src, args.out, fmt=args.format, labeled_patients=args.labeled_patients)
            print(f"wrote {args.format.upper()} folder {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    raise InputError(f"unknown prepare target {args.what!r}")


def cmd_bench(args, extra) -> int:
    if args.what == "report":
        return _bench_report(args, extra)
    if args.what == "ledger":
        return _bench_ledger(args, extra)
    if args.minutes is None:
        args.minutes = 10.0
    if args.out is None:
        args.out = f"benchmarks/results/{'curves' if args.what == 'curves' else 'e2e'}"
    from .preflight import check_device
    if args.what == "e2e":
        return _bench_e2e(args, extra)
    if args.what == "curves":
        cfg = _config(args, extra)
        check_device(cfg.train.device, amp=cfg.train.amp)
        return _bench_curves(args, cfg)
    if extra:
        raise InputError(f"unrecognised arguments {extra} (config overrides are for "
                         "'bench e2e' and 'bench curves')")
    check_device(args.device, key="--device")
    from .train.bench import bench_step
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
    import os
    if "ucseg_fast.ops" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        # the fused ops' Triton kernels run in the interpreter on the CPU (set before any
        # @triton.jit is defined, i.e. before the ops are imported)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from .bench.ledger import CARDS, HostSyncError, step_ledger
    from .ops._triton_utils import HAS_TRITON, interpret_mode
    from .train.trainer import resolve_config
    cfg = _config(args, extra)
    # "auto" op choices as a CUDA machine resolves them: the fused ops when Triton exists
    cfg = resolve_config(cfg, torch.device("cuda"))
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
    from .bench.report import main_report
    return main_report(args.out, data=args.data, minutes=8.0 if args.minutes is None
                       else args.minutes, smoke=args.smoke)


def _bench_e2e(args, extra) -> int:
    """`bench e2e`: Dice against wall-clock time of one or several runs on one plot -- runs it
    trains within --minutes each (the configuration, or each --variant), or, with --run, run
    folders that exist (their metrics.jsonl)."""
    from .train.bench import bench_e2e, plot_dice_curves, read_run_curve
    from .train.curves import parse_variant
    from .preflight import check_device
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
    cfg = _config(args, extra)
    check_device(cfg.train.device, amp=cfg.train.amp)
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
    from .train.curves import (UPG_VARIANTS, format_comparison, loss_curves, parse_variant,
                               write_curves)
    from .preflight import check_device
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


def cmd_demo(args, extra) -> int:
    """Train configs/demo.toml on the shared ACDC subset when present, else on synthetic data,
    then evaluate the best-on-validation checkpoint and print the per-class table."""
    from .config import load_config
    from .eval.protocol import evaluate, evaluation_items, open_dataset
    from .eval.report import format_table
    from .train import Trainer
    real = REPO.parent / "shared" / "data" / "ACDC"
    if (real / "train_slices.list").exists():
        root, which = real, f"the real ACDC subset at {real}"
    else:
        from .data.synthetic import write_synthetic_acdc
        root = REPO / "runs" / "synthetic_acdc"
        if not (root / "train_slices.list").exists():
            write_synthetic_acdc(root, n_train_patients=14, seed=0)
        which = f"synthetic cardiac-like data at {root} (no real ACDC found at {real})"
    preset = REPO / "configs" / "demo.toml"
    cfg = load_config(preset, [f"--data.root='{root}'", *extra])
    # the preset's runs/demo is the demo's own folder: a second `make demo` replaces the first
    # run there; another train.out_dir is only cleared with --overwrite
    out = Path(cfg.train.out_dir)
    own = out == Path(load_config(preset).train.out_dir)
    overwrite = args.overwrite or own
    from .preflight import preflight
    preflight(cfg)
    held = any((out / n).is_file() for n in ("metrics.jsonl", "last.json", "best.json"))
    note = f"; output {out}"
    if held and overwrite:
        note += " (replaces the previous demo run there)" if own else " (--overwrite: replaces the run there)"
    print(f"demo: training {cfg.name} on {which}{note}")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=overwrite)
    summary = trainer.train()
    print(f"demo: {summary['iterations']} iterations in {time.perf_counter() - t0:.0f} s; "
          f"best validation Dice {summary['best_val_dice']:.4f} at iteration "
          f"{summary['best_iteration']}")
    cfg_, meta, device, predict = _load_for_inference(str(out / "best.json"), [],
                                                      cfg.train.device, "train.device")
    vols = evaluation_items(cfg_, open_dataset(cfg_), "val")
    res = evaluate(cfg_, predict, vols, device=device, batch_size=cfg.train.val_batch_size)
    print(f"demo: best checkpoint (iteration {meta['iteration']}) on {len(vols)} validation volumes "
          f"({which}):")
    print(format_table(res))
    # what it learned, to look at: a few slices of the first validation volume, and the curve
    from .eval.report import save_overlay_figure
    from .train.bench import dice_curve, plot_dice_curves
    name, img, lab = vols[0][:3]
    pred = _predict_array(cfg_, predict, img, cfg.train.val_batch_size, device)
    fig = save_overlay_figure(out / "demo_predictions.png", img, lab, pred)
    curve = plot_dice_curves({cfg.name: dice_curve(summary["history"])}, out / "dice_vs_time.png",
                             f"{cfg.name}: validation Dice ({which.split(' at ')[0]})")
    print(f"demo: wrote {out / 'demo_predictions.png'} (image / ground truth / prediction, "
          f"slices {fig} of {name}) and {curve} (validation Dice against time)")
    return 0


# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucseg-fast", description=(
        "UC-Seg semi-supervised segmentation: fast training, evaluation and fused ops. "
        "Config overrides: --section.key=value (e.g. --train.max_iterations=300)."))
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train UC-Seg from a TOML preset",
                       description="Train UC-Seg. Any --section.key=value after the options "
                                   "overrides the preset (unknown keys are errors).")
    t.add_argument("--config", default=str(REPO / "configs" / "acdc_2d.toml"),
                   help="TOML preset (default: configs/acdc_2d.toml, the reference ACDC recipe)")
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

    e = sub.add_parser("eval", help="evaluate a checkpoint on val or test volumes")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=("val", "test"), default="val")
    e.add_argument("--mode", choices=("medpy", "strict"), default="medpy",
                   help="medpy: the field's convention (voxel units, absent class -> 0); "
                        "strict: empty cases reported as NaN and counted")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-volumes", type=int, default=0)
    e.add_argument("--out", help="folder for metrics.json / metrics.csv")
    e.add_argument("--save-predictions", metavar="DIR", help="write one NIfTI per volume")
    e.add_argument("--figure", metavar="PNG", help="write an image/GT/prediction overlay figure")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("predict", help="segment one volume (.h5 / .nii.gz / .npy)",
                       description="Segment one image: a 2D slice [H, W] or a 3D volume (.h5 "
                                   "dataset 'image', .npy, .nii / .nii.gz; the 3D model takes "
                                   "volumes only). Real floating or integer images; integer "
                                   "images are cast to float32. Refused before the model runs, "
                                   "naming the file: bool, complex, string and object arrays, "
                                   "NaN or infinite values, other ranks (e.g. a 4-D NIfTI: "
                                   "extract one volume first), and an --output folder that "
                                   "cannot be created or written.")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--input", required=True,
                   help=".h5 (dataset 'image'), .npy or .nii[.gz]; float or integer values "
                        "(integers cast to float32), all finite")
    r.add_argument("--output", required=True,
                   help=".nii.gz / .nii or .npy (its folder is created if missing)")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=16)
    r.set_defaults(fn=cmd_predict)

    q = sub.add_parser("prepare", help="data preparation helpers")
    q.add_argument("what", choices=("synthetic", "synthetic3d", "npy", "export"),
                   help="synthetic: write a cardiac-like SSL4MIS set; synthetic3d: an LA-like "
                        "3D set (UA-MT layout, --patients = train volumes); npy: SSL4MIS -> .npy "
                        "(DALI readers.numpy); export: SSL4MIS slices -> PNG/JPEG image+mask folder")
    q.add_argument("--out", required=True)
    q.add_argument("--src", help="SSL4MIS folder (npy, export)")
    q.add_argument("--format", choices=("png", "jpg"), default="png", help="export image format")
    q.add_argument("--labeled-patients", type=int, default=7, help="export: labeled/ = their slices")
    q.add_argument("--patients", type=int, default=14)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_prepare)

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
    b.add_argument("--compile-backend", default="inductor")
    b.add_argument("--no-nms", action="store_true",
                   help="step: pseudo-labels without the largest-component filter")
    b.add_argument("--config", default=str(REPO / "configs" / "acdc_2d.toml"),
                   help="e2e / curves / ledger: TOML preset (default: the ACDC recipe)")
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

    d = sub.add_parser("demo", help="small CPU-friendly training run + per-class Dice table",
                       description="Train configs/demo.toml (on the shared ACDC subset, else "
                                   "synthetic data) into runs/demo, replacing the previous demo "
                                   "run there, then evaluate its best checkpoint.")
    d.add_argument("--overwrite", action="store_true",
                   help="start over in a folder that holds a run (its files are removed); "
                        "the demo's own runs/demo is always replaced")
    d.set_defaults(fn=cmd_demo)
    return p


#: OSError numbers that are the user's environment, not a bug: a full disk, a read-only file
#: system, an exhausted quota
_USER_ERRNOS = (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC))


def user_error_line(e: BaseException) -> str | None:
    """The one line `main` prints for a user error, or None when `e` is a bug (which keeps its
    traceback). User errors: `UserError`, `ConfigError`, `CheckpointError` (`RunFolderError`),
    `DataError`, the OSErrors of a path (not found, not a folder, a folder, permission) and of
    the disk (full, read-only, quota)."""
    from .config import ConfigError
    from .data.ssl4mis import DataError
    from .train.checkpoint import CheckpointError
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


def main(argv: list[str] | None = None) -> int:
    """The CLI. A user error -- a config key or value, a file, a folder, a device, a full or
    read-only disk -- prints one line, `error: <message>` naming the file, key or value, and
    returns 2; anything else is a bug and raises with its traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo", "eval", "predict", "bench"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.fn(args, extra)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
