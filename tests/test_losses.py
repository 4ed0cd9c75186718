"""Loss primitives (ucseg_fast.losses) against hand-computed values and analytic gradients."""
from __future__ import annotations

import math

import pytest
import torch

from ucseg_fast import losses as L

f64 = torch.float64


def _t(x, dtype=f64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------------- CE ----
def test_ce_hand_case_and_gradient():
    # logits [B=1, C=2, H=1, W=2]: pixel 0 z = (0, 0), y = class 0 -> -log(1/2) = log 2
    #                               pixel 1 z = (log 3, 0), y = class 1 -> -log(1/4) = log 4
    z = _t([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]]).requires_grad_()
    y = _t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    loss = L.ce_loss(z, y)
    assert loss.item() == pytest.approx(1.5 * math.log(2.0), rel=1e-15)
    loss.backward()
    # dL/dz = (softmax - y) / (B*S) = pixel 0: (0.5-1, 0.5)/2 ; pixel 1: (0.75, 0.25-1)/2
    expect = _t([[[[-0.25, 0.375]], [[0.25, -0.375]]]])
    torch.testing.assert_close(z.grad, expect, rtol=1e-14, atol=1e-15)


def test_ce_all_zero_row_contributes_zero_but_counts():
    z = _t([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]]).requires_grad_()
    y = _t([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # pixel 1: no class (nms=0 pseudo-label)
    loss = L.ce_loss(z, y)
    assert loss.item() == pytest.approx(math.log(2.0) / 2, rel=1e-15)  # divided by 2 pixels
    loss.backward()
    assert torch.equal(z.grad[..., 1], torch.zeros(1, 2, 1, dtype=f64))


# ---------------------------------------------------------------------------------- BCE ----
def test_bce_hand_case():
    # (1-y) z + softplus(-z): z=0,y=1 -> log 2 ; z=25,y=0 -> 25 + log1p(e^-25) ;
    # z=-30,y=0 -> -30 + softplus(30) = log1p(e^-30) ; z=3,y=1 -> log1p(e^-3)
    z = _t([[[[0.0, 25.0]], [[-30.0, 3.0]]]])
    y = _t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    expect = (math.log(2.0) + 25.0 + math.log1p(math.exp(-25.0)) + math.log1p(math.exp(-30.0))
              + math.log1p(math.exp(-3.0))) / 4
    assert L.bce_loss(z, y).item() == pytest.approx(expect, rel=1e-14)


# --------------------------------------------------------------------------------- Dice ----
def test_dice_hand_case():
    eps = 1e-5
    # [1, 2, 1, 2]; channel 0: p=(0.5,0.25), y=(1,0): I=0.5, sum p=0.75, sum y=1
    #               channel 1: p=(0.5,0.75), y=(0,1): I=0.75, sum p=1.25, sum y=1
    p = _t([[[[0.5, 0.25]], [[0.5, 0.75]]]])
    y = _t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    d0 = 1 - (1.0 + eps) / (1.75 + eps)
    d1 = 1 - (1.5 + eps) / (2.25 + eps)
    assert L.dice_loss(p, y).item() == pytest.approx((d0 + d1) / 2, rel=1e-14)


def test_dice_empty_vs_empty_is_zero_and_absent_class_is_one():
    p = torch.zeros(1, 2, 3, 3, dtype=f64)
    p[:, 0] = 1.0
    y = p.clone()  # channel 1 empty in both -> D = eps/eps = 1 -> loss 0; channel 0 perfect
    assert L.dice_loss(p, y).item() == pytest.approx(0.0, abs=1e-15)
    y2 = torch.zeros_like(p)
    y2[:, 1] = 1.0  # GT all class 1, prediction all class 0 -> both channels D = eps/(9+eps)
    assert L.dice_loss(p, y2).item() == pytest.approx(1 - 1e-5 / (9 + 1e-5), rel=1e-14)


def test_dice_3d_is_per_axial_slice():
    eps = 1e-5
    # [B=1, C=1, H=2, W=1, D=2]: slice d=0 p=y=(1,1) -> 0 ; slice d=1 p=(1,1), y=(0,0)
    p = torch.ones(1, 1, 2, 1, 2, dtype=f64)
    y = torch.zeros_like(p)
    y[..., 0] = 1.0
    per_slice = (0.0 + (1 - eps / (2 + eps))) / 2
    assert L.dice_loss(p, y).item() == pytest.approx(per_slice, rel=1e-14)
    whole_volume = 1 - (4 + eps) / (6 + eps)  # what a (2,3,4) reduction would give instead
    assert abs(L.dice_loss(p, y).item() - whole_volume) > 0.1


def test_dice_gradient_matches_closed_form():
    # docs/method.md §6.5: dL/dp_i = -(2 Y_i (U+eps) - (2I+eps)) / (G (U+eps)^2), G = B*C groups
    torch.manual_seed(0)
    eps = 1e-5
    p = torch.rand(2, 3, 4, 5, dtype=f64).requires_grad_()
    y = (torch.rand(2, 3, 4, 5, dtype=f64) > 0.5).to(f64)
    L.dice_loss(p, y).backward()
    I = (p * y).sum((2, 3), keepdim=True).detach()
    U = (p.sum((2, 3), keepdim=True) + y.sum((2, 3), keepdim=True)).detach()
    G = 2 * 3
    expect = -(2 * y * (U + eps) - (2 * I + eps)) / (G * (U + eps) ** 2)
    torch.testing.assert_close(p.grad, expect, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------- AU ----
def _au_ref(z: list[float], k: int, lam: float, one_minus_lam: float, eps: float = 1e-10) -> float:
    sp = [x if x > 20 else math.log1p(math.exp(x)) for x in z]
    alpha = [v + 1 for v in sp]
    S = sum(alpha)
    scores = [a / S for a in alpha]
    s = max(scores)
    k_hat = scores.index(s)  # first index on ties
    u = len(z) / S
    if k_hat == k:
        return lam * (-s * math.log(1 - u + eps))
    return one_minus_lam * (-(1 - s) * math.log(u + eps))


def test_au_hand_cases_float32_lambda():
    lam = torch.tensor(0.01, dtype=torch.float32)
    lam_f = float(lam)  # 0.009999999776482582: the float32 value, not 0.01
    one_minus = float(1 - lam)  # 0.9900000095367432
    # [1, 2, 1, 3]: pixel 0 tie (0,0) -> k_hat 0 = target (a=1); pixel 1 tie, target 1 (a=0);
    # pixel 2 (30, -30): softplus(30) = 30 exactly (threshold branch), target 0 (a=1)
    z = _t([[[[0.0, 0.0, 30.0]], [[0.0, 0.0, -30.0]]]])
    k = torch.tensor([[[0, 1, 0]]])
    per = L.au_loss(z, k, lam, reduction="none")
    cols = [[0.0, 0.0], [0.0, 0.0], [30.0, -30.0]]
    expect = [_au_ref(c, kk, lam_f, one_minus) for c, kk in zip(cols, [0, 1, 0])]
    torch.testing.assert_close(per.flatten(), _t(expect), rtol=1e-14, atol=0)
    # pixel 0 by hand: s = 1/2, u = 2/(2(1+log 2)) = 1/(1+log 2)
    u0 = 1 / (1 + math.log(2))
    assert per[0, 0, 0].item() == pytest.approx(lam_f * (-0.5 * math.log(1 - u0 + 1e-10)), rel=1e-14)
    assert per[0, 0, 0].item() != pytest.approx(0.01 * (-0.5 * math.log(1 - u0 + 1e-10)), rel=1e-9)
    assert L.au_loss(z, k, lam).item() == pytest.approx(sum(expect) / 3, rel=1e-14)


def test_au_gradient_matches_closed_form_including_softplus_threshold():
    # docs/method.md §6.5 with g_c = sp'(z_c) (exactly 1 for z > 20)
    z = _t([[[[0.3, 30.0, -1.0]], [[-0.7, -30.0, 2.0]], [[1.1, 25.0, 0.5]]]]).requires_grad_()
    k = torch.tensor([[[0, 1, 2]]])  # pixel 0: hit (a=1), pixel 1: miss, pixel 2: hit
    lam = torch.tensor(0.3, dtype=torch.float32)
    lam_f, olam = float(lam), float(1 - lam)
    L.au_loss(z, k, lam).backward()
    eps, C, n = 1e-10, 3, 3
    zz = z.detach()[0, :, 0, :].T  # [pixel, C]
    g = torch.where(zz > 20, torch.ones_like(zz), torch.sigmoid(zz))
    alpha = torch.where(zz > 20, zz, torch.log1p(torch.exp(zz))) + 1
    S = alpha.sum(1, keepdim=True)
    s, m = (alpha / S).max(1, keepdim=True)
    u = C / S
    a = (m.squeeze(1) == k.flatten()).to(f64).unsqueeze(1)
    dLds = -lam_f * a * torch.log(1 - u + eps) + olam * (1 - a) * torch.log(u + eps)
    dLdu = lam_f * a * s / (1 - u + eps) - olam * (1 - a) * (1 - s) / (u + eps)
    onehot_m = torch.nn.functional.one_hot(m.squeeze(1), C).to(f64)
    dsdz = g * (onehot_m / S - alpha.gather(1, m) / S ** 2)
    dudz = -C * g / S ** 2
    expect = (dLds * dsdz + dLdu * dudz) / n
    torch.testing.assert_close(z.grad[0, :, 0, :].T, expect, rtol=1e-12, atol=1e-16)


def test_au_accepts_python_float_lambda_and_3d():
    torch.manual_seed(1)
    z = torch.randn(1, 2, 3, 3, 2, dtype=f64)
    k = torch.randint(0, 2, (1, 3, 3, 2))
    a = L.au_loss(z, k, 0.25)
    b = L.au_loss(z, k, torch.tensor(0.25, dtype=torch.float32))
    assert a.item() == b.item()
    per = L.au_loss(z, k, 0.25, reduction="none")
    assert per.shape == (1, 3, 3, 2)


# ------------------------------------------------------------------------------ gradcheck ----
def test_gradcheck_float64():
    torch.manual_seed(2)
    z = torch.randn(2, 3, 3, 2, dtype=f64, requires_grad=True)
    cls = torch.randint(0, 3, (2, 3, 2))
    y = torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).to(f64)
    y[0, :, 0, 0] = 0.0  # an all-zero CE row
    lam = torch.tensor(0.2, dtype=torch.float32)
    assert torch.autograd.gradcheck(lambda x: L.ce_loss(x, y), (z,))
    assert torch.autograd.gradcheck(lambda x: L.bce_loss(x, y), (z,))
    assert torch.autograd.gradcheck(lambda x: L.dice_loss(torch.softmax(x, 1), y), (z,))
    assert torch.autograd.gradcheck(lambda x: L.au_loss(x, cls, lam), (z,))


# --------------------------------------------------------------------------------- diff ----
def test_diff_loss_last_channel_clamp_and_detached():
    # channel 1 (= C-1) only: p_a = (0.5, 0 -> clamped 1e-8), p_b = (1, 1)
    # BCE = mean(-log 0.5, -log 1e-8) ; channel 0 is garbage that must be ignored
    pa = _t([[[[0.3, 0.9]], [[0.5, 0.0]]]]).requires_grad_()
    pb = _t([[[[0.7, 0.2]], [[1.0, 1.0]]]])
    d = L.diff_loss(pa, pb)
    assert d.dim() == 0 and not d.requires_grad
    assert d.item() == pytest.approx((math.log(2.0) - math.log(1e-8)) / 2, rel=1e-12)
    # upper clamp 1 - 1e-7 with target 0: -log(1e-7) (up to the rounding of 1 - 1e-7)
    d2 = L.diff_loss(_t([[[[0.0]], [[1.0]]]]), _t([[[[0.0]], [[0.0]]]]))
    assert d2.item() == pytest.approx(-math.log1p(-(1 - 1e-7)), rel=1e-12)


def test_diff_loss_matches_nn_bceloss():
    torch.manual_seed(3)
    pa = torch.softmax(torch.randn(2, 4, 5, 5, dtype=f64), 1)
    pb = torch.softmax(torch.randn(2, 4, 5, 5, dtype=f64), 1)
    ref = torch.nn.BCELoss()(pa[:, 3].clamp(1e-8, 1 - 1e-7), pb[:, 3])
    torch.testing.assert_close(L.diff_loss(pa, pb), ref, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------- gate ----
def test_queue_gate_soft_hand_case():
    # [1, 3, 1, 2]; GT classes (1, 2). soft p: class1 (0.6, 0.3), class2 (0.1, 0.5)
    # class 1: g=(1,0): 2*0.6/(0.9+1+0.001) ; class 2: g=(0,1): 2*0.5/(0.6+1+0.001)
    p = _t([[[[0.3, 0.2]], [[0.6, 0.3]], [[0.1, 0.5]]]])
    y = _t([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]])
    expect = (1.2 / 1.901 + 1.0 / 1.601) / 2
    assert L.queue_gate(p, y).item() == pytest.approx(expect, rel=1e-6)
    # binary variant: channel 1 only
    assert L.queue_gate(p, y, binary=True).item() == pytest.approx(1.2 / 1.901, rel=1e-6)


def test_queue_gate_zero_denominator():
    p = torch.zeros(1, 2, 2, 2)
    p[:, 0] = 1.0
    y = p.clone()  # class 1 absent in GT and prediction -> 0, not nan
    g = L.queue_gate(p, y)
    assert g.dtype == torch.float32 and g.item() == 0.0


def test_queue_gate_hard_hand_case():
    pred = torch.tensor([[[1, 1]]])
    tgt = torch.tensor([[[1, 2]]])
    # class 1: |P|=2, |G|=1, |P∩G|=1 -> 2/3.001 ; class 2: 0/(0+1+0.001) = 0
    assert L.queue_gate_hard(pred, tgt, 3).item() == pytest.approx((2 / 3.001 + 0.0) / 2, rel=1e-6)
    # both empty for class 1 -> 0; binary C = 2
    assert L.queue_gate_hard(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 2).item() == 0.0


# --------------------------------------------------------------------- term dictionaries ----
def test_supervised_and_unsup_terms_order_and_values():
    torch.manual_seed(4)
    z = torch.randn(2, 4, 6, 6, dtype=f64)
    cls = torch.randint(0, 4, (2, 6, 6))
    y = torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).to(f64)
    lam = torch.tensor(0.05, dtype=torch.float32)
    t = L.supervised_terms(z, y, cls, lam, kind="ce")
    assert list(t) == ["ce", "au", "dice"]
    assert t["ce"].item() == L.ce_loss(z, y).item()
    assert t["dice"].item() == L.dice_loss(torch.softmax(z, 1), y).item()
    assert L.supervised_total(t).item() == ((t["ce"] + t["au"]) + t["dice"]).item()
    assert L.pseudo_total(t).item() == ((t["dice"] + t["ce"]) + t["au"]).item()
    tb = L.supervised_terms(z, y, cls, lam, kind="bce")
    assert list(tb) == ["bce", "au", "dice"]
    assert tb["dice"].item() == L.dice_loss(torch.sigmoid(z), y).item()
    u = L.unsup_terms(z, y.float(), "bce")
    assert list(u) == ["bce", "dice"]
    assert L.unsup_total(u).item() == (u["bce"] + u["dice"]).item()
    with pytest.raises(ValueError, match="kind"):
        L.unsup_terms(z, y, "mse")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(2, 4, 6, 6), (1, 2, 4, 4, 3)])
