"""The UC-Seg trainer: one class, every variant a config value (DESIGN.md §4).

Per iteration t (0-based): schedules → batch (augmented on the training device) → one step
(forward of both subnets + UPG, all losses, backward, SGD; run by `StepRunner` eagerly, under
torch.compile or as a captured CUDA graph: `train.step_mode`) → device-side accumulation of the
loss terms. Host reads happen only every `log_every` steps (JSONL log with GPU telemetry,
progress bar) and at validation / checkpoint time. Validation runs the reference's slice-wise
protocol on the `val.list` volumes (Dice, classes 1..C-1) and keeps `best` (on validation only)
and `last`. Under torchrun the model is DDP-wrapped (see `train.distributed`): per-rank data and
CCP queues, terms all-reduced at log time, validation / log on rank 0; checkpoints gather
every rank's rank-local state to rank 0, which writes one pair (exact multi-process resume).

Run safety (`train`): the output folder is locked for the run (`RunLock`, one writer per
folder); a fresh run refuses a folder that holds a run (`RunFolderError`) unless
`overwrite=True` (then that run's files are removed first); orphans of interrupted saves are
removed at the start; a resumed run first cuts `metrics.jsonl` back to the checkpoint. A
non-finite loss (seen in the log window's sums, no per-step read) or non-finite weights
(checked before every validation and save) stop the run with `NonFiniteError`: no checkpoint
is ever written from non-finite weights.
"""
from __future__ import annotations

import dataclasses
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

from ..config import Config, config_from_dict, diff_configs, phase2_start_at
from ..data.factory import build_train_stream
from ..eval.protocol import (evaluate, evaluation_items, mean_dice, open_dataset,
                             selection_warning)
from ..models import build_ucseg_2d, build_ucseg_3d
from .checkpoint import (LOG_NAME, CheckpointError, RunFolderError, RunLock, atomic_write_text,
                         join_state, load_checkpoint, remove_orphans, remove_run, resolve,
                         run_in_folder, save_checkpoint, split_state, truncate_log)
from .objective import UCSegObjective
from .distributed import (DistInfo, all_reduce_mean, barrier, broadcast_flag,
                          gather_to_main, init_from_env)
from .schedules import ScheduleTensors
from .step import (StepRunner, apex_fused_sgd, check_graph_capturable, foreach_sgd_step,
                   resolve_step_mode)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {name!r} but CUDA is not available")
    return dev


#: data keys that do not change what is trained: a resume may change them
RESUME_FREE_KEYS = ("data.decode_workers", "data.max_image_pixels", "data.resume_changed_data")


class NonFiniteError(RuntimeError):
    """The loss or the weights became non-finite (NaN / inf); the run stopped without saving."""


