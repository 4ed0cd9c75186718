"""One contract across backends: every public op (and its nn.Module form) × {triton, reference}.

The Triton path runs on CPU through the interpreter (TRITON_INTERPRET=1, set by conftest) or on
CUDA; the reference path through `ops.set_backend("reference")`, restored afterwards. For each
op and backend: an empty batch (B = 0, and a map with no pixel) gives what the other backend
gives — zero losses with zero (empty) gradients, empty maps — without an exception; a threshold
is a number, a 0-D or a [1] floating tensor on the logits' device, anything else is refused with
the same error; mismatched shapes, dtypes and devices of the logits / targets, and a bad
ignore_index, raise the same error with the same message on both backends.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ucseg_fast import ops
from ucseg_fast.ops import (CrossPseudoLabelLoss, EntropyPseudoLabel, EvidentialUncertainty,
                            FusionUnsupLosses, PseudoLabelLoss, SegmentationLossTerms)
from ucseg_fast.ops._triton_utils import triton_usable
from ucseg_fast.ops.fusion_loss import loss_rows, pair_loss_terms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OTHER = torch.device("cpu" if DEVICE.type == "cuda" else "meta")  # "another device"
BACKENDS = ["triton", "reference"]
C = 3


def _z(B, spatial=(4, 6), dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B, C, *spatial), generator=g) * 2).to(dtype).to(device)


def _labels(B, spatial=(4, 6), seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (B, *spatial), generator=g).to(device)


def _mask(B, spatial=(4, 6), seed=2, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((B, *spatial), generator=g) > 0.3).to(device)


# op name -> (builder(B, spatial) -> (differentiable inputs, fn(*inputs) -> output))
def _build(name: str, B: int, spatial=(4, 6)):
    za, zb = _z(B, spatial), _z(B, spatial, seed=5)
    lab, msk = _labels(B, spatial), _mask(B, spatial)
    lam = torch.tensor(0.3, device=DEVICE)
    table: dict[str, tuple[tuple[torch.Tensor, ...], Callable]] = {
        "evidential_uncertainty": ((za,), lambda a: ops.evidential_uncertainty(a)),
        "evidential_uncertainty[tokens]": ((za,), lambda a: ops.evidential_uncertainty(
            a, patch_size=2)),
        "EvidentialUncertainty": ((za,), lambda a: EvidentialUncertainty()(a)),
        "entropy_pseudo_label": ((za, zb), lambda a, b: ops.entropy_pseudo_label(a, b, 0.5)),
        "EntropyPseudoLabel": ((za, zb), lambda a, b: EntropyPseudoLabel(0.5).to(DEVICE)(a, b)),
        "pseudo_label_loss": ((za,), lambda a: ops.pseudo_label_loss(a, lab, msk,
                                                                       dice_weight=1.0)),
        "PseudoLabelLoss": ((za,), lambda a: PseudoLabelLoss(dice_weight=0.5)(a, lab)),
        "cross_pseudo_label_loss": ((za, zb), lambda a, b: ops.cross_pseudo_label_loss(
            a, b, 0.5, dice_weight=1.0)),
        "CrossPseudoLabelLoss": ((za, zb), lambda a, b: CrossPseudoLabelLoss(
            0.5, dice_weight=1.0).to(DEVICE)(a, b)),
        "segmentation_loss_terms": ((za,), lambda a: ops.segmentation_loss_terms(a, lab,
                                                                                 lam=lam)),
        "segmentation_loss_terms[bce,3d]": ((za.unsqueeze(-1).expand(-1, -1, -1, -1, 2)
                                             .contiguous(),),
                                            lambda a: ops.segmentation_loss_terms(
                                                a, lab.unsqueeze(-1).expand(-1, -1, -1, 2),
                                                kind="bce", lam=lam)),
        "SegmentationLossTerms": ((za,), lambda a: SegmentationLossTerms(lam=0.3).to(DEVICE)(
            a, lab)),
        "fusion_unsup_losses": ((za, zb), lambda a, b: ops.fusion_unsup_losses(a, b, lab)),
        "FusionUnsupLosses": ((za, zb), lambda a, b: FusionUnsupLosses()(a, b, lab)),
        "pair_loss_terms": ((za, zb), lambda a, b: pair_loss_terms(a, b, lab, lam=lam)),
        "loss_rows": ((za, zb), lambda a, b: loss_rows(a, b, lab, lam=lam)),
    }
    return table[name]


OPS = ["evidential_uncertainty", "evidential_uncertainty[tokens]", "EvidentialUncertainty",
       "entropy_pseudo_label", "EntropyPseudoLabel", "pseudo_label_loss", "PseudoLabelLoss",
       "cross_pseudo_label_loss", "CrossPseudoLabelLoss", "segmentation_loss_terms",
       "segmentation_loss_terms[bce,3d]", "SegmentationLossTerms", "fusion_unsup_losses",
       "FusionUnsupLosses", "pair_loss_terms", "loss_rows"]


def _on(backend: str, fn: Callable):
    """fn() under `backend` (restored afterwards): ("ok", result) or (exception type, message)."""
    if backend == "triton" and not triton_usable(torch.zeros(1, device=DEVICE)):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    prev = ops.get_backend()
    ops.set_backend(backend)
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the contract compares what each path raises
        return type(exc), str(exc)
    finally:
        ops.set_backend(prev)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    res = []
    for o in out:
        res += _flat(o)
    return res


def _run_with_grads(name: str, B: int, spatial=(4, 6)):
    """(outputs, gradients of Σ float outputs w.r.t. the logits) of op `name`."""
    inputs, fn = _build(name, B, spatial)
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = _flat(fn(*xs))
    diff = [o for o in outs if o.requires_grad]
    grads = None
    if diff:
        total = sum(o.float().sum() for o in diff)
        grads = torch.autograd.grad(total, xs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
    return [o.detach() for o in outs], grads


def _other(backend: str) -> str:
    return BACKENDS[1 - BACKENDS.index(backend)]


def _same(a, b) -> None:
    """Two outcomes are the same: the same error and message, or equal outputs."""
    assert a[0] == b[0], (a, b)
    if a[0] != "ok":
        assert a[1] == b[1]
        return
    (oa, ga), (ob, gb) = a[1], b[1]
    assert len(oa) == len(ob)
    for x, y in zip(oa, ob):
        assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert (ga is None) == (gb is None)
    if ga is not None:
        for x, y in zip(ga, gb):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("B,spatial", [(0, (4, 6)), (2, (0, 6))], ids=["B=0", "no-pixel"])
def test_empty_input(name, backend, B, spatial):
    """No exception; the same outputs as the other backend; every loss 0 (not NaN) with an
    all-zero gradient; maps of the input's (empty) shape."""
    if "tokens" in name and spatial[0] == 0:
        spatial = (0, 4)
    got = _on(backend, lambda: _run_with_grads(name, B, spatial))
    assert got[0] == "ok", got
    _same(got, _on(_other(backend), lambda: _run_with_grads(name, B, spatial)))
    outs, grads = got[1]
    for o in outs:  # a map is empty; a loss (0-D, or loss_rows' [K, 3]) is all zero
        assert o.numel() == 0 or (o.dim() <= 2 and torch.count_nonzero(o) == 0), (name, o)
    for g in grads or []:
        assert torch.count_nonzero(g) == 0


