"""pseudo_label_loss: fused masked CE + soft Dice, forward and backward, against the fp64 oracle
and the golden CE/Dice numbers of the authors' code; edge cases, registration, compile, GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden import golden
from ucseg_fast.ops import (CrossPseudoLabelLoss, PseudoLabelLoss, cross_pseudo_label_loss,
                            entropy_pseudo_label, pseudo_label_loss, reference)
from ucseg_fast.ops import pseudo_loss as pl_mod
from ucseg_fast.ops.reference import tolerance

CASES = [  # (B, C, spatial, dtype, memory format, mask kind, dice_weight)
    (2, 2, (5, 7), torch.float32, torch.contiguous_format, "random", 0.0),
    (2, 3, (5, 7), torch.bfloat16, torch.channels_last, "random", 0.5),
    (1, 4, (3, 4, 5), torch.float16, torch.contiguous_format, None, 1.0),
    (2, 5, (3, 4, 5), torch.float32, torch.channels_last_3d, "all", 0.3),
    (2, 4, (5, 7), torch.float32, torch.channels_last, "random", 1.0),
]


def _inputs(B, C, spatial, dtype, fmt, mask_kind, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn((B, C, *spatial), generator=g) * scale).to(dtype)
    labels = torch.randint(0, C, (B, *spatial), generator=g)
    mask = {None: None, "random": torch.rand((B, *spatial), generator=g) > 0.4,
            "all": torch.ones((B, *spatial), dtype=torch.bool),
            "none": torch.zeros((B, *spatial), dtype=torch.bool)}[mask_kind]
    z = z.to(device).contiguous(memory_format=fmt).requires_grad_(True)
    return z, labels.to(device), None if mask is None else mask.to(device)


def _oracle_and_baseline(z, labels, mask, w):
    out = []
    for dt in (torch.float64, z.dtype):
        x = z.detach().to(dt).requires_grad_(True)
        loss = reference.pseudo_label_loss(x, labels, mask, dice_weight=w, dtype=dt)
        (g,) = torch.autograd.grad(loss, x)
        out.append((loss.detach(), g))
    return out


def _check(z, labels, mask, w, loss, dz):
    (l64, g64), (lb, gb) = _oracle_and_baseline(z, labels, mask, w)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert reference.max_abs_err(loss, l64) <= tolerance(l64, lb, atol=1e-6)
    assert reference.max_abs_err(dz, g64) <= tolerance(g64, gb, atol=1e-8, out_dtype=z.dtype)


@pytest.mark.parametrize("B,C,spatial,dtype,fmt,mask_kind,w", CASES)
def test_matches_oracle(B, C, spatial, dtype, fmt, mask_kind, w):
    z, labels, mask = _inputs(B, C, spatial, dtype, fmt, mask_kind)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=w)
    (dz,) = torch.autograd.grad(loss, z)
    _check(z, labels, mask, w, loss, dz)


def test_multi_tile_programs_and_determinism(monkeypatch):
    # 33x40 pixels at C = 4 are 3 tiles of 512; with 2 target programs for B = 2 each program
    # sweeps all 3 tiles (the loop inside the forward kernel)
    monkeypatch.setattr(pl_mod, "_TARGET_PROGRAMS", 2)
    z, labels, mask = _inputs(2, 4, (33, 40), torch.float32, torch.contiguous_format, "random", seed=5)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    (dz,) = torch.autograd.grad(loss, z)
    _check(z, labels, mask, 0.7, loss, dz)
    again = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    assert torch.equal(loss, again)  # no atomics: bitwise reproducible
    # finalize reducing the partial rows in several chunks (1 row per chunk)
    monkeypatch.setattr(pl_mod, "_TARGET_PROGRAMS", 1024)
    monkeypatch.setattr(pl_mod, "_FINALIZE_TILE", 8)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    (dz,) = torch.autograd.grad(loss, z)
    _check(z, labels, mask, 0.7, loss, dz)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_no_kept_pixel_gives_zero_and_zero_grad(w):
    z, labels, mask = _inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "none")
    loss = pseudo_label_loss(z, labels, mask, dice_weight=w)
    (dz,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.count_nonzero(dz) == 0


PL_IGNORE_CASES = [  # (C, spatial, dtype, fmt, label dtype, ignore_index, mask kind, dice_weight)
    (4, (6, 7), torch.float32, torch.contiguous_format, torch.int64, -100, None, 1.0),
    (3, (6, 7), torch.bfloat16, torch.channels_last, torch.uint8, 255, "random", 0.5),
    (5, (3, 4, 5), torch.float32, torch.contiguous_format, torch.int32, 2, "random", 0.0),
    (2, (3, 4, 5), torch.float16, torch.channels_last_3d, torch.int64, 0, None, 1.0),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("C,spatial,dtype,fmt,ldt,ignore_index,mask_kind,w", PL_IGNORE_CASES)
def test_ignore_index_and_out_of_range_labels(C, spatial, dtype, fmt, ldt, ignore_index, mask_kind,
                                              w, backend, monkeypatch):
    """A pixel labelled ignore_index, C, 255 or −1 is not counted: the loss equals the loss of
    in-range labels with that pixel masked out (CE sum, its denominator and the Dice sums), on
    both paths, with several programs per sample. CE alone is torch's F.cross_entropy(ignore_index)."""
    from ucseg_fast import ops

    monkeypatch.setattr(pl_mod, "_TARGET_PROGRAMS", 4)
    z, labels, mask = _inputs(2, C, spatial, dtype, fmt, mask_kind, seed=21)
    r = torch.rand(labels.shape, generator=torch.Generator().manual_seed(22))
    bad = [C, 255, ignore_index % 256] if ldt == torch.uint8 else [C, 255, -1, ignore_index]
    lab = labels
    for i, v in enumerate(bad):
        lab = torch.where((r >= 0.1 * i) & (r < 0.1 * (i + 1)), v, lab)
    lab = lab.to(ldt)
    keep = reference.counted_pixels(lab, C, ignore_index)
    clean = torch.where(keep, lab.long(), 0)
    keep_m = keep if mask is None else keep & mask
    prev = ops.get_backend()
    ops.set_backend(backend)
    try:
        loss = pseudo_label_loss(z, lab, mask, dice_weight=w, ignore_index=ignore_index)
        (dz,) = torch.autograd.grad(loss, z)
        mod = PseudoLabelLoss(dice_weight=w, ignore_index=ignore_index)
        assert torch.equal(mod(z, lab, mask), loss) and f"ignore_index={ignore_index}" in repr(mod)
    finally:
        ops.set_backend(prev)
    _check(z, clean, keep_m, w, loss, dz)  # = the in-range labels, the pixels masked out
    assert torch.count_nonzero(dz * ~keep_m.unsqueeze(1)) == 0
    if w == 0.0 and mask is None:
        want = F.cross_entropy(z.detach().float(), torch.where(keep, lab.long(), -5),
                               ignore_index=-5)
        torch.testing.assert_close(loss.detach(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_every_label_ignored_gives_zero(backend):
    from ucseg_fast import ops

    z, labels, _ = _inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, None)
    prev = ops.get_backend()
    ops.set_backend(backend)
    try:
        loss = pseudo_label_loss(z, torch.full_like(labels, -1))
        (dz,) = torch.autograd.grad(loss, z)
    finally:
        ops.set_backend(prev)
    assert loss.item() == 0.0 and torch.count_nonzero(dz) == 0


def test_extreme_logits_and_hand_value():
    # ±1e4 logits: CE = 0 where the label is the big class, 2e4 where it is a -1e4 class
    z = torch.full((1, 3, 1, 2), -1e4)
    z[0, 0] = 1e4
    labels = torch.tensor([[[0, 2]]])
    loss = pseudo_label_loss(z.requires_grad_(True), labels)
    (dz,) = torch.autograd.grad(loss, z)
    assert loss.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2
    expect = torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.0, -0.5]]).view(1, 3, 1, 2)
    torch.testing.assert_close(dz, expect)
    # equal logits: p = 1/C, CE = log C for every pixel; Dice by hand for C = 2, one pixel each
    z = torch.zeros(1, 2, 1, 2, requires_grad=True)
    loss = pseudo_label_loss(z, torch.tensor([[[0, 1]]]), dice_weight=1.0, eps=0.0)
    # per class: I = 0.5, sum p = 1, sum y = 1 -> 1 - 2*0.5/2 = 0.5
    assert loss.item() == pytest.approx(0.6931471805599453 + 0.5, rel=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, "f64"), (torch.float32, "f32")])
