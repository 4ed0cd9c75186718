"""Golden parity of loss primitives, pseudo-labels, copy-paste and schedules.

The golden keys `loss.*`, `pl.*`, `mix.*` and `sched.table`, each under its tolerance class
(tests/golden/README.md); and the input generator's check vectors (the test lives in
tests/golden.py, which is no test module of its own).
"""
from __future__ import annotations


import pytest
import torch

from golden import disc_map, golden, one_hot
from golden import test_generator_check_vectors  # noqa: F401  (collected here)
from ucseg_fast import losses as L
from ucseg_fast import pseudo_labels as PL
from ucseg_fast.config import scaled_iteration

T = 50000
AU_T = {"t0": 0, "t05": 25000, "t1": 50000}


def _schedules():
    from ucseg_fast.train import schedules
    return schedules






@pytest.fixture(scope="module")
def g():
    return golden()


@pytest.fixture(scope="module")
def zy(g):
    z = g.tensor("loss.z")
    y_cls = g.tensor("loss.y_cls").long()
    return z, y_cls, one_hot(y_cls)


def _grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_()
    v = fn(z)
    (gz,) = torch.autograd.grad(v, z)
    return v.detach(), gz


# ------------------------------------------------------------------------------ item 3 ----
def test_loss_inputs(g, zy):
    z, y_cls, _ = zy
    assert z.dtype == torch.float64 and z.shape == (2, 4, 8, 8)
    # the golden input: image 0 row 7, cols 0..3 (softplus threshold branch, ties)
    assert z[0, :, 7, 0].tolist() == [30.0, -30.0, 0.0, 0.0]
    assert z[0, :, 7, 1].tolist() == [-30.0, 30.0, -30.0, 30.0]
    assert len(set(z[0, :, 7, 2].tolist())) == 1
    assert z[0, :, 7, 3].tolist() == [-30.0, -30.0, 25.0, -30.0]
    assert int(y_cls.min()) >= 0 and int(y_cls.max()) <= 3
    assert set(g.tensor("loss.zero_rows").unique().tolist()) <= {0, 1}
    assert g.tensor("loss.z_b").shape == z.shape


def test_loss_ce(g, zy):
    z, _, y = zy
    v, gz = _grad(lambda x: L.ce_loss(x, y), z)
    g.check("loss.ce", v, "f64")
    g.check("loss.ce.grad", gz, "f64")


def test_loss_ce_zero_rows(g, zy):
    z, _, y = zy
    y0 = y * (1 - g.tensor("loss.zero_rows").to(torch.float64)).unsqueeze(1)
    v, gz = _grad(lambda x: L.ce_loss(x, y0), z)
    g.check("loss.ce_zero_rows", v, "f64")
    g.check("loss.ce_zero_rows.grad", gz, "f64")


def test_loss_dice(g, zy):
    z, _, y = zy
    v, gz = _grad(lambda x: L.dice_loss(torch.softmax(x, 1), y), z)
    g.check("loss.dice", v, "f64")
    g.check("loss.dice.grad", gz, "f64")
    p = torch.softmax(z, 1)
    per_bc = torch.tensor([[L.dice_loss(p[b:b + 1, c:c + 1], y[b:b + 1, c:c + 1]).item()
                            for c in range(4)] for b in range(2)], dtype=torch.float64)
    g.check("loss.dice.per_bc", per_bc, "f64")


@pytest.mark.parametrize("tag", sorted(AU_T))
def test_loss_au(g, zy, tag):
    z, y_cls, _ = zy
    lam = torch.tensor(_schedules().au_lambda(AU_T[tag], T), dtype=torch.float32)
    v, gz = _grad(lambda x: L.au_loss(x, y_cls, lam), z)
    g.check(f"loss.au.{tag}", v, "f64")
    g.check(f"loss.au.{tag}.grad", gz, "f64")
    per_pixel = L.au_loss(z, y_cls, lam, reduction="none").flatten()  # (b, h, w) row-major
    g.check(f"loss.au.{tag}.per_pixel", per_pixel, "f64")


def test_loss_diff(g, zy):
    z = zy[0]
    p, pb = torch.softmax(z, 1), torch.softmax(g.tensor("loss.z_b"), 1)
    d1 = L.diff_loss(p.float(), pb.float())  # loss_diff1 runs on float32 copies
    d2 = L.diff_loss(pb, p)  # loss_diff2: the mirror, float64
    d2_32 = L.diff_loss(pb.float(), p.float())
    assert d1.dtype == torch.float32 and d2.dtype == torch.float64
    g.check("loss.diff1", d1, "loose")
    g.check("loss.diff2", d2, "f64")
    g.check("loss.diff2_f32", d2_32, "loose")


def test_loss_gate(g, zy):
    z, y_cls, y = zy
    g.check("loss.gate", L.queue_gate(torch.softmax(z, 1), y), "loose")
    # the hard variant differs from the reference's soft gate on purpose (reference quirk)
    hard = L.queue_gate_hard(z.argmax(1), y_cls, 4)
    assert abs(hard.item() - g.scalar("loss.gate")) > 1e-3


def test_loss_float32_path_close_to_golden(g, zy):
    """The fp32 path (training precision) against the float64 golden values."""
    z, y_cls, y = zy
    z32 = z.float()
    lam = torch.tensor(_schedules().au_lambda(25000, T), dtype=torch.float32)
    for key, v in (("loss.ce", L.ce_loss(z32, y)),
                   ("loss.dice", L.dice_loss(torch.softmax(z32, 1), y)),
                   ("loss.au.t05", L.au_loss(z32, y_cls, lam))):
        assert v.dtype == torch.float32
        assert v.item() == pytest.approx(g.scalar(key), rel=2e-6, abs=1e-6), key


