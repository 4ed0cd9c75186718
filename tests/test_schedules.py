"""Schedules (ucseg_fast.train.schedules) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from ucseg_fast.config import scaled_iteration
from ucseg_fast.train import schedules as S

T = 50000


def test_consistency_weight_hand_values():
    # w(t) = 0.1 * exp(-5 (1 - min(t//150, 200)/200)^2) * 150
    assert S.consistency_weight(0) == pytest.approx(15 * math.exp(-5), rel=1e-15)
    assert S.consistency_weight(149) == S.consistency_weight(0)  # same 150-iteration "epoch"
    assert S.consistency_weight(150) == pytest.approx(15 * math.exp(-5 * (199 / 200) ** 2), rel=1e-15)
    assert S.consistency_weight(30000) == 15.0  # epoch 200 reached
    assert S.consistency_weight(10 ** 6) == 15.0  # clipped
    assert S.consistency_weight(123, rampup=0) == pytest.approx(15.0)


def test_au_lambda_is_the_float32_value():
    lam0 = S.au_lambda(0, T)
    assert lam0 == float(torch.tensor(0.01, dtype=torch.float32)) == 0.009999999776482582
    assert S.au_lambda(T, T) == 1.0
    for t in (1, 777, 25000, 49999):
        lam = S.au_lambda(t, T)
        assert float(torch.tensor(lam, dtype=torch.float32)) == lam  # representable in fp32
        assert lam == pytest.approx(S.au_lambda_exact(t, T), rel=2e-6)
    assert S.au_lambda_exact(T // 2, T) == pytest.approx(0.1, rel=1e-15)


def test_queue_threshold():
    assert S.queue_threshold(0, T) == 0.5
    assert S.queue_threshold(T, T) == pytest.approx(0.96)
    assert S.queue_threshold(T // 2, T, base=0.2, span=0.56) == pytest.approx(0.48)  # 3D


def test_lr_used_by_step():
    assert S.lr_at(0, 0.01, T) == 0.01
    assert S.lr_at(1, 0.01, T) == 0.01  # set after step 0: 0.01 * (1 - 0/T)
    assert S.lr_at(2, 0.01, T) == pytest.approx(0.01 * (1 - 1 / T), rel=1e-15)
    assert S.lr_at(T + 1, 0.01, T) == 0.0
    # the reference runs past T: lr turns negative; the project clamps at T
    assert S.lr_at(T + 100, 0.01, T, clamp_at_T=False) == pytest.approx(-0.01 * 99 / T, rel=1e-12)
    assert S.lr_at(T + 100, 0.01, T) == 0.0
    assert S.lr_after_step(T + 100, 0.01, T) == 0.0


def test_phase_switch():
    assert S.phase(11999) == 1 and S.phase(12000) == 2
    assert S.phase(5999, switch=6000) == 1 and S.phase(6000, switch=6000) == 2


def test_schedule_tensors_update_in_place():
    st = S.ScheduleTensors("cpu")
    ptrs = [x.data_ptr() for x in (st.lr, st.w, st.lam, st.thr)]
    assert st.lam.dtype == torch.float32 and st.lr.dim() == 0
    st.update(25001)
    assert [x.data_ptr() for x in (st.lr, st.w, st.lam, st.thr)] == ptrs
    assert st.lam.item() == S.au_lambda(25001, T)  # the exact float32 value
    assert st.lr.item() == pytest.approx(S.lr_at(25001, 0.01, T), rel=1e-7)
    assert st.w.item() == pytest.approx(S.consistency_weight(25001), rel=1e-7)
    assert st.thr.item() == pytest.approx(S.queue_threshold(25001, T), rel=1e-7)
    st64 = S.ScheduleTensors("cpu", dtype=torch.float64)
    st64.update(3000)
    assert st64.w.item() == S.consistency_weight(3000) and st64.lam.dtype == torch.float32
    assert "t=3000" in repr(st64)
    with pytest.raises(ValueError, match="T"):
        S.ScheduleTensors("cpu", T=0)


def test_proportional_schedules_equal_the_reference_at_its_length():
    ref = S.ScheduleTensors("cpu", T=T)
    prop = S.ScheduleTensors("cpu", T=T, T_ref=T)
    for t in (0, 1, 149, 150, 12000, 29999, 30000, 49999, 50000):
        assert prop.values(t) == ref.values(t), t
    assert scaled_iteration(12000, T, T) == 12000 and scaled_iteration(6000, T, T) == 6000


def test_proportional_schedules_at_300_iterations():
    # ACDC: the ramp is full at 0.6 T, copy-paste starts at 0.24 T
    full = S.consistency_weight(10 ** 6)
    w = [S.consistency_weight(t, scale=(300, T)) for t in range(301)]
    assert w[180] == full and w[179] < full and all(x == full for x in w[180:])
    assert all(a <= b for a, b in zip(w, w[1:]))  # a ramp: never decreasing
    assert w[0] == S.consistency_weight(0)  # starts where the reference starts
    assert scaled_iteration(12000, 300, T) == 72
    # the same epochs as the reference run, 300/50000 as long: t=90 ~ reference t=15000
    assert w[90] == S.consistency_weight(15000)
    st = S.ScheduleTensors("cpu", T=300, T_ref=T)
    st.update(180)
    assert st.w.item() == pytest.approx(full, rel=1e-7)
    # the lr, λ and the gate threshold follow t/T in both modes
    ab = S.ScheduleTensors("cpu", T=300)
    for t in (0, 72, 299):
        a, p = ab.values(t), st.values(t)
        assert (a["lr"], a["lam"], a["thr"]) == (p["lr"], p["lam"], p["thr"])
    with pytest.raises(ValueError, match="T_ref"):
        S.ScheduleTensors("cpu", T=300, T_ref=0)


def test_proportional_switch_rounds_to_the_nearest_iteration():
    assert scaled_iteration(12000, 1000, T) == 240
    assert scaled_iteration(12000, 1, T) == 0  # 0.24 rounds to 0
    assert scaled_iteration(6000, 1500, 50000) == 180
    assert scaled_iteration(1, 1, 2) == 1  # 0.5 rounds up
