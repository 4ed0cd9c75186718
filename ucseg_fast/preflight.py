"""Checks of a training run that need no data loaded and no model built.

`preflight(cfg, resume=...)` runs in `ucseg-fast train` (and `demo`) before the `Trainer` is
built, so a wrong device, an unwritable output folder, a missing data root or list file, too
few patients for ``data.labeled_patients`` or a missing resume checkpoint is reported at once,
as one line (`PreflightError`, a `UserError`: exit code 2), instead of after minutes of data
loading -- or as a traceback. What it checks:

* the device: ``train.device`` names a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...),
  CUDA exists when asked for, the CUDA index exists;
* the recipe on that device (`Recipe.check`): a CUDA-graph step it can capture, Triton for the
  fused ops (a `ConfigError`);
* the output folder ``train.out_dir``: creatable and writable (created, a probe file written,
  fsynced and removed; a folder it had to create is removed again in a single-process run);
* the data root ``data.root``: an existing folder (a file, a broken link or a symbolic-link loop
  is reported as what it is), and what ``data.format`` reads there (for the recipe's
  dimensions): SSL4MIS 2D ``train_slices.list``, ``<val_split>.list`` and ``data/``; SSL4MIS /
  UA-MT 3D ``train.list`` and ``<val_split>.list``; image folders ``labeled/image`` +
  ``labeled/mask``, ``unlabeled/image`` (unless ``data.unlabeled_manifest``) and ``val/image``;
  NIfTI ``imagesTr/`` and ``imagesVal/`` or ``imagesTs/``; the manifest file when one is named;
* SSL4MIS 2D: ``train_slices.list`` names at least ``data.labeled_patients`` patients (slice
  names grouped by the prefix before the first ``_``, as the data layer counts them), leaves
  unlabeled slices (unless a manifest supplies them) and fills one labeled batch;
* image folders: a colour ``labeled/image`` needs ``model.in_channels = 3`` (the first image's
  header is read, nothing decoded);
* ``--resume``: the checkpoint sidecar exists, is a ucseg-fast sidecar and holds every key a
  resume reads.

`check_output_path` (a file to write: ``predict --output``, ``eval --figure``) and
`check_output_folder` (``eval --out``, ``--save-predictions``) check output locations the same
way before any work is done.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from .errors import PreflightError

__all__ = ["INFERENCE_KEYS", "RESUME_KEYS", "check_data", "check_device", "check_output_folder",
           "check_output_path", "check_recipe", "check_resume", "path_problem", "check_sidecar",
           "preflight"]

#: Sidecar keys `eval` / `predict` read (`load_checkpoint` and `_load_for_inference`).
INFERENCE_KEYS = ("format", "tensors_file", "tensors_sha256", "config", "iteration")
#: Sidecar keys `Trainer.load` reads for an exact resume (rank 0).
RESUME_KEYS = (*INFERENCE_KEYS, "optimizer", "rng", "python_rng", "numpy_rng", "stream",
               "best_val_dice", "best_iteration", "history")

_SPECIAL_ERRNOS = {getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded",
                   errno.ENOSPC: "the disk is full", errno.EROFS: "read-only file system"}


def preflight(cfg: Any, *, resume: str | None = None) -> None:
    """Raise `PreflightError` (one line) when the run cannot start: device, data root and the
    files its format needs, labeled patients, resume checkpoint, output folder (module
    docstring). Reads list files and at most one image header; loads no data, builds no model."""
    device = check_device(cfg.train.device, key="train.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    check_recipe(cfg, device, world_size)
    check_data(cfg)
    if resume:
        check_resume(resume)
    # last: the only check that touches the disk; a folder it creates is removed again unless
    # other ranks (torchrun) may be probing it at the same moment
    check_output_folder(cfg.train.out_dir, key="train.out_dir", keep=world_size > 1)


def check_recipe(cfg: Any, device: Any, world_size: int = 1) -> None:
    """The recipe's checks that need the device (`Recipe.check`: a CUDA-graph step it cannot
    capture, fused ops without Triton), without reading the data folder (`check_data` does)."""
    from .train.recipe import Recipe
    Recipe(cfg).check(device, world_size, data=False)


# ------------------------------------------------------------------------------ device
def check_device(name: str, *, key: str = "train.device"):
    """The torch.device `name` means on this machine (``auto``: CUDA when available), or
    `PreflightError` naming `key` and the value."""
    import torch
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise PreflightError(f"{key} = {name!r} is not a device; use 'auto', 'cpu', 'cuda' "
                                 "or 'cuda:N'") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PreflightError(f"{key} = {name!r} but CUDA is not available on this "
                                     "machine (no GPU or a CPU-only torch); use 'cpu' or 'auto'")
            n = torch.cuda.device_count()
            if dev.index is not None and dev.index >= n:
                raise PreflightError(f"{key} = {name!r} but this machine has {n} CUDA "
                                     f"device(s): cuda:0 .. cuda:{n - 1}")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise PreflightError(f"{key} = {name!r} but MPS is not available on this machine")
        elif dev.type != "cpu":
            raise PreflightError(f"{key} = {name!r}: training and inference run on 'cpu' or "
                                 "'cuda[:N]' ('auto' picks)")
    return dev


# ------------------------------------------------------------------------------ paths
def path_problem(path: Path, want: str) -> str | None:
    """Why `path` is not a `want` ("dir" or "file") one can read, or None when it is."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic-link loop"
        if e.errno == errno.ENOENT:
            if os.path.islink(path):
                return f"is a broken symbolic link (to {os.readlink(path)})"
            return "does not exist"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of its path is a file, not a folder)"
        return f"cannot be read ({e.strerror})"
    if want == "dir":
        if stat.S_ISDIR(st.st_mode):
            return None if os.access(path, os.R_OK | os.X_OK) else "is not readable"
        return "is a file, not a folder" if stat.S_ISREG(st.st_mode) else "is not a folder"
    if stat.S_ISREG(st.st_mode):
        return None if os.access(path, os.R_OK) else "is not readable"
    return "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else "is not a regular file"


