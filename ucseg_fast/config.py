"""Configuration: frozen dataclasses, strict TOML presets and dotted CLI overrides.

A preset states only what differs from the defaults below; the defaults are the reference
ACDC recipe (METHOD.md §3). Unknown keys, wrong types and bad values are errors that name the
file and the key, so a typo never silently trains the wrong thing.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    # Folder in the SSL4MIS layout (train_slices.list, val.list, [test.list], data/...).
    root: str = "../shared/data/ACDC"
    num_classes: int = 4
    # Labeled patients; the first matching number of lines of train_slices.list are labeled.
    # 3D (img_size of 3 values): labeled volumes, the first lines of train.list.
    labeled_patients: int = 7
    # Training crop: 2 values = the 2D recipes (slices resized to it), 3 values = the 3D recipe
    # (random crop of the volumes, sliding-window evaluation with this window).
    img_size: tuple[int, ...] = (256, 256)
    labeled_bs: int = 12
    unlabeled_bs: int = 12
    augment: bool = True
    # Reference augmentation parameters (METHOD.md §3, albumentations pipeline).
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    ssr_p: float = 0.5
    shift_limit: float = 0.0625
    scale_limit: float = 0.05
    rotate_limit: float = 10.0
    distort_p: float = 0.25
    dropout_p: float = 0.5
    # Pipeline: "torch" (TrainStream, batched torch augmentation) or "dali" (DALI operators,
    # GPU decoding; ucseg_fast.data.factory.build_train_stream picks).
    backend: str = "torch"
    # "ssl4mis" (HDF5 + .list files) or "folder" (<root>/{labeled,unlabeled,val}/image|mask).
    format: str = "ssl4mis"
    # Optional unlabeled-only archive: a manifest file of image paths (streamed, sharded per rank).
    unlabeled_manifest: str = ""
    # Decoded images (PNG/JPEG folders, manifests) larger than this many pixels are refused,
    # naming the file (a guard against decompression bombs Pillow's own check lets through).
    max_image_pixels: int = 50_000_000
    # Threads decoding image files (folders, manifests) ahead of the step; 0 = in the training
    # thread. The order of the images, hence resume, does not depend on it.
    decode_workers: int = 2
    # Resume refuses a list / manifest whose content changed since the checkpoint (checked by a
    # fingerprint of its lines); true continues on the changed content, from the saved position.
    resume_changed_data: bool = False
    # Folder masks: "auto" | "index" (class ids) | "binary" (gray/255 > 0.5).
    mask_mode: str = "auto"
    # NIfTI images, per-volume scaling: "auto" (minmax for 2D, z-score for 3D) | "minmax" |
    # "zscore" | "none" (the stored values). Other formats are read as stored ("auto" only).
    intensity: str = "auto"
    # The list validation reads (SSL4MIS: <root>/<val_split>.list). The reference validates
    # ACDC on val.list and LA on test.list.
    val_split: str = "val"
    # 3D SSL4MIS / UA-MT volumes only: the last val_holdout lines of train.list are the
    # validation volumes (split "val", read instead of <root>/val.list) and never train, neither
    # labeled nor unlabeled. 0 = every line of train.list trains.
    val_holdout: int = 0
    # 3D sliding-window evaluation strides (METHOD.md §4: 18 in x/y, 4 in z)
    eval_stride_xy: int = 18
    eval_stride_z: int = 4


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 3
    patch_size: int = 16
    unet_dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    # "torch": plain PyTorch evidential uncertainty; "fused": the Triton op. With
    # upg_head = "fused" too, u is written straight into the attention's patch-token layout and
    # the fused head reads A from it (UCSeg.fused_tokens). "auto": fused on CUDA (with Triton),
    # torch elsewhere.
    uncertainty: str = "auto"
    # UPG fusion head: "torch" (the reference module), "fused" (Triton recompute sweeps,
    # same parameters and state_dict) or "auto" (fused on CUDA with Triton, torch elsewhere)
    upg_head: str = "auto"


@dataclass(frozen=True)
class LossConfig:
    # fusion: the paper's learned UPG pseudo-label; entropy: less-uncertain subnet + confidence
    # mask; fusion+mask: UPG pseudo-label with the confidence mask of softmax(P).
    pseudo_mode: str = "fusion"
    nms: bool = True
    confidence_threshold: float = 0.95
    consistency: float = 0.1
    consistency_rampup: float = 200.0
    unsup_factor: float = 150.0
    rampup_epoch_len: int = 150
    embed_c_factor: float = 0.2
    embed_p_factor: float = 0.1
    ccp: bool = True
    queue_size: int = 1440
    contrast_temperature: float = 0.3
    # Reference quirks (docs/reference-differences.md): "shared" pointer / "reference"
    # init / "soft" gate reproduce the authors' code; the defaults do what was meant.
    queue_pointer: str = "per_class"
    queue_init: str = "feature_norm"
    queue_gate: str = "hard"
    gate_base: float = 0.5
    gate_span: float = 0.46
    phase2_start: int = 12000
    # "absolute": the consistency ramp (rampup_epoch_len, consistency_rampup) and phase2_start
    # count iterations as the reference does; "proportional": they are points of a reference
    # run of reference_iterations iterations, moved to the same fraction of train.max_iterations
    # (a 300-iteration ACDC run reaches full w at 180 and copy-paste at 72). λ_t, the gate
    # threshold and the lr follow t / max_iterations in both.
    schedules: str = "absolute"
    reference_iterations: int = 50000
    # false: the supervised baseline -- the same pair (both subnets and P) trained on the
    # labeled images only, every unlabeled-data term (pseudo-label losses, CCP, copy-paste) off
    semi_supervised: bool = True
    # "softmax": CE + softmax Dice (the ACDC trainer); "sigmoid": BCE on the 2-channel one-hot,
    # σ Dice, per-channel σ > 0.5 pseudo-labels (the 2D-generic / 3D trainers, num_classes 2)
    supervision: str = "softmax"
    # CE/BCE + Dice (+ AU) of the labeled terms, the fusion-mode unsupervised terms and phase 2's
    # mixed terms through the fused ops.fusion_loss kernels, and the step's predictions (maps,
    # diff terms, gates) through ops.prediction_stats (same values, fp32): true / false, or
    # "auto" = true on CUDA with Triton, false elsewhere
    fused_losses: bool | str = "auto"


@dataclass(frozen=True)
class TrainConfig:
    max_iterations: int = 50000
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    seed: int = 42
    device: str = "auto"
    # bf16 autocast on CUDA; ignored on CPU (fp32).
    amp: str = "bf16"
    channels_last: bool = True
    # "auto": one CUDA graph per phase on one GPU, torch.compile where a graph cannot be
    # captured (DDP, apex, connected components that sync; the log says which), eager on CPU
    step_mode: str = "auto"
    # torch.compile options of step_mode = "compile" (backend "aot_eager" = no Inductor, for tests)
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    # eager steps of each phase before its CUDA graph is captured (step_mode = "graph")
    graph_warmup: int = 3
    # "foreach": SGD on torch._foreach ops reading the lr device tensor (no sync, graph-safe);
    # "fused": torch's fused SGD kernel (tensor lr); "apex": apex FusedSGD when importable
    optimizer: str = "foreach"
    # DDP only: convert BatchNorm to SyncBatchNorm (the reference has per-GPU statistics)
    sync_bn: bool = False
    log_every: int = 50
    val_every: int = 200
    checkpoint_every: int = 1000
    val_batch_size: int = 16
    # 0 = every volume of val.list
    max_val_volumes: int = 0
    out_dir: str = "runs/acdc_2d"
    progress: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "acdc_2d"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "backend"): ("torch", "dali"),
    ("data", "format"): ("ssl4mis", "folder", "nifti"),
    ("data", "mask_mode"): ("auto", "index", "binary"),
    ("data", "intensity"): ("auto", "minmax", "zscore", "none"),
    ("model", "uncertainty"): ("auto", "torch", "fused"),
    ("model", "upg_head"): ("auto", "torch", "fused"),
    ("loss", "fused_losses"): (True, False, "auto"),
    ("loss", "pseudo_mode"): ("fusion", "entropy", "fusion+mask"),
    ("loss", "schedules"): ("absolute", "proportional"),
    ("loss", "queue_pointer"): ("shared", "per_class"),
    ("loss", "queue_init"): ("reference", "feature_norm"),
    ("loss", "queue_gate"): ("soft", "hard"),
    ("loss", "supervision"): ("softmax", "sigmoid"),
    ("train", "amp"): ("bf16", "fp16", "none"),
    ("train", "step_mode"): ("auto", "eager", "compile", "graph"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"),
    ("train", "compile_backend"): ("inductor", "aot_eager", "eager"),
    ("train", "optimizer"): ("foreach", "fused", "apex"),
}
_ALLOWED_LABELED = (3, 7, 14, 21, 28, 35, 70, 140)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if set(typing.get_args(tp)) == {bool, str}:  # a switch: true / false / "auto"
        if not isinstance(value, (bool, str)):
            raise ConfigError(f"{where}: expected true, false or \"auto\", got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(data: dict[str, Any], source: str) -> Config:
    top = _section_types(Config)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in top:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(top)})")
        tp = top[key]
        if tp is str:
            kwargs[key] = _coerce(value, str, f"{source}: {key}")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        hints = _section_types(tp)
        sec: dict[str, Any] = {}
        for k, v in value.items():
            if k not in hints:
                raise ConfigError(
                    f"{source}: unknown key '{key}.{k}' (known: {', '.join(hints)})")
            sec[k] = _coerce(v, hints[k], f"{source}: {key}.{k}")
            choices = _CHOICES.get((key, k))
            if choices and sec[k] not in choices:
                raise ConfigError(f"{source}: {key}.{k} = {sec[k]!r}; choose one of {choices}")
        kwargs[key] = tp(**sec)
    cfg = Config(**kwargs)
    _validate(cfg, source)
    return cfg


def _float_keys(cfg: Config):
    """(`section.key`, value) of every float (and tuple-of-float) key, in declaration order."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = _section_types(type(section))
        for f in dataclasses.fields(section):
            tp, v = hints[f.name], getattr(section, f.name)
            if tp is float:
                yield f"{sec.name}.{f.name}", v
            elif typing.get_origin(tp) is tuple and float in typing.get_args(tp):
                for i, x in enumerate(v):
                    yield f"{sec.name}.{f.name}[{i}]", x