def test_golden_ce_dice(dtype, tol):
    """CE and Dice of the authors' code (loss.*): fp64 via the reference path, fp32 via the
    Triton kernel. The authors' all-zero target rows (nms=0) count in the CE mean; a label
    outside [0, C) is not counted at all (ignore_index rule), so the loss over the n counted
    pixels times n/N is the golden all-zero-row CE over all N pixels."""
    g = golden()
    z = g.tensor("loss.z").to(dtype).requires_grad_(True)
    y = g.tensor("loss.y_cls").long()
    zero_rows = g.tensor("loss.zero_rows").bool()
    ce = pseudo_label_loss(z, y)
    (d_ce,) = torch.autograd.grad(ce, z)
    both = pseudo_label_loss(z, y, dice_weight=1.0)
    (d_both,) = torch.autograd.grad(both, z)
    g.check("loss.ce", ce.detach(), tol)
    g.check("loss.ce.grad", d_ce, tol)
    g.check("loss.dice", (both - ce).detach(), tol)
    g.check("loss.dice.grad", d_both - d_ce, tol)
    ratio = float((~zero_rows).sum()) / zero_rows.numel()  # n / N, exact in binary (48/128)
    ce_m = pseudo_label_loss(z, y, ~zero_rows) * ratio  # the same pixels left out by the mask
    for label in (4, 255, -1):
        ce0 = pseudo_label_loss(z, torch.where(zero_rows, label, y)) * ratio
        (d_ce0,) = torch.autograd.grad(ce0, z)
        g.check("loss.ce_zero_rows", ce0.detach(), tol)
        g.check("loss.ce_zero_rows.grad", d_ce0, tol)
        assert reference.max_abs_err(ce0, ce_m) <= 1e-6 * float(ce_m.detach().abs())
    # ignore_index inside [0, C): class 2 is left out wherever it is
    ig = pseudo_label_loss(z, y, ignore_index=2, dice_weight=1.0)
    assert reference.max_abs_err(ig, pseudo_label_loss(z, y, y != 2, dice_weight=1.0)) <= 1e-6


