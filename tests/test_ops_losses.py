"""The segmentation-loss kernel family (ops/loss_kernels.py) through every op built on it.

pseudo_label_loss / cross_pseudo_label_loss: fused masked CE + soft Dice, forward and backward,
against the fp64 oracle and the golden CE/Dice numbers of the authors' code; edge cases,
registration, compile, GPU. segmentation_loss_terms / fusion_unsup_losses: the fused fusion-mode
losses (CE|BCE, Dice per (b, c[, d]), AU) against the plain-PyTorch losses of
`ucseg_fast.losses` (values and autograd gradients, fp64 oracle), the golden loss.* numbers,
edge cases, registration, compile and (GPU) CUDA-graph replay with λ changed between replays.
Both: three launches a call, of the same three kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden import golden
from ucseg_fast import losses as L
from ucseg_fast.ops import (CrossPseudoLabelLoss, FusionUnsupLosses, PseudoLabelLoss,
                            SegmentationLossTerms, _triton_utils, cross_pseudo_label_loss,
                            entropy_pseudo_label, fusion_unsup_losses, pseudo_label_loss,
                            reference, segmentation_loss_terms)
from ucseg_fast.ops import loss_kernels as lk
from ucseg_fast.ops.fusion_loss import loss_rows
from ucseg_fast.ops.reference import max_abs_err, tolerance


# =========================================================================== one family
class _Counting:
    """Stands in for a kernel: records each launch's name, then launches it."""

    def __init__(self, kernel, name: str, log: list[str]) -> None:
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def _count_launches(monkeypatch) -> list[str]:
    log: list[str] = []
    for name in ("_loss_fwd_kernel", "_loss_finalize_kernel", "_loss_bwd_kernel"):
        monkeypatch.setattr(lk, name, _Counting(getattr(lk, name), name, log))
    return log


@pytest.mark.skipif(not _triton_utils.triton_usable(torch.zeros(1)),
                    reason="Triton kernel not runnable here (no triton / TRITON_INTERPRET)")
def test_every_loss_op_is_three_launches_of_one_kernel_family(monkeypatch):
    """Forward sweep + finalize + backward sweep, the same three kernels for every op (one or
    two logit tensors, mask, in-sweep pseudo-labels, AU, BCE, per-slice Dice): nothing else."""
    log = _count_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    za = torch.randn(2, 3, 5, 7, generator=g).requires_grad_(True)
    zb = torch.randn(2, 3, 5, 7, generator=g).requires_grad_(True)
    z3 = torch.randn(2, 2, 3, 4, 5, generator=g).requires_grad_(True)
    lab = torch.randint(0, 3, (2, 5, 7), generator=g)
    mask = torch.rand(2, 5, 7, generator=g) > 0.3
    lam = torch.tensor(0.3)
    calls = {
        "pseudo_label_loss": lambda: pseudo_label_loss(za, lab, mask, dice_weight=0.5),
        "cross_pseudo_label_loss": lambda: sum(cross_pseudo_label_loss(za, zb, 0.5,
                                                                       dice_weight=1.0)[:2]),
        "segmentation_loss_terms": lambda: sum(segmentation_loss_terms(za, lab, lam=lam).values()),
        "segmentation_loss_terms[bce,3d]": lambda: sum(segmentation_loss_terms(
            z3, lab[:, :3, :4, None].expand(-1, -1, -1, 5) % 2, kind="bce", lam=lam).values()),
        "loss_rows": lambda: loss_rows(za, zb, lab, lam=lam).sum(),
        "fusion_unsup_losses": lambda: sum(sum(t.values()) for t in fusion_unsup_losses(za, zb,
                                                                                        lab)),
    }
    for name, fn in calls.items():
        log.clear()
        fn().backward()
        assert log == ["_loss_fwd_kernel", "_loss_finalize_kernel", "_loss_bwd_kernel"], name


