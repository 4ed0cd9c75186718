"""entropy_pseudo_label: Triton kernel (interpreter on CPU) against the fp64 oracle, hand cases
(ties, 0·log 0, ±1e4, threshold equality), device-tensor threshold under compile, GPU tier."""
from __future__ import annotations

import math

import pytest
import torch

from ucseg_fast.ops import EntropyPseudoLabel, entropy_pseudo_label, reference
from ucseg_fast.ops._triton_utils import flat_layout
from ucseg_fast.ops.reference import tolerance

DELTA = 1e-5  # a pixel within DELTA of a tie/threshold (in the fp64 oracle) may legitimately flip

CASES = [  # (C, spatial, dtype, memory format of logits_a, select)
    (2, (5, 7), torch.float32, torch.contiguous_format, "min_entropy"),
    (3, (5, 7), torch.bfloat16, torch.channels_last, "mean"),
    (4, (3, 4, 5), torch.float16, torch.contiguous_format, "min_entropy"),
    (5, (3, 4, 5), torch.float32, torch.channels_last_3d, "mean"),
    (4, (5, 7), torch.bfloat16, torch.channels_last, "min_entropy"),
]


def _pair(B, C, spatial, dtype, fmt, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    za = (torch.randn((B, C, *spatial), generator=g) * 3).to(dtype)
    zb = (torch.randn((B, C, *spatial), generator=g) * 3).to(dtype)
    return za.to(device).contiguous(memory_format=fmt), zb.to(device)


def _ambiguous(za, zb, thr, select):
    """(label_ambiguous, mask_ambiguous, select_ambiguous) pixel maps from the fp64 oracle."""
    pa, pb = torch.softmax(za.double(), 1), torch.softmax(zb.double(), 1)
    ha, hb = reference.normalized_entropy(pa), reference.normalized_entropy(pb)
    if select == "min_entropy":
        p = torch.where((ha <= hb).unsqueeze(1), pa, pb)
        sel = (ha - hb).abs() < DELTA
    else:
        p, sel = 0.5 * (pa + pb), torch.zeros_like(ha, dtype=torch.bool)
    top2 = p.topk(2, dim=1).values
    lab = sel | ((top2[:, 0] - top2[:, 1]) < DELTA)
    msk = sel | ((top2[:, 0] - thr).abs() < DELTA)
    return lab, msk, sel


def _check_against_oracle(out, za, zb, thr, select):
    ora = reference.entropy_pseudo_label(za, zb, thr, select=select, dtype=torch.float64)
    base = reference.entropy_pseudo_label(za, zb, thr, select=select, dtype=za.dtype)
    lab_amb, msk_amb, sel_amb = _ambiguous(za, zb, thr, select)
    assert out.labels.dtype == torch.int64 and out.mask.dtype == torch.bool
    assert out.uncertainty.dtype == torch.float32 and out.labels.shape == ora.labels.shape
    # discrete outputs: exact except near-ties, and near-ties must be rare (not a vacuous test)
    assert torch.equal(out.labels[~lab_amb], ora.labels[~lab_amb])
    assert torch.equal(out.mask[~msk_amb], ora.mask[~msk_amb])
    assert int(lab_amb.sum()) + int(msk_amb.sum()) <= max(2, lab_amb.numel() // 50)
    keep = ~sel_amb
    bound = tolerance(ora.uncertainty[keep], base.uncertainty[keep], atol=2e-6)
    assert reference.max_abs_err(out.uncertainty[keep], ora.uncertainty[keep]) <= bound
    return ora


@pytest.mark.parametrize("C,spatial,dtype,fmt,select", CASES)
def test_matches_oracle(C, spatial, dtype, fmt, select):
    za, zb = _pair(2, C, spatial, dtype, fmt)
    assert flat_layout(za)[0] is za  # channels-last / contiguous are read in place, no copy
    thr = 0.9
    out = entropy_pseudo_label(za, zb, thr, select=select)
    ora = _check_against_oracle(out, za, zb, thr, select)
    assert 0 < int(ora.mask.sum()) < ora.mask.numel()  # threshold splits the pixels


def test_batch_one_and_extremes():
    za, zb = _pair(1, 4, (3, 5), torch.float32, torch.contiguous_format, seed=3)
    za[0, :, 0, :] *= 3000.0  # logits around ±1e4: exp underflows to exactly 0 (0·log 0)
    zb[0, :, 1, :] = -1e4
    for select in ("min_entropy", "mean"):
        out = entropy_pseudo_label(za, zb, torch.tensor(0.9), select=select)
        _check_against_oracle(out, za, zb, 0.9, select)
        assert torch.isfinite(out.uncertainty).all()


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _h(p):
    return -sum(v * math.log(v) for v in p if v > 0) / math.log(len(p))


def test_hand_cases_ties_and_selection():
    big = 1e4
    # pixels (C = 3): all equal | tie of classes 1, 2 | confident, different classes | b more certain
    a = [[0.0, 0.0, 0.0], [0.0, 5.0, 5.0], [big, -big, -big], [2.0, 0.0, 0.0]]
    b = [[0.0, 0.0, 0.0], [0.0, 5.0, 5.0], [-big, big, -big], [0.0, 0.0, 8.0]]
    za = torch.tensor(a).T.reshape(1, 3, 1, 4)
    zb = torch.tensor(b).T.reshape(1, 3, 1, 4)
    out = entropy_pseudo_label(za, zb, 0.5, select="min_entropy")
    pb3 = _softmax(b[3])
    assert out.labels.flatten().tolist() == [0, 1, 0, 2]
    assert out.mask.flatten().tolist() == [False, False, True, True]
    expect_h = [1.0, _h(_softmax(a[1])), 0.0, _h(pb3)]
    torch.testing.assert_close(out.uncertainty.flatten(), torch.tensor(expect_h), rtol=1e-5, atol=1e-6)

    out = entropy_pseudo_label(za, zb, 0.5, select="mean")
    pm3 = [(x + y) / 2 for x, y in zip(_softmax(a[3]), pb3)]
    # pixel 2: p = (0.5, 0.5, 0) exactly -> tie to class 0, mask 0.5 >= 0.5, H = log 2 / log 3
    assert out.labels.flatten().tolist() == [0, 1, 0, 2]
    assert out.mask.flatten().tolist() == [False, False, True, True]
    expect_h = [1.0, _h(_softmax(a[1])), math.log(2) / math.log(3), _h(pm3)]
    torch.testing.assert_close(out.uncertainty.flatten(), torch.tensor(expect_h), rtol=1e-5, atol=1e-6)


def test_threshold_tensor_under_compile():
    # C = 2, equal logits: max p = 0.5 exactly, so the mask flips exactly at threshold 0.5
    za = torch.zeros(1, 2, 2, 3)
    za[0, 0, 1] = 2.0
    zb = za.clone()
    thr = torch.tensor(0.5)
    fn = torch.compile(lambda a, b, t: entropy_pseudo_label(a, b, t), backend="aot_eager", fullgraph=True)
    assert fn(za, zb, thr).mask.sum() == 6
    thr.fill_(0.5000001)  # in place: the same compiled graph must read the new value
    assert fn(za, zb, thr).mask.tolist() == [[[False] * 3, [True] * 3]]
    eager = entropy_pseudo_label(za, zb, thr)
    assert all(torch.equal(x, y) for x, y in zip(fn(za, zb, thr), eager))

    mod = EntropyPseudoLabel(0.5, select="mean")
    assert mod(za, zb).mask.all()
    mod.set_threshold(0.85)  # softmax((2, 0))[0] = 0.881
    assert mod(za, zb).mask.sum() == 3
    as_float = entropy_pseudo_label(za, zb, 0.9).mask
    assert torch.equal(as_float, entropy_pseudo_label(za, zb, torch.tensor(0.9)).mask)


def test_opcheck_and_errors():
    za, zb = _pair(2, 3, (5, 7), torch.float32, torch.contiguous_format)
    for select in ("min_entropy", "mean"):
        torch.library.opcheck(torch.ops.ucseg.entropy_pseudo_label.default,
                              (za, zb, torch.tensor(0.6), select))
    with pytest.raises(ValueError, match="one shape"):
        entropy_pseudo_label(za, zb[:, :2])
    with pytest.raises(ValueError, match="select"):
        entropy_pseudo_label(za, zb, select="max")
    with pytest.raises(ValueError, match="0-D"):  # one element: 0-D or [1] (test_ops_contract)
        entropy_pseudo_label(za, zb, torch.tensor([0.5, 0.6]))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,select", [((12, 4, 256, 256), "min_entropy"), ((2, 14, 64, 64, 64), "mean")])
def test_gpu_real_shapes_compile_and_graph(shape, select):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    za, zb = _pair(shape[0], shape[1], shape[2:], torch.bfloat16, fmt, device="cuda")
    thr = torch.tensor(0.6, device="cuda")
    out = entropy_pseudo_label(za, zb, thr, select=select)
    _check_against_oracle(out, za, zb, 0.6, select)
    comp = torch.compile(entropy_pseudo_label, fullgraph=True)(za, zb, thr, select=select)
    assert all(torch.equal(x, y) for x, y in zip(comp, out))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: JIT compile outside the capture
            entropy_pseudo_label(za, zb, thr, select=select)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = entropy_pseudo_label(za, zb, thr, select=select)
    for t in (0.6, 0.9, 0.3):
        thr.fill_(t)
        graph.replay()
        eager = entropy_pseudo_label(za, zb, t, select=select)
        assert all(torch.equal(x, y) for x, y in zip(static, eager)), f"replay with threshold {t}"