def test_backward_saves_no_float_class_tensor():
    z, labels, mask = _inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "random")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pseudo_label_loss(z, labels, mask, dice_weight=1.0)
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= z.numel()]
    assert all(t.data_ptr() == z.data_ptr() for t in big_float), "only the logits input may be saved"
    (dz,) = torch.autograd.grad(loss, z)
    _check(z, labels, mask, 1.0, loss, dz)


def test_opcheck_compile_module_errors():
    z, labels, mask = _inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "random")
    for m, w in ((mask, 0.5), (None, 0.0)):
        torch.library.opcheck(torch.ops.ucseg.pseudo_label_loss.default, (z, labels, m, w, 1e-5))
    _, coef = torch.ops.ucseg.pseudo_label_loss(z, labels, mask, 0.5, 1e-5)
    torch.library.opcheck(torch.ops.ucseg.pseudo_label_loss_backward.default,
                          (torch.tensor(1.0), z.detach(), labels, mask, coef, 0.5, 1e-5))

    def f(x):
        return pseudo_label_loss(x, labels, mask, dice_weight=0.5) * 3.0

    eager = f(z)
    (g_eager,) = torch.autograd.grad(eager, z)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(z)
    (g_comp,) = torch.autograd.grad(comp, z)
    assert torch.equal(eager, comp) and torch.equal(g_eager, g_comp)
    module_loss = PseudoLabelLoss(dice_weight=0.5)(z, labels, mask)
    assert torch.equal(module_loss, pseudo_label_loss(z, labels, mask, dice_weight=0.5))

    with pytest.raises(ValueError, match="labels"):
        pseudo_label_loss(z, labels.float(), mask)
    with pytest.raises(ValueError, match="mask"):
        pseudo_label_loss(z, labels, mask.float())
    with pytest.raises(TypeError, match="dice_weight"):
        pseudo_label_loss(z, labels, mask, dice_weight=torch.tensor(1.0))
    with pytest.raises(TypeError, match="ignore_index"):
        pseudo_label_loss(z, labels, mask, ignore_index=torch.tensor(1))
    torch.library.opcheck(torch.ops.ucseg.pseudo_label_loss.default,
                          (z, labels, mask, 0.5, 1e-5, 1))


