"""The displacement fields of the distortion stage of `augment` (OneOf(GridDistortion |
ElasticTransform)), batched on the batch's device, as albumentations 1.4.x computes them:

* `grid_distortion_maps`: the separable sampling maps of ``grid_distortion`` (its per-cell
  ``linspace`` loop as lookup tables, cached per size and device);
* `elastic_fields`: OpenCV-Gaussian-blurred noise displacements, the noise on an ``f x f``-pixel
  block grid (``f = clamp(sigma // 6, 1, 8)``) and the blur as two small matrix products
  (reflect-101 border), cached per size and device.

Both are also importable from `augment`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["elastic_coarse", "elastic_fields", "grid_distortion_maps"]


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """OpenCV ``borderInterpolate(BORDER_REFLECT_101)`` for arbitrary offsets (period 2(n-1))."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    p = np.mod(idx, period)
    return np.where(p > n - 1, period - p, p)


@lru_cache(maxsize=32)
def _blur_matrix_np(n: int, sigma: float, coarse: int) -> np.ndarray:
    """``[n, ceil(n / coarse)]``: block-upsample a coarse field, then OpenCV Gaussian blur.

    OpenCV ``GaussianBlur(ksize=(0, 0), sigma)`` on float32 uses ``ksize = round(8 sigma + 1) | 1``
    taps of ``exp(-t^2 / (2 sigma^2))`` normalised to 1, and BORDER_REFLECT_101.
    """
    ksize = int(round(sigma * 8 + 1)) | 1
    radius = ksize // 2
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    g /= g.sum()
    rows = np.arange(n)
    src = _reflect101(rows[:, None] + t[None, :].astype(np.int64), n)  # [n, ksize]
    blur = np.zeros((n, n), dtype=np.float64)
    np.add.at(blur, (np.repeat(rows, ksize), src.reshape(-1)), np.tile(g, n))
    n_coarse = -(-n // coarse)
    up = np.zeros((n, n_coarse), dtype=np.float64)
    up[rows, rows // coarse] = 1.0
    return blur @ up


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float, coarse: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Cached per device: a fresh host->device copy each step would be a synchronising transfer.
    return torch.from_numpy(_blur_matrix_np(n, sigma, coarse)).to(device=device, dtype=dtype)


def elastic_coarse(sigma: float) -> int:
    """Block size ``f`` of the elastic noise grid: ``clamp(sigma // 6, 1, 8)``."""
    return int(min(8, max(1, sigma // 6)))


def elastic_fields(
    noise_B2hw: torch.Tensor, height: int, width: int, *, alpha: float, sigma: float
) -> torch.Tensor:
    """Elastic displacement ``[B, 2, H, W]`` (dx, dy in pixels) from coarse uniform(-1, 1) noise.

    ``noise_B2hw`` is ``[B, 2, ceil(H/f), ceil(W/f)]`` with ``f = clamp(sigma // 6, 1, 8)``.
    """
    f = elastic_coarse(sigma)
    dt, dev = noise_B2hw.dtype, noise_B2hw.device
    kh = _blur_matrix(height, float(sigma), f, dev, dt)
    kw = _blur_matrix(width, float(sigma), f, dev, dt)
    # Blocks of f x f equal values have f^2 times the blurred variance of iid pixels: scale by 1/f.
    return (kh @ (noise_B2hw * (alpha / f)) @ kw.T).contiguous()


@lru_cache(maxsize=32)
def _grid_tables_np(size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel (cell, fraction, covered) and per-cell "ends at the border" of albumentations'
    ``grid_distortion`` loop: cell ``i`` spans ``[i*step, min(i*step + step, size))``, its values
    are ``np.linspace(prev, cur, len)`` with ``cur = prev + step*s_i``, or ``cur = size`` for the
    cell that would overrun the border; pixels no cell reaches stay 0."""
    step = size // num_steps
    cell = np.zeros(size, dtype=np.int64)
    frac = np.zeros(size, dtype=np.float64)
    covered = np.zeros(size, dtype=bool)
    clamped = np.zeros(num_steps + 1, dtype=bool)
    for i in range(num_steps + 1):
        start, end = i * step, i * step + step
        if end > size:
            end = size
            clamped[i] = True
        n = end - start
        if n <= 0:
            continue
        cell[start:end] = i
        frac[start:end] = np.arange(n) / (n - 1) if n > 1 else 0.0
        covered[start:end] = True
    return cell, frac, covered, clamped


@lru_cache(maxsize=64)
def _grid_tables(
    size: int, num_steps: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cell, frac, covered, clamped = _grid_tables_np(size, num_steps)
    return (
        torch.from_numpy(cell).to(device),
        torch.from_numpy(frac).to(device=device, dtype=dtype),
        torch.from_numpy(covered).to(device),
        torch.from_numpy(clamped).to(device),
    )


def _grid_map(steps_BK: torch.Tensor, size: int, num_steps: int) -> torch.Tensor:
    cell, frac, covered, clamped = _grid_tables(size, num_steps, steps_BK.device, steps_BK.dtype)
    step = size // num_steps
    cur = torch.where(clamped, torch.full_like(steps_BK, float(size)), step * torch.cumsum(steps_BK, dim=1))
    prev = torch.cat([torch.zeros_like(cur[:, :1]), cur[:, :-1]], dim=1)
    p, c = prev[:, cell], cur[:, cell]  # [B, size]
    return torch.where(covered, p + (c - p) * frac, torch.zeros_like(p))


def grid_distortion_maps(
    steps_x_BK: torch.Tensor, steps_y_BK: torch.Tensor, height: int, width: int, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """albumentations ``grid_distortion`` sampling maps, batched: ``map_x [B, W]``, ``map_y [B, H]``.

    The map is separable (``map_x`` depends on the column only) and is *not* the identity even
    for unit steps (each cell's ``linspace`` includes both ends): a reference quirk, kept.
    ``steps_*_BK`` are ``[B, num_steps + 1]`` factors ``1 + U(-limit, limit)``.
    """
    return _grid_map(steps_x_BK, width, num_steps), _grid_map(steps_y_BK, height, num_steps)