def _require(path: Path, want: str, what: str) -> None:
    why = path_problem(path, want)
    if why is not None:
        raise PreflightError(f"{path} {why}: {what}")


def _write_probe(folder: Path) -> None:
    """Create, write, fsync and remove a uniquely named file in `folder` (OSError on failure)."""
    probe = folder / f".ucseg-write-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        try:
            os.write(fd, b"ucseg-fast write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass


def _os_reason(e: OSError) -> str:
    return _SPECIAL_ERRNOS.get(e.errno or -1, e.strerror or str(e))


def check_output_folder(path: str | os.PathLike[str], *, key: str = "output folder",
                        keep: bool = False) -> Path:
    """`path` is a folder that exists or can be created, and a file can be written in it
    (created, probed, and -- unless `keep` -- the folders it had to create removed again).
    `PreflightError` names `key`, the folder and the OS error."""
    p = Path(path)
    why = path_problem(p, "dir")
    if why is not None and why != "does not exist":
        raise PreflightError(f"{key} = '{p}' {why}")
    created: list[Path] = []
    q = p
    while path_problem(q, "dir") == "does not exist" and q != q.parent:
        created.append(q)
        q = q.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"{key} = '{p}' cannot be created ({_os_reason(e)}"
                             f"{'' if e.filename is None else f': {e.filename}'})") from None
    try:
        _write_probe(p)
    except OSError as e:
        raise PreflightError(f"{key} = '{p}' is not writable ({_os_reason(e)})") from None
    finally:
        if not keep:
            for c in created:  # innermost first; only folders this check made, only if empty
                try:
                    c.rmdir()
                except OSError:
                    break
    return p