def test_launch_geometry_is_computed_from_shapes_and_device():
    """No environment knob: the tile from C (and D), the forward grid from the SM count."""
    assert _triton_utils.sm_count(torch.device("cpu")) == 128  # the interpreter's stand-in
    assert lk.target_programs(torch.device("cpu")) == 8 * 128
    z = torch.zeros(2, 4, 40, 30)
    R, D, block_c, block_r, block_d, n_tiles = lk.geometry(z, per_slice=False)
    assert (R, D, block_c, block_d) == (1200, 1, 4, 1) and block_c * block_r == 2048
    assert n_tiles == -(-1200 // block_r)
    R, D, block_c, block_r, block_d, _ = lk.geometry(torch.zeros(1, 2, 6, 5, 3), per_slice=True)
    assert (R, D, block_c, block_d) == (30, 3, 2, 4) and block_r == 32


# =========================================================================== pseudo_label_loss
PL_CASES = [  # (B, C, spatial, dtype, memory format, mask kind, dice_weight)
    (2, 2, (5, 7), torch.float32, torch.contiguous_format, "random", 0.0),
    (2, 3, (5, 7), torch.bfloat16, torch.channels_last, "random", 0.5),
    (1, 4, (3, 4, 5), torch.float16, torch.contiguous_format, None, 1.0),
    (2, 5, (3, 4, 5), torch.float32, torch.channels_last_3d, "all", 0.3),
    (2, 4, (5, 7), torch.float32, torch.channels_last, "random", 1.0),
]


def _pl_inputs(B, C, spatial, dtype, fmt, mask_kind, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn((B, C, *spatial), generator=g) * scale).to(dtype)
    labels = torch.randint(0, C, (B, *spatial), generator=g)
    mask = {None: None, "random": torch.rand((B, *spatial), generator=g) > 0.4,
            "all": torch.ones((B, *spatial), dtype=torch.bool),
            "none": torch.zeros((B, *spatial), dtype=torch.bool)}[mask_kind]
    z = z.to(device).contiguous(memory_format=fmt).requires_grad_(True)
    return z, labels.to(device), None if mask is None else mask.to(device)


def _pl_oracle_and_baseline(z, labels, mask, w):
    out = []
    for dt in (torch.float64, z.dtype):
        x = z.detach().to(dt).requires_grad_(True)
        loss = reference.pseudo_label_loss(x, labels, mask, dice_weight=w, dtype=dt)
        (g,) = torch.autograd.grad(loss, x)
        out.append((loss.detach(), g))
    return out


def _pl_check(z, labels, mask, w, loss, dz):
    (l64, g64), (lb, gb) = _pl_oracle_and_baseline(z, labels, mask, w)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert reference.max_abs_err(loss, l64) <= tolerance(l64, lb, atol=1e-6)
    assert reference.max_abs_err(dz, g64) <= tolerance(g64, gb, atol=1e-8, out_dtype=z.dtype)


@pytest.mark.parametrize("B,C,spatial,dtype,fmt,mask_kind,w", PL_CASES)
def test_pl_matches_oracle(B, C, spatial, dtype, fmt, mask_kind, w):
    z, labels, mask = _pl_inputs(B, C, spatial, dtype, fmt, mask_kind)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=w)
    (dz,) = torch.autograd.grad(loss, z)
    _pl_check(z, labels, mask, w, loss, dz)


def test_multi_tile_programs_and_determinism(monkeypatch):
    # 33x40 pixels at C = 4 are 3 tiles of 512; with 2 target programs for B = 2 each program
    # sweeps all 3 tiles (the loop inside the forward kernel)
    monkeypatch.setattr(lk, "target_programs", lambda device: 2)
    z, labels, mask = _pl_inputs(2, 4, (33, 40), torch.float32, torch.contiguous_format, "random", seed=5)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    (dz,) = torch.autograd.grad(loss, z)
    _pl_check(z, labels, mask, 0.7, loss, dz)
    again = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    assert torch.equal(loss, again)  # no atomics: bitwise reproducible
    # finalize reducing the partial rows in several chunks (1 row per chunk)
    monkeypatch.undo()
    monkeypatch.setattr(lk, "_FINALIZE_TILE", 8)
    loss = pseudo_label_loss(z, labels, mask, dice_weight=0.7)
    (dz,) = torch.autograd.grad(loss, z)
    _pl_check(z, labels, mask, 0.7, loss, dz)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_no_kept_pixel_gives_zero_and_zero_grad(w):
    z, labels, mask = _pl_inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "none")
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
def test_pl_ignore_index_and_out_of_range_labels(C, spatial, dtype, fmt, ldt, ignore_index, mask_kind,
                                              w, backend, monkeypatch):
    """A pixel labelled ignore_index, C, 255 or −1 is not counted: the loss equals the loss of
    in-range labels with that pixel masked out (CE sum, its denominator and the Dice sums), on
    both paths, with several programs per sample. CE alone is torch's F.cross_entropy(ignore_index)."""
    from ucseg_fast import ops

    monkeypatch.setattr(lk, "target_programs", lambda device: 4)
    z, labels, mask = _pl_inputs(2, C, spatial, dtype, fmt, mask_kind, seed=21)
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
    _pl_check(z, clean, keep_m, w, loss, dz)  # = the in-range labels, the pixels masked out
    assert torch.count_nonzero(dz * ~keep_m.unsqueeze(1)) == 0
    if w == 0.0 and mask is None:
        want = F.cross_entropy(z.detach().float(), torch.where(keep, lab.long(), -5),
                               ignore_index=-5)
        torch.testing.assert_close(loss.detach(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_every_label_ignored_gives_zero(backend):
    from ucseg_fast import ops

    z, labels, _ = _pl_inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, None)
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


def test_pl_backward_saves_no_float_class_tensor():
    z, labels, mask = _pl_inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "random")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pseudo_label_loss(z, labels, mask, dice_weight=1.0)
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= z.numel()]
    assert all(t.data_ptr() == z.data_ptr() for t in big_float), "only the logits input may be saved"
    (dz,) = torch.autograd.grad(loss, z)
    _pl_check(z, labels, mask, 1.0, loss, dz)


