"""Small synthetic datasets in the SSL4MIS layouts: cardiac-MRI-like ACDC slices/volumes and
left-atrium-like LA volumes (UA-MT layout, `write_synthetic_la`).

For demos, smoke tests and benchmarks without the real data: the same files, list formats,
dtypes and gzip compression as the real ACDC folders, so every reader and the trainer run on it
unchanged. Each patient has two frames (``frame01`` = end-diastole, ``frame02`` = end-systole,
smaller LV); each volume is a stack of short-axis slices, base to apex, with 4 classes:

* 3 = LV blood pool: a bright disc;
* 2 = myocardium: a dark ring around it;
* 1 = RV: a bright crescent beside the ring (absent in the most apical slice);
* 0 = background: textured tissue, dark and bright distractor blobs.

Per volume random centre and radii, smooth texture, a multiplicative bias field, slight blur and
Gaussian noise make segmentation learnable but not a threshold.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["write_synthetic_acdc", "synthetic_volume", "synthetic_atrium", "write_synthetic_la"]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: cubic upsampling of a coarse normal grid."""
    from scipy.ndimage import zoom

    coarse = rng.standard_normal((cells, cells))
    return zoom(coarse, (shape[0] / cells, shape[1] / cells), order=3, mode="reflect", grid_mode=True)[
        : shape[0], : shape[1]
    ]


def synthetic_volume(
    rng: np.random.Generator, depth: int, size: tuple[int, int], *, systole: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One volume: image float32 ``[D, H, W]`` in [0, 1] and label uint8 ``[D, H, W]`` in {0..3}."""
    from scipy.ndimage import gaussian_filter

    h, w = size
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.42, 0.58)
    r_lv = m * rng.uniform(0.09, 0.13) * (rng.uniform(0.7, 0.85) if systole else 1.0)
    thick = m * rng.uniform(0.035, 0.055) * (1.2 if systole else 1.0)
    phi = math.radians(rng.uniform(150.0, 210.0))  # RV lies to the image left of the LV
    rv_dist = rng.uniform(0.45, 0.7)
    rv_scale = rng.uniform(1.25, 1.5)
    texture = _smooth_field(rng, size, 12)
    bias = np.exp(0.25 * _smooth_field(rng, size, 3))
    blobs = np.zeros(size)
    for _ in range(int(rng.integers(2, 5))):  # distractors of LV-like and myocardium-like intensity
        by, bx = rng.uniform(0, h), rng.uniform(0, w)
        if math.hypot(by - cy, bx - cx) < 2.5 * (r_lv + thick):
            continue
        rb = m * rng.uniform(0.03, 0.08)
        blobs = np.where((yy - by) ** 2 + (xx - bx) ** 2 < rb * rb, rng.choice([-0.15, 0.4]), blobs)

    image = np.empty((depth, h, w), np.float32)
    label = np.zeros((depth, h, w), np.uint8)
    for z in range(depth):
        t = z / max(depth - 1, 1)  # 0 = base, 1 = apex
        s = 1.0 - 0.55 * t**1.5
        lcy, lcx = cy + rng.normal(0, 0.8), cx + rng.normal(0, 0.8)
        r1, r2 = r_lv * s, (r_lv + thick) * s
        d_lv = np.hypot(yy - lcy, xx - lcx)
        rv = np.zeros((h, w), bool)
        if z < depth - 1 or depth == 1:
            rv_s = 1.0 - 0.8 * t
            rcy = lcy + math.sin(phi) * r2 * rv_dist
            rcx = lcx + math.cos(phi) * r2 * rv_dist
            rv = (np.hypot(yy - rcy, xx - rcx) < r2 * rv_scale * rv_s) & (d_lv > r2 + 1.5)
        lab = np.zeros((h, w), np.uint8)
        lab[rv] = 1
        lab[(d_lv < r2) & (d_lv >= r1)] = 2
        lab[d_lv < r1] = 3
        intensity = np.array([0.0, 0.65, 0.28, 0.78])[lab]
        bg = 0.32 + 0.1 * texture + blobs
        img = np.where(lab == 0, bg, intensity + 0.04 * texture)
        img = gaussian_filter(img, 0.8) * bias + rng.normal(0.0, 0.04, size)
        image[z] = img
        label[z] = lab
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / max(hi - lo, 1e-6)
    return image.astype(np.float32), label


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip", compression_opts=4)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=4)


def write_synthetic_acdc(
    root: str | os.PathLike[str],
    n_train_patients: int = 14,
    slices_per_volume: int = 8,
    n_val: int = 4,
    n_test: int = 4,
    size: tuple[int, int] = (160, 192),
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` and return it as a Path.

    ``n_train_patients`` patients give ``2 * slices_per_volume`` lines each in
    ``train_slices.list`` (grouped by patient, frames in order, slices shuffled within a frame
    like the real list), so "the first k patients" is the first ``2 * k * slices_per_volume``
    lines. ``n_val`` / ``n_test`` patients give two volumes each in ``val.list`` / ``test.list``
    (``n_test = 0`` writes no ``test.list``, like the shared subset).
    """
    if n_train_patients < 1 or slices_per_volume < 1 or n_val < 0 or n_test < 0:
        raise ValueError(
            f"need n_train_patients >= 1, slices_per_volume >= 1, n_val >= 0, n_test >= 0; got "
            f"{n_train_patients}, {slices_per_volume}, {n_val}, {n_test}"
        )
    total = n_train_patients + n_val + n_test
    if total > 999:
        raise ValueError(f"at most 999 patients, got {total}")
    root = Path(root)
    slices_dir = root / "data" / "slices"
    slices_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, total + 1))
    size = (int(size[0]), int(size[1]))

    train_lines: list[str] = []
    for pid in ids[:n_train_patients]:
        for frame in (1, 2):
            image, label = synthetic_volume(rng, slices_per_volume, size, systole=frame == 2)
            base = f"patient{pid:03d}_frame{frame:02d}"
            for z in rng.permutation(slices_per_volume):
                name = f"{base}_slice_{z + 1}"
                _write_h5(slices_dir / f"{name}.h5", image[z], label[z])
                train_lines.append(name)
    (root / "train_slices.list").write_text("\n".join(train_lines) + "\n")

    for split, pids in (("val", ids[n_train_patients:n_train_patients + n_val]),
                        ("test", ids[n_train_patients + n_val:])):
        if len(pids) == 0:
            continue
        lines = []
        for pid in pids:
            for frame in (1, 2):
                image, label = synthetic_volume(rng, slices_per_volume, size, systole=frame == 2)
                name = f"patient{pid:03d}_frame{frame:02d}"
                _write_h5(root / "data" / f"{name}.h5", image, label)
                lines.append(name)
        (root / f"{split}.list").write_text("\n".join(lines) + "\n")
    return root


