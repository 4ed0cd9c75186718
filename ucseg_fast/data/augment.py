"""The reference's 2D augmentation as batched torch ops on the device that holds the batch.

Reference (albumentations 1.4.x, docs/method.md §3), per sample, in this order::

    HorizontalFlip(p .5) -> VerticalFlip(p .5)
    -> ShiftScaleRotate(shift 0.0625, scale 0.05, rotate 10 deg, p .5; bilinear image,
       nearest mask, BORDER_REFLECT_101)
    -> OneOf(p .25){ GridDistortion(5 steps, limit 0.05), ElasticTransform(alpha 1, sigma 50) }
    -> CoarseDropout(5..8 holes of floor(H/20) x floor(W/20), image and mask set to 0, p .5)

Here every random parameter of the whole batch comes from one ``torch.rand`` call (plus one for
the elastic noise) on the batch's device, driven by a ``torch.Generator``; flips are exact
``flip`` + ``where``; all remaining geometry (shift-scale-rotate, then grid distortion or elastic
field) is composed into ONE sampling grid per sample, evaluated by one ``grid_sample`` for the
images (bilinear) and one for the labels (nearest, so labels stay in the class set). No Python
loop over samples; no host sync.

Coordinates are OpenCV's: pixel centres at integers, ``x`` = column. The grid is normalised with
``align_corners=True``, so ``grid_sample``'s ``reflection`` padding reflects about the edge pixel
centres, which *is* OpenCV's BORDER_REFLECT_101 (``align_corners=False`` would give BORDER_REFLECT).

Deliberate differences from the reference (see docs/reference-differences.md):

* one resampling of the composed geometry instead of two (SSR warp, then distortion remap):
  slightly less interpolation blur, labels rounded once instead of twice, and the border
  reflection applied to the source under the composed map rather than to the SSR output;
* exact bilinear weights (OpenCV quantises sub-pixel positions to 1/32 px); nearest-neighbour
  ties at exactly half a pixel round half-to-even (``grid_sample``) instead of half-up;
* the elastic field's noise lives on an ``f x f``-pixel block grid (``f = clamp(sigma // 6, 1, 8)``,
  8 for sigma 50) with variance scaled by ``1/f^2``, then blurred with OpenCV's Gaussian
  (radius 4 sigma, reflect-101) by two small matrix products; the field has the reference's
  variance and correlation length (std ~0.004 px for alpha 1, sigma 50: a near no-op there too);
* random parameters are fresh every step; the reference's worker re-seeding makes its
  augmentation-parameter sequence repeat every epoch (docs/method.md §3, [inference]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from .augment_fields import elastic_coarse, elastic_fields, grid_distortion_maps

__all__ = [
    "AugmentParams",
    "apply_params",
    "apply_stages",
    "augment_2d",
    "draw_params",
    "elastic_fields",
    "grid_distortion_maps",
    "hole_size",
]


# ---------------------------------------------------------------------------- helpers
def hole_size(size: int, frac: float) -> int:
    """``floor(size * frac)`` without float surprises (``int(60 * 0.05)`` must be 3)."""
    return int(Fraction(frac).limit_denominator(10_000) * size)


# ---------------------------------------------------------------------------- parameters
@dataclass
class AugmentParams:
    """Per-sample parameters of one batch (all tensors on the batch's device, leading dim B).

    Drawn by `draw_params`; tests and other backends may build them by hand and call
    `apply_params` to reproduce an exact transform.
    """

    hflip: torch.Tensor  # [B] bool
    vflip: torch.Tensor  # [B] bool
    ssr_on: torch.Tensor  # [B] bool
    angle_deg: torch.Tensor  # [B] counter-clockwise on screen (cv2.getRotationMatrix2D)
    scale: torch.Tensor  # [B]
    shift_x: torch.Tensor  # [B] fraction of the width (content moves right for > 0)
    shift_y: torch.Tensor  # [B] fraction of the height (content moves down for > 0)
    distort_on: torch.Tensor  # [B] bool
    use_grid: torch.Tensor  # [B] bool: GridDistortion if True else ElasticTransform
    steps_x: torch.Tensor  # [B, grid_steps + 1] grid-distortion factors along x
    steps_y: torch.Tensor  # [B, grid_steps + 1]
    elastic_noise: torch.Tensor | None  # [B, 2, ceil(H/f), ceil(W/f)] uniform(-1, 1); None: no distortion
    dropout_on: torch.Tensor  # [B] bool
    n_holes: torch.Tensor  # [B] integer-valued
    hole_y: torch.Tensor  # [B, max_holes] integer-valued top rows
    hole_x: torch.Tensor  # [B, max_holes] integer-valued left columns
    hole_h: int
    hole_w: int
    # Static switches (Python bools, from the probabilities): skip a stage's work entirely.
    flips: bool = True
    geometry: bool = True
    dropout: bool = True


def draw_params(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    hflip_p: float = 0.5,
    vflip_p: float = 0.5,
    ssr_p: float = 0.5,
    shift_limit: float = 0.0625,
    scale_limit: float = 0.05,
    rotate_limit: float = 10.0,
    distort_p: float = 0.25,
    grid_steps: int = 5,
    grid_limit: float = 0.05,
    elastic_sigma: float = 50.0,
    dropout_p: float = 0.5,
    holes: tuple[int, int] = (5, 8),
    hole_frac: float = 1 / 20,
) -> AugmentParams:
    """All random parameters of a batch from one ``torch.rand`` (+ one for the elastic noise)."""
    min_holes, max_holes = int(holes[0]), int(holes[1])
    if not 0 <= min_holes <= max_holes:
        raise ValueError(f"holes must be (min, max) with 0 <= min <= max, got {holes}")
    if grid_steps < 1:
        raise ValueError(f"grid_steps must be >= 1, got {grid_steps}")
    b, h, w, k = batch, height, width, grid_steps + 1
    hh, hw = hole_size(h, hole_frac), hole_size(w, hole_frac)
    col_holes = 11
    col_steps = col_holes + 2 * max_holes
    u = torch.rand((b, col_steps + 2 * k), generator=generator, device=device, dtype=dtype)

    def sym(col: torch.Tensor, limit: float) -> torch.Tensor:  # U(-limit, limit)
        return (2.0 * col - 1.0) * limit

    steps = 1.0 + sym(u[:, col_steps:], grid_limit)
    noise = None
    if distort_p > 0:
        f = elastic_coarse(elastic_sigma)
        noise = 2.0 * torch.rand((b, 2, -(-h // f), -(-w // f)), generator=generator, device=device, dtype=dtype) - 1.0
    return AugmentParams(
        hflip=u[:, 0] < hflip_p,
        vflip=u[:, 1] < vflip_p,
        ssr_on=u[:, 2] < ssr_p,
        angle_deg=sym(u[:, 3], rotate_limit),
        scale=1.0 + sym(u[:, 4], scale_limit),
        shift_x=sym(u[:, 5], shift_limit),
        shift_y=sym(u[:, 6], shift_limit),
        distort_on=u[:, 7] < distort_p,
        use_grid=u[:, 8] < 0.5,  # OneOf: each of the two with probability 1/2
        steps_x=steps[:, :k],
        steps_y=steps[:, k:],
        elastic_noise=noise,
        dropout_on=u[:, 9] < dropout_p,
        # randint(min, max) inclusive, randint(0, H - h) inclusive, as Python's random.randint
        n_holes=(min_holes + torch.floor(u[:, 10] * (max_holes - min_holes + 1))).clamp(max=max_holes),
        hole_y=torch.floor(u[:, col_holes:col_holes + max_holes] * (h - hh + 1)).clamp(max=h - hh),
        hole_x=torch.floor(u[:, col_holes + max_holes:col_steps] * (w - hw + 1)).clamp(max=w - hw),
        hole_h=hh,
        hole_w=hw,
        flips=hflip_p > 0 or vflip_p > 0,
        geometry=ssr_p > 0 or distort_p > 0,
        dropout=dropout_p > 0 and max_holes > 0 and hh > 0 and hw > 0,
    )


# ---------------------------------------------------------------------------- application
def _sampling_grid(
    p: AugmentParams, b: int, h: int, w: int, *, ssr: bool, distortion: bool, elastic_alpha: float,
    elastic_sigma: float, device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """Composed source position of every output pixel, normalised for ``align_corners=True``.

    ``ssr`` / ``distortion`` switch the two geometric stages (``distortion`` needs
    ``p.elastic_noise``). With ``ssr=False`` the shift-scale-rotate fields of ``p`` are not read and
    the identity takes their place through the same arithmetic (bit-identical to ``ssr_on`` False).
    """
    xs = torch.arange(w, device=device, dtype=dtype)
    ys = torch.arange(h, device=device, dtype=dtype)
    # q: where the distortion (applied last) samples the shift-scale-rotate output, in pixels.
    qx = xs.expand(b, h, w)
    qy = ys.view(h, 1).expand(b, h, w)
    if distortion:
        assert p.elastic_noise is not None
        gx_BW, gy_BH = grid_distortion_maps(p.steps_x.to(dtype), p.steps_y.to(dtype), h, w, p.steps_x.shape[1] - 1)
        el_B2HW = elastic_fields(p.elastic_noise.to(dtype), h, w, alpha=elastic_alpha, sigma=elastic_sigma)
        sel_grid = (p.distort_on & p.use_grid).view(b, 1)
        sel_el = (p.distort_on & ~p.use_grid).to(dtype).view(b, 1, 1, 1)
        # The grid-distortion map is separable: select on [B, W] / [B, H], broadcast once.
        dgx_B1W = torch.where(sel_grid, gx_BW - xs, 0.0).view(b, 1, w)
        dgy_BH1 = torch.where(sel_grid, gy_BH - ys, 0.0).view(b, h, 1)
        el_B2HW = el_B2HW * sel_el
        qx = qx + dgx_B1W + el_B2HW[:, 0]
        qy = qy + dgy_BH1 + el_B2HW[:, 1]
    # Inverse of cv2.getRotationMatrix2D(centre, angle, scale) followed by the shift (dx W, dy H):
    # forward dst = s R(angle) (src - c) + c + t  =>  src = R(-angle) (dst - c - t) / s + c.
    if ssr:
        on = p.ssr_on
        angle = torch.where(on, p.angle_deg.to(dtype), 0.0) * (math.pi / 180.0)
        scale = torch.where(on, p.scale.to(dtype), 1.0)
        tx = torch.where(on, p.shift_x.to(dtype) * w, 0.0).view(b, 1, 1)
        ty = torch.where(on, p.shift_y.to(dtype) * h, 0.0).view(b, 1, 1)
    else:  # exactly the values the branch above gives for ssr_on False
        angle = torch.zeros(b, device=device, dtype=dtype)
        scale = torch.ones(b, device=device, dtype=dtype)
        tx = ty = torch.zeros(b, 1, 1, device=device, dtype=dtype)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0  # pixel-centre convention: rotate about the middle pixel
    cos = (torch.cos(angle) / scale).view(b, 1, 1)
    sin = (torch.sin(angle) / scale).view(b, 1, 1)
    ux, uy = qx - cx - tx, qy - cy - ty
    sx = cos * ux - sin * uy + cx
    sy = sin * ux + cos * uy + cy
    return torch.stack((sx * (2.0 / (w - 1)) - 1.0, sy * (2.0 / (h - 1)) - 1.0), dim=-1)


def _flip_stage(
    x: torch.Tensor, y: torch.Tensor | None, p: AugmentParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Exact pixel permutations, before any resampling (as in the reference).
    b, bl = x.shape[0], 0 if y is None else y.shape[0]
    x = torch.where(p.hflip.view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where(p.vflip.view(b, 1, 1, 1), x.flip(-2), x)
    if y is not None:
        y = torch.where(p.hflip[:bl].view(bl, 1, 1), y.flip(-1), y)
        y = torch.where(p.vflip[:bl].view(bl, 1, 1), y.flip(-2), y)
    return x, y


def _geometry_stage(
    x: torch.Tensor, y: torch.Tensor | None, p: AugmentParams, *, ssr: bool, distortion: bool,
    elastic_alpha: float, elastic_sigma: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift-scale-rotate and/or the OneOf distortion, composed into one ``grid_sample``."""
    b, _, h, w = x.shape
    bl = 0 if y is None else y.shape[0]
    if ssr and distortion:
        geo_on = p.ssr_on | p.distort_on
    else:
        geo_on = p.ssr_on if ssr else p.distort_on
    grid_BHW2 = _sampling_grid(p, b, h, w, ssr=ssr, distortion=distortion, elastic_alpha=elastic_alpha,
                               elastic_sigma=elastic_sigma, device=x.device, dtype=x.dtype)
    warped = F.grid_sample(x, grid_BHW2, mode="bilinear", padding_mode="reflection", align_corners=True)
    # Samples without geometry keep their exact pixels (grid_sample's identity is not bit-exact).
    x = torch.where(geo_on.view(b, 1, 1, 1), warped, x)
    if y is not None and bl > 0:
        # Nearest sampling returns stored values only, so labels stay in the class set.
        y_warped = F.grid_sample(
            y.to(x.dtype).unsqueeze(1), grid_BHW2[:bl], mode="nearest", padding_mode="reflection", align_corners=True
        ).squeeze(1)
        y = torch.where(geo_on[:bl].view(bl, 1, 1), y_warped.round().to(y.dtype), y)
    return x, y


def _dropout_stage(
    x: torch.Tensor, y: torch.Tensor | None, p: AugmentParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CoarseDropout: image holes 0, label holes background (0)."""
    b, _, h, w = x.shape
    bl = 0 if y is None else y.shape[0]
    dev, cdt = x.device, x.dtype
    max_holes = p.hole_y.shape[1]
    slot = torch.arange(max_holes, device=dev, dtype=cdt)
    active_BK = p.dropout_on.view(b, 1) & (slot.view(1, -1) < p.n_holes.to(cdt).view(b, 1))
    y1, x1 = p.hole_y.to(cdt).unsqueeze(-1), p.hole_x.to(cdt).unsqueeze(-1)
    rows = torch.arange(h, device=dev, dtype=cdt).view(1, 1, h)
    cols = torch.arange(w, device=dev, dtype=cdt).view(1, 1, w)
    rows_BKH = ((rows >= y1) & (rows < y1 + p.hole_h) & active_BK.unsqueeze(-1)).to(cdt)
    cols_BKW = ((cols >= x1) & (cols < x1 + p.hole_w)).to(cdt)
    # Union of up to max_holes rectangles as one batched outer product (count > 0).
    hole_BHW = torch.bmm(rows_BKH.transpose(1, 2), cols_BKW) > 0.5
    x = x.masked_fill(hole_BHW.unsqueeze(1), 0.0)
    if y is not None and bl > 0:
        y = y.masked_fill(hole_BHW[:bl], 0)  # holes are labelled background
    return x, y


def apply_stages(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    params: AugmentParams,
    *,
    flips: bool = True,
    ssr: bool = True,
    distortion: bool = True,
    dropout: bool = True,
    elastic_alpha: float = 1.0,
    elastic_sigma: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the chosen stages of `AugmentParams`, in the reference's order (flips ->
    shift-scale-rotate -> OneOf(grid distortion | elastic) -> CoarseDropout).

    A stage switched off here is the identity whatever ``params`` say, and its fields are not
    read. Shift-scale-rotate and distortion, when both on, are composed into one resampling (as
    `apply_params`); called separately they are two resamplings, each with the reflect-101
    border (the reference's way). A backend that already applied flips and shift-scale-rotate
    (DALI) runs ``apply_stages(x, y, p, flips=False, ssr=False)`` for the rest, with the same ``p``;
    where ``ssr_on`` is False for every sample, that equals `apply_params` bit for bit.
    Inputs as `apply_params`.
    """
    _check_inputs(images, labels)
    cdt = torch.float64 if images.dtype == torch.float64 else torch.float32
    p = params
    x, y = images.to(cdt), labels
    if flips and p.flips:
        x, y = _flip_stage(x, y, p)
    distort = distortion and p.elastic_noise is not None
    if p.geometry and (ssr or distort):
        x, y = _geometry_stage(x, y, p, ssr=ssr, distortion=distort, elastic_alpha=elastic_alpha,
                               elastic_sigma=elastic_sigma)
    if dropout and p.dropout and p.hole_y.shape[1] > 0 and p.hole_h > 0 and p.hole_w > 0:
        x, y = _dropout_stage(x, y, p)
    return x.to(images.dtype).contiguous(), (None if y is None else y.contiguous())


def apply_params(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    params: AugmentParams,
    *,
    elastic_alpha: float = 1.0,
    elastic_sigma: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply `AugmentParams` to ``images [B, C, H, W]`` and ``labels [Bl <= B, H, W]`` (or None)."""
    return apply_stages(images, labels, params, elastic_alpha=elastic_alpha, elastic_sigma=elastic_sigma)


def _check_inputs(images: torch.Tensor, labels: torch.Tensor | None) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    b, _, h, w = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2, got {h}x{w}")
    if labels is not None:
        if labels.dim() != 3 or labels.shape[1:] != images.shape[2:] or labels.shape[0] > b:
            raise ValueError(
                f"labels must be [Bl <= {b}, {h}, {w}], got {tuple(labels.shape)} for images {tuple(images.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def augment_2d(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    *,
    hflip_p: float = 0.5,
    vflip_p: float = 0.5,
    ssr_p: float = 0.5,
    shift_limit: float = 0.0625,
    scale_limit: float = 0.05,
    rotate_limit: float = 10.0,
    distort_p: float = 0.25,
    grid_steps: int = 5,
    grid_limit: float = 0.05,
    elastic_alpha: float = 1.0,
    elastic_sigma: float = 50.0,
    dropout_p: float = 0.5,
    holes: tuple[int, int] = (5, 8),
    hole_frac: float = 1 / 20,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch with the reference's 2D pipeline; every sample draws its own parameters.

    Args:
        images: ``[B, C, H, W]`` float (fp32/fp64/bf16/fp16; geometry in fp32, fp64 for fp64 input).
        labels: ``[Bl, H, W]`` integer class maps of the FIRST ``Bl <= B`` images (labeled samples
            first, unlabeled after), or None.
        generator: ``torch.Generator`` on the images' device type; the output is a pure function
            of its state and the inputs (deterministic on CPU and CUDA: no atomics involved).
        hflip_p .. hole_frac: the reference's values by default (module docstring); a
            probability of 0 turns a stage off.

    Returns:
        ``(images, labels)`` with the input dtypes and shapes.
    """
    _check_inputs(images, labels)
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {images.device}: they must match")
    b, _, h, w = images.shape
    params = draw_params(
        b, h, w, generator,
        device=images.device,
        dtype=torch.float64 if images.dtype == torch.float64 else torch.float32,
        hflip_p=hflip_p, vflip_p=vflip_p, ssr_p=ssr_p, shift_limit=shift_limit,
        scale_limit=scale_limit, rotate_limit=rotate_limit, distort_p=distort_p,
        grid_steps=grid_steps, grid_limit=grid_limit, elastic_sigma=elastic_sigma,
        dropout_p=dropout_p, holes=holes, hole_frac=hole_frac,
    )
    return apply_params(images, labels, params, elastic_alpha=elastic_alpha, elastic_sigma=elastic_sigma)