def test_pl_opcheck_compile_module_errors():
    z, labels, mask = _pl_inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "random")
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
        _pl_check(z, out.pseudo.labels, out.pseudo.mask, w, loss, dz / scale)


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
def test_pl_gpu_real_shapes_compile_and_graph(shape, w):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    z, labels, mask = _pl_inputs(shape[0], shape[1], shape[2:], torch.bfloat16, fmt, "random", device="cuda")
    loss = pseudo_label_loss(z, labels, mask, dice_weight=w)
    (dz,) = torch.autograd.grad(loss, z)
    _pl_check(z, labels, mask, w, loss, dz)
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


# =========================================================================== fusion-mode terms
GW = {"ce": 1.3, "bce": 1.3, "dice": 0.7, "au": 2.1}  # upstream weights: each term's grad path

FL_CASES = [  # (B, C, spatial, dtype, memory format, kind, target kind, with AU)
    (2, 4, (5, 7), torch.float32, torch.contiguous_format, "ce", "cls", True),
    (1, 2, (5, 7), torch.bfloat16, torch.channels_last, "bce", "cls", True),
    (2, 2, (3, 4, 5), torch.float32, torch.contiguous_format, "bce", "onehot", True),
    (1, 4, (3, 5, 3), torch.bfloat16, torch.channels_last_3d, "ce", "cls", True),
    (2, 4, (3, 4, 5), torch.float32, torch.channels_last_3d, "ce", "multihot", False),
    (2, 2, (7, 5), torch.float32, torch.channels_last, "ce", "cls", False),
]


def _fl_inputs(B, C, spatial, dtype, fmt, tgt, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn((B, C, *spatial), generator=g) * scale).to(dtype)
    cls = torch.randint(0, C, (B, *spatial), generator=g)
    if tgt == "cls":
        target = cls
    elif tgt == "onehot":
        target = F.one_hot(cls, C).movedim(-1, 1).float()
    else:  # nms=0 style: per-channel thresholds, rows may be all zero or multi-hot
        target = (torch.rand((B, C, *spatial), generator=g) > 0.6).float()
    return z.to(device).contiguous(memory_format=fmt).requires_grad_(True), target.to(device)


def _y_cls(target: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot/multi-hot y, AU target class) as the plain losses take them."""
    if target.dim() == z.dim():
        return target, target.argmax(1)
    return reference.one_hot_labels(target, z.shape[1], torch.float32), target


def _losses_py(z: torch.Tensor, target: torch.Tensor, kind: str, lam) -> dict[str, torch.Tensor]:
    """The trainer's plain-PyTorch terms (losses.py) — the definition these ops must equal."""
    y, cls = _y_cls(target, z)
    if lam is None:
        return L.unsup_terms(z, y.to(L.acc(z).dtype), kind)
    return L.supervised_terms(z, y.to(L.acc(z).dtype), cls, lam, kind)


