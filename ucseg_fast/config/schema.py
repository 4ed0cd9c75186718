"""The configuration schema: frozen dataclasses of every key with its default, the allowed
choices, and the recipes a configuration can train.

A recipe (`Config.recipe`) fixes what the other keys cannot change: the dimensionality of the
images and subnets (`data.img_size` must have that many values), the supervision (softmax CE +
Dice over C classes, or sigmoid BCE + Dice on the 2-channel one-hot of a binary task), the data
formats it reads and the pseudo-label modes it has. `ucseg_fast.recipe.Recipe` builds the
model, stream, objective and evaluation of a configuration from it. The defaults below are the
reference ACDC recipe (docs/method.md §3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    dims: int              # 2: slices / images, 2D subnets; 3: volumes, 3D subnets
    supervision: str       # "softmax" (CE + softmax Dice) | "sigmoid" (BCE + σ Dice, 2 classes)
    formats: tuple[str, ...]
    pseudo_modes: tuple[str, ...]
    summary: str

    @property
    def binary(self) -> bool:
        return self.supervision == "sigmoid"


RECIPES: dict[str, RecipeSpec] = {r.name: r for r in (
    RecipeSpec("multiclass_2d", 2, "softmax", ("ssl4mis", "folder", "nifti"),
               ("fusion", "entropy", "fusion+mask"),
               "C-class 2D slices or images, CE + softmax Dice (the reference's ACDC trainer)"),
    RecipeSpec("binary_2d", 2, "sigmoid", ("ssl4mis", "folder", "nifti"), ("fusion",),
               "binary 2D images, BCE + σ Dice on the 2-channel one-hot, σ(P)[:, 1] > 0.5 "
               "(the reference's 2D-generic trainer)"),
    RecipeSpec("binary_3d", 3, "sigmoid", ("ssl4mis", "nifti"), ("fusion",),
               "binary 3D volumes, random crops, per-axial-slice σ Dice, sliding-window "
               "evaluation (the reference's LA trainer)"),
)}


@dataclass(frozen=True)
class DataConfig:
    # Folder in the SSL4MIS layout (train_slices.list, val.list, [test.list], data/...).
    root: str = "data/ACDC"
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
    # Reference augmentation parameters (docs/method.md §3, albumentations pipeline).
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
    # 3D sliding-window evaluation strides (docs/method.md §4: 18 in x/y, 4 in z)
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
    # CE/BCE + Dice (+ AU) of the labeled terms, the fusion-mode unsupervised terms and phase 2's
    # mixed terms through the fused ops.fusion_loss kernels, and the step's predictions (maps,
    # diff terms, gates) through ops.prediction_stats (same values, fp32): true / false, or
    # "auto" = true on CUDA with Triton, false elsewhere
    fused_losses: bool | str = "auto"


@dataclass(frozen=True)
class ReferenceConfig:
    """Switches that reproduce slips of the authors' code (docs/reference-differences.md). The
    defaults do what the method means; the golden tests use the reference values."""
    # CCP queues: "shared" = one write pointer per subnet across classes (the reference);
    # "per_class" = every class writes its own next slots
    queue_pointer: str = "per_class"
    # 2D queue initialisation: "reference" = randn normalised along the class axis;
    # "feature_norm" = along the feature axis (as the authors' 3D code does)
    queue_init: str = "feature_norm"
    # queue gate: "soft" = the reference's swapped-argument soft Dice; "hard" = hard Dice of the
    # argmax prediction against the ground truth
    queue_gate: str = "hard"


@dataclass(frozen=True)
class TrainConfig:
    max_iterations: int = 50000
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    seed: int = 42
    device: str = "auto"
    # "bf16" autocast on CUDA or "none"; CPU runs fp32 either way. (fp16 would need a loss
    # scaler, which the step does not have.)
    amp: str = "bf16"
    channels_last: bool = True
    # "auto": one CUDA graph per phase on one GPU, torch.compile where a graph cannot be
    # captured (DDP, apex, connected components that sync; the log says which), eager on CPU
    step_mode: str = "auto"
    # torch.compile mode of step_mode = "compile"
    compile_mode: str = "default"
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
    # What is trained (RECIPES): "multiclass_2d", "binary_2d" or "binary_3d"
    recipe: str = "multiclass_2d"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    @property
    def spec(self) -> "RecipeSpec":
        """The recipe's fixed choices (dimensions, supervision, formats): `RECIPES[recipe]`."""
        return RECIPES[self.recipe]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    ("recipe",): tuple(RECIPES),
    ("data", "backend"): ("torch", "dali"),
    ("data", "format"): ("ssl4mis", "folder", "nifti"),
    ("data", "mask_mode"): ("auto", "index", "binary"),
    ("data", "intensity"): ("auto", "minmax", "zscore", "none"),
    ("model", "uncertainty"): ("auto", "torch", "fused"),
    ("model", "upg_head"): ("auto", "torch", "fused"),
    ("loss", "fused_losses"): (True, False, "auto"),
    ("loss", "pseudo_mode"): ("fusion", "entropy", "fusion+mask"),
    ("loss", "schedules"): ("absolute", "proportional"),
    ("reference", "queue_pointer"): ("shared", "per_class"),
    ("reference", "queue_init"): ("reference", "feature_norm"),
    ("reference", "queue_gate"): ("soft", "hard"),
    ("train", "amp"): ("bf16", "none"),
    ("train", "step_mode"): ("auto", "eager", "compile", "graph"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"),
    ("train", "optimizer"): ("foreach", "fused", "apex"),
}
ALLOWED_LABELED = (3, 7, 14, 21, 28, 35, 70, 140)


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
