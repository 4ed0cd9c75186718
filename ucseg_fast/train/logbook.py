"""The training log: device-side sums of the loss terms over a log window (no host read per
step), the clock of training seconds (validation and saving excluded), the JSONL writer, and
the non-finite guard that stops a run without saving.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .distributed import DistInfo, all_reduce_mean


class NonFiniteError(RuntimeError):
    """The loss or the weights became non-finite (NaN / inf); the run stopped without saving."""


def fmt_value(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


class LogWindow:
    """The loss-term sums of the steps since the last log row, from iteration `start`."""

    def __init__(self, start: int):
        self.reset(start)

    def reset(self, start: int) -> None:
        self.start, self.steps, self.data_wait = start, 0, 0.0
        self.acc: dict = {}
        self.n_key: dict = {}

    def add(self, terms) -> None:
        accumulate_terms(self.acc, terms, self.n_key)
        self.steps += 1

    def means(self, dist: DistInfo) -> tuple[list[str], list[float]]:
        """(term names, window means averaged over the ranks): one host read."""
        keys, means = window_means(self.acc, self.n_key)
        return keys, all_reduce_mean(means, dist).tolist()  # sync-ok: log / save time


class StepClock:
    """Seconds of training steps: `credit(t)` adds the time from the last mark to `t` (to the
    total and to the current log window), `resume()` marks now without crediting (after
    validation / saving, which are not step time)."""

    def __init__(self, train_s: float = 0.0):
        self.train_s, self.win_s = train_s, 0.0
        self.t_last = time.perf_counter()

    def at(self, t: float) -> float:
        """Training seconds as of `t` (the running segment included)."""
        return self.train_s + t - self.t_last

    def credit(self, t: float) -> None:
        self.train_s += t - self.t_last
        self.win_s += t - self.t_last
        self.t_last = t

    def resume(self) -> None:
        self.t_last = time.perf_counter()

    def take_window(self) -> float:
        w, self.win_s = self.win_s, 0.0
        return w


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line (log rows and validation records)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def start(self) -> None:
        if self.enabled:
            self.path.write_text("")

    def append(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def null_nonfinite(rec: dict[str, Any], name: str) -> dict[str, Any]:
    """`rec` with its non-finite floats as null and `nonfinite` naming the first bad term."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
           for k, v in rec.items()}
    out["nonfinite"] = name
    return out


def nonfinite_tensor(named: list[tuple[str, torch.Tensor]], dist: DistInfo) -> str | None:
    """The first non-finite tensor of `named` as "name = value", None when all are finite.
    One `_foreach_norm` (max |x|) over the floating tensors and one host read; collective
    under DDP (the verdict is every rank's)."""
    named = [(k, t.detach()) for k, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    maxabs = torch._foreach_norm([t for _, t in named], float("inf"), dtype=torch.float32)
    bad = (~torch.stack(maxabs).isfinite()).any().float().reshape(1)
    if float(all_reduce_mean(bad, dist)) == 0.0:  # sync-ok: checkpoint time
        return None
    for (k, _), m in zip(named, maxabs):
        v = float(m)  # sync-ok: failure path only
        if not math.isfinite(v):
            return f"{k} = {fmt_value(v)}"
    return "on another rank"


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


def first_nonfinite(keys: list[str], vals: list[float]) -> tuple[str, float] | None:
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