def test_empty_batch_losses_are_zero_on_both_paths_not_nan():
    """What the contract replaced: a ZeroDivisionError on the Triton path and NaN / 0 on the
    reference path. Now 0 on both, and `.backward()` works."""
    for backend in BACKENDS:
        z = _z(0).requires_grad_(True)
        out = _on(backend, lambda: ops.pseudo_label_loss(z, _labels(0), dice_weight=1.0))
        assert out[0] == "ok" and float(out[1].detach()) == 0.0
        out[1].backward()
        assert z.grad is not None and z.grad.shape == z.shape


# --------------------------------------------------------------------------- thresholds
_THR_OPS = {
    "entropy_pseudo_label": lambda a, b, t: ops.entropy_pseudo_label(a, b, t),
    "entropy_pseudo_label[mean]": lambda a, b, t: ops.entropy_pseudo_label(a, b, t,
                                                                            select="mean"),
    "cross_pseudo_label_loss": lambda a, b, t: ops.cross_pseudo_label_loss(a, b, t,
                                                                           dice_weight=1.0),
}

ACCEPTED = {  # every accepted form equals the Python float 0.5
    "float": lambda: 0.5,
    "0-D tensor": lambda: torch.tensor(0.5, device=DEVICE),
    "[1] tensor": lambda: torch.tensor([0.5], device=DEVICE),
    "0-D float64 tensor": lambda: torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
}
REFUSED = {  # (threshold, error type, message fragment)
    "[1, 1] tensor": (lambda: torch.tensor([[0.5]], device=DEVICE), ValueError,
                      "0-D tensor or a 1-element tensor [1], got shape (1, 1)"),
    "[2] tensor": (lambda: torch.tensor([0.5, 0.6], device=DEVICE), ValueError,
                   "got shape (2,)"),
    "empty tensor": (lambda: torch.zeros(0, device=DEVICE), ValueError, "got shape (0,)"),
    "int tensor": (lambda: torch.tensor(1, device=DEVICE), TypeError, "floating point"),
    "bool": (lambda: True, TypeError, "got bool"),
    "str": (lambda: "0.5", TypeError, "got str"),
    "other device": (lambda: torch.tensor(0.5, device=OTHER), ValueError,
                     f"threshold is on {OTHER}, the logits on {DEVICE}"),
    "other device [1]": (lambda: torch.tensor([0.5], device=OTHER), ValueError,
                         "must be on the logits' device"),
}


