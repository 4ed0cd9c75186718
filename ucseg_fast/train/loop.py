"""The training loop of one `Trainer.train()` call, readable on one screen (`run`), with its
three kinds of bookkeeping kept apart:
- log rows (`_log_row`, every `log_every` steps, at the stop and at the end): window means of
  the loss terms, the schedules, throughput and GPU telemetry; a non-finite mean writes its row
  (null values) and stops the run;
- the time budget (`_budget`): stop when one more log window and the final validation would
  not fit, and re-plan the run's length once from its own steps;
- validation and checkpoints (`_bookkeeping`): the window and the weights are checked finite
  first, `best` is saved on improvement, `last` on `checkpoint_every` and at the stop; their
  seconds are kept out of the training clock (`train_s`, `step_ms`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..eval.protocol import selection_warning
from .distributed import broadcast_flag
from .logbook import LogWindow, NonFiniteError, StepClock, first_nonfinite, fmt_value, \
    null_nonfinite


class TrainLoop:
    """One `train()` call of `trainer` (a `Trainer`: its stream, step, log, validation and
    saves), from its current iteration to `stop_at` or max_iterations."""

    def __init__(self, trainer: Any, stop_at: int | None, time_budget_s: float | None,
                 replan: Callable[..., int | None] | None):
        self.tr = trainer
        self.T = trainer.cfg.train.max_iterations
        self.stop = self.T if stop_at is None else min(stop_at, self.T)
        self.budget, self.replan = time_budget_s, replan
        self.bar = None

    def run(self, fresh: bool) -> dict[str, Any]:
        tr = self.tr
        from ..telemetry import GpuSampler
        self.gpu = GpuSampler(tr.device.index or 0 if tr.device.type == "cuda" else None).start()
        self._start(fresh)
        clock = self.clock = StepClock(float(tr.history[-1].get("train_s", 0.0))
                                       if tr.history else 0.0)
        window = self.window = LogWindow(tr.iteration)
        try:
            while tr.iteration < self.stop:
                t0 = time.perf_counter()
                batch = tr.stream.next()
                window.data_wait += time.perf_counter() - t0
                window.add(tr.step(batch, tr.iteration))
                tr.iteration += 1
                if self.bar is not None:
                    self.bar.update(1)
                every = tr.cfg.train
                done, halt = tr.iteration == self.T, tr.iteration == self.stop
                if self.budget is not None and tr.iteration % every.log_every == 0:
                    halt, done = self._budget(halt, done)
                    every = tr.cfg.train  # a re-plan may have changed the cadence
                if tr.iteration % every.log_every == 0 or halt or done:
                    self._log_row()
                val_now = (tr.iteration % every.val_every == 0 or done
                           or (halt and self.budget is not None))
                save_now = tr.iteration % every.checkpoint_every == 0
                if val_now or save_now or halt:
                    self._bookkeeping(val_now, save_now, halt)
                if halt:
                    break
        finally:
            self.gpu.stop()
            if self.bar is not None:
                self.bar.close()
        wall = tr.wall_fields()
        return {"iterations": tr.iteration, "best_val_dice": tr.best_dice,
                "best_iteration": tr.best_iteration, "history": tr.history,
                "out_dir": str(tr.out_dir), "train_s": clock.train_s, **wall,
                "val_share": wall["val_s"] / wall["wall_s"] if wall["wall_s"] > 0 else 0.0,
                **({"selection_warning": w} if (w := selection_warning(tr.cfg)) else {}),
                "skipped_files": tr.skipped_files()}

    # ----------------------------------------------------------------------------------
    def _start(self, fresh: bool) -> None:
        tr = self.tr
        main = tr.dist.is_main
        if tr.cfg.train.progress and main:
            from tqdm import tqdm
            self.bar = tqdm(total=self.T, initial=tr.iteration, desc=tr.cfg.name, unit="it",
                            dynamic_ncols=True, mininterval=1.0)
        if main:
            m, lo = tr.cfg.model, tr.cfg.loss
            tr.log(f"training {tr.cfg.name} ({tr.cfg.recipe}) on {tr.device} "
                   f"({tr.core.step_mode_reason}; uncertainty {m.uncertainty}, UPG head "
                   f"{m.upg_head}, fused losses {lo.fused_losses}; world size "
                   f"{tr.dist.world_size}) from iteration {tr.iteration} to {self.T}; "
                   f"{tr.core.method_line()}; data {tr.cfg.data.root}; output {tr.out_dir}")
            warning = selection_warning(tr.cfg)
            if warning:  # loudly: at the start, and in the summary
                tr.log(warning)
        tr._wall0 = time.perf_counter()
        if tr.history:  # a resumed run continues the clock of its log
            tr._wall0 -= float(tr.history[-1].get("wall_s", 0.0))
            tr.val_s = float(tr.history[-1].get("val_s", 0.0))
        if fresh and main:
            tr.metrics.start()  # a fresh run starts a fresh log (a resumed one appends)
            # the untrained model's score: the baseline every later validation is compared to
            self._validation_record(0.0)

    def _validation_record(self, train_s: float) -> float:
        tr = self.tr
        dice = tr.validate()
        rec = {"iteration": tr.iteration, "val_dice": dice, "train_s": train_s,
               **tr.wall_fields(), "skipped_files": tr.skipped_files()}
        tr.history.append(rec)
        tr.metrics.append(rec)
        return dice

    def _budget(self, halt: bool, done: bool) -> tuple[bool, bool]:
        """Stop now unless one more log window of steps and the final validation still fit
        (the mean step time so far, validation excluded); else maybe re-plan T once."""
        tr = self.tr
        if tr.device.type == "cuda":  # sync-ok: once per log window, finished GPU work counts
            torch.cuda.synchronize(tr.device)
        now = time.perf_counter()
        per_step = self.clock.at(now) / max(1, tr.iteration)
        if now - tr._wall0 + per_step * tr.cfg.train.log_every + tr.last_val_s >= self.budget:
            return True, done
        if self.replan is not None:
            new_T = self.replan(tr, self.clock.at(now), now - tr._wall0)
            if new_T is not None:  # once: the run's length from its own steps
                self.replan = None
                tr.set_max_iterations(new_T)
                self.T = self.stop = new_T
                if self.bar is not None:
                    self.bar.total = new_T
                return tr.iteration >= new_T, tr.iteration >= new_T
        return halt, done

    def _log_row(self) -> None:
        tr, window, clock = self.tr, self.window, self.clock
        from ..telemetry import throughput_fields
        keys, vals = window.means(tr.dist)
        clock.credit(time.perf_counter())
        rec = {"iteration": tr.iteration, **tr.schedule_fields(tr.iteration - 1),
               **throughput_fields(tr.iteration - window.start, tr.images_per_step(),
                                   clock.take_window(), window.data_wait, self.gpu.window()),
               **dict(zip(keys, vals)), "skipped_files": tr.skipped_files()}
        bad = first_nonfinite(keys, vals)
        if bad is not None:  # the row says so (null values), then the run stops
            rec = null_nonfinite(rec, bad[0])
        tr.metrics.append(rec)
        if bad is not None:
            raise NonFiniteError(self._loss_message(bad))
        if self.bar is not None:
            post = {"loss": f"{rec['L']:.3f}", "img/s": f"{rec['img_per_s']:.1f}",
                    "ms": f"{rec['step_ms']:.1f}"}
            if "gpu_util" in rec:
                post["gpu"] = f"{rec['gpu_util']:.0f}%"
            self.bar.set_postfix(post, refresh=False)
        window.reset(tr.iteration)

    def _loss_message(self, bad: tuple[str, float]) -> str:
        name, v = bad
        return (f"non-finite loss in iterations {self.window.start + 1}-{self.tr.iteration} "
                f"({name} = {fmt_value(v)}); stopped without saving; {self.tr.last_finite()}")

    def _bookkeeping(self, val_now: bool, save_now: bool, halt: bool) -> None:
        tr = self.tr
        if (val_now or save_now) and tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)  # sync-ok: before validation / saving anyway
        t_book = time.perf_counter()
        # nothing is validated or saved unchecked: the steps since the last log row (their
        # window sums) and the weights must be finite
        if self.window.steps:
            bad = first_nonfinite(*self.window.means(tr.dist))
            if bad is not None:
                raise NonFiniteError(self._loss_message(bad))
        tr.check_finite("validation" if val_now else "saving last")
        improved = False
        if tr.dist.is_main and val_now:
            dice = self._validation_record(self.clock.at(t_book))
            if dice > tr.best_dice:
                tr.best_dice, tr.best_iteration = dice, tr.iteration
                improved = True
            tr.log(f"iteration {tr.iteration}: val Dice {dice:.4f} "
                   f"(best {tr.best_dice:.4f} at {tr.best_iteration})")
        # saves are collective: every rank's rank-local state goes into the checkpoint
        if val_now and broadcast_flag(improved, tr.dist, tr.device):
            tr.save("best", check=False)  # checked above, before validation
        if save_now or halt:
            tr.save("last", check=False)
        if val_now or save_now:
            # validation / saving are not step time: credit the steps up to the start of
            # this bookkeeping, then restart the clock
            self.clock.credit(t_book)
            self.clock.resume()
