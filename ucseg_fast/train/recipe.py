"""The recipe of a configuration: one object that checks a whole run before anything is read,
then builds what the run is made of.

`Config.recipe` names the recipe (`config.RECIPES`: "multiclass_2d", "binary_2d",
"binary_3d"); its `RecipeSpec` fixes the dimensionality, the supervision (softmax or
sigmoid), the formats and the pseudo-label modes, and `config.rules` has already checked the
keys against it. `Recipe` adds what needs the device or the data folder and builds:
- `check(device, world_size)`: the rules that depend on where the run happens (CUDA-graph
  capture, the fused ops' availability) and on the data folder's first image (a colour folder
  needs `model.in_channels = 3`) -- before the stream reads anything; `ConfigError` otherwise;
- `model(device)`, `objective(device)`, `schedules(device)`, `stream(...)`,
  `dataset()`, `memory_format()`;
- the evaluation protocol: `evaluation_items`, `evaluate` (argmax, or σ(P)[:, 1] > 0.5 for a
  binary recipe: `eval.protocol`).

The trainer, `eval` / `predict`, `bench` and `curves` build through it, so a 2D / 3D or
softmax / sigmoid decision is taken in one place: the spec.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import Config, ConfigError, RecipeSpec, apply_overrides


def resolve_ops(cfg: Config, device: torch.device) -> Config:
    """`cfg` with every "auto" op choice resolved for `device`: the fused ops (evidential
    uncertainty, UPG head, losses and predictions) on CUDA when Triton is importable, the
    PyTorch modules elsewhere. An explicit choice is kept."""
    from ..ops._triton_utils import HAS_TRITON
    fast = device.type == "cuda" and HAS_TRITON
    m, lo = cfg.model, cfg.loss
    ov = []
    if m.uncertainty == "auto":
        ov.append(f"--model.uncertainty={'fused' if fast else 'torch'}")
    if m.upg_head == "auto":
        ov.append(f"--model.upg_head={'fused' if fast else 'torch'}")
    if lo.fused_losses == "auto":
        ov.append(f"--loss.fused_losses={'true' if fast else 'false'}")
    return apply_overrides(cfg, ov) if ov else cfg


class Recipe:
    """What `cfg` trains and how it is scored (see the module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.spec: RecipeSpec = cfg.spec
        self._dataset: Any = None

    @property
    def dims(self) -> int:
        return self.spec.dims

    # -- checks that need the device or the data folder ------------------------------------
    def check(self, device: torch.device, world_size: int = 1, *,
              step_mode: str | None = None, data: bool = True) -> None:
        """ConfigError unless this configuration can run on `device` with `world_size`
        processes: a CUDA-graph step it cannot capture, fused ops without Triton, a colour
        image folder trained with one input channel. Reads no training data (a folder's first
        image header at most; `data=False`: none)."""
        cfg = self.cfg
        tc, lo, m = cfg.train, cfg.loss, cfg.model
        from .step import check_graph_capturable, resolve_step_mode
        mode, _ = resolve_step_mode(step_mode or tc.step_mode, nms=lo.nms, device=device,
                                    world_size=world_size, optimizer=tc.optimizer)
        if mode == "graph":
            check_graph_capturable(nms=lo.nms, device=device, world_size=world_size,
                                   optimizer=tc.optimizer)
        elif mode == "compile" and tc.compile_mode in ("reduce-overhead", "max-autotune"):
            check_graph_capturable(nms=lo.nms, device=device, world_size=world_size,
                                   optimizer=tc.optimizer, compile_mode=tc.compile_mode)
        fused = [k for k, v in (("model.uncertainty", m.uncertainty),
                                ("model.upg_head", m.upg_head)) if v == "fused"]
        if lo.fused_losses is True:
            fused.append("loss.fused_losses")
        if fused:
            from ..ops._triton_utils import HAS_TRITON
            if not HAS_TRITON:
                raise ConfigError(f"{', '.join(fused)}: the fused ops need Triton, which is not "
                                  "importable (pip install triton, or set them to 'auto')")
        if data and cfg.data.format == "folder":
            self._check_folder_channels()

    def _check_folder_channels(self) -> None:
        d, m = self.cfg.data, self.cfg.model
        channels = self.dataset().channels  # lists the folder, reads one image header
        if channels == 3 and m.in_channels != 3:
            raise ConfigError(f"{d.root}: colour image folder, but model.in_channels = "
                              f"{m.in_channels}; set model.in_channels = 3")

    # -- builders ---------------------------------------------------------------------------
    def model(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The UC-Seg pair: UNet-2D + VNet-2D (+ 2D UPG) or UNet-3D + VNet-3D (+ 3D UPG).
        "auto" op choices are resolved for `device` (default: CUDA when available)."""
        from ..models import build_ucseg_2d, build_ucseg_3d
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        cfg = resolve_ops(self.cfg, dev)
        m, d = cfg.model, cfg.data
        common = dict(num_classes=d.num_classes, in_channels=m.in_channels,
                      img_size=tuple(d.img_size), patch_size=m.patch_size,
                      head_impl=m.upg_head)
        if self.dims == 3:  # the 3D UNet has the reference's fixed dropout 0.3
            model = build_ucseg_3d(**common)
        else:
            model = build_ucseg_2d(**common, unet_dropout=tuple(m.unet_dropout))
        if m.uncertainty == "fused":
            from ..ops import evidential_uncertainty
            model.uncertainty_fn = evidential_uncertainty
            # both fused: u is written as patch tokens and the head reads A's tokens
            model.fused_tokens = m.upg_head == "fused"
        return model

    def objective(self, device: torch.device | str = "cpu"):
        from .objective import UCSegObjective
        return UCSegObjective.from_config(resolve_ops(self.cfg, torch.device(device))
                                          ).to(device)

    def schedules(self, device: torch.device | str = "cpu"):
        from .schedules import ScheduleTensors
        return ScheduleTensors.from_config(self.cfg, device)

    def memory_format(self, channels_last: bool | None = None) -> torch.memory_format:
        """channels-last (NHWC) for 2D, channels-last-3d (NDHWC) for 3D when
        `train.channels_last` (or `channels_last`) is on; contiguous otherwise."""
        on = self.cfg.train.channels_last if channels_last is None else channels_last
        if not on:
            return torch.contiguous_format
        return torch.channels_last_3d if self.dims == 3 else torch.channels_last

    def stream(self, device: torch.device, *, seed: int | None = None, rank: int = 0,
               world_size: int = 1):
        """The training stream of `[data]` (torch or DALI backend, any format, optional
        unlabeled manifest), sharded for `rank` of `world_size`."""
        from ..data.factory import build_train_stream
        return build_train_stream(self.cfg.data, device=device,
                                  seed=self.cfg.train.seed if seed is None else seed,
                                  rank=rank, world_size=world_size,
                                  channels=self.cfg.model.in_channels, dims=self.dims,
                                  dataset=self.dataset())

    def dataset(self) -> Any:
        """The dataset of `[data]` (lists read and checked, nothing decoded), opened once and
        shared by the checks, the training stream and validation."""
        if self._dataset is None:
            from ..eval.protocol import open_dataset
            self._dataset = open_dataset(self.cfg)
        return self._dataset

    # -- evaluation protocol ----------------------------------------------------------------
    def evaluation_items(self, dataset: Any, split: str = "val", limit: int | None = None):
        from ..eval.protocol import evaluation_items
        return evaluation_items(self.cfg, dataset, split, limit)

    def evaluate(self, predict_fn, items, **kw):
        from ..eval.protocol import evaluate
        return evaluate(self.cfg, predict_fn, items, **kw)


def build_model(cfg: Config, device: torch.device | str | None = None) -> torch.nn.Module:
    """`Recipe(cfg).model(device)`: the UC-Seg pair of a configuration (training, evaluation
    and prediction)."""
    return Recipe(cfg).model(device)