CPS_CASES = [  # (C, spatial, dtype, memory format, select, dice_weight)
    (2, (5, 7), torch.float32, torch.contiguous_format, "min_entropy", 0.0),
    (4, (3, 4, 5), torch.bfloat16, torch.channels_last_3d, "mean", 1.0),
    (5, (5, 7), torch.float16, torch.channels_last, "min_entropy", 0.5),
]


def _pair(C, spatial, dtype, fmt, device="cpu", seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    za, zb = ((torch.randn((B, C, *spatial), generator=g) * 3).to(dtype) for _ in range(2))
    return (za.to(device).contiguous(memory_format=fmt).requires_grad_(True),
            zb.to(device).requires_grad_(True))


def _check_cross(za, zb, thr, select, w, out, gw=(2.0, 3.0)):
    """The fused two-subnet op equals entropy_pseudo_label + two pseudo_label_loss calls."""
    ref_pl = entropy_pseudo_label(za.detach(), zb.detach(), thr, select=select)
    # same per-pixel code in two kernels; compiled separately, FMA contraction may differ by an
    # ulp, which can flip a pixel that sits exactly on a tie: allow a handful, count them
    flips = int((out.pseudo.labels != ref_pl.labels).sum() + (out.pseudo.mask != ref_pl.mask).sum())
    assert flips <= max(0, ref_pl.labels.numel() // 100_000)
    assert reference.max_abs_err(out.pseudo.uncertainty, ref_pl.uncertainty) <= 1e-6
    assert 0 < int(out.pseudo.mask.sum()) < out.pseudo.mask.numel()
    dza, dzb = torch.autograd.grad(gw[0] * out.loss_a + gw[1] * out.loss_b, (za, zb))
    for z, loss, dz, scale in ((za, out.loss_a, dza, gw[0]), (zb, out.loss_b, dzb, gw[1])):
        _check(z, out.pseudo.labels, out.pseudo.mask, w, loss, dz / scale)


@pytest.mark.parametrize("C,spatial,dtype,fmt,select,w", CPS_CASES)
def test_cross_pseudo_label_loss_matches_composition(C, spatial, dtype, fmt, select, w):
    za, zb = _pair(C, spatial, dtype, fmt)
    thr = torch.tensor(0.8)
    _check_cross(za, zb, thr, select, w, cross_pseudo_label_loss(za, zb, thr, select=select, dice_weight=w))


def test_cross_pseudo_label_loss_registration_compile_module():
    za, zb = _pair(3, (5, 7), torch.float32, torch.contiguous_format)
    thr = torch.tensor(0.8)
    torch.library.opcheck(torch.ops.ucseg.cross_pseudo_label_loss.default,
                          (za, zb, thr, "min_entropy", 0.5, 1e-5))
    out = torch.ops.ucseg.cross_pseudo_label_loss(za, zb, thr, "mean", 1.0, 1e-5)
    torch.library.opcheck(torch.ops.ucseg.cross_pseudo_label_loss_backward.default,
                          (torch.tensor([1.0, 2.0]), za.detach(), zb.detach(), *out[1:3], out[4], 1.0, 1e-5))

    def f(a, b, t):
        o = cross_pseudo_label_loss(a, b, t, dice_weight=0.5)
        return o.loss_a + 2 * o.loss_b, o.pseudo.mask

    eager, m_eager = f(za, zb, thr)
    g_eager = torch.autograd.grad(eager, (za, zb))
    comp_fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    comp, m_comp = comp_fn(za, zb, thr)
    g_comp = torch.autograd.grad(comp, (za, zb))
    assert torch.equal(eager, comp) and torch.equal(m_eager, m_comp)
    assert all(torch.equal(x, y) for x, y in zip(g_eager, g_comp))
    thr.fill_(0.95)  # threshold read from the tensor by the compiled graph
    assert torch.equal(comp_fn(za, zb, thr)[1], f(za, zb, thr)[1])
    assert not torch.equal(comp_fn(za, zb, thr)[1], m_comp)

    mod = CrossPseudoLabelLoss(0.8, select="mean", dice_weight=1.0)
    mod.set_threshold(0.9)
    o_mod = mod(za, zb)
    o_fn = cross_pseudo_label_loss(za, zb, 0.9, select="mean", dice_weight=1.0)
    assert torch.equal(o_mod.loss_a, o_fn.loss_a) and torch.equal(o_mod.pseudo.mask, o_fn.pseudo.mask)
    with pytest.raises(ValueError, match="cross_pseudo_label_loss"):
        cross_pseudo_label_loss(za, zb[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,w", [((12, 4, 256, 256), 1.0), ((2, 14, 64, 64, 64), 0.5)])
def test_gpu_real_shapes_compile_and_graph(shape, w):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    z, labels, mask = _inputs(shape[0], shape[1], shape[2:], torch.bfloat16, fmt, "random", device="cuda")
    loss = pseudo_label_loss(z, labels, mask, dice_weight=w)
    (dz,) = torch.autograd.grad(loss, z)
    _check(z, labels, mask, w, loss, dz)
    fn = torch.compile(lambda x: pseudo_label_loss(x, labels, mask, dice_weight=w), fullgraph=True)
    comp = fn(z)
    (dzc,) = torch.autograd.grad(comp, z)
    assert torch.equal(comp, loss) and torch.equal(dzc, dz)

    # whole forward + backward captured in a CUDA graph, new logits copied in between replays
    zs = z.detach().clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            zs.grad = None
            pseudo_label_loss(zs, labels, mask, dice_weight=w).backward()
    torch.cuda.current_stream().wait_stream(s)
    zs.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = pseudo_label_loss(zs, labels, mask, dice_weight=w)
        static_loss.backward()
    z2 = torch.randn_like(z).mul_(3)
    with torch.no_grad():
        zs.copy_(z2)
    graph.replay()
    x = z2.detach().requires_grad_(True)
    ref = pseudo_label_loss(x, labels, mask, dice_weight=w)
    (g,) = torch.autograd.grad(ref, x)
    assert torch.equal(static_loss, ref) and torch.equal(zs.grad, g)


@pytest.mark.gpu
def test_gpu_cross_pseudo_label_loss_graph():
    za, zb = _pair(4, (256, 256), torch.bfloat16, torch.channels_last, device="cuda", B=12)
    thr = torch.tensor(0.8, device="cuda")
    out = cross_pseudo_label_loss(za, zb, thr, dice_weight=1.0)
    _check_cross(za, zb, thr, "min_entropy", 1.0, out)

    def step():
        o = cross_pseudo_label_loss(za, zb, thr, dice_weight=1.0)
        (o.loss_a + o.loss_b).backward()
        return o

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            za.grad = zb.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    za.grad = zb.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for t in (0.8, 0.95):
        thr.fill_(t)
        graph.replay()
        a, b = za.detach().clone().requires_grad_(True), zb.detach().clone().requires_grad_(True)
        o = cross_pseudo_label_loss(a, b, t, dice_weight=1.0)
        (o.loss_a + o.loss_b).backward()
        assert torch.equal(static.pseudo.mask, o.pseudo.mask), f"threshold {t}"
        assert torch.equal(static.loss_a, o.loss_a) and torch.equal(za.grad, a.grad)
        assert torch.equal(zb.grad, b.grad)