def _weighted(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(GW[k] * v for k, v in terms.items())


def _fl_oracle_and_baseline(z, target, kind, lam):
    out = []
    for dt in (torch.float64, torch.float32):
        x = z.detach().to(dt).requires_grad_(True)
        terms = _losses_py(x, target, kind, lam)
        (g,) = torch.autograd.grad(_weighted(terms), x)
        out.append(({k: v.detach() for k, v in terms.items()}, g))
    return out


def _fl_check(z, target, kind, lam, terms, dz):
    (t64, g64), (t32, g32) = _fl_oracle_and_baseline(z, target, kind, lam)
    assert sorted(terms) == sorted(t64)
    for k, v in terms.items():
        assert v.dtype == torch.float32 and v.dim() == 0, k
        assert max_abs_err(v, t64[k]) <= tolerance(t64[k], t32[k], atol=1e-6), k
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert max_abs_err(dz, g64) <= tolerance(g64, g32, atol=1e-8, out_dtype=z.dtype)


@pytest.mark.parametrize("B,C,spatial,dtype,fmt,kind,tgt,au", FL_CASES)
def test_fl_matches_losses_py(B, C, spatial, dtype, fmt, kind, tgt, au):
    z, target = _fl_inputs(B, C, spatial, dtype, fmt, tgt)
    lam = torch.tensor(0.37) if au else None
    terms = segmentation_loss_terms(z, target, kind=kind, lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _fl_check(z, target, kind, lam, terms, dz)


@pytest.mark.parametrize("kind,tgt,spatial,fmt", [
    ("ce", "cls", (5, 7), torch.channels_last),
    ("bce", "onehot", (3, 4, 5), torch.contiguous_format),
])
def test_unsup_pair_matches_two_single_calls(kind, tgt, spatial, fmt):
    z1, target = _fl_inputs(2, 4 if kind == "ce" else 2, spatial, torch.float32, fmt, tgt)
    z2 = _fl_inputs(2, z1.shape[1], spatial, torch.float32, torch.contiguous_format, tgt, seed=1)[0]
    t1, t2 = fusion_unsup_losses(z1, z2, target, kind=kind)
    assert sorted(t1) == sorted(t2) == sorted([kind, "dice"])
    dz1, dz2 = torch.autograd.grad(_weighted(t1) + 3.0 * _weighted(t2), (z1, z2))
    _fl_check(z1, target, kind, None, t1, dz1)
    _fl_check(z2, target, kind, None, t2, dz2 / 3.0)


def test_all_zero_rows_and_large_logits():
    """nms=0 zero rows of a float target count in the CE mean with 0; logits above softplus'
    threshold 20 take its exact branch (AU)."""
    z, cls = _fl_inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=3)
    with torch.no_grad():
        z[0, 2, :2] = 25.0  # z > 20, winning class 2 (AU: a = 1 where the label is 2)
        z[1, :, 3] = 30.0 * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1)  # ties 0/2 at +30
        cls[0, 0] = 2
    zero = torch.zeros_like(cls, dtype=torch.bool)
    zero[:, 1:3] = True
    lam = torch.tensor(0.5)
    target = reference.one_hot_labels(cls, 4, torch.float32) * (~zero).unsqueeze(1)
    for t in (cls, target):
        terms = segmentation_loss_terms(z, t, kind="ce", lam=lam)
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        _fl_check(z, t, "ce", lam, terms, dz)
    # an all-zero row contributes 0 to CE: removing those pixels' logits changes nothing
    z0 = z.detach().clone()
    z0[:, :, 1:3] = 0.0
    t_a = segmentation_loss_terms(z, target, kind="ce", dice=False)["ce"]
    t_b = segmentation_loss_terms(z0, target, kind="ce", dice=False)["ce"]
    assert torch.equal(t_a, t_b)
    # ... and it counts in the mean, where an out-of-range label is not counted at all
    t_c = segmentation_loss_terms(z, torch.where(zero, 4, cls), kind="ce", dice=False)["ce"]
    n, N = int((~zero).sum()), zero.numel()
    torch.testing.assert_close(t_c * n / N, t_a, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- ignore_index
def _ignored_oracle(z, labels, kind, lam, ignore_index):
    """The ignore_index rule written independently of the ops (and of `reference`): CE by
    torch's own F.cross_entropy(ignore_index=...), BCE / AU as means over the counted pixels,
    Dice of p·keep against one_hot·keep. fp64 oracle and the fp32 baseline, with gradients."""
    out = []
    C = z.shape[1]
    lab = labels.long()
    keep = (lab >= 0) & (lab < C) & (lab != ignore_index)
    ign = torch.where(keep, lab, -7)
    y_all = F.one_hot(torch.where(keep, lab, 0), C).movedim(-1, 1)
    for dt in (torch.float64, torch.float32):
        x = z.detach().to(dt).requires_grad_(True)
        y = (y_all * keep.unsqueeze(1)).to(dt)
        n = keep.sum().clamp(min=1)
        if kind == "ce":
            t = {"ce": F.cross_entropy(x, ign, ignore_index=-7, reduction="sum") / n}
        else:
            el = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            t = {"bce": (el * keep.unsqueeze(1)).sum() / (n * C)}
        p = L.probs(x, kind)
        t["dice"] = L.dice_loss(p * keep.unsqueeze(1), y)
        if lam is not None:
            t["au"] = (L.au_loss(x, ign, lam, reduction="none") * keep).sum() / n
        (g,) = torch.autograd.grad(_weighted(t), x)
        out.append(({k: v.detach() for k, v in t.items()}, g))
    return out


IGNORE_CASES = [  # (B, C, spatial, dtype, fmt, kind, label dtype, ignore_index, with AU)
    (2, 4, (6, 7), torch.float32, torch.contiguous_format, "ce", torch.int64, -100, True),
    (2, 4, (6, 7), torch.float32, torch.channels_last, "ce", torch.uint8, 255, True),
    (1, 3, (5, 6), torch.bfloat16, torch.contiguous_format, "ce", torch.int64, 1, True),
    (2, 2, (3, 4, 5), torch.float32, torch.contiguous_format, "bce", torch.int32, -1, True),
    (2, 4, (3, 5, 3), torch.float16, torch.channels_last_3d, "ce", torch.int64, 0, False),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("B,C,spatial,dtype,fmt,kind,ldt,ignore_index,au", IGNORE_CASES)
def test_fl_ignore_index_and_out_of_range_labels(B, C, spatial, dtype, fmt, kind, ldt, ignore_index,
                                              au, backend, monkeypatch):
    """Pixels labelled ignore_index, C, 255 or −1 leave every term (CE|BCE sum and mean, Dice's
    I, Σp, Σy, AU sum and mean); values and gradients against the independent oracle, on both
    paths, with several programs per sample and a chunked finalize (the counts add up)."""
    from ucseg_fast import ops

    monkeypatch.setattr(lk, "target_programs", lambda device: 2 * B)
    monkeypatch.setattr(lk, "_FINALIZE_TILE", 8)
    z, labels = _fl_inputs(B, C, spatial, dtype, fmt, "cls", seed=11)
    g = torch.Generator().manual_seed(12)
    r = torch.rand(labels.shape, generator=g)
    bad = [C, 255, -1, ignore_index]
    if ldt == torch.uint8:
        bad = [C, 255, ignore_index % 256]
    for i, v in enumerate(bad):  # ~40% of the pixels are not counted, a mix of the labels
        labels = torch.where((r >= 0.1 * i) & (r < 0.1 * (i + 1)), v, labels)
    labels = labels.to(ldt)
    lam = torch.tensor(0.3) if au else None
    prev = ops.get_backend()
    ops.set_backend(backend)
    try:
        terms = segmentation_loss_terms(z, labels, kind=kind, lam=lam, ignore_index=ignore_index)
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        z2 = z.detach().flip(1).clone().requires_grad_(True)
        t1, t2 = fusion_unsup_losses(z, z2, labels, kind=kind, ignore_index=ignore_index)
        dz1, dz2 = torch.autograd.grad(_weighted(t1) + _weighted(t2), (z, z2))
    finally:
        ops.set_backend(prev)
    for zz, tt, dd, lm in ((z, terms, dz, lam), (z, t1, dz1, None), (z2, t2, dz2, None)):
        (t64, g64), (t32, g32) = _ignored_oracle(zz, labels, kind, lm, ignore_index)
        if lm is None:
            t64.pop("au", None)
        assert sorted(tt) == sorted(t64)
        for k, v in tt.items():
            assert max_abs_err(v, t64[k]) <= tolerance(t64[k], t32[k], atol=1e-6), k
        assert max_abs_err(dd, g64) <= tolerance(g64, g32, atol=1e-8, out_dtype=zz.dtype)
    # a pixel that is not counted has a zero gradient
    keep = reference.counted_pixels(labels, C, ignore_index)
    assert torch.count_nonzero(dz * ~keep.unsqueeze(1)) == 0


def test_ignore_index_matches_torch_cross_entropy():
    """The issue's case: half the pixels at 255. torch's F.cross_entropy(ignore_index=255) is
    the mean over the other half; so is ours, on both paths (not half of it)."""
    from ucseg_fast import ops

    z, labels = _fl_inputs(2, 4, (8, 8), torch.float32, torch.contiguous_format, "cls", seed=4)
    labels[:, :4] = 255
    want = F.cross_entropy(z.detach(), labels, ignore_index=255)
    prev = ops.get_backend()
    try:
        for backend in ("triton", "reference"):
            ops.set_backend(backend)
            for ii in (255, -100):  # 255 is out of range: ignored with or without ignore_index
                got = segmentation_loss_terms(z, labels, dice=False, ignore_index=ii)["ce"]
                torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0)
    finally:
        ops.set_backend(prev)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_every_pixel_ignored_gives_zero_not_nan(kind, backend):
    """No counted pixel: CE|BCE and AU are 0 (torch's F.cross_entropy gives NaN: we differ on
    purpose, as pseudo_label_loss with an all-False mask), zero gradient; Dice still counts the
    (b, c) groups, each 1 − ε/ε = 0."""
    from ucseg_fast import ops

    z, _ = _fl_inputs(2, 2, (5, 7), torch.float32, torch.contiguous_format, "cls")
    labels = torch.full((2, 5, 7), 255, dtype=torch.uint8)
    prev = ops.get_backend()
    ops.set_backend(backend)
    try:
        terms = segmentation_loss_terms(z, labels, kind=kind, lam=torch.tensor(0.5))
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        mod = SegmentationLossTerms(kind, lam=0.5, ignore_index=1)
        t_mod = mod(z, torch.ones(2, 5, 7, dtype=torch.long))
    finally:
        ops.set_backend(prev)
    for t in (terms, t_mod):
        assert all(float(v.detach()) == 0.0 for v in t.values()), t
    assert torch.count_nonzero(dz) == 0
    assert "ignore_index=1" in repr(mod)


def test_ignore_index_default_and_in_range_unchanged():
    """ignore_index set, every label in range and not ignore_index: bitwise the default."""
    z, labels = _fl_inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=9)
    lam = torch.tensor(0.4)
    a = segmentation_loss_terms(z, labels, lam=lam)
    b = segmentation_loss_terms(z, labels, lam=lam, ignore_index=255)
    ga = torch.autograd.grad(_weighted(a), z)[0]
    gb = torch.autograd.grad(_weighted(b), z)[0]
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ga, gb)
    z64 = z.detach().double()
    r64 = reference.segmentation_loss_terms(z64, labels, lam=lam, ignore_index=255)
    ref = _losses_py(z64, labels, "ce", lam)
    assert all(torch.equal(r64[k], ref[k]) for k in ref)
    with pytest.raises(TypeError, match="ignore_index"):
        segmentation_loss_terms(z, labels, ignore_index=255.0)
    with pytest.raises(TypeError, match="ignore_index"):
        FusionUnsupLosses(ignore_index=True)


