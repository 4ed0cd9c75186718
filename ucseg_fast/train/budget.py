"""Time-to-Dice: a training run planned to fill a wall-clock budget.

`train --time-budget MINUTES` (and `bench e2e`) answer "how good is the model after N minutes
on this machine?". A run of the reference's length does not fit a few minutes, and cutting it
short would train with the reference's absolute schedules at their start (a consistency weight
of a few per cent, no copy-paste). So the plan is:

1. Proportional schedules (`loss.schedules = "proportional"`): whatever `max_iterations` the
   plan picks, the run goes through the whole method, ramp and copy-paste at the reference's
   fractions of it.
2. A probe, on the clock: the configuration's own trainer is built, takes a few untimed then
   timed steps in each phase the run will have (the lower quartile of single steps; a phase-2
   step is not a phase-1 step), and validates (timed: the first validation also reads the volumes,
   so a second one is timed when it is cheap); then it is discarded.
3. `max_iterations` and `val_every` from those times: validations (iteration 0 and then
   `n_val` more, the last at the end) are given about `VAL_SHARE` of what is left, the steps
   the rest, less a margin for the build of the real trainer (measured in the probe) and
   checkpoints.
4. One correction from the run's own steps: after about `REPLAN_AT` of the planned steps
   (all of phase 1, before copy-paste starts), `max_iterations` is planned again from the
   measured step time (and the probe's phase-2 / phase-1 ratio): a probe of a few steps can be
   off by a third on a shared machine. The schedules read T, so they follow; the lr and the
   consistency weight change by a few per cent of their value at that point.
5. The run itself, with the remaining budget as a hard wall-clock stop (`Trainer.train
   (time_budget_s=)`): if steps turn out slower than probed, it stops a little before
   `max_iterations` (the summary's `iterations` against the plan's), validating and saving
   `last` within the budget.

The summary reports the plan, the seconds of each part and validation's share of the run.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Any, Callable

import torch

from ..config import Config, phase2_start_at
from ..errors import UserError

__all__ = ["BudgetError", "plan_run", "train_for_budget", "VAL_SHARE"]

#: the part of the budget (after the probe) validations are planned to take at most
VAL_SHARE = 0.10
#: most validations a planned run makes after iteration 0
MAX_VALIDATIONS = 20
#: the budget kept free for what the probe does not measure (checkpoints, the log, jitter)
MARGIN = 0.03
#: the fraction of the planned run after which its length is planned again from its own steps
REPLAN_AT = 0.08


class BudgetError(UserError):
    """The budget cannot hold a run: printed as one line by the CLI."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync-ok: timing the probe


