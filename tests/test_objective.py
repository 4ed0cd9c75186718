"""The step objective in every pseudo-label mode, both phases, on a tiny real model."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast.models import build_ucseg_2d
from ucseg_fast.train.objective import UCSegObjective
from ucseg_fast.train.schedules import ScheduleTensors


def _setup(mode, **kw):
    torch.manual_seed(0)
    model = build_ucseg_2d(num_classes=4, img_size=(32, 32)).train()
    obj = UCSegObjective(4, pseudo_mode=mode, queue_size=16, **kw)
    sched = ScheduleTensors("cpu", T=100)
    sched.update(10)
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 4, (2, 32, 32))
    return model, obj, sched, x, y


@pytest.mark.parametrize("mode", ["fusion", "entropy", "fusion+mask"])
@pytest.mark.parametrize("phase2", [False, True])
def test_modes_give_finite_loss_and_gradients(mode, phase2):
    model, obj, sched, x, y = _setup(mode)
    L, terms = obj(model, x, y, sched, phase2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(L)
    L.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert ("mix1" in terms) == phase2
    assert ("mask_frac" in terms) == (mode != "fusion")
    for k in ("sup1", "sup2", "pseudo", "unsup1", "unsup2", "ic", "ife1", "ife2", "L"):
        assert terms[k].requires_grad is False and torch.isfinite(terms[k])


def test_confidence_threshold_is_a_live_tensor():
    # tau = 1.0 keeps (almost) nothing, tau = 0 keeps every pixel: the mask follows the tensor
    model, obj, sched, x, y = _setup("entropy")
    sched.tau.fill_(0.0)
    _, t0 = obj(model, x, y, sched, False)
    sched.tau.fill_(1.0)
    _, t1 = obj(model, x, y, sched, False)
    assert float(t0["mask_frac"]) == 1.0 and float(t1["mask_frac"]) < 0.01


def test_closed_gate_leaves_queues_and_open_gate_fills_them():
    model, obj, sched, x, y = _setup("fusion")
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    sched.thr.fill_(2.0)  # a Dice can never exceed 2: gate closed
    obj(model, x, y, sched, False)
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())
    sched.thr.fill_(-1.0)  # always open
    obj(model, x, y, sched, False)
    assert not torch.equal(before["ccp.levels.0.queue1"], obj.state_dict()["ccp.levels.0.queue1"])
