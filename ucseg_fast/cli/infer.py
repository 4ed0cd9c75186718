"""`ucseg-fast eval` and `ucseg-fast predict`: a checkpoint's model on held-out data or on one
image, with every input and output location checked before the model runs."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..errors import InputError
from .common import positive

__all__ = ["add_parsers", "check_image_array", "cmd_eval", "cmd_predict", "load_for_inference",
           "predict_array", "read_input"]


def add_parsers(sub) -> None:
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


def load_for_inference(checkpoint: str, overrides: list[str], device_name: str,
                        device_option: str = "--device"):
    import torch
    from ..config import ConfigError, config_from_dict, load_config
    from ..preflight import check_device, check_sidecar
    from ..train.checkpoint import load_checkpoint
    from ..train.recipe import build_model
    from ..train.state import load_model_state
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


def predict_array(cfg, predict, img, batch_size: int, device):
    """Class map of one volume with the configuration's inference: slice-wise 2D (argmax, or
    σ(P)[:, 1] > 0.5 for binary runs) or the 3D sliding-window protocol."""
    if cfg.spec.dims == 3:
        from ..eval.sliding_window import predict_case_3d
        return predict_case_3d(predict, img, patch=tuple(cfg.data.img_size),
                               stride_xy=cfg.data.eval_stride_xy, stride_z=cfg.data.eval_stride_z,
                               nms=True, batch_size=batch_size, device=device,
                               in_channels=cfg.model.in_channels)
    from ..eval.inference import binary_decision_logits, predict_volume
    fn = predict
    if cfg.spec.binary:  # binary recipes segment with σ(P)[:, 1] > 0.5
        fn = lambda x: binary_decision_logits(predict(x))  # noqa: E731
    return predict_volume(fn, img, img_size=tuple(cfg.data.img_size), batch_size=batch_size,
                          device=device, in_channels=cfg.model.in_channels)


def cmd_eval(args, extra) -> int:
    import numpy as np
    from ..eval.inference import ImageEvaluation
    from ..eval.protocol import evaluate, evaluation_items, open_dataset, selection_warning
    from ..eval.report import (format_image_table, format_table, save_overlay_figure, write_csv,
                               write_image_reports, write_json)
    from ..preflight import check_output_folder, check_output_path
    positive(args.batch_size, "--batch-size")
    positive(args.max_volumes, "--max-volumes", 0)
    # every output location is checked before the (possibly long) evaluation
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    check_output_folder(out, key="--out")
    if args.save_predictions:
        check_output_folder(args.save_predictions, key="--save-predictions")
    if args.figure:
        check_output_path(args.figure, key="--figure")
    cfg, meta, device, predict = load_for_inference(args.checkpoint, extra, args.device)
    if args.figure and cfg.data.format == "folder":
        raise InputError("--figure draws slices of volumes; image folders have none")
    if cfg.data.format in ("folder", "nifti") and args.split != "val":
        kind = "an image folder" if cfg.data.format == "folder" else "a NIfTI set"
        raise InputError(f"--split {args.split}: the checkpoint was trained on {kind} "
                         f"(data.format = {cfg.data.format!r}), which has one held-out split: "
                         "--split val")
    if device.type == "cuda":  # exact HD95/ASD on the GPU instead of scipy on the CPU
        from ..eval import surface_gpu
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
             if args.split == "val" and holdout and cfg.spec.dims == 3 else "")
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
        pred = predict_array(cfg, predict, img, args.batch_size, device)
        if cfg.spec.dims == 3:  # [X, Y, Z] volumes: the figure shows axial slices (the last axis)
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
    three_d = cfg.spec.dims == 3
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
            from ..data.nifti import NiftiDataset, resolve_intensity
            dims = cfg.spec.dims
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
    from ..eval.inference import save_nifti
    from ..preflight import check_output_path, path_problem
    out = Path(args.output)
    check_output_path(out, key="--output")  # first: never find an unwritable output after inference
    if not out.name.endswith((".npy", *_NIFTI)):
        raise InputError(f"--output {out}: name a .nii.gz, .nii or .npy file")
    positive(args.batch_size, "--batch-size")
    src = Path(args.input)
    why = path_problem(src, "file")
    if why is not None:
        raise InputError(f"--input {src} {why}")
    cfg, meta, device, predict = load_for_inference(args.checkpoint, extra, args.device)
    three_d = cfg.spec.dims == 3
    img, spacing, nii = read_input(cfg, src)  # dtype, rank, finiteness: checked here
    if img.ndim == 2:
        img = img[None]
    pred = predict_array(cfg, predict, img, args.batch_size, device).cpu().numpy()
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