def test_multi_program_finalize_chunks_and_determinism(monkeypatch):
    # 2 programs per sample sweeping several tiles; finalize reading rows/groups in chunks
    monkeypatch.setattr(lk, "target_programs", lambda device: 4)
    monkeypatch.setattr(_triton_utils, "TILE_ELEMS", 64)
    monkeypatch.setattr(lk, "_FINALIZE_TILE", 8)
    z, target = _fl_inputs(2, 4, (9, 11, 5), torch.float32, torch.contiguous_format, "cls", seed=5)
    lam = torch.tensor(0.2)
    terms = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _fl_check(z, target, "ce", lam, terms, dz)
    again = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    assert all(torch.equal(terms[k], again[k]) for k in terms)  # no atomics: bitwise


def test_float64_is_the_reference_exactly():
    z, target = _fl_inputs(2, 4, (5, 7), torch.float64, torch.contiguous_format, "cls")
    lam = torch.tensor(0.25)
    terms = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    ref = _losses_py(z, target, "ce", lam)
    assert all(torch.equal(terms[k], ref[k]) for k in ref)


AU_T = {"t0": 0, "t05": 25000, "t1": 50000}


def test_golden_ce_dice_au():
    """The float32 Triton path against the authors' float64 numbers (f32 tolerance class)."""
    from ucseg_fast.train.schedules import au_lambda

    g = golden()
    z = g.tensor("loss.z").float().requires_grad_(True)
    y_cls = g.tensor("loss.y_cls").long()
    zero_rows = g.tensor("loss.zero_rows").bool()
    terms = segmentation_loss_terms(z, y_cls, kind="ce")
    g.check("loss.ce", terms["ce"].detach(), "f32")
    g.check("loss.dice", terms["dice"].detach(), "f32")
    (d_ce,) = torch.autograd.grad(terms["ce"], z, retain_graph=True)
    (d_dice,) = torch.autograd.grad(terms["dice"], z)
    g.check("loss.ce.grad", d_ce, "f32")
    g.check("loss.dice.grad", d_dice, "f32")
    # the authors' nms=0 all-zero rows: a float target (they count in the CE mean) ...
    y0 = reference.one_hot_labels(y_cls, 4, torch.float32) * (~zero_rows).unsqueeze(1)
    ce0 = segmentation_loss_terms(z, y0, kind="ce", dice=False)["ce"]
    g.check("loss.ce_zero_rows", ce0.detach(), "f32")
    g.check("loss.ce_zero_rows.grad", torch.autograd.grad(ce0, z)[0], "f32")
    # ... where a label outside [0, C) is not counted: the mean over n pixels, times n/N
    ratio = float((~zero_rows).sum()) / zero_rows.numel()
    ce_i = segmentation_loss_terms(z, torch.where(zero_rows, 4, y_cls), kind="ce",
                                   dice=False)["ce"] * ratio
    g.check("loss.ce_zero_rows", ce_i.detach(), "f32")
    g.check("loss.ce_zero_rows.grad", torch.autograd.grad(ce_i, z)[0], "f32")
    for tag, t in AU_T.items():
        lam = torch.tensor(au_lambda(t, 50000), dtype=torch.float32)
        au = segmentation_loss_terms(z, y_cls, kind="ce", lam=lam, dice=False)["au"]
        g.check(f"loss.au.{tag}", au.detach(), "f32")
        g.check(f"loss.au.{tag}.grad", torch.autograd.grad(au, z)[0], "f32")