def check_output_path(path: str | os.PathLike[str], *, key: str = "output") -> Path:
    """A file can be written at `path`: it is not a folder, and its folder exists and is
    writable or can be created (nothing is created: the nearest existing folder above it is
    probed instead). `PreflightError` names `key`, the path and the OS error."""
    p = Path(path)
    why = path_problem(p, "file")
    if why == "is a folder, not a file":
        raise PreflightError(f"{key} = '{p}' is a folder; name a file to write")
    if why not in (None, "does not exist", "is not readable"):
        raise PreflightError(f"{key} = '{p}' {why}")
    folder = p.parent if str(p.parent) else Path(".")
    q = folder
    while path_problem(q, "dir") == "does not exist" and q != q.parent:
        q = q.parent
    why = path_problem(q, "dir")
    if why is not None:
        where = "its folder" if q == folder else "the folder above it"
        raise PreflightError(f"{key} = '{p}': {where} {q} {why}")
    try:
        _write_probe(q)
    except OSError as e:
        raise PreflightError(f"{key} = '{p}': cannot write in {q} ({_os_reason(e)})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise PreflightError(f"{key} = '{p}' exists and is not writable")
    return p


# ------------------------------------------------------------------------------ data
def check_data(cfg: Any) -> None:
    """The data root and what `data.format` reads there (module docstring)."""
    d = cfg.data
    root = Path(d.root)
    why = path_problem(root, "dir")
    if why is not None:
        raise PreflightError(f"data.root = '{root}' {why}")
    if d.unlabeled_manifest:
        why = path_problem(Path(d.unlabeled_manifest), "file")
        if why is not None:
            raise PreflightError(f"data.unlabeled_manifest = '{d.unlabeled_manifest}' {why}")
    three_d = cfg.spec.dims == 3
    fmt = d.format
    if fmt == "ssl4mis" and three_d:
        layout = f"data.format = 'ssl4mis' with the 3D recipe {cfg.recipe!r} reads <root>/train.list"
        _require(root / "train.list", "file", layout)
        holdout = d.val_holdout
        if holdout:  # validation reads the last val_holdout lines of train.list, no other list
            lines = [ln for ln in (root / "train.list").read_text().splitlines() if ln.strip()]
            if d.labeled_patients + holdout >= len(lines):
                raise PreflightError(
                    f"{root / 'train.list'}: {len(lines)} volumes; data.labeled_patients = "
                    f"{d.labeled_patients} plus data.val_holdout = {holdout} held out for validation "
                    f"leave no unlabeled volume (labeled_patients + val_holdout must be at most "
                    f"{len(lines) - 1})")
        else:
            _require(root / f"{d.val_split}.list", "file",
                     f"validation reads <root>/<data.val_split>.list (data.val_split = {d.val_split!r})")
    elif fmt == "ssl4mis":
        layout = ("data.format = 'ssl4mis' reads <root>/train_slices.list, <root>/val.list and "
                  "the HDF5 files under <root>/data/")
        _require(root / "train_slices.list", "file", layout)
        _require(root / "data", "dir", layout)
        _require(root / f"{d.val_split}.list", "file",
                 f"validation reads <root>/<data.val_split>.list (data.val_split = {d.val_split!r})")
        check_labeled_patients(cfg)
    elif fmt == "folder":
        layout = ("data.format = 'folder' reads <root>/{labeled,unlabeled,val}/image/* with masks "
                  "under <root>/{labeled,val}/mask/")
        _require(root / "labeled" / "image", "dir", layout)
        _require(root / "labeled" / "mask", "dir", layout)
        from .data.folders import FolderDataset
        ds = FolderDataset(root, num_classes=d.num_classes, mask_mode=d.mask_mode)
        if not d.unlabeled_manifest:
            _require(root / "unlabeled" / "image", "dir",
                     layout + " (or name data.unlabeled_manifest)")
            if not ds.images("unlabeled"):
                raise PreflightError(f"{root / 'unlabeled' / 'image'}: no image files and no "
                                     "data.unlabeled_manifest: no unlabeled data")
        _require(root / "val" / "image", "dir", "validation reads <root>/val/image + val/mask")
        if ds.channels == 3 and cfg.model.in_channels != 3:
            raise PreflightError(f"{root}: colour image folder, but model.in_channels = "
                                 f"{cfg.model.in_channels}; set model.in_channels = 3")
    elif fmt == "nifti":
        _require(root / "imagesTr", "dir", "data.format = 'nifti' reads <root>/imagesTr/*.nii.gz "
                 "+ labelsTr/ (nnU-Net / MSD layout)")
        if not any(path_problem(root / v, "dir") is None for v in ("imagesVal", "imagesTs")):
            raise PreflightError(f"{root}: no imagesVal/ (or imagesTs/) folder: validation reads "
                                 "<root>/imagesVal + labelsVal, else imagesTs + labelsTs")


def check_labeled_patients(cfg: Any) -> None:
    """SSL4MIS 2D: `train_slices.list` has the labeled patients, unlabeled slices left (unless a
    manifest supplies them) and at least one labeled batch. Read with the data layer's rules
    (`SSL4MISDataset.train_slices`, `slices_of_first_patients`)."""
    from .data.ssl4mis import SSL4MISDataset, patient_of, slices_of_first_patients
    d = cfg.data
    lst = Path(d.root) / "train_slices.list"
    names = SSL4MISDataset(d.root, num_classes=d.num_classes, check_files=False).train_slices
    groups = sum(1 for i, n in enumerate(names) if i == 0 or patient_of(n) != patient_of(names[i - 1]))
    try:
        n_l = slices_of_first_patients(names, d.labeled_patients)
    except ValueError as e:
        if "reappears" in str(e):
            raise PreflightError(f"{lst}: {e}; its slices must be grouped by patient") from None
        raise PreflightError(f"data.labeled_patients = {d.labeled_patients}, but {lst} names only "
                             f"{groups} patients ({len(names)} slices; a patient is the slice-name "
                             f"prefix before the first '_')") from None
    if n_l >= len(names) and not d.unlabeled_manifest:
        raise PreflightError(f"data.labeled_patients = {d.labeled_patients} labels every patient "
                             f"of {lst} ({groups} patients, {len(names)} slices): no unlabeled "
                             "data left; label fewer patients or name data.unlabeled_manifest")
    if n_l < d.labeled_bs:
        raise PreflightError(f"data.labeled_bs = {d.labeled_bs}, but the {d.labeled_patients} "
                             f"labeled patients of {lst} have {n_l} slices: one labeled batch "
                             f"needs {d.labeled_bs}")


# ------------------------------------------------------------------------------ checkpoints
def check_sidecar(path: str | os.PathLike[str], keys: tuple[str, ...] = INFERENCE_KEYS,
                  *, what: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """The sidecar of checkpoint `path` (.json, tensor file or stem) and its parsed content;
    `PreflightError` when it is missing, not JSON, not a ucseg-fast sidecar or lacks one of
    `keys`."""
    from .train.checkpoint import FORMAT, CheckpointError, resolve
    try:
        js = resolve(path)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreflightError(f"{js}: corrupt checkpoint sidecar ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PreflightError(f"{js}: not a ucseg-fast checkpoint sidecar (format={fmt!r})")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise PreflightError(f"{js}: {what} sidecar lacks key(s) {', '.join(missing)} "
                              "(damaged or edited file, or not written by ucseg-fast)")
    return js, meta


def check_resume(path: str | os.PathLike[str]) -> Path:
    """`--resume`: the sidecar exists and holds what `Trainer.load` reads."""
    js, _ = check_sidecar(path, RESUME_KEYS, what="resume checkpoint")
    return js