def _thr_outcome(op, backend, thr):
    za, zb = _z(2), _z(2, seed=5)
    res = _on(backend, lambda: _flat(_THR_OPS[op](za, zb, thr())))
    return res if res[0] != "ok" else ("ok", ([o.detach() for o in res[1]], None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_THR_OPS))
@pytest.mark.parametrize("form", list(ACCEPTED))
def test_threshold_accepted(op, backend, form):
    got = _thr_outcome(op, backend, ACCEPTED[form])
    assert got[0] == "ok", got
    _same(got, _thr_outcome(op, backend, ACCEPTED["float"]))
    _same(got, _thr_outcome(op, _other(backend), ACCEPTED[form]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_THR_OPS))
@pytest.mark.parametrize("form", list(REFUSED))
def test_threshold_refused_with_one_message(op, backend, form):
    thr, exc, fragment = REFUSED[form]
    got = _thr_outcome(op, backend, thr)
    assert got[0] is exc and fragment in got[1] and got[1].startswith(op.split("[")[0]), got
    _same(got, _thr_outcome(op, _other(backend), thr))


def test_threshold_buffer_of_the_modules_and_a_1_element_view():
    """The [1] form is read through a view: an in-place update of the caller's tensor is seen."""
    za, zb = _z(2), _z(2, seed=5)
    thr = torch.tensor([0.5], device=DEVICE)
    for backend in BACKENDS:
        first = _on(backend, lambda: ops.entropy_pseudo_label(za, zb, thr).mask.clone())[1]
        thr.fill_(0.99)
        second = _on(backend, lambda: ops.entropy_pseudo_label(za, zb, thr).mask.clone())[1]
        thr.fill_(0.5)
        assert int(second.sum()) < int(first.sum())
    mod = EntropyPseudoLabel(0.5).to(DEVICE)
    mod.set_threshold(torch.tensor([0.7], device=DEVICE))
    assert float(mod.threshold) == pytest.approx(0.7)


