"""The UC-Seg trainer: one class, every variant a config value (DESIGN.md §4).

Per iteration t (0-based): schedules → batch (augmented on the training device) → one step
(forward of both subnets + UPG, all losses, backward, SGD) → device-side accumulation of the
loss terms. Host reads happen only every `log_every` steps (JSONL log, progress bar) and at
validation / checkpoint time. Validation runs the reference's slice-wise protocol on the
`val.list` volumes (Dice, classes 1..C-1) and keeps `best` (on validation only) and `last`.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import Config, config_from_dict, diff_configs
from ..data import SSL4MISDataset, TrainStream
from ..data.ssl4mis import slices_of_first_patients
from ..eval import evaluate_volumes
from ..models import build_ucseg_2d
from .checkpoint import CheckpointError, join_state, load_checkpoint, save_checkpoint, split_state
from .objective import UCSegObjective
from .schedules import ScheduleTensors


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {name!r} but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        tc, dc, lc = cfg.train, cfg.data, cfg.loss
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp) \
            if self.device.type == "cuda" else None
        if tc.amp == "fp16" and self.device.type == "cuda":
            raise ValueError("train.amp = 'fp16' needs a GradScaler, which this trainer does "
                             "not use; choose 'bf16' or 'none'")
        if tc.step_mode != "eager":
            warnings.warn(f"train.step_mode = {tc.step_mode!r} is not implemented yet; "
                          "running eager steps", stacklevel=2)

        self.dataset = SSL4MISDataset(dc.root)
        # Labeled = the slices of the first k patients of train_slices.list (on the full SSL4MIS
        # list: 3->68, 7->136, 14->256, ... slices, the reference's table).
        n_l = slices_of_first_patients(self.dataset.train_slices, dc.labeled_patients)
        if n_l >= len(self.dataset.train_slices):
            raise ValueError(f"{dc.root}: train_slices.list has {len(self.dataset.train_slices)} "
                             f"slices, not more than the {n_l} labeled ones of "
                             f"{dc.labeled_patients} patients: no unlabeled data")
        aug = dict(hflip_p=dc.hflip_p, vflip_p=dc.vflip_p, ssr_p=dc.ssr_p,
                   shift_limit=dc.shift_limit, scale_limit=dc.scale_limit,
                   rotate_limit=dc.rotate_limit, distort_p=dc.distort_p, dropout_p=dc.dropout_p)
        if not dc.augment:
            aug.update(hflip_p=0.0, vflip_p=0.0, ssr_p=0.0, distort_p=0.0, dropout_p=0.0)
        self.stream = TrainStream(self.dataset, n_labeled=n_l, labeled_bs=dc.labeled_bs,
                                  unlabeled_bs=dc.unlabeled_bs, seed=tc.seed, device=self.device,
                                  img_size=tuple(dc.img_size), augment=aug)

        self.model = build_ucseg_2d(num_classes=dc.num_classes, in_channels=cfg.model.in_channels,
                                    img_size=tuple(dc.img_size), patch_size=cfg.model.patch_size,
                                    unet_dropout=tuple(cfg.model.unet_dropout))
        if cfg.model.uncertainty == "fused":
            from ..ops import evidential_uncertainty
            self.model.uncertainty_fn = evidential_uncertainty
        self.model.to(self.device)
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.objective = UCSegObjective(
            dc.num_classes, pseudo_mode=lc.pseudo_mode, nms=lc.nms,
            embed_c_factor=lc.embed_c_factor, embed_p_factor=lc.embed_p_factor, ccp=lc.ccp,
            queue_size=lc.queue_size, contrast_temperature=lc.contrast_temperature,
            queue_pointer=lc.queue_pointer, queue_init=lc.queue_init,
            queue_gate=lc.queue_gate).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=tc.base_lr,
                                         momentum=tc.momentum, weight_decay=tc.weight_decay,
                                         foreach=True)
        self.mix_generator = torch.Generator(device=self.device)
        self.mix_generator.manual_seed(tc.seed + 7)
        self.scalars = ScheduleTensors(
            self.device, base_lr=tc.base_lr, T=tc.max_iterations, consistency=lc.consistency,
            rampup=lc.consistency_rampup, unsup_factor=lc.unsup_factor,
            epoch_len=lc.rampup_epoch_len, thr_base=lc.gate_base, thr_span=lc.gate_span,
            confidence_threshold=lc.confidence_threshold)
        self.iteration = 0
        self.best_dice = -1.0
        self.best_iteration = -1
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(tc.out_dir)
        self._val_volumes = None

    # ----------------------------------------------------------------------------------
    def _update_scalars(self, t: int) -> None:
        self.scalars.update(t)  # in place: a captured graph reads the new values
        lr = self.scalars.values(t)["lr"]
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batch, t: int) -> dict[str, torch.Tensor]:
        """One training iteration on a Batch; returns detached loss terms (device)."""
        self._update_scalars(t)
        x = torch.cat([batch.x_l, batch.x_u], 0).contiguous(memory_format=self.memory_format)
        phase2 = t >= self.cfg.loss.phase2_start
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, terms = self.objective(self.model, x, batch.y_l, self.scalars, phase2,
                                         generator=self.mix_generator)
        loss.backward()
        self.optimizer.step()
        return terms

    # ----------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train up to max_iterations (or stop early at `stop_at`, saving `last`, e.g. to
        split a run across jobs; the schedules always follow max_iterations)."""
        tc = self.cfg.train
        T = tc.max_iterations
        stop = T if stop_at is None else min(stop_at, T)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        log_path = self.out_dir / "metrics.jsonl"
        acc: dict[str, torch.Tensor] = {}
        n_acc = 0
        t_last, it_last = time.perf_counter(), self.iteration
        bar = None
        if tc.progress:
            from tqdm import tqdm
            bar = tqdm(total=T, initial=self.iteration, desc=self.cfg.name, unit="it",
                       dynamic_ncols=True, mininterval=1.0)
        self.log(f"training {self.cfg.name} on {self.device} from iteration {self.iteration} "
                 f"to {T}; data {self.cfg.data.root}; output {self.out_dir}")
        if self.iteration == 0 and not self.history:
            log_path.write_text("")  # a fresh run starts a fresh log (a resumed one appends)
            # the untrained model's score: the baseline every later validation is compared to
            start = self.validate()
            self.history.append({"iteration": 0, "val_dice": start})
            with open(log_path, "a") as f:
                f.write(json.dumps({"iteration": 0, "val_dice": start}) + "\n")
            t_last = time.perf_counter()
        while self.iteration < stop:
            t = self.iteration
            batch = self.stream.next()
            terms = self.step(batch, t)
            for k, v in terms.items():
                acc[k] = acc[k] + v.float() if k in acc else v.float().clone()
            n_acc += 1
            self.iteration = t + 1
            if bar is not None:
                bar.update(1)
            done = self.iteration == T
            halt = self.iteration == stop
            if self.iteration % tc.log_every == 0 or halt:
                keys = sorted(acc)
                vals = (torch.stack([acc[k] for k in keys]) / n_acc).tolist()  # sync-ok: log time
                now = time.perf_counter()
                ips = (self.iteration - it_last) / max(now - t_last, 1e-9)
                rec = {"iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"],
                       "it_per_s": ips, "img_per_s": ips * (self.cfg.data.labeled_bs +
                                                            self.cfg.data.unlabeled_bs),
                       "step_ms": 1000.0 / ips if ips > 0 else math.nan,
                       **dict(zip(keys, vals))}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['L']:.3f}", refresh=False)
                acc, n_acc = {}, 0
                t_last, it_last = now, self.iteration
            if self.iteration % tc.val_every == 0 or done:
                dice = self.validate()
                rec = {"iteration": self.iteration, "val_dice": dice}
                self.history.append(rec)
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if dice > self.best_dice:
                    self.best_dice, self.best_iteration = dice, self.iteration
                    self.save("best")
                self.log(f"iteration {self.iteration}: val Dice {dice:.4f} "
                         f"(best {self.best_dice:.4f} at {self.best_iteration})")
            if self.iteration % tc.checkpoint_every == 0 or halt:
                self.save("last")
            if self.iteration % tc.val_every == 0 or self.iteration % tc.checkpoint_every == 0:
                t_last = time.perf_counter()  # keep validation / saving out of step_ms
        if bar is not None:
            bar.close()
        return {"iterations": self.iteration, "best_val_dice": self.best_dice,
                "best_iteration": self.best_iteration, "history": self.history,
                "out_dir": str(self.out_dir)}

    # ----------------------------------------------------------------------------------
    def val_volumes(self):
        if self._val_volumes is None:
            names = self.dataset.volumes("val")
            if self.cfg.train.max_val_volumes:
                names = names[: self.cfg.train.max_val_volumes]
            self._val_volumes = [(n, *self.dataset.read_volume(n)) for n in names]
        return self._val_volumes

    def predict_fn(self):
        model = self.model

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return model.predict(x.contiguous(memory_format=self.memory_format)).float()
        return fn

    def validate(self) -> float:
        """Mean validation Dice (classes 1..C-1, then volumes), the reference's protocol."""
        self.model.eval()
        try:
            res = evaluate_volumes(self.predict_fn(), self.val_volumes(), self.cfg.data.num_classes,
                                   img_size=tuple(self.cfg.data.img_size),
                                   batch_size=self.cfg.train.val_batch_size,
                                   device=self.device, dice_only=True)
        finally:
            self.model.train()
        return float(res.mean()["dice"])

    # ----------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        for k, v in self.objective.state_dict().items():
            tensors[f"objective.{k}"] = v
        opt = self.optimizer.state_dict()
        opt_meta = split_state(opt, "optim", tensors)
        rng = {"cpu": torch.get_rng_state(), "mix": self.mix_generator.get_state(),
               "python": random.getstate(), "numpy": np.random.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng_meta = split_state({k: v for k, v in rng.items() if k not in ("python", "numpy")},
                               "rng", tensors)
        stream_meta = split_state(self.stream.state_dict(), "stream", tensors)
        meta = {"config": self.cfg.to_dict(), "iteration": self.iteration,
                "best_val_dice": self.best_dice, "best_iteration": self.best_iteration,
                "history": self.history, "optimizer": opt_meta, "rng": rng_meta,
                "python_rng": _py_state(random.getstate()),
                "numpy_rng": _np_state(np.random.get_state()), "stream": stream_meta,
                "torch_version": torch.__version__}
        return tensors, meta

    def save(self, tag: str) -> Path:
        tensors, meta = self.state_tensors()
        return save_checkpoint(self.out_dir, tag, tensors, meta)

    def load(self, path: str | Path, *, strict_config: bool = True) -> None:
        """Restore a checkpoint for an exact resume."""
        tensors, meta = load_checkpoint(path)
        saved = config_from_dict(meta["config"], source=f"{path} (saved config)")
        diffs = diff_configs(saved, self.cfg)
        if diffs and strict_config:
            raise CheckpointError(f"{path}: checkpoint was trained with a different config: "
                                  + "; ".join(diffs))
        load_model_state(self.model, tensors, str(path))
        obj = {k[len("objective."):]: v for k, v in tensors.items() if k.startswith("objective.")}
        self.objective.load_state_dict(obj)
        self.optimizer.load_state_dict(_to_device(join_state(meta["optimizer"], tensors), self.device))
        rng = join_state(meta["rng"], tensors)
        torch.set_rng_state(rng["cpu"])
        self.mix_generator.set_state(rng["mix"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_py_state_back(meta["python_rng"]))
        np.random.set_state(_np_state_back(meta["numpy_rng"]))
        self.stream.load_state_dict(join_state(meta["stream"], tensors))
        self.iteration = int(meta["iteration"])
        self.best_dice = float(meta["best_val_dice"])
        self.best_iteration = int(meta["best_iteration"])
        self.history = list(meta["history"])


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{source}: no model tensors in checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: model does not match the checkpoint "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            if k == "state":  # optimizer per-param state: move tensors to the device
                out[k] = {int(pk): {n: (t.to(device) if isinstance(t, torch.Tensor) and t.dim() > 0
                                        else t) for n, t in pv.items()} for pk, pv in v.items()}
            else:
                out[k] = _to_device(v, device)
        return out
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_back(s):
    return (s[0], tuple(s[1]), s[2])


def _np_state(s):
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def _np_state_back(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])
