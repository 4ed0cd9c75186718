"""The step objective in every pseudo-label mode, both phases, on a tiny real model."""
from __future__ import annotations

import copy

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


# --- loss.fused_losses: the fused ops.fusion_loss path equals the PyTorch chain -------------
_FUSED_CASES = [("softmax", True, "fusion"), ("softmax", False, "fusion"),
                ("sigmoid", True, "fusion"), ("sigmoid", False, "fusion"),
                ("softmax", True, "entropy")]


def _one_step(model, obj, x, y, phase2):
    """One objective forward + backward from a fixed RNG state (dropout, copy-paste draw)."""
    torch.manual_seed(123)
    L, terms = obj(model, x, y, obj._sched, phase2, generator=torch.Generator().manual_seed(7))
    L.backward()
    return terms, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("phase2", [False, True], ids=["phase1", "phase2"])
@pytest.mark.parametrize("supervision,nms,mode", _FUSED_CASES,
                         ids=[f"{s}-nms{int(n)}-{m}" for s, n, m in _FUSED_CASES])
def test_fused_losses_match_the_pytorch_chain(supervision, nms, mode, phase2, monkeypatch):
    from ucseg_fast.ops import fusion_loss

    launches = []
    real_launch = fusion_loss._launch_fwd
    monkeypatch.setattr(fusion_loss, "_launch_fwd",
                        lambda *a: launches.append(a[1] is not None) or real_launch(*a))
    C = 2 if supervision == "sigmoid" else 4
    torch.manual_seed(0)
    model = build_ucseg_2d(num_classes=C, img_size=(32, 32)).train()
    model_f = copy.deepcopy(model)
    objs = []
    for fused in (False, True):
        torch.manual_seed(1)  # identical CCP queue initialisation
        o = UCSegObjective(C, pseudo_mode=mode, nms=nms, queue_size=16, supervision=supervision,
                           fused_losses=fused)
        o._sched = ScheduleTensors("cpu", T=100)
        o._sched.update(10)
        o._sched.thr.fill_(-1.0)  # gate open: the queue update is part of the compared step
        objs.append(o)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = torch.randint(0, C, (1, 32, 32), generator=g)
    t_ref, g_ref = _one_step(model, objs[0], x, y, phase2)
    assert launches == []  # the default path never touches the fused kernels
    t_fus, g_fus = _one_step(model_f, objs[1], x, y, phase2)
    # labeled z1 + z2 (pair), P (single); fusion-mode unsup pair; phase-2 mixed pair
    want = [True, False] + [True] * (mode == "fusion") + [True] * phase2
    assert launches == want

    assert t_ref.keys() == t_fus.keys()
    for k in t_ref:
        torch.testing.assert_close(t_fus[k], t_ref[k], rtol=1e-4, atol=1e-5, msg=f"term {k}")
    for k, v in objs[0].state_dict().items():  # queues fed by the same pseudo-labels
        torch.testing.assert_close(objs[1].state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert g_ref.keys() == g_fus.keys()
    n_grads = 0
    for n, gr in g_ref.items():
        assert (gr is None) == (g_fus[n] is None), n
        if gr is not None:
            torch.testing.assert_close(g_fus[n], gr, rtol=1e-4, atol=1e-5, msg=f"grad {n}")
            n_grads += 1
    assert n_grads > 50


@pytest.mark.parametrize("fused", [False, True])
def test_supervised_baseline_has_no_unlabeled_term(fused):
    """loss.semi_supervised = false: only the labeled terms of z1, z2 and P, computed on the
    labeled images alone (the unlabeled half changes nothing), and the queues stay untouched;
    its L is the same combination of those terms as in the semi-supervised objective."""
    model, obj, sched, x, y = _setup("fusion", semi_supervised=False, fused_losses=fused)
    before = copy.deepcopy(obj.state_dict())
    L, terms = obj(model, x, y, sched, True)  # phase 2 asked for: the baseline has none
    labeled = {"ce1_l", "dice1_l", "au1", "ce2_l", "dice2_l", "au2", "ceP_l", "diceP_l", "auP"}
    assert set(terms) == labeled | {"sup1", "sup2", "pseudo", "L"}
    assert torch.allclose(terms["L"], 0.5 * (terms["sup1"] + terms["sup2"]) + terms["pseudo"])
    assert torch.equal(L.detach(), terms["L"])
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())
    L.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # other unlabeled images: the same loss (model in eval: dropout would differ per call)
    model.eval()
    x2 = x.clone()
    x2[2:] = torch.rand_like(x2[2:])
    L1, _ = obj(model, x, y, sched, False)
    L2, _ = obj(model, x2, y, sched, False)
    assert torch.equal(L1, L2)
    # the semi-supervised objective's labeled terms are the same numbers on the same images
    model_s, obj_s, sched_s, _, _ = _setup("fusion", fused_losses=fused)
    model_s.load_state_dict(model.state_dict())
    model_s.eval()
    _, ts = obj_s(model_s, x[:2], y, sched_s, False)
    _, tb = obj(model, x[:2], y, sched, False)
    for k in labeled:
        assert torch.allclose(ts[k], tb[k], atol=1e-6), k