def test_low_precision_inputs_give_fp32_losses(shape):
    torch.manual_seed(5)
    z = torch.randn(*shape)
    cls = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    y = torch.nn.functional.one_hot(cls, shape[1]).movedim(-1, 1).float()
    lam = torch.tensor(0.1)
    zb = z.to(torch.bfloat16)
    for kind in ("ce", "bce"):
        ref = L.supervised_terms(z, y, cls, lam, kind)
        low = L.supervised_terms(zb, y.to(torch.bfloat16), cls, lam, kind)
        for k in ref:
            assert low[k].dtype == torch.float32, k
            # bf16 rounding of the logits only (~4e-3 relative), the math is fp32
            torch.testing.assert_close(low[k], ref[k], rtol=2e-2, atol=2e-3)


def test_under_bf16_autocast_losses_stay_fp32_and_differentiable():
    torch.manual_seed(6)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    cls = torch.randint(0, 4, (2, 6, 6))
    y = torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float()
    w = torch.randn(4, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.conv2d(x, w)
        assert z.dtype == torch.bfloat16
        t = L.supervised_terms(z, y, cls, torch.tensor(0.1), "ce")
        u = L.unsup_terms(z, y, "bce")
        d = L.diff_loss(torch.softmax(z, 1), torch.softmax(z, 1))  # F.binary_cross_entropy would raise here
        total = L.supervised_total(t) + L.unsup_total(u) + 0.5 * d
    assert all(v.dtype == torch.float32 for v in (*t.values(), *u.values(), d, total))
    total.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    z = torch.randn(2, 4, 16, 16, device=dev, requires_grad=True)
    cls = torch.randint(0, 4, (2, 16, 16), device=dev)
    y = torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float()
    lam = torch.tensor(0.1, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = L.supervised_terms(z, y, cls, lam, "ce")
        u = L.unsup_terms(z, y, "ce")
        total = L.supervised_total(t) + L.unsup_total(u) + 0.5 * L.diff_loss(torch.softmax(z, 1), y)
        total.backward()
        L.queue_gate(torch.softmax(z, 1), y)
        L.queue_gate_hard(z.argmax(1), cls, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
