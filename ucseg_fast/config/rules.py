"""Validation of a whole configuration, once, before anything is built or read: ranges of the
numbers, the choices that must agree with each other, and what the recipe allows. Every error
is a `ConfigError` naming the source (file, overrides or checkpoint), the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
import typing

from .schema import ALLOWED_LABELED, RECIPES, Config, phase2_start_at


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


def _float_keys(cfg: Config):
    """(`section.key`, value) of every float (and tuple-of-float) key, in declaration order."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            tp, v = hints[f.name], getattr(section, f.name)
            if tp is float:
                yield f"{sec.name}.{f.name}", v
            elif typing.get_origin(tp) is tuple and float in typing.get_args(tp):
                for i, x in enumerate(v):
                    yield f"{sec.name}.{f.name}[{i}]", x


def _validate_numbers(cfg: Config, source: str) -> None:
    """Ranges of the numbers (every message names the key and the value)."""
    d, t, lo, m = cfg.data, cfg.train, cfg.loss, cfg.model
    for key, v in _float_keys(cfg):  # TOML has inf and nan literals; no key means either
        if not math.isfinite(v):
            raise ConfigError(f"{source}: {key} = {v!r} must be a finite number")
    if not t.base_lr > 0:
        raise ConfigError(f"{source}: train.base_lr = {t.base_lr!r} must be > 0")
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"{source}: train.momentum = {t.momentum!r} must be in [0, 1)")
    if not t.weight_decay >= 0:
        raise ConfigError(f"{source}: train.weight_decay = {t.weight_decay!r} must be >= 0")
    if m.patch_size < 1:
        raise ConfigError(f"{source}: model.patch_size = {m.patch_size} must be >= 1")
    if lo.rampup_epoch_len < 1:
        raise ConfigError(f"{source}: loss.rampup_epoch_len = {lo.rampup_epoch_len} must be >= 1")
    if lo.consistency_rampup < 0:
        raise ConfigError(f"{source}: loss.consistency_rampup = {lo.consistency_rampup!r} must "
                          f"be >= 0 (0 = no ramp-up)")
    if lo.contrast_temperature <= 0:
        raise ConfigError(f"{source}: loss.contrast_temperature = {lo.contrast_temperature!r} "
                          f"must be > 0 (the CCP logits are divided by it)")
    for k in ("labeled_bs", "unlabeled_bs"):
        if getattr(d, k) < 1:
            raise ConfigError(f"{source}: data.{k} = {getattr(d, k)} must be >= 1")
    batch = d.labeled_bs + d.unlabeled_bs
    if lo.queue_size < batch:
        raise ConfigError(f"{source}: loss.queue_size = {lo.queue_size} must be >= data.labeled_bs "
                          f"+ data.unlabeled_bs = {batch}: each CCP queue update writes one "
                          f"column per image of the batch")
    if lo.reference_iterations < 1:
        raise ConfigError(f"{source}: loss.reference_iterations = {lo.reference_iterations} must "
                          f"be >= 1")
    switch = phase2_start_at(cfg)
    if d.labeled_bs != d.unlabeled_bs and switch < t.max_iterations and lo.semi_supervised:
        raise ConfigError(f"{source}: data.labeled_bs = {d.labeled_bs} != data.unlabeled_bs = "
                          f"{d.unlabeled_bs}: phase-2 copy-paste (from iteration {switch} < "
                          f"train.max_iterations = {t.max_iterations}) pairs "
                          f"labeled image i with unlabeled image i, so the two batch sizes must "
                          f"be equal (or start copy-paste after the run: loss.phase2_start >= "
                          f"{'train.max_iterations' if lo.schedules == 'absolute' else 'loss.reference_iterations'})")
    if t.max_val_volumes < 0:
        raise ConfigError(f"{source}: train.max_val_volumes = {t.max_val_volumes} must be >= 0 "
                          f"(0 = every validation volume)")
    for k in ("val_batch_size", "graph_warmup"):
        if getattr(t, k) < 1:
            raise ConfigError(f"{source}: train.{k} = {getattr(t, k)} must be >= 1")
    if d.max_image_pixels < 1:
        raise ConfigError(f"{source}: data.max_image_pixels = {d.max_image_pixels} must be >= 1")
    if d.decode_workers < 0:
        raise ConfigError(f"{source}: data.decode_workers = {d.decode_workers} must be >= 0 "
                          f"(0 = decode in the training thread)")


def validate(cfg: Config, source: str) -> None:
    """ConfigError (naming `source`, the key and the value) unless `cfg` is trainable."""
    _validate_numbers(cfg, source)
    _validate_recipe(cfg, source)
    _validate_data(cfg, source)