def _fmt_value(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """`overwrite`: a fresh `train()` may replace a run that `train.out_dir` already holds
    (its log, config and checkpoints are deleted first); without it such a folder is refused
    (`RunFolderError`). A resumed run (`load`) always continues in its folder."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print,
                 overwrite: bool = False):
        self.cfg = cfg
        self.log = log
        self.overwrite = overwrite
        tc, dc = cfg.train, cfg.data
        self.device = resolve_device(tc.device)
        self.dist: DistInfo = init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cuda":
            # the current device is what graph capture, the default generator and NCCL use
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        seed_everything(tc.seed)
        if tc.amp == "fp16" and self.device.type == "cuda":
            raise ValueError("train.amp = 'fp16' needs a GradScaler, which this trainer does "
                             "not use; choose 'bf16' or 'none'")
        cfg = resolve_config(cfg, self.device)  # "auto" choices as this device runs them
        self.cfg = cfg

        # The stream (torch or DALI backend; SSL4MIS or image-folder format; optional unlabeled
        # manifest) and the validation data come from the [data] section alone.
        self.stream = build_train_stream(dc, device=self.device, seed=tc.seed,
                                         rank=self.dist.rank, world_size=self.dist.world_size,
                                         channels=cfg.model.in_channels)
        self.dataset = open_dataset(cfg)
        if dc.format == "folder" and self.dataset.channels == 3 and cfg.model.in_channels != 3:
            raise ValueError(f"{dc.root}: colour image folder, but model.in_channels = "
                             f"{cfg.model.in_channels}; set model.in_channels = 3")

        core = build_step_core(cfg, self.device, dist=self.dist)
        self.core = core
        self.model, self.train_model = core.model, core.train_model
        self.memory_format, self.amp_dtype = core.memory_format, core.amp_dtype
        self.objective, self.scalars = core.objective, core.scalars
        self.optimizer, self.mix_generator, self.runner = (core.optimizer, core.mix_generator,
                                                           core.runner)
        self.iteration = 0
        self.best_dice = -1.0
        self.best_iteration = -1
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(tc.out_dir)
        self._val_volumes = None
        self.val_s, self.last_val_s = 0.0, 0.0  # seconds of validation: all, the latest
        self._wall0 = time.perf_counter()  # reset by train()
        self._resumed_from: Path | None = None   # the checkpoint `load` restored
        self._cut_log_at: int | None = None      # pending: cut metrics.jsonl back (resume)
        # (path, iteration) of the newest checkpoint known finite: written by this run or loaded
        self._last_checkpoint: tuple[str, int] | None = None

    def autocast(self):
        return self.core.autocast()

    def step(self, batch, t: int) -> dict[str, torch.Tensor]:
        """One training iteration on a Batch; returns detached loss terms (device)."""
        return self.core.step(batch, t)

    # ----------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None, *, time_budget_s: float | None = None,
              replan: Callable[["Trainer", float, float], int | None] | None = None
              ) -> dict[str, Any]:
        """Train up to max_iterations (or stop early at `stop_at`, saving `last`, e.g. to
        split a run across jobs; the schedules always follow max_iterations).

        `time_budget_s` (single process): a wall-clock budget for this call, validation and
        checkpoints included: at each log row the run stops (validating and saving `last`)
        when one more log window and one more validation would not fit. `train.budget` plans
        `max_iterations` so that the run fills its budget. Validation records carry `train_s`
        (step time only), `wall_s` (since the start, validation included) and `val_s` (the
        validations' share of it). `replan(trainer, train_s, wall_s)`, with a budget: asked at
        each log row until it returns a length, which then replaces max_iterations
        (`set_max_iterations`; `train.budget` measures the run's own steps once)."""
        tc = self.cfg.train
        T = tc.max_iterations
        stop = T if stop_at is None else min(stop_at, T)
        if time_budget_s is not None and self.dist.enabled:
            raise ValueError("train(time_budget_s=...) is single-process only (ranks would "
                             "stop at different iterations)")
        main = self.dist.is_main
        log_path = self.out_dir / LOG_NAME
        fresh = self.iteration == 0 and not self.history and self._resumed_from is None
        lock = self._open_run_folder(fresh)  # collective under DDP; rank 0 holds the lock
        try:
            return self._train(T, stop, fresh, log_path, time_budget_s, replan)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, T: int, stop: int, fresh: bool, log_path: Path,
               time_budget_s: float | None, replan=None) -> dict[str, Any]:
        tc = self.cfg.train
        main = self.dist.is_main
        acc: dict[str, torch.Tensor] = {}
        n_key: dict[str, int] = {}
        n_acc = 0
        data_wait = 0.0
        bar = None
        if tc.progress and main:
            from tqdm import tqdm
            bar = tqdm(total=T, initial=self.iteration, desc=self.cfg.name, unit="it",
                       dynamic_ncols=True, mininterval=1.0)
        from ..telemetry import GpuSampler, throughput_fields
        gpu = GpuSampler(self.device.index or 0 if self.device.type == "cuda" else None).start()
        if main:
            m, lo = self.cfg.model, self.cfg.loss
            self.log(f"training {self.cfg.name} on {self.device} ({self.core.step_mode_reason}; "
                     f"uncertainty {m.uncertainty}, UPG head {m.upg_head}, fused losses "
                     f"{lo.fused_losses}; world size {self.dist.world_size}) from iteration "
                     f"{self.iteration} to {T}; {self._method_line()}; data "
                     f"{self.cfg.data.root}; output {self.out_dir}")
            warning = selection_warning(self.cfg)
            if warning:  # loudly: at the start, and in the summary
                self.log(warning)
        self._wall0 = time.perf_counter()
        if self.history:  # a resumed run continues the clock of its log
            self._wall0 -= float(self.history[-1].get("wall_s", 0.0))
            self.val_s = float(self.history[-1].get("val_s", 0.0))
        if fresh and main:
            log_path.write_text("")  # a fresh run starts a fresh log (a resumed one appends)
            # the untrained model's score: the baseline every later validation is compared to
            start = self.validate()
            rec0 = {"iteration": 0, "val_dice": start, "train_s": 0.0, **self.wall_fields(),
                    "skipped_files": self.skipped_files()}
            self.history.append(rec0)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec0) + "\n")
        train_s = float(self.history[-1].get("train_s", 0.0)) if self.history else 0.0
        t_last, it_last = time.perf_counter(), self.iteration
        win_s = 0.0  # training seconds of the current log window (bookkeeping excluded)
        try:
            while self.iteration < stop:
                t = self.iteration
                t0 = time.perf_counter()
                batch = self.stream.next()
                data_wait += time.perf_counter() - t0
                terms = self.step(batch, t)
                accumulate_terms(acc, terms, n_key)
                n_acc += 1
                self.iteration = t + 1
                if bar is not None:
                    bar.update(1)
                done = self.iteration == T
                halt = self.iteration == stop
                if time_budget_s is not None and self.iteration % tc.log_every == 0:
                    # sync-ok: once per log window, so the budget counts finished GPU work
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    # stop now unless one more log window of steps and the final validation
                    # still fit (the mean step time so far, validation excluded)
                    per_step = (train_s + now - t_last) / max(1, self.iteration)
                    if (now - self._wall0 + per_step * tc.log_every + self.last_val_s
                            >= time_budget_s):
                        halt = True
                    elif replan is not None:
                        new_T = replan(self, train_s + now - t_last, now - self._wall0)
                        if new_T is not None:  # once: the run's length from its own steps
                            replan = None
                            self.set_max_iterations(new_T)
                            T = stop = new_T
                            tc = self.cfg.train
                            done, halt = self.iteration >= T, self.iteration >= T
                            if bar is not None:
                                bar.total = T
                if self.iteration % tc.log_every == 0 or halt or done:
                    keys, means = window_means(acc, n_key)
                    vals_t = all_reduce_mean(means, self.dist)
                    vals = vals_t.tolist()  # sync-ok: log time
                    now = time.perf_counter()
                    train_s += now - t_last
                    win_s += now - t_last
                    rec = {"iteration": self.iteration, **self.schedule_fields(self.iteration - 1),
                           **throughput_fields(self.iteration - it_last,
                                               self.images_per_step(),
                                               win_s, data_wait, gpu.window()),
                           **dict(zip(keys, vals)), "skipped_files": self.skipped_files()}
                    bad = _first_nonfinite(keys, vals)
                    if bad is not None:  # the row says so (null values), then the run stops
                        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                               for k, v in rec.items()}
                        rec["nonfinite"] = bad[0]
                    if main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    if bad is not None:
                        raise NonFiniteError(self._loss_message(it_last, bad))
                    if bar is not None:
                        post = {"loss": f"{rec['L']:.3f}", "img/s": f"{rec['img_per_s']:.1f}",
                                "ms": f"{rec['step_ms']:.1f}"}
                        if "gpu_util" in rec:
                            post["gpu"] = f"{rec['gpu_util']:.0f}%"
                        bar.set_postfix(post, refresh=False)
                    acc, n_key, n_acc, data_wait = {}, {}, 0, 0.0
                    t_last, it_last, win_s = now, self.iteration, 0.0
                val_now = (self.iteration % tc.val_every == 0 or done or
                           (halt and time_budget_s is not None))
                improved = False
                if val_now or self.iteration % tc.checkpoint_every == 0:
                    if self.device.type == "cuda":  # sync-ok: before validation / saving anyway
                        torch.cuda.synchronize(self.device)
                t_book = time.perf_counter()
                if val_now or self.iteration % tc.checkpoint_every == 0 or halt:
                    # nothing is validated or saved unchecked: the steps since the last log row
                    # (their window sums) and the weights must be finite
                    if n_acc:
                        keys, means = window_means(acc, n_key)
                        vals = all_reduce_mean(means, self.dist).tolist()  # sync-ok: save time
                        bad = _first_nonfinite(keys, vals)
                        if bad is not None:
                            raise NonFiniteError(self._loss_message(it_last, bad))
                    self.check_finite("validation" if val_now else "saving last")
                if main and val_now:
                    dice = self.validate()
                    rec = {"iteration": self.iteration, "val_dice": dice,
                           "train_s": train_s + t_book - t_last, **self.wall_fields(),
                           "skipped_files": self.skipped_files()}
                    self.history.append(rec)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if dice > self.best_dice:
                        self.best_dice, self.best_iteration = dice, self.iteration
                        improved = True
                    self.log(f"iteration {self.iteration}: val Dice {dice:.4f} "
                             f"(best {self.best_dice:.4f} at {self.best_iteration})")
                # saves are collective: every rank's rank-local state goes into the checkpoint
                if val_now and broadcast_flag(improved, self.dist, self.device):
                    self.save("best", check=False)  # checked above, before validation
                if self.iteration % tc.checkpoint_every == 0 or halt:
                    self.save("last", check=False)
                if val_now or self.iteration % tc.checkpoint_every == 0:
                    # keep validation / saving out of step_ms and train_s: credit the steps
                    # since the last log up to the start of this bookkeeping, then restart
                    train_s += t_book - t_last
                    win_s += t_book - t_last
                    t_last = time.perf_counter()
                if halt:
                    break
        finally:
            gpu.stop()
            if bar is not None:
                bar.close()
        wall = self.wall_fields()
        return {"iterations": self.iteration, "best_val_dice": self.best_dice,
                "best_iteration": self.best_iteration, "history": self.history,
                "out_dir": str(self.out_dir), "train_s": train_s, **wall,
                "val_share": wall["val_s"] / wall["wall_s"] if wall["wall_s"] > 0 else 0.0,
                **({"selection_warning": w} if (w := selection_warning(self.cfg)) else {}),
                "skipped_files": self.skipped_files()}

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
        self.cfg = cfg
        self.core.cfg = self.cfg
        self.scalars.T = T
        self.core.phase2_start = phase2_start_at(self.cfg)
        if self.dist.is_main:
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=1))

    def _method_line(self) -> str:
        lo, T = self.cfg.loss, self.cfg.train.max_iterations
        if not lo.semi_supervised:
            return "supervised baseline (labeled images only, no unlabeled term)"
        full = self.scalars.full_weight_at()
        if full <= T:
            ramp = f"consistency weight full from iteration {full}"
        else:  # absolute schedules in a short run: say how little of the method it trains
            share = self.scalars.values(T - 1)["w"] / self.scalars.values(full)["w"]
            ramp = (f"consistency weight full from iteration {full}, after the run: at most "
                    f"{100 * share:.1f} % of it here (loss.schedules = 'proportional' scales "
                    f"the schedules to the run)")
        cp = self.core.phase2_start
        return f"{lo.schedules} schedules ({ramp}, copy-paste from {cp if cp < T else 'never'})"

    def schedule_fields(self, t: int) -> dict[str, Any]:
        """What step t trained with, for the log: lr, consistency weight w, AU λ, queue-gate
        threshold and phase (the supervised baseline: phase 1, and no unlabeled term uses w)."""
        v = self.scalars.values(t)
        return {"lr": v["lr"], "w": v["w"], "au_lambda": v["lam"], "gate_thr": v["thr"],
                "phase": 2 if t >= self.core.phase2_start else 1}

    def skipped_files(self) -> int:
        """Files the data stream skipped (unreadable / oversized manifest entries)."""
        return int(getattr(self.stream, "skipped_files", 0) or 0)

    def _open_run_folder(self, fresh: bool) -> RunLock | None:
        """Rank 0: take the folder's lock and prepare the folder (`_prepare_folder`); every
        rank learns whether that worked (collective under DDP). Returns the held lock."""
        err: BaseException | None = None
        lock = None
        if self.dist.is_main:
            try:
                lock = RunLock(self.out_dir)
                warning = lock.acquire()
                if warning:
                    self.log(warning)
                try:
                    self._prepare_folder(fresh)
                except BaseException:
                    lock.release()
                    raise
            except Exception as e:  # re-raised below, once the other ranks know
                err = e
        if self.dist.enabled and not broadcast_flag(err is None, self.dist, self.device) \
                and err is None:
            raise RunFolderError(f"{self.out_dir}: rank 0 could not start the run in this "
                                 "folder (its error says why)")
        if err is not None:
            raise err
        return lock

    def _prepare_folder(self, fresh: bool) -> None:
        """With the lock held: refuse (or, overwrite, clear) a used folder for a fresh run,
        remove orphans of interrupted saves, cut the log back on resume, write config.json."""
        d = self.out_dir
        if fresh:
            found = run_in_folder(d)
            if found and not self.overwrite:
                sidecar = next((n for n in ("last.json", *found) if n.endswith(".json")
                                and (d / n).is_file()), "last.json")
                raise RunFolderError(
                    f"{d} already holds a run ({', '.join(found[:4])}"
                    f"{', ...' if len(found) > 4 else ''}): resume it with --resume "
                    f"{d / sidecar}, or start over with --overwrite (deletes that run)")
            if found:
                removed = remove_run(d)
                self.log(f"overwrite: removed the previous run in {d} ({len(removed)} files)")
        elif self.overwrite:
            self.log(f"overwrite ignored: resuming the run in {d} at iteration {self.iteration}")
        orphans = remove_orphans(d)
        if orphans:
            self.log(f"{d}: removed {len(orphans)} orphaned file(s) of interrupted saves "
                     f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''})")
        if self._cut_log_at is not None:
            cut = truncate_log(d / LOG_NAME, self._cut_log_at)
            if cut:
                self.log(f"{d / LOG_NAME}: removed {cut} row(s) written after iteration "
                         f"{self._cut_log_at}, the checkpoint this run resumes from")
            self._cut_log_at = None
        atomic_write_text(d / "config.json", json.dumps(self.cfg.to_dict(), indent=1))

    def _last_finite(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint of this run was saved"
        path, it = self._last_checkpoint
        return f"last finite checkpoint {path} (iteration {it})"

    def _loss_message(self, it_last: int, bad: tuple[str, float]) -> str:
        name, v = bad
        return (f"non-finite loss in iterations {it_last + 1}-{self.iteration} "
                f"({name} = {_fmt_value(v)}); stopped without saving; {self._last_finite()}")

    def nonfinite_state(self) -> str | None:
        """The first non-finite parameter / buffer of the model or the objective (CCP queues),
        as "name = value", or None when all are finite. One `_foreach_norm` (max |x|) over all
        floating tensors and one host read: checkpoint time only. Collective under DDP (the
        verdict is every rank's)."""
        named = [(f"model.{k}", t) for k, t in self.model.named_parameters()]
        named += [(f"model.{k}", t) for k, t in self.model.named_buffers()]
        named += [(f"objective.{k}", t) for k, t in self.objective.named_buffers()]
        named = [(k, t.detach()) for k, t in named if t.is_floating_point() and t.numel()]
        if not named:
            return None
        maxabs = torch._foreach_norm([t for _, t in named], float("inf"), dtype=torch.float32)
        bad = (~torch.stack(maxabs).isfinite()).any().float().reshape(1)
        if float(all_reduce_mean(bad, self.dist)) == 0.0:  # sync-ok: checkpoint time
            return None
        for (k, _), m in zip(named, maxabs):
            v = float(m)  # sync-ok: failure path only
            if not math.isfinite(v):
                return f"{k} = {_fmt_value(v)}"
        return "on another rank"

    def check_finite(self, before: str) -> None:
        """NonFiniteError unless the weights (and CCP queues) are all finite."""
        what = self.nonfinite_state()
        if what is not None:
            raise NonFiniteError(f"non-finite weights at iteration {self.iteration} ({what}); "
                                 f"stopped before {before}, nothing saved; {self._last_finite()}")

    # ----------------------------------------------------------------------------------
    def val_volumes(self):
        if self._val_volumes is None:
            self._val_volumes = evaluation_items(self.cfg, self.dataset, self.cfg.data.val_split,
                                                 self.cfg.train.max_val_volumes or None)
        return self._val_volumes

    def predict_fn(self):
        model = self.model

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return model.predict(x.contiguous(memory_format=self.memory_format)).float()
        return fn

    def validate(self) -> float:
        """Mean validation Dice with the configuration's protocol (`eval.protocol`): volumes
        slice-wise (classes 1..C-1, then volumes), image folders per image at img_size. Its
        seconds go to `val_s` (and `last_val_s`)."""
        t0 = time.perf_counter()
        self.model.eval()
        try:
            res = evaluate(self.cfg, self.predict_fn(), self.val_volumes(), device=self.device,
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
    def _rank_state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This process's rank-local state: CCP queues and pointers (objective buffers), the
        torch / CUDA / copy-paste / Python / NumPy RNG states and the data-stream position;
        tensor keys start with `prefix` ("" on rank 0, "rank{r}." on rank r). All tensors are
        on the CPU (they travel to rank 0 by pickle)."""
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.objective.state_dict().items():
            tensors[f"{prefix}objective.{k}"] = v.detach().cpu().contiguous()  # sync-ok: checkpoint
        rng = {"cpu": torch.get_rng_state(), "mix": self.mix_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"rng": split_state(rng, f"{prefix}rng", tensors),
                "python_rng": _py_state(random.getstate()),
                "numpy_rng": _np_state(np.random.get_state()),
                "stream": split_state(self.stream.state_dict(), f"{prefix}stream", tensors)}
        return tensors, meta

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint's tensors and JSON metadata, on rank 0 (None on the other ranks).

        Collective under DDP: every rank must call it. Replicated state (model, optimizer —
        identical on every rank) is rank 0's; rank-local state (`_rank_state`) is gathered
        from every rank: rank 0's under the plain names (a single-process checkpoint has the
        same layout as before), rank r's tensors under `rank{r}.` and its metadata under
        meta["ranks"][str(r)]; meta["world_size"] records the number of ranks."""
        r = self.dist.rank
        local = self._rank_state("" if r == 0 else f"rank{r}.")
        gathered = gather_to_main(local, self.dist, self.device)
        if gathered is None:
            return None
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        opt_meta = split_state(self.optimizer.state_dict(), "optim", tensors)
        ranks: dict[str, Any] = {}
        for rank, (t_r, m_r) in enumerate(gathered):
            tensors.update(t_r)
            if rank:
                ranks[str(rank)] = m_r
        meta = {"config": self.cfg.to_dict(), "iteration": self.iteration,
                "best_val_dice": self.best_dice, "best_iteration": self.best_iteration,
                "history": self.history, "optimizer": opt_meta, **gathered[0][1],
                "world_size": self.dist.world_size, "ranks": ranks,
                "torch_version": torch.__version__}
        return tensors, meta

    def save(self, tag: str, *, check: bool = True) -> Path:
        """Write `<out_dir>/<tag>` (atomic pair, rank 0 writes). Collective under DDP: every
        rank calls it and returns once the pair is complete on disk. Non-finite weights are
        never saved: `NonFiniteError` (`check=False`: the caller has just checked)."""
        if check:
            self.check_finite(f"saving {tag}")
        state = self.state_tensors()
        path = self.out_dir / f"{tag}.json"
        if state is not None:
            path = save_checkpoint(self.out_dir, tag, *state)
        barrier(self.dist)
        self._last_checkpoint = (str(path), self.iteration)
        return path

    def load(self, path: str | Path, *, strict_config: bool = True) -> None:
        """Restore a checkpoint for an exact resume; under DDP each rank restores its own
        rank-local state, so the world size must be the one the checkpoint was saved with."""
        tensors, meta = load_checkpoint(path)
        saved = config_from_dict(meta["config"], source=f"{path} (saved config)")
        diffs = diff_configs(saved, self.cfg) + diff_configs(
            saved, self.cfg, sections=("train",),
            keys=("max_iterations", "base_lr", "momentum", "weight_decay", "seed", "optimizer",
                  "amp", "channels_last"))
        diffs = [d for d in diffs if d.split(":", 1)[0] not in RESUME_FREE_KEYS]
        if diffs and strict_config:
            raise CheckpointError(f"{path}: checkpoint was trained with a different config: "
                                  + "; ".join(diffs))
        saved_ws, ws, r = int(meta.get("world_size", 1)), self.dist.world_size, self.dist.rank
        if saved_ws != ws:
            raise CheckpointError(
                f"{path}: checkpoint was saved with world size {saved_ws} but this run has world "
                f"size {ws}: each rank's data position, RNG and CCP queues cannot be mapped onto "
                f"another number of processes; resume with {saved_ws} process(es) (eval / "
                "predict load the model weights from any checkpoint)")
        prefix = "" if r == 0 else f"rank{r}."
        local = meta if r == 0 else meta.get("ranks", {}).get(str(r))
        if local is None:
            raise CheckpointError(f"{path}: no rank-local state for rank {r} "
                                  f"(meta['ranks'] has {sorted(meta.get('ranks', {}))})")
        load_model_state(self.model, tensors, str(path))
        head = f"{prefix}objective."
        obj = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        self.objective.load_state_dict(obj)
        self.optimizer.load_state_dict(_to_device(join_state(meta["optimizer"], tensors), self.device))
        rng = join_state(local["rng"], tensors)
        torch.set_rng_state(rng["cpu"])
        self.mix_generator.set_state(rng["mix"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_py_state_back(local["python_rng"]))
        np.random.set_state(_np_state_back(local["numpy_rng"]))
        self.stream.load_state_dict(join_state(local["stream"], tensors))
        if self.core.uses_tensor_lr():  # load_state_dict put a loaded copy in place of the tensor
            for g in self.optimizer.param_groups:
                g["lr"] = self.scalars.lr
        self.runner.reset()  # graphs baked in the old optimizer-state tensors
        self.iteration = int(meta["iteration"])
        self.best_dice = float(meta["best_val_dice"])
        self.best_iteration = int(meta["best_iteration"])
        self.history = list(meta["history"])
        # train() (holding the folder's lock) cuts metrics.jsonl back to this iteration: rows a
        # killed run wrote after this checkpoint would otherwise appear twice
        self._resumed_from = resolve(path)
        self._cut_log_at = self.iteration
        self._last_checkpoint = (str(self._resumed_from), self.iteration)


class StepCore:
    """Everything one training step needs, without data: the UC-Seg pair (and its DDP wrapper),
    the objective with its CCP queues, the schedule tensors, the optimizer, the copy-paste
    generator and the `StepRunner`. The Trainer wraps it with data, logging, validation and
    checkpoints; `bench` and the ledger run it on synthetic batches."""

    def __init__(self, cfg: Config, device: torch.device, *, dist: DistInfo | None = None,
                 amp: str | None = None, channels_last: bool | None = None,
                 step_mode: str | None = None) -> None:
        cfg = resolve_config(cfg, device)
        tc, dc, lc = cfg.train, cfg.data, cfg.loss
        self.cfg, self.device = cfg, device
        dist = dist if dist is not None else DistInfo()
        self.dist = dist
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # `amp` / `channels_last` default to the configuration as CUDA applies it (bf16 and
        # channels-last on CUDA only); the ledger passes them explicitly to count the CUDA step
        amp = amp if amp is not None else (tc.amp if device.type == "cuda" else "none")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.model = build_model(cfg, device)
        if any(p.device != device for p in self.model.parameters()):
            self.model.to(device)
        cl = tc.channels_last if channels_last is None else channels_last
        self.memory_format = memory_format_for(cfg) if cl else torch.contiguous_format
        to_memory_format(self.model, self.memory_format)
        self.objective = UCSegObjective(
            dc.num_classes, pseudo_mode=lc.pseudo_mode, nms=lc.nms,
            embed_c_factor=lc.embed_c_factor, embed_p_factor=lc.embed_p_factor, ccp=lc.ccp,
            queue_size=lc.queue_size, contrast_temperature=lc.contrast_temperature,
            queue_pointer=lc.queue_pointer, queue_init=lc.queue_init,
            queue_gate=lc.queue_gate, supervision=lc.supervision,
            fused_losses=lc.fused_losses, semi_supervised=lc.semi_supervised).to(device)
        self.scalars = ScheduleTensors(
            device, base_lr=tc.base_lr, T=tc.max_iterations, consistency=lc.consistency,
            rampup=lc.consistency_rampup, unsup_factor=lc.unsup_factor,
            epoch_len=lc.rampup_epoch_len, thr_base=lc.gate_base, thr_span=lc.gate_span,
            confidence_threshold=lc.confidence_threshold,
            T_ref=lc.reference_iterations if lc.schedules == "proportional" else None)
        self.phase2_start = phase2_start_at(cfg)  # never reached by the supervised baseline
        self.optimizer = self._build_optimizer()
        self.train_model: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            if tc.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # static_graph: the set of parameters that get gradients is the same every step
            # (one, the UPG cross-attention temperature, never does) and phase 2 calls the
            # model twice before one backward; DDP learns both from the first iteration
            # instead of searching the autograd graph every step (find_unused_parameters)
            self.train_model = DDP(self.model, device_ids=[device.index]
                                   if device.type == "cuda" else None, static_graph=True)
            # same initial weights on every rank (seeded above, and DDP broadcasts rank 0's);
            # distinct dropout draws per rank from here on
            torch.manual_seed(tc.seed + 1000 * dist.rank)
        self.mix_generator = torch.Generator(device=device)
        self.mix_generator.manual_seed(tc.seed + 7 + 1000 * dist.rank)
        from .precision import WeightCast
        self.step_mode, self.step_mode_reason = resolve_step_mode(
            step_mode or tc.step_mode, nms=lc.nms, device=device, world_size=dist.world_size,
            optimizer=tc.optimizer)
        if self.step_mode == "graph":
            check_graph_capturable(nms=lc.nms, device=device, world_size=dist.world_size,
                                   optimizer=tc.optimizer)
        elif self.step_mode == "compile" and tc.compile_mode in ("reduce-overhead",
                                                                 "max-autotune"):
            check_graph_capturable(nms=lc.nms, device=device, world_size=dist.world_size,
                                   optimizer=tc.optimizer, compile_mode=tc.compile_mode)
        self.runner = StepRunner(
            model=self.train_model, forward=self._objective_call, update=self._optimizer_update,
            mode=self.step_mode, device=device, memory_format=self.memory_format,
            autocast=self.autocast, generators=(self.mix_generator,), warmup=tc.graph_warmup,
            compile_mode=tc.compile_mode, compile_backend=tc.compile_backend,
            # one cast op for every weight; under DDP autocast keeps its per-parameter casts (a
            # forward on swapped-in weight copies is not combined with the DDP reducer here)
            weight_cast=None if dist.enabled else WeightCast(self.model, self.amp_dtype),
            prepare=self._prepare)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """`foreach`: a torch SGD holds the state, `foreach_sgd_step` updates with the lr
        tensor; `fused`: torch's fused SGD kernel with the lr tensor; `apex`: FusedSGD."""
        tc = self.cfg.train
        kw = dict(momentum=tc.momentum, weight_decay=tc.weight_decay)
        params = self.model.parameters()
        if tc.optimizer == "apex":
            fused = apex_fused_sgd()
            if fused is not None:
                return fused(params, lr=tc.base_lr, **kw)
            warnings.warn("train.optimizer = 'apex' but apex is not importable; using the "
                          "foreach SGD", stacklevel=3)
        if tc.optimizer == "fused":
            return torch.optim.SGD(params, lr=self.scalars.lr, fused=True, **kw)
        return torch.optim.SGD(params, lr=tc.base_lr, foreach=True, **kw)

    def uses_tensor_lr(self) -> bool:
        return self.cfg.train.optimizer == "fused"

    def _optimizer_update(self) -> None:
        if isinstance(self.optimizer, torch.optim.SGD) and not self.uses_tensor_lr():
            foreach_sgd_step(self.optimizer, self.scalars.lr)
        else:
            self.optimizer.step()

    def _objective_call(self, model, x, y_l, phase2: bool, **mix):
        return self.objective.forward_values(model, x, y_l, self.scalars, phase2, **mix)

    def _prepare(self, x: torch.Tensor, phase2: bool) -> dict[str, torch.Tensor]:
        """The phase-2 copy-paste draw, on the device, outside a compiled forward."""
        if not phase2:
            return {}
        box, branch = self.objective.draw_mix(tuple(x.shape[2:]), x.device, self.mix_generator)
        return {"mix_box": box, "mix_branch_a": branch}

    def update_scalars(self, t: int) -> None:
        self.scalars.update(t)  # in place: a captured graph reads the new values
        if self.uses_tensor_lr():
            return
        lr = self.scalars.values(t)["lr"]  # host float: logged, and what apex reads
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batch, t: int) -> dict[str, torch.Tensor]:
        """One training iteration on a Batch (`x_l`, `y_l`, `x_u`); detached loss terms."""
        self.update_scalars(t)
        return self.runner(batch, t >= self.phase2_start)


def resolve_config(cfg: Config, device: torch.device) -> Config:
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
    from ..config import apply_overrides
    return apply_overrides(cfg, ov) if ov else cfg


def build_step_core(cfg: Config, device: torch.device | str, **kw) -> StepCore:
    """`StepCore(cfg, device, ...)` (see there)."""
    return StepCore(cfg, torch.device(device), **kw)


def accumulate_terms(acc: dict, terms, n_key: dict | None = None) -> None:
    """Add one step's loss terms to the device-side sums of a log window (no host read).

    `StepTerms` (the objective's one tensor of terms) is added with one op, keyed by its
    names (phase 1 and phase 2 steps have different terms); a plain {name: 0-D tensor} dict
    term by term."""
    from .objective import StepTerms
    if isinstance(terms, StepTerms):
        cur = acc.get(terms.names)
        # a copy of the values: in graph mode they are the graph's static outputs
        acc[terms.names] = terms.values.clone() if cur is None else cur + terms.values
        if n_key is not None:
            n_key[terms.names] = n_key.get(terms.names, 0) + 1
        return
    for k, v in terms.items():
        acc[k] = acc[k] + v.float() if k in acc else v.float().clone()
        if n_key is not None:
            n_key[k] = n_key.get(k, 0) + 1  # phase-2 terms exist only in phase 2


def _first_nonfinite(keys: list[str], vals: list[float]) -> tuple[str, float] | None:
    """(name, value) of the first non-finite window mean, the total loss L first."""
    order = sorted(range(len(keys)), key=lambda i: keys[i] != "L")
    for i in order:
        if not math.isfinite(vals[i]):
            return keys[i], vals[i]
    return None


def window_means(acc: dict, n_key: dict) -> tuple[list[str], torch.Tensor]:
    """(sorted term names, their means over the window as one device tensor) from the sums of
    `accumulate_terms` (terms that exist in phase 2 only are averaged over their own steps)."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for key, val in acc.items():
        if isinstance(key, tuple):
            for i, name in enumerate(key):
                if name.startswith("_"):  # padding slots of StepTerms, not terms
                    continue
                sums.setdefault(name, []).append(val[i])
                counts[name] = counts.get(name, 0) + n_key[key]
        else:
            sums.setdefault(key, []).append(val)
            counts[key] = counts.get(key, 0) + n_key[key]
    keys = sorted(sums)
    means = torch.stack([(sum(sums[k][1:], sums[k][0]) / counts[k]).float() for k in keys])
    return keys, means


def to_memory_format(model: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """`model.to(memory_format=...)` in place (`.data` of the 4-D / 5-D tensors): also for the
    ledger's fake tensors, which `Module.to` cannot swap."""
    nd = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
    if nd is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == nd:
                t.data = t.data.contiguous(memory_format=memory_format)


def memory_format_for(cfg: Config) -> torch.memory_format:
    """`train.channels_last`: channels-last for 2D (NHWC), channels-last-3d for 3D (NDHWC)."""
    if not cfg.train.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if len(cfg.data.img_size) == 3 else torch.channels_last


def build_model(cfg: Config, device: torch.device | str | None = None) -> torch.nn.Module:
    """The UC-Seg pair a configuration describes (training, evaluation and prediction):
    UNet-2D + VNet-2D for a 2-value `data.img_size`, UNet-3D + VNet-3D (and the 3D UPG) for a
    3-value one (`model.unet_dropout` is 2D only; the 3D UNet has the reference's 0.3).
    "auto" op choices are resolved for `device` (default: CUDA when available)."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    cfg = resolve_config(cfg, dev)
    m = cfg.model
    if len(cfg.data.img_size) == 3:
        model = build_ucseg_3d(num_classes=cfg.data.num_classes, in_channels=m.in_channels,
                               img_size=tuple(cfg.data.img_size), patch_size=m.patch_size,
                               head_impl=m.upg_head)
    else:
        model = build_ucseg_2d(num_classes=cfg.data.num_classes, in_channels=m.in_channels,
                               img_size=tuple(cfg.data.img_size), patch_size=m.patch_size,
                               unet_dropout=tuple(m.unet_dropout), head_impl=m.upg_head)
    if m.uncertainty == "fused":
        from ..ops import evidential_uncertainty
        model.uncertainty_fn = evidential_uncertainty
        # both fused: u is written as patch tokens and the head reads A's tokens (no copies)
        model.fused_tokens = m.upg_head == "fused"
    return model


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
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]  # sync-ok: numpy RNG state, host only


def _np_state_back(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])