def test_fl_backward_saves_no_float_class_tensor():
    z, target = _fl_inputs(2, 4, (3, 4, 5), torch.float32, torch.contiguous_format, "cls")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    lam = torch.tensor(0.3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= z.numel() // 2]
    assert all(t.data_ptr() == z.data_ptr() for t in big_float), "only the logits may be saved"
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _fl_check(z, target, "ce", lam, terms, dz)


def test_fl_opcheck_compile_module_lambda_errors():
    z, target = _fl_inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "cls")
    z2 = _fl_inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=2)[0]
    lam = torch.tensor(0.4)
    op = torch.ops.ucseg.segmentation_loss_terms
    torch.library.opcheck(op.default, (z, None, target, lam, "ce", True, 1e-5))
    ignored = torch.where(target == 1, 255, target)  # ignore_index 0 and label 255
    torch.library.opcheck(op.default, (z, z2, ignored, lam, "ce", True, 1e-5, 0))
    torch.library.opcheck(op.default, (z, z2, target.float().unsqueeze(1).expand(-1, 3, -1, -1)
                                       .contiguous(), None, "bce", True, 1e-5))
    _, coef = op(z, None, target, lam, "ce", True, 1e-5)
    torch.library.opcheck(torch.ops.ucseg.segmentation_loss_terms_backward.default,
                          (torch.tensor([[1.0, 2.0, 3.0]]), z.detach(), None, target, lam, coef,
                           "ce", True, 1e-5))
    _, coef = op(z, z2, ignored, None, "bce", False, 1e-5, 0)
    torch.library.opcheck(torch.ops.ucseg.segmentation_loss_terms_backward.default,
                          (torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]]), z.detach(),
                           z2.detach(), ignored, None, coef, "bce", False, 1e-5, 0))

    def f(x, x2, t):
        terms = segmentation_loss_terms(x, target, kind="ce", lam=t)
        a, b = fusion_unsup_losses(x, x2, target)
        return _weighted(terms) + a["ce"] + 2 * b["dice"]

    eager = f(z, z2, lam)
    g_eager = torch.autograd.grad(eager, (z, z2))
    comp_fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    comp = comp_fn(z, z2, lam)
    g_comp = torch.autograd.grad(comp, (z, z2))
    assert torch.equal(eager, comp) and all(torch.equal(a, b) for a, b in zip(g_eager, g_comp))
    lam.fill_(0.9)  # λ read from the tensor by the compiled graph
    assert torch.equal(comp_fn(z, z2, lam), f(z, z2, lam)) and not torch.equal(comp_fn(z, z2, lam), comp)

    mod = SegmentationLossTerms("ce", lam=0.1)
    mod.set_lambda(0.4)
    m_terms = mod(z, target)
    f_terms = segmentation_loss_terms(z, target, kind="ce", lam=0.4)
    assert all(torch.equal(m_terms[k], f_terms[k]) for k in f_terms)
    pair = FusionUnsupLosses("ce")(z, z2, target)
    assert torch.equal(pair[1]["dice"], fusion_unsup_losses(z, z2, target)[1]["dice"])

    with pytest.raises(ValueError, match="class map"):
        segmentation_loss_terms(z, target[:, :3])
    with pytest.raises(ValueError, match="integer"):
        segmentation_loss_terms(z, target.float())
    with pytest.raises(ValueError, match="kind"):
        segmentation_loss_terms(z, target, kind="focal")
    with pytest.raises(ValueError, match="0-D"):
        segmentation_loss_terms(z, target, lam=torch.ones(1))
    with pytest.raises(ValueError, match="z2_u"):
        fusion_unsup_losses(z, z2[:, :2], target)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,kind,dtype", [((12, 4, 256, 256), "ce", torch.bfloat16),
                                              ((2, 2, 96, 96, 96), "bce", torch.float32)])