def _validate_recipe(cfg: Config, source: str) -> None:
    """What the recipe fixes: dimensions, classes, formats, pseudo-label modes."""
    d, lo, spec = cfg.data, cfg.loss, RECIPES[cfg.recipe]
    if len(d.img_size) != spec.dims:
        other = [r.name for r in RECIPES.values() if r.dims == len(d.img_size)]
        raise ConfigError(f"{source}: data.img_size {list(d.img_size)} has {len(d.img_size)} "
                          f"values, but recipe {cfg.recipe!r} trains {spec.dims}D data: give "
                          f"{spec.dims} values" + (f", or choose recipe = {other[0]!r}"
                                                   if other else ""))
    if spec.binary and d.num_classes != 2:
        raise ConfigError(f"{source}: recipe {cfg.recipe!r} is binary (σ on a 2-channel one-hot "
                          f"[background, foreground]): data.num_classes must be 2, got "
                          f"{d.num_classes}")
    if d.format not in spec.formats:
        raise ConfigError(f"{source}: recipe {cfg.recipe!r} reads data.format "
                          f"{' / '.join(map(repr, spec.formats))}, got {d.format!r}")
    if lo.pseudo_mode not in spec.pseudo_modes:
        raise ConfigError(f"{source}: loss.pseudo_mode = {lo.pseudo_mode!r}; recipe "
                          f"{cfg.recipe!r} has {' / '.join(map(repr, spec.pseudo_modes))} (the "
                          f"entropy modes are softmax rules)")
    if spec.dims == 3 and d.unlabeled_manifest:
        raise ConfigError(f"{source}: data.unlabeled_manifest is a 2D (slice/image) source; "
                          f"recipe {cfg.recipe!r} trains on volumes")


def _validate_data(cfg: Config, source: str) -> None:
    d, t, lo = cfg.data, cfg.train, cfg.loss
    three_d = RECIPES[cfg.recipe].dims == 3
    if d.format == "ssl4mis" and not three_d and d.labeled_patients not in ALLOWED_LABELED:
        raise ConfigError(f"{source}: data.labeled_patients = {d.labeled_patients}; the SSL4MIS "
                          f"ACDC split defines {ALLOWED_LABELED}")
    if d.labeled_patients < 1:
        raise ConfigError(f"{source}: data.labeled_patients must be >= 1, got "
                          f"{d.labeled_patients}")
    if d.intensity != "auto" and d.format != "nifti":
        raise ConfigError(f"{source}: data.intensity = {d.intensity!r} scales NIfTI volumes only "
                          f"(data.format = 'nifti'); data.format = {d.format!r} keeps 'auto'")
    if d.eval_stride_xy < 1 or d.eval_stride_z < 1:
        raise ConfigError(f"{source}: data.eval_stride_xy = {d.eval_stride_xy} and "
                          f"data.eval_stride_z = {d.eval_stride_z} must be >= 1")
    if not d.val_split or "/" in d.val_split:
        raise ConfigError(f"{source}: data.val_split = {d.val_split!r} must name a list file "
                          f"(<root>/<val_split>.list)")
    if d.format == "nifti" and d.val_split != "val":
        raise ConfigError(f"{source}: data.val_split = {d.val_split!r}; a NIfTI set has one "
                          f"held-out split, 'val' (imagesVal/ + labelsVal/, else imagesTs/ + "
                          f"labelsTs/): set data.val_split = 'val'")
    if d.format == "folder" and d.val_split != "val":
        raise ConfigError(f"{source}: data.val_split = {d.val_split!r}; an image folder has one "
                          f"held-out split, 'val' (<root>/val/image + mask): set "
                          f"data.val_split = 'val'")
    if d.format == "ssl4mis" and not three_d and d.val_split not in ("val", "test"):
        raise ConfigError(f"{source}: data.val_split = {d.val_split!r}; 2D SSL4MIS validation "
                          f"reads the volumes of val.list or test.list: 'val' or 'test'")
    if d.val_holdout < 0:
        raise ConfigError(f"{source}: data.val_holdout = {d.val_holdout} must be >= 0 (the number "
                          f"of last train.list lines held out for validation; 0 = none)")
    if d.val_holdout and not (three_d and d.format == "ssl4mis"):
        raise ConfigError(f"{source}: data.val_holdout = {d.val_holdout} holds out the last lines of "
                          f"train.list, which only the 3D SSL4MIS / UA-MT volumes have (recipe "
                          f"'binary_3d', data.format = 'ssl4mis'; here recipe {cfg.recipe!r}, "
                          f"data.format {d.format!r}): set data.val_holdout = 0")
    if d.val_holdout and d.val_split != "val":
        raise ConfigError(f"{source}: data.val_holdout = {d.val_holdout} makes the last "
                          f"{d.val_holdout} lines of train.list the validation split 'val', but "
                          f"data.val_split = {d.val_split!r} validates on another list: set "
                          f"data.val_split = 'val' (or data.val_holdout = 0)")
    if d.num_classes < 2:
        raise ConfigError(f"{source}: data.num_classes = {d.num_classes} must be >= 2")
    for n in d.img_size:
        if n % 16 or n % cfg.model.patch_size:
            raise ConfigError(f"{source}: data.img_size {d.img_size} must be divisible by 16 "
                              f"and by model.patch_size {cfg.model.patch_size}")
    if t.max_iterations < 1:
        raise ConfigError(f"{source}: train.max_iterations = {t.max_iterations} must be >= 1")
    for k in ("log_every", "val_every", "checkpoint_every"):
        if getattr(t, k) < 1:
            raise ConfigError(f"{source}: train.{k} = {getattr(t, k)} must be >= 1")
    if not 0.0 < lo.confidence_threshold <= 1.0:
        raise ConfigError(f"{source}: loss.confidence_threshold = {lo.confidence_threshold!r} "
                          f"must be in (0, 1]")


