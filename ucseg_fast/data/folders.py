"""PNG/JPEG image + mask folders (colonoscopy, dermoscopy, ultrasound, exported slices).

Layout = the reference's "2D generic" one (docs/method.md §3)::

    <root>/labeled/image/<name>.<png|jpg|...>     <root>/labeled/mask/<name>.<png|...>
    <root>/unlabeled/image/<name>.<...>           (masks, if present, are never read)
    <root>/val/image/<name>.<...>                 <root>/val/mask/<name>.<...>

A mask lives at the image's path with ``image`` -> ``mask``; the same file name first, else the
same stem with any image extension (JPEG images with PNG masks are common). Every image of
``labeled/`` is labeled (the reference's ``n_l`` equals that folder's size).

Masks:
* ``mask_mode="index"``: pixel values are class ids; a value >= ``num_classes`` is an error.
* ``mask_mode="binary"``: the reference's rule ``gray / 255 > 0.5`` -> class 1 (0/255 masks,
  JPEG-compressed masks).
* ``mask_mode="auto"`` (default): ``index`` when every value is < ``num_classes``, else ``binary``
  when ``num_classes == 2``, else an error naming the file.
Palette PNGs give their palette indices; other colour masks are converted to gray first.

Images are decoded with Pillow (a declared dependency) to float32 in
[0, 1] (8-bit / 255, 16-bit / 65535, float TIFF as stored), as gray ``[1, H, W]`` or RGB
``[3, H, W]``. The reference reads BGR with OpenCV; RGB here (channel order is irrelevant for a
network trained from scratch). Files are listed in sorted name order (the reference uses
``os.listdir`` order, which is file-system dependent). Every labeled pair is checked when it is
read: an unreadable image, a mask of another size or a label outside the class set is a
`DataError` naming the file. So is an image or mask above ``max_image_pixels`` pixels
(``data.max_image_pixels``, checked from the header before decoding) and a path that is a
directory, a dangling symlink or a symlink loop (`guards.check_file` says which).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .guards import DEFAULT_MAX_IMAGE_PIXELS, check_file, check_pixels, fingerprint_lines
from .prefetch import ordered_map
from .ssl4mis import resize_nearest

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset", "decode_image", "decode_mask", "export_folder", "image_header",
           "ssl4mis_to_npy"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("labeled", "unlabeled", "val")
MASK_MODES = ("auto", "index", "binary")
_GRAY_MODES = ("L", "I;16", "I;16B", "I", "F")


def _open(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *, load: bool = True):
    """Open an image file: path checked (`check_file`), size checked from the header against
    ``max_pixels`` before decoding, then decoded (``load``) so a truncated file fails here, with
    its name."""
    from PIL import Image, UnidentifiedImageError

    check_file(path, "image file")
    try:
        img = Image.open(path)  # lazy: reads the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    try:
        w, h = img.size
        check_pixels(path, w, h, max_pixels)  # only the first frame of a multi-frame file is read
        if load:
            img.load()
    except DataError:
        img.close()
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        img.close()
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    return img


def image_header(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> tuple[str, tuple[int, int]]:
    """``(PIL mode, (H, W))`` from the header alone (path and size checked, nothing decoded)."""
    img = _open(path, max_pixels, load=False)
    try:
        w, h = img.size
        return img.mode, (int(h), int(w))
    finally:
        img.close()


def _divisor(arr: np.ndarray, path: str | os.PathLike[str]) -> float | None:
    if arr.dtype == np.uint8:
        return 255.0
    if arr.dtype in (np.uint16, np.int32) and arr.max(initial=0) <= 65535:
        return 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return None
    raise DataError(f"{path}: unsupported pixel type {arr.dtype}")


def _to_float(arr: np.ndarray, path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """float32 in [0, 1] (8-bit / 255, 16-bit / 65535, float as stored), resized (OpenCV nearest
    rule) *before* the conversion when ``size`` is given: nearest resizing only picks pixels, so
    the result is bit-identical to converting first, at a quarter of the work for 512 -> 256."""
    div = _divisor(arr, path)  # range checked on the whole image
    if size is not None:
        arr = resize_nearest(arr, size)
    out = arr.astype(np.float32, order="C")  # a fresh, contiguous array
    if div is not None:
        out /= div
    return out


def decode_image(path: str | os.PathLike[str], *, channels: int = 1,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, size: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """Decode an image file to float32 ``[channels, H, W]`` in [0, 1] (``channels`` 1 or 3),
    resized to ``size = (H, W)`` with OpenCV's nearest rule when given. An image above
    ``max_pixels`` pixels is refused from its header (`DataError` naming the file and its size).
    No pathlib here: `ManifestStream` calls it for millions of names (pathlib interns parts)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _open(path, max_pixels)
    try:
        if channels == 1:
            if img.mode not in _GRAY_MODES:
                img = img.convert("L")
            arr = np.asarray(img)
            if arr.ndim != 2:
                raise DataError(f"{path}: expected a single-channel image, got shape {arr.shape}")
            return _to_float(arr, path, size)[None]
        arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
        return _to_float(arr.transpose(2, 0, 1), path, size)
    finally:
        img.close()


