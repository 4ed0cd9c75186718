"""segmentation_loss_terms / fusion_unsup_losses: the fused fusion-mode losses (CE|BCE, Dice per
(b, c[, d]), AU) against the plain-PyTorch losses of `ucseg_fast.losses` (values and autograd
gradients, fp64 oracle), the golden loss.* numbers of the authors' code, edge cases,
registration, compile and (GPU) CUDA-graph replay with λ changed between replays."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden import golden
from ucseg_fast import losses as L
from ucseg_fast.ops import (FusionUnsupLosses, SegmentationLossTerms, fusion_unsup_losses,
                            reference, segmentation_loss_terms)
from ucseg_fast.ops import fusion_loss as fl_mod
from ucseg_fast.ops.reference import max_abs_err, tolerance

GW = {"ce": 1.3, "bce": 1.3, "dice": 0.7, "au": 2.1}  # upstream weights: each term's grad path

CASES = [  # (B, C, spatial, dtype, memory format, kind, target kind, with AU)
    (2, 4, (5, 7), torch.float32, torch.contiguous_format, "ce", "cls", True),
    (1, 2, (5, 7), torch.bfloat16, torch.channels_last, "bce", "cls", True),
    (2, 2, (3, 4, 5), torch.float32, torch.contiguous_format, "bce", "onehot", True),
    (1, 4, (3, 5, 3), torch.bfloat16, torch.channels_last_3d, "ce", "cls", True),
    (2, 4, (3, 4, 5), torch.float32, torch.channels_last_3d, "ce", "multihot", False),
    (2, 2, (7, 5), torch.float32, torch.channels_last, "ce", "cls", False),
]


def _inputs(B, C, spatial, dtype, fmt, tgt, device="cpu", seed=0, scale=3.0):
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


def _oracle_and_baseline(z, target, kind, lam):
    out = []
    for dt in (torch.float64, torch.float32):
        x = z.detach().to(dt).requires_grad_(True)
        terms = _losses_py(x, target, kind, lam)
        (g,) = torch.autograd.grad(_weighted(terms), x)
        out.append(({k: v.detach() for k, v in terms.items()}, g))
    return out


def _check(z, target, kind, lam, terms, dz):
    (t64, g64), (t32, g32) = _oracle_and_baseline(z, target, kind, lam)
    assert sorted(terms) == sorted(t64)
    for k, v in terms.items():
        assert v.dtype == torch.float32 and v.dim() == 0, k
        assert max_abs_err(v, t64[k]) <= tolerance(t64[k], t32[k], atol=1e-6), k
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert max_abs_err(dz, g64) <= tolerance(g64, g32, atol=1e-8, out_dtype=z.dtype)


@pytest.mark.parametrize("B,C,spatial,dtype,fmt,kind,tgt,au", CASES)
def test_matches_losses_py(B, C, spatial, dtype, fmt, kind, tgt, au):
    z, target = _inputs(B, C, spatial, dtype, fmt, tgt)
    lam = torch.tensor(0.37) if au else None
    terms = segmentation_loss_terms(z, target, kind=kind, lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _check(z, target, kind, lam, terms, dz)


@pytest.mark.parametrize("kind,tgt,spatial,fmt", [
    ("ce", "cls", (5, 7), torch.channels_last),
    ("bce", "onehot", (3, 4, 5), torch.contiguous_format),
])
def test_unsup_pair_matches_two_single_calls(kind, tgt, spatial, fmt):
    z1, target = _inputs(2, 4 if kind == "ce" else 2, spatial, torch.float32, fmt, tgt)
    z2 = _inputs(2, z1.shape[1], spatial, torch.float32, torch.contiguous_format, tgt, seed=1)[0]
    t1, t2 = fusion_unsup_losses(z1, z2, target, kind=kind)
    assert sorted(t1) == sorted(t2) == sorted([kind, "dice"])
    dz1, dz2 = torch.autograd.grad(_weighted(t1) + 3.0 * _weighted(t2), (z1, z2))
    _check(z1, target, kind, None, t1, dz1)
    _check(z2, target, kind, None, t2, dz2 / 3.0)


def test_all_zero_rows_and_large_logits():
    """nms=0 zero rows of a float target count in the CE mean with 0; logits above softplus'
    threshold 20 take its exact branch (AU)."""
    z, cls = _inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=3)
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
        _check(z, t, "ce", lam, terms, dz)
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
def test_ignore_index_and_out_of_range_labels(B, C, spatial, dtype, fmt, kind, ldt, ignore_index,
                                              au, backend, monkeypatch):
    """Pixels labelled ignore_index, C, 255 or −1 leave every term (CE|BCE sum and mean, Dice's
    I, Σp, Σy, AU sum and mean); values and gradients against the independent oracle, on both
    paths, with several programs per sample and a chunked finalize (the counts add up)."""
    from ucseg_fast import ops

    monkeypatch.setattr(fl_mod, "_TARGET_PROGRAMS", 2 * B)
    monkeypatch.setattr(fl_mod, "_FINALIZE_TILE", 8)
    z, labels = _inputs(B, C, spatial, dtype, fmt, "cls", seed=11)
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

    z, labels = _inputs(2, 4, (8, 8), torch.float32, torch.contiguous_format, "cls", seed=4)
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

    z, _ = _inputs(2, 2, (5, 7), torch.float32, torch.contiguous_format, "cls")
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
    z, labels = _inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=9)
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
    monkeypatch.setattr(fl_mod, "_TARGET_PROGRAMS", 4)
    monkeypatch.setattr(fl_mod, "TILE_ELEMS", 64)
    monkeypatch.setattr(fl_mod, "_FINALIZE_TILE", 8)
    z, target = _inputs(2, 4, (9, 11, 5), torch.float32, torch.contiguous_format, "cls", seed=5)
    lam = torch.tensor(0.2)
    terms = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _check(z, target, "ce", lam, terms, dz)
    again = segmentation_loss_terms(z, target, kind="ce", lam=lam)
    assert all(torch.equal(terms[k], again[k]) for k in terms)  # no atomics: bitwise


def test_float64_is_the_reference_exactly():
    z, target = _inputs(2, 4, (5, 7), torch.float64, torch.contiguous_format, "cls")
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


def test_backward_saves_no_float_class_tensor():
    z, target = _inputs(2, 4, (3, 4, 5), torch.float32, torch.contiguous_format, "cls")
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
    _check(z, target, "ce", lam, terms, dz)


def test_opcheck_compile_module_lambda_errors():
    z, target = _inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "cls")
    z2 = _inputs(2, 3, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=2)[0]
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
def test_gpu_compile_and_graph_replay_lambda(shape, kind, dtype):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    B, C, spatial = shape[0], shape[1], shape[2:]
    z, target = _inputs(B, C, spatial, dtype, fmt, "cls", device="cuda")
    z2 = _inputs(B, C, spatial, dtype, fmt, "cls", device="cuda", seed=1)[0]
    lam = torch.tensor(0.01, device="cuda")
    terms = segmentation_loss_terms(z, target, kind=kind, lam=lam)
    (dz,) = torch.autograd.grad(_weighted(terms), z)
    _check(z, target, kind, lam, terms, dz)
    t1, t2 = fusion_unsup_losses(z, z2, target, kind=kind)
    dz1, dz2 = torch.autograd.grad(_weighted(t1) + _weighted(t2), (z, z2))
    _check(z2, target, kind, None, t2, dz2)

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
    big, target = _inputs(4, 4, (6, 5), torch.float32, torch.channels_last, "cls", seed=7)
    zt = _inputs(2, 4, (5, 6), torch.float32, torch.contiguous_format, "cls", seed=8)[0]
    zt = zt.detach().transpose(2, 3).requires_grad_(True)
    lam = torch.tensor(0.2)
    for z in (big[2:], zt):
        terms = segmentation_loss_terms(z, target[2:], kind="ce", lam=lam)
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        _check(z, target[2:], "ce", lam, terms, dz)


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
        z, target = _inputs(B, 5, spatial, torch.float32, torch.contiguous_format, tgt, seed=5)
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
        _check(z, target, kind, lam, terms, dz)
        z2 = z0.flip(1).clone().requires_grad_(True)
        t1, t2 = fusion_unsup_losses(z, z2, target, kind=kind)
        dz1, dz2 = torch.autograd.grad(_weighted(t1) + _weighted(t2), (z, z2))
        _check(z, target, kind, None, t1, dz1)
        _check(z2, target, kind, None, t2, dz2)