def synthetic_atrium(rng: np.random.Generator, shape: tuple[int, int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One LA-like volume ``[X, Y, Z]``: image float32, z-score normalised like the UA-MT
    ``mri_norm2.h5`` files, label uint8 {0, 1}: a bright, lumpy blob (the atrium: an ellipsoid
    with a few attached lobes, the pulmonary-vein stubs) in smooth textured tissue, with
    bright distractor blobs, a bias field and noise."""
    from scipy.ndimage import gaussian_filter

    X, Y, Z = (int(v) for v in shape)
    grid = np.stack(np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"), 0)
    grid = grid.astype(np.float64)
    centre = np.array([X, Y, Z]) * rng.uniform(0.4, 0.6, 3)
    radii = np.array([X, Y, Z]) * rng.uniform(0.14, 0.22, 3)
    d = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
    label = d < 1.0
    for _ in range(int(rng.integers(2, 5))):  # lobes on the surface
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        c = centre + direction * radii * rng.uniform(0.8, 1.1)
        r = radii.min() * rng.uniform(0.25, 0.45)
        label |= (((grid - c[:, None, None, None]) / r) ** 2).sum(0) < 1.0
    texture = gaussian_filter(rng.standard_normal((X, Y, Z)), 4.0)
    texture /= max(float(texture.std()), 1e-6)
    image = np.where(label, 1.0, 0.35) + 0.08 * texture
    for _ in range(int(rng.integers(2, 5))):  # distractors: vessels / other chambers
        c = np.array([X, Y, Z]) * rng.uniform(0.05, 0.95, 3)
        r = radii.min() * rng.uniform(0.3, 0.6)
        blob = (((grid - c[:, None, None, None]) / r) ** 2).sum(0) < 1.0
        image = np.where(blob & ~label, rng.uniform(0.6, 0.85), image)
    bias = np.exp(0.2 * gaussian_filter(rng.standard_normal((X, Y, Z)), 12.0) * 8.0)
    image = gaussian_filter(image, 0.7) * bias + rng.normal(0.0, 0.05, (X, Y, Z))
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    return image.astype(np.float32), label.astype(np.uint8)


def write_synthetic_la(root: str | os.PathLike[str], n_train: int = 6, n_test: int = 2,
                       shape: tuple[int, int, int] = (72, 64, 48), seed: int = 0) -> Path:
    """Write an LA-like 3D set in the UA-MT layout: ``<root>/2018LA_Seg_Training Set/<case>/
    mri_norm2.h5`` (``image`` float32, ``label`` uint8, gzip), ``train.list`` (the first lines
    are the labeled cases of a run) and ``test.list``. Each case gets a slightly different
    shape around ``shape`` (as real scans do)."""
    if n_train < 2 or n_test < 0:
        raise ValueError(f"need n_train >= 2 (labeled + unlabeled) and n_test >= 0, got "
                         f"{n_train}, {n_test}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        case = f"CASE{i:04d}"
        jitter = rng.integers(-4, 5, 3) * np.array([1, 1, 0])
        image, label = synthetic_atrium(rng, tuple(int(v) for v in np.array(shape) + jitter))
        folder = root / "2018LA_Seg_Training Set" / case
        folder.mkdir(parents=True, exist_ok=True)
        _write_h5(folder / "mri_norm2.h5", image, label)
        lines[split].append(case)
    for split, names in lines.items():
        if names:
            (root / f"{split}.list").write_text("\n".join(names) + "\n")
    return root