def scaled_iteration(q: int, T: int, T_ref: int) -> int:
    """round(q · T / T_ref), halves up, in exact integer arithmetic: iteration q of a reference
    run of T_ref iterations moved to a run of T (proportional schedules)."""
    return (2 * q * T + T_ref) // (2 * T_ref)


def phase2_start_at(cfg: Config) -> int:
    """The iteration phase-2 copy-paste starts at: `loss.phase2_start` with absolute schedules,
    round(phase2_start · max_iterations / reference_iterations) with proportional ones
    (`scaled_iteration`); never (past the last iteration) for the supervised baseline."""
    lo, T = cfg.loss, cfg.train.max_iterations
    if not lo.semi_supervised:
        return T + 1
    if lo.schedules == "absolute":
        return int(lo.phase2_start)
    return scaled_iteration(lo.phase2_start, T, lo.reference_iterations)


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


def _validate(cfg: Config, source: str) -> None:
    d, t, lo = cfg.data, cfg.train, cfg.loss
    _validate_numbers(cfg, source)
    if len(d.img_size) not in (2, 3):
        raise ConfigError(f"{source}: data.img_size {list(d.img_size)} must have 2 values (2D) "
                          f"or 3 values (3D)")
    three_d = len(d.img_size) == 3
    if d.format == "ssl4mis" and not three_d and d.labeled_patients not in _ALLOWED_LABELED:
        raise ConfigError(f"{source}: data.labeled_patients = {d.labeled_patients}; the SSL4MIS "
                          f"ACDC split defines {_ALLOWED_LABELED}")
    if d.labeled_patients < 1:
        raise ConfigError(f"{source}: data.labeled_patients must be >= 1, got "
                          f"{d.labeled_patients}")
    if d.intensity != "auto" and d.format != "nifti":
        raise ConfigError(f"{source}: data.intensity = {d.intensity!r} scales NIfTI volumes only "
                          f"(data.format = 'nifti'); data.format = {d.format!r} keeps 'auto'")
    if three_d:
        if d.format not in ("ssl4mis", "nifti"):
            raise ConfigError(f"{source}: 3D training (data.img_size {list(d.img_size)}) reads "
                              f"SSL4MIS / UA-MT HDF5 or NIfTI volumes: data.format must be "
                              f"'ssl4mis' or 'nifti', got {d.format!r}")
        if d.backend not in ("torch", "dali"):  # both build the 3D stream (VolumeStream / DaliVolumeStream)
            raise ConfigError(f"{source}: 3D training has the 'torch' and 'dali' data backends; "
                              f"data.backend = {d.backend!r}")
        if d.unlabeled_manifest:
            raise ConfigError(f"{source}: data.unlabeled_manifest is a 2D (slice/image) source; "
                              f"it cannot feed 3D training")
        if d.num_classes != 2 or lo.supervision != "sigmoid":
            raise ConfigError(f"{source}: the 3D recipe is the reference's binary one "
                              f"(data.num_classes = 2, loss.supervision = 'sigmoid'); got "
                              f"num_classes = {d.num_classes}, supervision = {lo.supervision!r}")
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
                          f"train.list, which only the 3D SSL4MIS / UA-MT recipe reads (data.img_size "
                          f"of 3 values, data.format = 'ssl4mis'; here {d.format!r}, img_size "
                          f"{list(d.img_size)}): set data.val_holdout = 0")
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


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'--train.max_iterations=300' or 'train.max_iterations=300' -> (['train', 'max_iterations'], 300).

    Values are parsed as TOML literals (numbers, booleans, lists, quoted strings); anything
    that is not a TOML literal is taken as a bare string."""
    s = text[2:] if text.startswith("--") else text
    if "=" not in s:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = s.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 and parts != ["name"]:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.max_iterations=300)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML preset at `path` (if any), then dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
        source = str(p)
        _build(data, source)  # report preset errors against the file, before overrides
    data = _apply(data, overrides)
    return _build(data, f"{source} + overrides" if overrides else source)


def _apply(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for ov in overrides:
        parts, value = parse_override(ov)
        upd: dict[str, Any] = {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}
        data = _merge(data, upd)
    return data


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with dotted overrides (as `load_config` takes them) applied and validated."""
    if not overrides:
        return cfg
    return _build(_apply(cfg.to_dict(), overrides), "config + overrides")


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (lists for tuples)."""
    return _build(data, source)


def diff_configs(a: Config, b: Config, sections=("data", "model", "loss"),
                 keys: tuple[str, ...] | None = None) -> list[str]:
    """Keys (section.key) whose values differ between a and b in the given sections
    (only `keys` of them when given)."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for s in sections:
        for k in da[s]:
            if keys is not None and k not in keys:
                continue
            if da[s][k] != db[s][k]:
                out.append(f"{s}.{k}: {da[s][k]!r} != {db[s][k]!r}")
    return out
