"""Schedules (ucseg_fast.train.schedules) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

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