def test_fl_gpu_compile_and_graph_replay_lambda(shape, kind, dtype):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    B, C, spatial = shape[0], shape[1], shape[2:]
    z, target = _fl_inputs(B, C, spatial, dtype, fmt, "cls", device="cuda")
    z2 = _fl_inputs(B, C, spatial, dtype, fmt, "cls", device="cuda", seed=1)[0]
    lam = torch.tensor(0.01, device="cuda")
    terms = segmentation_loss_terms(z, target, kind=kind, lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _fl_check(z, target, kind, lam, terms, dz)
    t1, t2 = fusion_unsup_losses(z, z2, target, kind=kind)
    dz1, dz2 = torch.autograd.grad(_weighted(t1) + _weighted(t2), (z, z2))
    _fl_check(z2, target, kind, None, t2, dz2)

    def step(x, x2):
        s = segmentation_loss_terms(x, target, kind=kind, lam=lam)
        a, b = fusion_unsup_losses(x, x2, target, kind=kind)
        return _weighted(s) + _weighted(a) + _weighted(b)

    comp_fn = torch.compile(step, fullgraph=True)
    comp = comp_fn(z, z2)
    assert torch.equal(comp, step(z, z2))

    zs, z2s = z.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            zs.grad = z2s.grad = None
            step(zs, z2s).backward()
    torch.cuda.current_stream().wait_stream(s)
    zs.grad = z2s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(zs, z2s)
        static.backward()
    for value in (0.01, 0.5, 1.0):
        lam.fill_(value)
        graph.replay()
        a, b = z.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
        ref = step(a, b)
        ref.backward()
        assert torch.equal(static, ref), f"lambda {value}"
        assert torch.equal(zs.grad, a.grad) and torch.equal(z2s.grad, b.grad), f"lambda {value}"


def test_sliced_and_permuted_layouts():
    """A batch slice of a channels-last tensor is read in place; spatial dims that do not
    collapse (a transposed H/W) are copied, and the gradient still lands in z's layout."""
    big, target = _fl_inputs(4, 4, (6, 5), torch.float32, torch.channels_last, "cls", seed=7)
    zt = _fl_inputs(2, 4, (5, 6), torch.float32, torch.contiguous_format, "cls", seed=8)[0]
    zt = zt.detach().transpose(2, 3).requires_grad_(True)
    lam = torch.tensor(0.2)
    for z in (big[2:], zt):
        terms = segmentation_loss_terms(z, target[2:], kind="ce", lam=lam)
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        _fl_check(z, target[2:], "ce", lam, terms, dz)


# σ(z) = 1/(1 + e^−z) as torch.sigmoid computes it: e^1e4 = inf gives σ = 0 exactly (the
# interpreter's numpy reports the inf; the GPU does not)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("kind,tgt", [("ce", "cls"), ("bce", "onehot"), ("ce", "multihot")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_five_classes_fp16_and_extreme_logits(kind, tgt, dtype):
    """C = 5, fp16 / fp32, odd sizes, batch 1 and 3, and logits at ±1e4 on half the pixels (softplus
    and the stable BCE form far past their thresholds, softmax one-hot to rounding, AU's u ~ C/1e4)
    — labeled terms with AU, and the unlabeled pair."""
    for B, spatial in ((1, (7, 5)), (3, (3, 5, 3))):
        z, target = _fl_inputs(B, 5, spatial, torch.float32, torch.contiguous_format, tgt, seed=5)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            big = torch.rand(z.shape, generator=g) < 0.5
            sign = torch.where(torch.rand(z.shape, generator=g) < 0.5, -1.0, 1.0)
            z0 = torch.where(big, sign * 1e4, z).to(dtype)
        z = z0.clone().requires_grad_(True)
        lam = torch.tensor(0.8)
        terms = segmentation_loss_terms(z, target, kind=kind, lam=lam)
        assert all(torch.isfinite(v) for v in terms.values()), terms
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        _fl_check(z, target, kind, lam, terms, dz)
        z2 = z0.flip(1).clone().requires_grad_(True)
        t1, t2 = fusion_unsup_losses(z, z2, target, kind=kind)
        dz1, dz2 = torch.autograd.grad(_weighted(t1) + _weighted(t2), (z, z2))
        _fl_check(z, target, kind, None, t1, dz1)
        _fl_check(z2, target, kind, None, t2, dz2)