def _probe(cfg: Config, *, steps: int, budget_s: float, log: Callable[[str], None]
           ) -> dict[str, float]:
    """Build the trainer of `cfg` (timed), time `steps` steps of each phase after warm-up and
    one validation; then free it. Nothing is written."""
    from .trainer import Trainer
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=lambda s: None)
    build_s = time.perf_counter() - t0
    core = trainer.core
    warm = max(1, cfg.train.graph_warmup + 1) if core.runner.mode == "graph" else 1
    T = cfg.train.max_iterations
    switch = phase2_start_at(cfg)
    times: dict[int, float] = {}
    for phase, t_at in ((1, 0), (2, switch)):
        if phase == 2 and switch >= T:
            break
        for _ in range(warm + 2):  # + 2: first-call allocations and kernel selection
            trainer.step(trainer.stream.next(), t_at)
        each = []
        for _ in range(steps):
            _sync(trainer.device)
            t1 = time.perf_counter()
            trainer.step(trainer.stream.next(), t_at)
            _sync(trainer.device)
            each.append(time.perf_counter() - t1)
        # the lower quartile of single steps: a slow step (a page fault, another process)
        # makes the plan too short, while a plan a little too long only means that the
        # wall-clock stop ends the run a few steps before max_iterations
        times[phase] = sorted(each)[len(each) // 4]
    # the first validation reads the validation volumes, later ones reuse them: time both
    # when a second one is cheap next to the budget
    trainer.validate()
    first_val_s = val_s = trainer.last_val_s
    if first_val_s < 0.02 * budget_s:
        trainer.validate()
        val_s = trainer.last_val_s
    close = getattr(trainer.stream, "close", None)
    if close is not None:  # decode threads of a streamed archive
        close()
    del trainer, core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = {"build_s": build_s, "step1_s": times[1], "step2_s": times.get(2, times[1]),
           "first_val_s": first_val_s, "val_s": val_s}
    log(f"time budget probe: build {build_s:.1f} s, phase-1 step {1e3 * times[1]:.0f} ms"
        + (f", phase-2 step {1e3 * times[2]:.0f} ms" if 2 in times else "")
        + f", validation {val_s:.1f} s")
    return out


def plan_run(cfg: Config, budget_s: float, probe: dict[str, float], elapsed_s: float
             ) -> tuple[Config, dict[str, Any]]:
    """`cfg` with `max_iterations`, `val_every`, `log_every` and `checkpoint_every` set so the
    run fits `budget_s` seconds of which `elapsed_s` are spent; and the plan, for the summary.
    Pure arithmetic on the probe's times (tested on its own)."""
    lo = cfg.loss
    avail = budget_s * (1.0 - MARGIN) - elapsed_s - probe["build_s"]
    val_s = max(probe["val_s"], 1e-6)
    # phase-2 share of the run: the proportional switch is a fixed fraction of T
    f2 = 0.0
    if lo.semi_supervised and lo.phase2_start < lo.reference_iterations:
        f2 = 1.0 - lo.phase2_start / lo.reference_iterations
    step_s = (1.0 - f2) * probe["step1_s"] + f2 * probe["step2_s"]
    n_val = int(min(MAX_VALIDATIONS, max(1, math.floor(VAL_SHARE * avail / val_s) - 1)))
    first = max(probe.get("first_val_s", val_s), val_s)  # reads the volumes
    T = math.floor((avail - first - n_val * val_s) / step_s) if avail > 0 else 0
    if T < 1:
        raise BudgetError(
            f"a time budget of {budget_s / 60:.2f} min cannot hold a run of {cfg.name}: "
            f"{elapsed_s:.0f} s spent on the probe, a build takes {probe['build_s']:.0f} s, a "
            f"step {step_s:.2f} s and a validation {probe['val_s']:.1f} s (validate on fewer "
            "volumes with --train.max_val_volumes, or give more minutes)")
    n_val = min(n_val, T)
    val_every = math.ceil(T / n_val)
    tc = cfg.train
    log_every = max(1, min(tc.log_every, val_every, math.ceil(T / 10)))
    new = dataclasses.replace(
        cfg, loss=dataclasses.replace(lo, schedules="proportional"),
        train=dataclasses.replace(tc, max_iterations=T, val_every=val_every,
                                  log_every=log_every, checkpoint_every=max(T, 1)))
    plan = {"budget_s": budget_s, "probe_s": elapsed_s, **probe, "step_s": step_s,
            "phase2_fraction": f2, "max_iterations": T, "val_every": val_every,
            "validations": 1 + math.ceil(T / val_every),
            "planned_val_share": (first + math.ceil(T / val_every) * val_s) / budget_s}
    return new, plan


def _replanner(plan: dict[str, Any], budget_s: float, left_s: float,
               log: Callable[[str], None]):
    """The `Trainer.train(replan=)` callback: once REPLAN_AT of the planned steps are done,
    the length that fills what is left of `left_s` at the measured step time."""
    ratio = plan["step2_s"] / max(plan["step1_s"], 1e-9)
    f = 1.0 - plan["phase2_fraction"]  # the fraction of the run before copy-paste
    v = plan["val_s"] / plan["val_every"]  # validation time a step brings

    def replan(trainer, train_s: float, wall_s: float) -> int | None:
        t = trainer.iteration
        T = trainer.cfg.train.max_iterations
        if t < max(REPLAN_AT * T, 2 * trainer.cfg.train.log_every, 5):
            return None  # not enough of the run's own steps yet
        switch = phase2_start_at(trainer.cfg)
        s1 = train_s / t  # every step so far was a phase-1 step
        s2 = s1 * ratio
        rest = left_s - wall_s - MARGIN * budget_s - plan["val_s"]  # the final validation
        new_T = math.floor((rest + t * (s1 + v)) / (f * s1 + (1.0 - f) * s2 + v))
        if t >= switch or new_T <= t or f * new_T <= t + 1:
            return T if t < switch else None  # too late to change the length: keep it
        log(f"time budget: {new_T} iterations instead of {T} (a step takes {1e3 * s1:.0f} ms "
            f"here, the probe said {1e3 * plan['step1_s']:.0f} ms)")
        plan.update(replanned_at=t, planned_max_iterations=T, max_iterations=new_T)
        return new_T
    return replan


def train_for_budget(cfg: Config, minutes: float, *, log: Callable[[str], None] = print,
                     overwrite: bool = False, started: float | None = None,
                     probe_steps: int = 8) -> dict[str, Any]:
    """Plan (`_probe`, `plan_run`) and train `cfg` within `minutes` of wall-clock time counted
    from `started` (default: now). Returns the trainer's summary with `plan` added and the run's
    own seconds (`elapsed_s` from `started`)."""
    from .trainer import Trainer
    started = time.perf_counter() if started is None else started
    budget_s = 60.0 * minutes
    if budget_s <= 0:
        raise BudgetError(f"--time-budget {minutes} must be > 0 minutes")
    if cfg.loss.schedules != "proportional":
        log("time budget: proportional schedules (the run's length is planned from its "
            "budget; absolute schedules would stop early in the reference's ramp)")
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss,
                                                                 schedules="proportional"))
    probe = _probe(cfg, steps=probe_steps, budget_s=budget_s, log=log)
    cfg, plan = plan_run(cfg, budget_s, probe, time.perf_counter() - started)
    log(f"time budget {minutes:g} min: {plan['max_iterations']} iterations, validation every "
        f"{plan['val_every']} ({plan['validations']} validations, about "
        f"{100 * plan['planned_val_share']:.0f} % of the budget)")
    trainer = Trainer(cfg, log=log, overwrite=overwrite)
    left = budget_s - (time.perf_counter() - started)
    summary = trainer.train(time_budget_s=left,
                            replan=_replanner(plan, budget_s, left, log))
    summary["plan"] = plan
    if summary["iterations"] < plan["max_iterations"]:
        log(f"time budget: stopped at iteration {summary['iterations']} of the "
            f"{plan['max_iterations']} planned (steps were slower than the probe's)")
    summary["elapsed_s"] = time.perf_counter() - started
    summary["budget_s"] = budget_s
    summary["device"] = (torch.cuda.get_device_name(trainer.device)
                         if trainer.device.type == "cuda" else "cpu")
    summary["step_mode"] = trainer.runner.mode
    return summary
