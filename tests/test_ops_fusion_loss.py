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
    """nms=0 zero rows (float target and out-of-range labels) count in the CE mean with 0;
    logits above softplus' threshold 20 take its exact branch (AU)."""
    z, cls = _inputs(2, 4, (5, 7), torch.float32, torch.contiguous_format, "cls", seed=3)
    with torch.no_grad():
        z[0, 2, :2] = 25.0  # z > 20, winning class 2 (AU: a = 1 where the label is 2)
        z[1, :, 3] = 30.0 * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1)  # ties 0/2 at +30
        cls[0, 0] = 2
    zero = torch.zeros_like(cls, dtype=torch.bool)
    zero[:, 1:3] = True
    lam = torch.tensor(0.5)
    for target in (torch.where(zero, 4, cls),  # label C: all-zero row
                   reference.one_hot_labels(cls, 4, torch.float32) * (~zero).unsqueeze(1)):
        terms = segmentation_loss_terms(z, target, kind="ce", lam=lam)
        (dz,) = torch.autograd.grad(_weighted(terms), z)
        _check(z, target, "ce", lam, terms, dz)
    # an all-zero row contributes 0 to CE: removing those pixels' logits changes nothing
    z0 = z.detach().clone()
    z0[:, :, 1:3] = 0.0
    t_a = segmentation_loss_terms(z, torch.where(zero, 4, cls), kind="ce", dice=False)["ce"]
    t_b = segmentation_loss_terms(z0, torch.where(zero, 4, cls), kind="ce", dice=False)["ce"]
    assert torch.equal(t_a, t_b)


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
    ce0 = segmentation_loss_terms(z, torch.where(zero_rows, 4, y_cls), kind="ce", dice=False)["ce"]
    g.check("loss.ce_zero_rows", ce0.detach(), "f32")
    g.check("loss.ce_zero_rows.grad", torch.autograd.grad(ce0, z)[0], "f32")
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
    torch.library.opcheck(op.default, (z, z2, target.float().unsqueeze(1).expand(-1, 3, -1, -1)
                                       .contiguous(), None, "bce", True, 1e-5))
    _, coef = op(z, None, target, lam, "ce", True, 1e-5)
    torch.library.opcheck(torch.ops.ucseg.segmentation_loss_terms_backward.default,
                          (torch.tensor([[1.0, 2.0, 3.0]]), z.detach(), None, target, lam, coef,
                           "ce", True, 1e-5))

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