# --------------------------------------------------------------------------- bad inputs
def _bad_cases():
    """(op, case, fn): every call must raise, with one message on both backends."""
    z, z2, lab, msk = _z(2), _z(2, seed=5), _labels(2), _mask(2)
    lam = torch.tensor(0.3, device=DEVICE)
    ep, cps = ops.entropy_pseudo_label, ops.cross_pseudo_label_loss
    pll, slt, fus = ops.pseudo_label_loss, ops.segmentation_loss_terms, ops.fusion_unsup_losses
    pair_in = {"shape": z2[:, :2], "dtype": z2.half(), "device": z2.to(OTHER)}
    cases = []
    for kind, b in pair_in.items():
        cases += [("entropy_pseudo_label", f"logits_b {kind}", lambda b=b: ep(z, b)),
                  ("cross_pseudo_label_loss", f"logits_b {kind}", lambda b=b: cps(z, b)),
                  ("fusion_unsup_losses", f"z2_u {kind}", lambda b=b: fus(z, b, lab)),
                  ("pair_loss_terms", f"z2 {kind}", lambda b=b: pair_loss_terms(z, b, lab)),
                  ("loss_rows", f"z2 {kind}", lambda b=b: loss_rows(z, b, lab))]
    targets = {"shape": lab[:, :3], "float dtype": lab.float(), "bool dtype": lab.bool(),
               "device": lab.to(OTHER)}
    for kind, t in targets.items():
        cases += [("pseudo_label_loss", f"labels {kind}", lambda t=t: pll(z, t)),
                  ("segmentation_loss_terms", f"target {kind}", lambda t=t: slt(z, t)),
                  ("fusion_unsup_losses", f"Y_u {kind}", lambda t=t: fus(z, z2, t)),
                  ("loss_rows", f"target {kind}", lambda t=t: loss_rows(z, z2, t))]
    masks = {"shape": msk[:, :3], "dtype": msk.float(), "device": msk.to(OTHER)}
    for kind, m in masks.items():
        cases.append(("pseudo_label_loss", f"mask {kind}", lambda m=m: pll(z, lab, m)))
    logits = {"rank": z[:, :, 0, 0], "int dtype": z.long(), "one class": z[:, :1],
              "not a tensor": z.tolist()}
    for kind, x in logits.items():
        cases += [("evidential_uncertainty", f"logits {kind}",
                   lambda x=x: ops.evidential_uncertainty(x)),
                  ("entropy_pseudo_label", f"logits_a {kind}", lambda x=x: ep(x, z)),
                  ("pseudo_label_loss", f"logits {kind}", lambda x=x: pll(x, lab)),
                  ("segmentation_loss_terms", f"logits {kind}", lambda x=x: slt(x, lab))]
    cases += [
        ("evidential_uncertainty", "patch_size not dividing",
         lambda: ops.evidential_uncertainty(z, patch_size=5)),
        ("entropy_pseudo_label", "select", lambda: ep(z, z2, select="max")),
        ("cross_pseudo_label_loss", "select", lambda: cps(z, z2, select="max")),
        ("cross_pseudo_label_loss", "dice_weight tensor",
         lambda: cps(z, z2, dice_weight=torch.tensor(1.0))),
        ("pseudo_label_loss", "dice_weight tensor",
         lambda: pll(z, lab, dice_weight=torch.tensor(1.0))),
        ("segmentation_loss_terms", "lam [1]", lambda: slt(z, lab, lam=torch.ones(1))),
        ("segmentation_loss_terms", "lam device",
         lambda: slt(z, lab, lam=lam.to(OTHER))),
        ("segmentation_loss_terms", "kind", lambda: slt(z, lab, kind="focal")),
        ("segmentation_loss_terms", "eps tensor", lambda: slt(z, lab, eps=torch.tensor(1.0))),
        ("segmentation_loss_terms", "3D logits", lambda: slt(z[..., 0], lab[..., 0])),
        ("pseudo_label_loss", "ignore_index float", lambda: pll(z, lab, ignore_index=255.0)),
        ("segmentation_loss_terms", "ignore_index tensor",
         lambda: slt(z, lab, ignore_index=torch.tensor(255))),
        ("fusion_unsup_losses", "ignore_index bool", lambda: fus(z, z2, lab, ignore_index=True)),
        ("loss_rows", "ignore_index beyond int64", lambda: loss_rows(z, z2, lab,
                                                                     ignore_index=2**64)),
    ]
    return cases


_BAD = {f"{op}: {case}": fn for op, case, fn in _bad_cases()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_BAD))
def test_bad_inputs_same_error_on_both_backends(case, backend):
    fn = _BAD[case]
    got = _on(backend, fn)
    assert got[0] != "ok" and issubclass(got[0], (ValueError, TypeError)), (case, got)
    op = case.split(":")[0]
    if op not in ("pair_loss_terms",) and "not a tensor" not in case:
        assert op in got[1], got  # the message names the op
    other = _on(_other(backend), fn)
    assert other == got
