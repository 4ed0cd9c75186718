"""The UC-Seg trainer: a configuration's `Recipe` builds the parts, this loop runs them.

Per iteration t: batch (augmented on the training device) → one step (`StepCore`: schedules,
forward of both subnets + UPG, all losses, backward, SGD; eager, compiled or a CUDA graph) →
device-side sums of the loss terms (`LogWindow`). Host reads happen only every `log_every`
steps (a `metrics.jsonl` row with throughput and GPU telemetry) and at validation / checkpoint
time. Validation runs the recipe's protocol and keeps `best` (on validation only) and `last`.
A checkpoint is the `RunState` registry of stateful parts (model, optimizer, CCP queues, RNGs,
data-stream position) plus the progress; under torchrun every rank's rank-local state is
gathered (exact multi-process resume). The folder is locked for the run (`run_folder`); a
non-finite loss or weight stops the run with `NonFiniteError` and saves nothing.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config, config_from_dict, diff_configs, phase2_start_at
from ..eval.protocol import mean_dice
from .checkpoint import (LOG_NAME, CheckpointError, atomic_write_text, load_checkpoint, resolve,
                         save_checkpoint)
from .core import StepCore, place
from .distributed import barrier
from .logbook import MetricsLog, NonFiniteError, nonfinite_tensor
from .loop import TrainLoop
from .recipe import Recipe
from .run_folder import open_run_folder
from .state import RunState, load_model_state, rng_part, seed_everything

__all__ = ["NonFiniteError", "Trainer"]

#: data keys that do not change what is trained: a resume may change them
RESUME_FREE_KEYS = ("data.decode_workers", "data.max_image_pixels", "data.resume_changed_data")
#: train keys a resume must keep (the others — cadence, output, progress — may change)
RESUME_TRAIN_KEYS = ("max_iterations", "base_lr", "momentum", "weight_decay", "seed",
                     "optimizer", "amp", "channels_last")


class Trainer:
    """`overwrite`: a fresh `train()` may replace a run that `train.out_dir` already holds
    (its log, config and checkpoints are deleted first); without it such a folder is refused
    (`RunFolderError`). A resumed run (`load`) always continues in its folder.
    `compile_backend`: torch.compile's backend of step_mode "compile" (tests use "aot_eager")."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print,
                 overwrite: bool = False, compile_backend: str = "inductor"):
        self.log, self.overwrite = log, overwrite
        self.device, self.dist = place(cfg.train.device)
        seed_everything(cfg.train.seed)
        self.recipe = Recipe(cfg)
        self.recipe.check(self.device, self.dist.world_size)  # before any data is read
        self.stream = self.recipe.stream(self.device, rank=self.dist.rank,
                                         world_size=self.dist.world_size)
        self.dataset = self.recipe.dataset()
        self.core = core = StepCore(cfg, self.device, dist=self.dist,
                                    compile_backend=compile_backend)
        self.cfg = core.cfg  # "auto" op choices as this device runs them
        self.model, self.train_model, self.objective = core.model, core.train_model, core.objective
        self.scalars, self.optimizer, self.runner = core.scalars, core.optimizer, core.runner
        self.mix_generator, self.memory_format = core.mix_generator, core.memory_format
        self.iteration, self.best_dice, self.best_iteration = 0, -1.0, -1
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(self.cfg.train.out_dir)
        self.metrics = MetricsLog(self.out_dir / LOG_NAME, self.dist.is_main)
        self.val_s, self.last_val_s = 0.0, 0.0  # seconds of validation: all, the latest
        self._val_items = None
        self._wall0 = time.perf_counter()  # reset by train()
        self._resumed_from: Path | None = None   # the checkpoint `load` restored
        self._cut_log_at: int | None = None      # pending: cut metrics.jsonl back (resume)
        self._last_checkpoint: tuple[str, int] | None = None  # newest finite (path, iteration)
        self._source = ""  # the checkpoint being loaded (error messages)
        self.state = self._state_registry()

    def _state_registry(self) -> RunState:
        s = RunState(self.dist, self.device)
        s.add("model", self.model.state_dict,
              lambda t: load_model_state(self.model, t, self._source, prefix=""), layout="tensors")
        s.add("objective", lambda: {k: v.detach().cpu().contiguous()  # sync-ok: checkpoint
                                    for k, v in self.objective.state_dict().items()},
              self.objective.load_state_dict, layout="tensors", rank_local=True)
        s.add("optimizer", self.optimizer.state_dict, self.core.load_optimizer_state,
              tensor_key="optim")
        rng_part(s, self.mix_generator)
        s.add("stream", self.stream.state_dict, self.stream.load_state_dict, rank_local=True)
        return s

    def autocast(self):
        return self.core.autocast()

    def step(self, batch, t: int) -> dict[str, torch.Tensor]:
        """One training iteration on a Batch; returns detached loss terms (device)."""
        return self.core.step(batch, t)

    # ----------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None, *, time_budget_s: float | None = None,
              replan: Callable[["Trainer", float, float], int | None] | None = None
              ) -> dict[str, Any]:
        """Train up to max_iterations (or stop early at `stop_at`, saving `last`; the
        schedules always follow max_iterations). `time_budget_s` (single process): a
        wall-clock budget, validation and checkpoints included — at each log row the run stops
        (validating and saving `last`) when one more log window and one more validation would
        not fit; `replan(trainer, train_s, wall_s)` is asked at each log row until it returns
        a length, which replaces max_iterations (`train.budget`). See `loop.TrainLoop`."""
        if time_budget_s is not None and self.dist.enabled:
            raise ValueError("train(time_budget_s=...) is single-process only (ranks would "
                             "stop at different iterations)")
        fresh = self.iteration == 0 and not self.history and self._resumed_from is None
        lock = open_run_folder(self.out_dir, fresh=fresh, overwrite=self.overwrite,
                               cut_log_at=self._cut_log_at, iteration=self.iteration,
                               config=self.cfg.to_dict(), log=self.log, dist=self.dist,
                               device=self.device)
        self._cut_log_at = None
        try:
            return TrainLoop(self, stop_at, time_budget_s, replan).run(fresh)
        finally:
            if lock is not None:
                lock.release()

    # ----------------------------------------------------------------------------------
    def images_per_step(self) -> int:
        """Images one step trains on, all ranks (the supervised baseline: the labeled ones)."""
        d = self.cfg.data
        return (d.labeled_bs + (d.unlabeled_bs if self.cfg.loss.semi_supervised else 0)
                ) * self.dist.world_size

    def set_max_iterations(self, T: int) -> None:
        """Change the run's length before copy-paste starts (a time-budget run, `train.budget`):
        the configuration (and its config.json), the schedules (they read T) and the switch
        follow; so does `checkpoint_every` when it was the old length."""
        tc = self.cfg.train
        every = T if tc.checkpoint_every == tc.max_iterations else tc.checkpoint_every
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(
            tc, max_iterations=T, checkpoint_every=every))
        if min(T, phase2_start_at(self.cfg), phase2_start_at(cfg)) <= self.iteration:
            raise ValueError(f"max_iterations {T}: the run is at iteration {self.iteration}; "
                             "its length can only change before copy-paste starts")
        self.cfg = self.core.cfg = cfg
        self.scalars.T = T
        self.core.phase2_start = phase2_start_at(cfg)
        if self.dist.is_main:
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))

    def schedule_fields(self, t: int) -> dict[str, Any]:
        """What step t trained with, for the log: lr, consistency weight w, AU λ, queue-gate
        threshold and phase (the supervised baseline: phase 1, and no unlabeled term uses w)."""
        v = self.scalars.values(t)
        return {"lr": v["lr"], "w": v["w"], "au_lambda": v["lam"], "gate_thr": v["thr"],
                "phase": 2 if t >= self.core.phase2_start else 1}

    def skipped_files(self) -> int:
        """Files the data stream skipped (unreadable / oversized manifest entries)."""
        return int(getattr(self.stream, "skipped_files", 0) or 0)

    def last_finite(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint of this run was saved"
        path, it = self._last_checkpoint
        return f"last finite checkpoint {path} (iteration {it})"

    def check_finite(self, before: str) -> None:
        """NonFiniteError unless the weights and the CCP queues are all finite (one host read;
        collective under DDP)."""
        named = [(f"model.{k}", t) for k, t in self.model.named_parameters()]
        named += [(f"model.{k}", t) for k, t in self.model.named_buffers()]
        named += [(f"objective.{k}", t) for k, t in self.objective.named_buffers()]
        what = nonfinite_tensor(named, self.dist)
        if what is not None:
            raise NonFiniteError(f"non-finite weights at iteration {self.iteration} ({what}); "
                                 f"stopped before {before}, nothing saved; {self.last_finite()}")

    # ----------------------------------------------------------------------------------
    def val_volumes(self):
        if self._val_items is None:
            self._val_items = self.recipe.evaluation_items(
                self.dataset, self.cfg.data.val_split, self.cfg.train.max_val_volumes or None)
        return self._val_items

    def predict_fn(self):
        model, fmt = self.model, self.memory_format

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return model.predict(x.contiguous(memory_format=fmt)).float()
        return fn

    def validate(self) -> float:
        """Mean validation Dice with the recipe's protocol; its seconds go to `val_s`."""
        t0 = time.perf_counter()
        self.model.eval()
        try:
            res = self.recipe.evaluate(self.predict_fn(), self.val_volumes(), device=self.device,
                                       batch_size=self.cfg.train.val_batch_size, dice_only=True)
        finally:
            self.model.train()
            self.last_val_s = time.perf_counter() - t0
            self.val_s += self.last_val_s
        return mean_dice(res)

    def wall_fields(self) -> dict[str, float]:
        """`wall_s`: seconds since this run started (its log's clock, resumes included),
        validation and checkpoints included; `val_s`: the validations' part of it."""
        return {"wall_s": time.perf_counter() - self._wall0, "val_s": self.val_s}

    # ----------------------------------------------------------------------------------
    def save(self, tag: str, *, check: bool = True) -> Path:
        """Write `<out_dir>/<tag>` (atomic pair, rank 0 writes). Collective under DDP. Non-finite
        weights are never saved (`check=False`: the caller has just checked)."""
        if check:
            self.check_finite(f"saving {tag}")
        state = self.state.capture()
        path = self.out_dir / f"{tag}.json"
        if state is not None:
            tensors, meta = state
            meta.update(config=self.cfg.to_dict(), iteration=self.iteration,
                        best_val_dice=self.best_dice, best_iteration=self.best_iteration,
                        history=self.history, torch_version=torch.__version__)
            path = save_checkpoint(self.out_dir, tag, tensors, meta)
        barrier(self.dist)
        self._last_checkpoint = (str(path), self.iteration)
        return path

    def load(self, path: str | Path, *, strict_config: bool = True) -> None:
        """Restore a checkpoint for an exact resume (same world size under DDP)."""
        tensors, meta = load_checkpoint(path)
        saved = config_from_dict(meta["config"], source=f"{path} (saved config)")
        diffs = diff_configs(saved, self.cfg) + diff_configs(
            saved, self.cfg, sections=("train",), keys=RESUME_TRAIN_KEYS)
        diffs = [d for d in diffs if d.split(":", 1)[0] not in RESUME_FREE_KEYS]
        if diffs and strict_config:
            raise CheckpointError(f"{path}: checkpoint was trained with a different config: "
                                  + "; ".join(diffs))
        self._source = str(path)
        self.state.restore(tensors, meta, str(path))
        self._resumed_from = resolve(path)
        self.runner.reset()  # graphs baked in the old optimizer-state tensors
        self.iteration = int(meta["iteration"])
        self.best_dice = float(meta["best_val_dice"])
        self.best_iteration = int(meta["best_iteration"])
        self.history = list(meta["history"])
        # train() (holding the folder's lock) cuts metrics.jsonl back to this iteration
        self._cut_log_at = self.iteration
        self._last_checkpoint = (str(self._resumed_from), self.iteration)