def decode_mask(path: str | os.PathLike[str], *, num_classes: int, mask_mode: str = "auto",
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a mask file to class ids uint8 ``[H, W]`` (see the module docstring for the modes)."""
    path = Path(path)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    img = _open(path, max_pixels)
    if img.mode not in ("L", "P", "I;16", "I", "1"):
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel mask, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise DataError(f"{path}: mask must hold integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    hi = int(arr.max(initial=0))
    mode = mask_mode
    if mode == "auto":
        # Binary only for 8-bit gray masks (a bright foreground, hi > 127; JPEG noise is fine):
        # a class-id mask with a stray value (e.g. a 2 in a 0/1 mask) must fail loudly, not be
        # thresholded at 127 into an empty label.
        mode = "index" if hi < num_classes else (
            "binary" if num_classes == 2 and hi > 127 else "index")
    if mode == "binary":
        if hi > 255:
            raise DataError(f"{path}: binary mask value {hi} > 255")
        return (arr > 127).astype(np.uint8)  # gray / 255 > 0.5, the reference's rule
    if hi >= num_classes or int(arr.min(initial=0)) < 0:
        raise DataError(
            f"{path}: mask value {hi} outside the class set [0, {num_classes}) "
            f"(mask_mode={mask_mode!r}; 0/255 masks need num_classes=2 or mask_mode='binary')"
        )
    return arr.astype(np.uint8)


class FolderDataset:
    """Reader of one image+mask folder in the 2D generic layout.

    Args:
        root: folder holding ``labeled/``, ``unlabeled/`` (optional) and ``val/`` (optional).
        num_classes: class count (2 for binary tasks); labels are checked against it.
        mask_mode: ``auto`` | ``index`` | ``binary``.
        channels: 1 (gray; the trainer repeats it like ACDC's) or 3 (RGB); 0 = decided from the
            first labeled image (gray modes -> 1, anything else -> 3).
        max_image_pixels: images / masks above this many pixels are refused from their header
            (`DataError` naming the file and its size; ``data.max_image_pixels``).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, num_classes: int, mask_mode: str = "auto", channels: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        if not (self.root / "labeled" / "image").is_dir():
            raise FileNotFoundError(f"image folder dataset: {self.root / 'labeled' / 'image'} not found "
                                    "(layout <root>/{labeled,unlabeled,val}/image/*, masks under mask/)")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.mask_mode = mask_mode
        self.max_image_pixels = max_image_pixels
        labeled = self.images("labeled")
        #: the labeled image files as listed when the dataset was opened (`images` lists anew)
        self.labeled_files: list[Path] = labeled
        if not labeled:
            raise DataError(f"{self.root / 'labeled' / 'image'}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        if channels == 0:
            mode, _ = image_header(labeled[0], max_image_pixels)
            channels = 1 if mode in ("L", "I;16", "I;16B", "I", "F", "1") else 3
        if channels not in (1, 3):
            raise ValueError(f"channels must be 0, 1 or 3, got {channels}")
        self.channels = int(channels)

    def images(self, split: str) -> list[Path]:
        """Sorted image files of ``split`` (empty when the split folder does not exist). Every
        entry with an image extension is listed, broken ones too (a dangling symlink, a folder
        named ``x.png``): reading it then says what it is, instead of the file silently missing."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        folder = self.root / split / "image"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    def fingerprint(self, split: str, paths: list[Path] | None = None) -> dict:
        """Content fingerprint of ``split``'s file list (names in sorted order; `guards`)."""
        paths = self.images(split) if paths is None else paths
        return fingerprint_lines((p.name for p in paths), str(self.root / split / "image"))

    def mask_path(self, image_path: Path) -> Path:
        """``<split>/image/<name>`` -> ``<split>/mask/<name>`` (or the same stem, another extension).
        A candidate that exists but is broken (dangling symlink, folder, loop) is reported as such."""
        mask_dir = image_path.parent.parent / "mask"
        same = mask_dir / image_path.name
        for cand in (same, *(mask_dir / f"{image_path.stem}{ext}" for ext in IMAGE_EXTENSIONS)):
            if os.path.lexists(cand):
                return Path(check_file(cand, "mask file"))
        raise FileNotFoundError(f"mask of {image_path} not found (looked for {same} and {image_path.stem}.*)")

    def read_pair(self, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Image float32 ``[C, H, W]`` and label uint8 ``[H, W]``, checked against each other."""
        image = decode_image(image_path, channels=self.channels, max_pixels=self.max_image_pixels)
        mpath = self.mask_path(image_path)
        label = decode_mask(mpath, num_classes=self.num_classes, mask_mode=self.mask_mode,
                            max_pixels=self.max_image_pixels)
        if label.shape != image.shape[1:]:
            raise DataError(
                f"{mpath}: mask size {label.shape[1]}x{label.shape[0]} != image size "
                f"{image.shape[2]}x{image.shape[1]} of {image_path}"
            )
        return image, label

    def read_image(self, image_path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
        """One image float32 ``[C, H, W]`` (resized to ``size`` with the OpenCV nearest rule),
        exactly what `load_split` caches for it; safe to call from several threads."""
        return decode_image(image_path, channels=self.channels, max_pixels=self.max_image_pixels, size=size)

    def load_split(
        self, split: str, size: tuple[int, int], *, with_labels: bool = True, workers: int = 0,
        paths: list[Path] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read a whole split into memory, resized with OpenCV's INTER_NEAREST rule (the
        reference's first transform): images float32 ``[N, C, H, W]``, labels uint8 ``[N, H, W]``.
        ``workers`` threads decode in parallel (``data.decode_workers``); the result and the
        error raised for a bad file (the first one in sorted order) do not depend on it."""
        paths = self.images(split) if paths is None else paths
        h, w = int(size[0]), int(size[1])
        images = torch.empty((len(paths), self.channels, h, w), dtype=torch.float32)
        labels = torch.empty((len(paths), h, w), dtype=torch.uint8) if with_labels else None

        def one(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
            if with_labels:
                image, label = self.read_pair(p)
                return resize_nearest(image, (h, w)), resize_nearest(label, (h, w))
            return self.read_image(p, (h, w)), None

        for i, (image, label) in enumerate(ordered_map(one, paths, workers if len(paths) > 1 else 0)):
            if labels is not None:
                labels[i] = torch.from_numpy(np.ascontiguousarray(label))
            images[i] = torch.from_numpy(np.ascontiguousarray(image))
        return images, labels

    def __repr__(self) -> str:
        return (f"FolderDataset(root={str(self.root)!r}, num_classes={self.num_classes}, "
                f"mask_mode={self.mask_mode!r}, channels={self.channels})")


# ---------------------------------------------------------------------------- prepare helpers
def _to_uint8(image_HW: np.ndarray) -> np.ndarray:
    """Per-slice min-max to 0..255 (ACDC slices are float; PNG/JPEG need 8 bits)."""
    lo, hi = float(image_HW.min()), float(image_HW.max())
    return np.round((image_HW - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)


def export_folder(src: str | os.PathLike[str], out: str | os.PathLike[str], *, fmt: str = "png",
                  labeled_patients: int = 7, max_val_volumes: int = 0) -> dict[str, int]:
    """SSL4MIS folder -> the 2D generic layout: slices of the first ``labeled_patients`` patients of
    ``train_slices.list`` -> ``labeled/``, the rest -> ``unlabeled/``, val volumes sliced ->
    ``val/``. Images 8-bit gray (per-slice min-max) as PNG or JPEG (quality 95); masks always PNG
    with class ids (lossless). Returns the file count per split."""
    from PIL import Image

    from .ssl4mis import SSL4MISDataset, slices_of_first_patients

    if fmt not in ("png", "jpg"):
        raise ValueError(f"export format must be 'png' or 'jpg', got {fmt!r}")
    ds = SSL4MISDataset(src)
    out = Path(out)
    names = ds.train_slices
    n_l = slices_of_first_patients(names, labeled_patients)
    counts = {"labeled": 0, "unlabeled": 0, "val": 0}

    def write(split: str, name: str, image: np.ndarray, label: np.ndarray) -> None:
        (out / split / "image").mkdir(parents=True, exist_ok=True)
        (out / split / "mask").mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(_to_uint8(image), mode="L")
        if fmt == "jpg":
            im.save(out / split / "image" / f"{name}.jpg", quality=95)
        else:
            im.save(out / split / "image" / f"{name}.png")
        Image.fromarray(label.astype(np.uint8), mode="L").save(out / split / "mask" / f"{name}.png")
        counts[split] += 1

    for i, name in enumerate(names):
        image, label = ds.read_slice(name)
        write("labeled" if i < n_l else "unlabeled", name, image, label)
    if (ds.root / "val.list").is_file():
        vols = ds.volumes("val")
        for v in vols[: max_val_volumes or len(vols)]:
            image, label = ds.read_volume(v)
            for z in range(image.shape[0]):
                write("val", f"{v}_slice_{z + 1}", image[z], label[z])
    return counts


def ssl4mis_to_npy(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """SSL4MIS HDF5 -> ``.npy`` pairs (for DALI ``readers.numpy``): ``<out>/slices/<name>_image.npy``
    (float32) and ``_label.npy`` (uint8), volumes under ``<out>/volumes/``; list files copied.
    Returns the number of pairs written."""
    import shutil

    from .ssl4mis import SSL4MISDataset

    ds = SSL4MISDataset(src)
    out = Path(out)
    n = 0
    (out / "slices").mkdir(parents=True, exist_ok=True)
    for name in ds.train_slices:
        image, label = ds.read_slice(name)
        np.save(out / "slices" / f"{name}_image.npy", image.astype(np.float32))
        np.save(out / "slices" / f"{name}_label.npy", label.astype(np.uint8))
        n += 1
    for split in ("val", "test"):
        if (ds.root / f"{split}.list").is_file():
            (out / "volumes").mkdir(parents=True, exist_ok=True)
            for v in ds.volumes(split):
                image, label = ds.read_volume(v)
                np.save(out / "volumes" / f"{v}_image.npy", image.astype(np.float32))
                np.save(out / "volumes" / f"{v}_label.npy", label.astype(np.uint8))
                n += 1
    for lst in ("train_slices.list", "val.list", "test.list"):
        if (ds.root / lst).is_file():
            shutil.copyfile(ds.root / lst, out / lst)
    return n