# ------------------------------------------------------------------------------ item 5 ----
def test_pl_argmax_nms1_nms0(g):
    P = g.tensor("pl.P")
    g.check("pl.argmax", PL.fusion_pseudo_label_map(P, nms=False), "exact")
    nms1 = PL.fusion_pseudo_label_map(P, nms=True)
    g.check("pl.nms1", nms1, "exact")
    Y1 = PL.fusion_pseudo_label(P, nms=True)
    assert Y1.dtype == torch.float32
    assert torch.equal(Y1, one_hot(g.tensor("pl.nms1").long()).float())
    assert torch.equal(PL.prediction_masks(P, nms=True), Y1)
    Y0 = PL.fusion_pseudo_label(P, nms=False)
    g.check("pl.nms0", Y0, "exact")
    g.check("pl.nms0_zero_rows", int((Y0.sum(1) == 0).sum()), "exact")


def test_pl_tie(g):
    P = g.tensor("pl.tie.P")
    assert set(P.unique().tolist()) == {1.0, 5.0}
    assert not bool((P[:, 3] == 5.0).any())  # class 3 absent
    g.check("pl.tie.nms1", PL.fusion_pseudo_label_map(P, nms=True), "exact")


@pytest.fixture(scope="module")
def mix_inputs(g):
    x_l, x_u = g.input("mix.in.x_l"), g.input("mix.in.x_u")
    y_l = one_hot(disc_map(g.scalar("mix.y_l_discs")))
    Y_u = one_hot(disc_map(g.scalar("mix.Y_u_discs")))
    box = g.scalar("mix.box")
    assert box["size"] == PL.copy_paste_box_size(256) == 170
    starts = torch.tensor([box["row_start"], box["col_start"]], dtype=torch.int64)
    M = PL.copy_paste_mask((256, 256), starts, torch.int64)  # int64 like generate_mask
    return x_l, x_u, y_l, Y_u, M, box


def test_mix_box_and_mask(g, mix_inputs):
    M, box = mix_inputs[4], mix_inputs[5]
    r, c, s = box["row_start"], box["col_start"], box["size"]
    assert 0 <= r <= 256 - s - 1 and 0 <= c <= 256 - s - 1
    expect = torch.ones(256, 256, dtype=torch.int64)
    expect[r:r + s, c:c + s] = 0
    assert torch.equal(M, expect)
    # generate_mask's second output (the per-image loss mask) equals M: one M for everything
    g.check("mix.loss_mask_equal", True, "exact")


@pytest.mark.parametrize("branch", ["a", "b"])
def test_mix_branches(g, mix_inputs, branch):
    x_l, x_u, y_l, Y_u, M, box = mix_inputs
    x_mix, y_mix = PL.copy_paste_mix(x_l, x_u, y_l, Y_u, M, torch.tensor(branch == "a"))
    g.check(f"mix.{branch}.x_mix", x_mix, "f64")
    r, c, s = box["row_start"], box["col_start"], box["size"]
    g.check(f"mix.{branch}.x_mix.corner_tl", x_mix[..., r - 4:r + 4, c - 4:c + 4], "exact")
    g.check(f"mix.{branch}.x_mix.corner_br", x_mix[..., r + s - 4:r + s + 4, c + s - 4:c + s + 4], "exact")
    assert torch.equal(y_mix.sum(1), torch.ones(2, 256, 256, dtype=torch.float64))  # exact one-hot
    g.check(f"mix.{branch}.y_mix", y_mix.argmax(1), "exact")


# ------------------------------------------------------------------------------ item 6 ----
def test_sched_table(g):
    S = _schedules()
    table = g.scalar("sched.table")
    assert len(table) == 14

    def f64(key, a, b):
        g._close(key, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), "f64")

    for row in table:
        t = row["t"]
        k = f"sched.table[t={t}]"
        f64(k + ".w", S.consistency_weight(t), row["w"])
        # proportional schedules at the reference T are the reference's, bit for bit
        assert S.consistency_weight(t, scale=(T, T)) == S.consistency_weight(t), k
        assert S.phase(t, scaled_iteration(12000, T, T)) == row["phase"], k
        st = S.ScheduleTensors("cpu", dtype=torch.float64, T=T, T_ref=T, clamp_at_T=False)
        assert st.values(t) == S.ScheduleTensors("cpu", dtype=torch.float64, T=T,
                                                 clamp_at_T=False).values(t), k
        lam = S.au_lambda(t, T)
        assert lam == row["lambda_f32"], (k, lam, row["lambda_f32"])  # exact float32 value
        one_minus = float(1 - torch.tensor(lam, dtype=torch.float32))  # what au_loss uses
        assert one_minus == row["one_minus_lambda_f32"], (k, one_minus)
        f64(k + ".lambda_exact", S.au_lambda_exact(t, T), row["lambda_exact"])
        f64(k + ".thr", S.queue_threshold(t, T), row["thr"])
        # reference mode (no stop at T): reproduces the negative lr of t = 50100
        f64(k + ".lr_set_after_step", S.lr_after_step(t, 0.01, T, clamp_at_T=False),
            row["lr_set_after_step"])
        f64(k + ".lr_used_in_step", S.lr_at(t, 0.01, T, clamp_at_T=False), row["lr_used_in_step"])
        # project mode: identical up to T, never negative after it
        if t <= T:
            assert S.lr_at(t, 0.01, T) == S.lr_at(t, 0.01, T, clamp_at_T=False)
        assert S.lr_at(t, 0.01, T) >= 0.0
        assert S.phase(t) == row["phase"], k
