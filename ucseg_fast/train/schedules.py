"""Per-iteration schedules of UC-Seg (docs/method.md §2.1 λ_t, §2.2 w(t), §2.4 thr(t), §3 lr).

The scalar functions return Python floats computed exactly as the reference computes them
(golden `sched.table`, all 14 rows, bit for bit). `ScheduleTensors` holds them as 0-D device
tensors that are overwritten in place before each step, so a captured CUDA graph, a compiled
step and a tensor-lr optimizer all see the new values without recapture or recompilation.

Absolute or proportional (`loss.schedules`). The reference counts the consistency ramp and the
copy-paste switch in absolute iterations (ACDC: w(t) reaches its full value at 30 000, copy-paste
from 12 000, in a run of T_ref = 50 000), so a shorter run trains with a fraction of the
unlabeled weight and no copy-paste. Proportional schedules read every iteration-valued setting
as a point of the reference run of `loss.reference_iterations` iterations and move it to the
same fraction of this run's T: the ramp's epoch index is ⌊t·T_ref / (T·epoch_len)⌋ (integer
arithmetic), the switch round(phase2_start·T / T_ref) (`config.phase2_start_at`). At T = T_ref
both are the reference's exactly; at T = 300 (ACDC) the ramp is full at iteration 180 and
copy-paste starts at 72. λ_t, the queue-gate threshold and the lr are functions of t/T already
and do not change.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "consistency_weight",
    "au_lambda",
    "au_lambda_exact",
    "queue_threshold",
    "lr_after_step",
    "lr_at",
    "phase",
    "ScheduleTensors",
]


def consistency_weight(
    t: int,
    consistency: float = 0.1,
    rampup: float = 200.0,
    unsup_factor: float = 150.0,
    epoch_len: int = 150,
    scale: tuple[int, int] | None = None,
) -> float:
    """w(t) = consistency · exp(−5(1 − min(⌊t/epoch_len⌋, rampup)/rampup)²) · unsup_factor.

    SSL4MIS `sigmoid_rampup` on "epochs" of 150 iterations, times the hard-coded ×150
    (`--unsup_factor` in ACDC); same float64 operation order as the reference.
    `scale = (T, T_ref)`: proportional, the epoch index is ⌊t·T_ref / (T·epoch_len)⌋.
    """
    if rampup == 0:
        ramp = 1.0
    else:
        epoch = t // epoch_len if scale is None else (t * scale[1]) // (scale[0] * epoch_len)
        current = float(np.clip(epoch, 0.0, rampup))
        ph = 1.0 - current / rampup
        ramp = float(np.exp(-5.0 * ph * ph))
    return consistency * ramp * unsup_factor


def au_lambda(t: int, T: int) -> float:
    """λ_t of the AU loss, the float32 value the reference computes (returned as a float).

    `0.01 * exp(−log(0.01) / T * t)` on a float32 CPU tensor: every op rounds to float32,
    which moves λ by up to ~1e-7 relative from 0.01^(1−t/T) (`au_lambda_exact`). Computed on
    the CPU on purpose: a device `exp` may differ by one ulp.
    """
    a = torch.tensor(0.01, dtype=torch.float32)
    return float(a * torch.exp(-torch.log(a) / T * t))


def au_lambda_exact(t: int, T: int) -> float:
    """The intended λ_t = 0.01^(1 − t/T) in float64 (for comparison only)."""
    return 0.01 ** (1 - t / T)


def queue_threshold(t: int, T: int, base: float = 0.5, span: float = 0.46) -> float:
    """Queue-gate threshold thr(t) = base + span·t/T (2D 0.5/0.46; 3D 0.2/0.56)."""
    return base + span * t / T


def lr_after_step(t: int, base_lr: float, T: int, clamp_at_T: bool = True) -> float:
    """lr the reference sets after the step of iteration t: base_lr·(1 − t/T).

    The reference never stops at T (it runs whole epochs), so for t > T the lr turns
    negative; `clamp_at_T=True` (the project, which stops at T) clamps t to T (lr ≥ 0).
    """
    if clamp_at_T:
        t = min(t, T)
    return base_lr * (1.0 - t / T)


def lr_at(step: int, base_lr: float, T: int, clamp_at_T: bool = True) -> float:
    """lr used BY step t: base_lr for t = 0, base_lr·(1 − (t−1)/T) afterwards."""
    if step <= 0:
        return base_lr
    return lr_after_step(step - 1, base_lr, T, clamp_at_T)


def phase(t: int, switch: int = 12000) -> int:
    """1 before the copy-paste phase, 2 from iteration `switch` on (2D 12 000, 3D 6 000)."""
    return 2 if t >= switch else 1



class ScheduleTensors:
    """0-D device tensors of the per-step scalars, updated in place by `update(t)`.

    `lr`, `w`, `thr` use `dtype` (float32 by default; float64 for golden parity); `lam` is
    always float32 because the reference's AU loss uses the float32 λ_t. `update` writes
    with `fill_` (one tiny kernel each, no host sync, same storage), so a CUDA graph captured
    with these tensors replays with the new values.
    """

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "ScheduleTensors":
        """The schedules of a configuration ([train] base_lr, max_iterations; [loss] ramp,
        gate and proportional-schedule keys)."""
        tc, lc = cfg.train, cfg.loss
        return cls(device, base_lr=tc.base_lr, T=tc.max_iterations, consistency=lc.consistency,
                   rampup=lc.consistency_rampup, unsup_factor=lc.unsup_factor,
                   epoch_len=lc.rampup_epoch_len, thr_base=lc.gate_base,
                   thr_span=lc.gate_span, confidence_threshold=lc.confidence_threshold,
                   T_ref=lc.reference_iterations if lc.schedules == "proportional" else None)

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        base_lr: float = 0.01,
        T: int = 50000,
        consistency: float = 0.1,
        rampup: float = 200.0,
        unsup_factor: float = 150.0,
        epoch_len: int = 150,
        thr_base: float = 0.5,
        thr_span: float = 0.46,
        clamp_at_T: bool = True,
        confidence_threshold: float = 0.95,
        T_ref: int | None = None,
    ) -> None:
        if T <= 0:
            raise ValueError(f"ScheduleTensors: T (max_iterations) must be > 0, got {T}")
        if T_ref is not None and T_ref <= 0:
            raise ValueError(f"ScheduleTensors: T_ref (loss.reference_iterations) must be > 0, "
                             f"got {T_ref}")
        self.T_ref = T_ref  # None: absolute schedules; else proportional to T / T_ref
        self.base_lr, self.T = base_lr, T
        self.consistency, self.rampup = consistency, rampup
        self.unsup_factor, self.epoch_len = unsup_factor, epoch_len
        self.thr_base, self.thr_span = thr_base, thr_span
        self.clamp_at_T = clamp_at_T
        self.lr = torch.zeros((), dtype=dtype, device=device)
        self.w = torch.zeros((), dtype=dtype, device=device)
        self.thr = torch.zeros((), dtype=dtype, device=device)
        self.lam = torch.zeros((), dtype=torch.float32, device=device)
        # confidence threshold τ of the entropy / fusion+mask modes (a tensor so a schedule
        # or a change between CUDA-graph replays takes effect)
        self.tau = torch.full((), confidence_threshold, dtype=torch.float32, device=device)
        self.t = 0
        self.update(0)

    def values(self, t: int) -> dict[str, float]:
        """The Python values `update(t)` writes (for logging; no device access)."""
        return {
            "lr": lr_at(t, self.base_lr, self.T, self.clamp_at_T),
            "w": consistency_weight(t, self.consistency, self.rampup, self.unsup_factor, self.epoch_len,
                                    None if self.T_ref is None else (self.T, self.T_ref)),
            "lam": au_lambda(t, self.T),
            "thr": queue_threshold(t, self.T, self.thr_base, self.thr_span),
        }

    def full_weight_at(self) -> int:
        """The first iteration whose consistency weight is the full one: the epoch index
        reaches ⌈rampup⌉ (absolute: t·1, proportional: t·T_ref/T, in epochs of epoch_len)."""
        if self.rampup == 0:
            return 0
        iters = math.ceil(self.rampup) * self.epoch_len  # in the reference run's iterations
        if self.T_ref is None:
            return iters
        return -(-iters * self.T // self.T_ref)  # ⌈iters·T / T_ref⌉

    DEVICE_WRITES = 4  # kernels `update` launches: one fill_ per device scalar

    def update(self, t: int) -> None:
        """Write the values for step t into the existing tensors (in place)."""
        v = self.values(t)
        self.lr.fill_(v["lr"])
        self.w.fill_(v["w"])
        self.lam.fill_(v["lam"])
        self.thr.fill_(v["thr"])
        self.t = t

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={x:.6g}" for k, x in self.values(self.t).items())
        return f"ScheduleTensors(t={self.t}, {body})"
