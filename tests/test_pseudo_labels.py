"""Pseudo-label rules and copy-paste mixing (ucseg_fast.pseudo_labels)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from ucseg_fast import pseudo_labels as PL






def _logits_from_map(cls_map: torch.Tensor, C: int, hi: float = 5.0) -> torch.Tensor:
    """[B, C, *S] logits: `hi` on the chosen class, 1 elsewhere."""
    return 1.0 + (hi - 1.0) * PL.one_hot(cls_map, C, torch.float64)


# --------------------------------------------------------------------------------- ACDC ----
def test_argmax_first_index_on_ties():
    # one pixel: logits (0, 2, 0, 2): classes 1 and 3 tie -> 1 ; (1,1,1,1) -> 0
    P = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    P = P.view(1, 4, 1, 2)
    assert PL.fusion_pseudo_label_map(P, nms=False).tolist() == [[[1, 0]]]


def test_acdc_nms_keeps_largest_8_connected_component():
    m = torch.tensor([[
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 2],  # class-1 pixel (1,3) alone (size 1)
        [0, 0, 0, 0, 0, 0],
        [2, 0, 0, 0, 1, 0],  # (3,4) touches (4,5) diagonally -> one component of size 3
        [0, 2, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1],
    ]])
    # class 1: {(0,0),(0,1),(1,0)} size 3 and {(3,4),(4,5),(5,5)} size 3 (diagonal) -> tie ->
    # the one met first in raster order wins; (1,3) dropped.
    # class 2: {(3,0),(4,1)} diagonal size 2 beats {(1,5)} size 1. class 3 absent.
    expect = torch.tensor([[
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [2, 0, 0, 0, 0, 0],
        [0, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]])
    P = _logits_from_map(m, 4)
    got = PL.fusion_pseudo_label_map(P, nms=True)
    assert got.dtype == torch.int64 and torch.equal(got, expect)
    Y = PL.fusion_pseudo_label(P, nms=True)
    assert Y.dtype == torch.float32 and not Y.requires_grad
    assert torch.equal(Y, PL.one_hot(expect, 4))
    assert torch.equal(PL.prediction_masks(P, nms=True), PL.one_hot(expect, 4))
    assert torch.equal(PL.prediction_masks(P, nms=False), PL.one_hot(m, 4))


def test_acdc_nms0_strict_threshold_allows_empty_rows():
    # pixel 0: softmax (0.5, 0.5) -> nothing set (strict >) ; pixel 1: (e^2, 1)/(e^2+1) -> class 0
    P = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]])
    Y = PL.fusion_pseudo_label(P, nms=False)
    assert Y.tolist() == [[[[0.0, 1.0]], [[0.0, 0.0]]]]


# ------------------------------------------------------------------------- binary and 3D ----
def test_binary_2d_per_channel_fp32_sigmoid():
    # channels thresholded independently; fp32 sigmoid(1e-8) rounds to exactly 0.5 -> not set
    P = torch.tensor([[[[1e-8, 3.0, -1.0]], [[1e-8, 2.0, -2.0]]]], dtype=torch.float32)
    Y = PL.fusion_pseudo_label(P, nms=False, binary=True)
    assert Y.tolist() == [[[[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]]]  # both set at pixel 1
    assert PL.fusion_pseudo_label_map(P, nms=False, binary=True).tolist() == [[[0, 1, 0]]]


def test_3d_nms_uses_ge_threshold_and_26_connectivity():
    fg = torch.full((1, 5, 3, 3), -4.0)
    fg[0, 0, 0, 0] = 0.0  # sigma = 0.5 exactly -> kept by >= 0.5
    fg[0, 1, 1, 1] = 3.0  # corner-adjacent to (0,0,0): 26-connected, one component of size 3
    fg[0, 2, 2, 2] = 3.0
    fg[0, 4, 0, 0] = 3.0  # isolated voxel (size 1) -> dropped
    P = torch.stack([-fg, fg], dim=1)
    Y = PL.fusion_pseudo_label(P, nms=True, binary=True)
    expect = torch.zeros(1, 5, 3, 3, dtype=torch.int64)
    expect[0, 0, 0, 0] = expect[0, 1, 1, 1] = expect[0, 2, 2, 2] = 1
    assert torch.equal(Y, PL.one_hot(expect, 2))
    # nms=0 in 3D: strict > per channel -> the sigma = 0.5 voxel is not set in either channel
    Y0 = PL.fusion_pseudo_label(P, nms=False, binary=True)
    assert Y0[0, :, 0, 0, 0].tolist() == [0.0, 0.0]
    assert Y0[0, 1, 4, 0, 0].item() == 1.0


def test_binary_rule_rejects_multiclass():
    with pytest.raises(ValueError, match="C = 2"):
        PL.fusion_pseudo_label(torch.zeros(1, 4, 2, 2), nms=False, binary=True)


# ---------------------------------------------------------------------------- copy-paste ----
@pytest.mark.parametrize("n,ell", [(224, 149), (256, 170), (96, 64)])
def test_box_size(n, ell):
    assert PL.copy_paste_box_size(n) == ell


def test_box_starts_cover_exactly_the_reference_range():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([PL.copy_paste_box((96, 96, 96), generator=g) for _ in range(1500)])
    assert draws.dtype == torch.int64 and draws.shape == (1500, 3)
    # randint(0, n - ell) -> {0 .. 31} for 96 (never 32, which would push the box out)
    assert int(draws.min()) == 0 and int(draws.max()) == 96 - 64 - 1
    s = PL.copy_paste_box((256, 224), generator=g)
    assert 0 <= int(s[0]) <= 85 and 0 <= int(s[1]) <= 74


@pytest.mark.parametrize("shape", [(224, 224), (256, 256), (96, 96, 96), (10, 7)])
def test_mask_zero_box_position_and_size(shape):
    starts = torch.tensor([n - PL.copy_paste_box_size(n) - 1 for n in shape])  # last start
    M = PL.copy_paste_mask(shape, starts, torch.float32)
    assert M.shape == tuple(shape) and M.dtype == torch.float32
    box = [PL.copy_paste_box_size(n) for n in shape]
    assert int((M == 0).sum()) == int(np.prod(box))
    sl = tuple(slice(int(o), int(o) + b) for o, b in zip(starts, box))
    assert bool((M[sl] == 0).all())
    M2 = PL.copy_paste_mask(shape, torch.zeros(len(shape), dtype=torch.int64), torch.int64)
    assert M2.dtype == torch.int64 and M2[(0,) * len(shape)].item() == 0


def test_mask_rejects_wrong_starts():
    with pytest.raises(ValueError, match="starts"):
        PL.copy_paste_mask((8, 8), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("branch_a", [True, False])
def test_mix_branches_match_reference_formula(branch_a):
    torch.manual_seed(0)
    x_l, x_u = torch.rand(2, 3, 9, 9, dtype=torch.float64), torch.rand(2, 3, 9, 9, dtype=torch.float64)
    y_l = PL.one_hot(torch.randint(0, 4, (2, 9, 9)), 4, torch.float64)
    Y_u = PL.one_hot(torch.randint(0, 4, (2, 9, 9)), 4)  # float32 like the pseudo-labels
    M = PL.copy_paste_mask((9, 9), torch.tensor([1, 2]), torch.int64)  # int64 as the reference
    A = M if branch_a else 1 - M
    for br in (branch_a, torch.tensor(branch_a)):
        x_mix, y_mix = PL.copy_paste_mix(x_l, x_u, y_l, Y_u, M, br)
        assert torch.equal(x_mix, x_l * A + x_u * (1 - A))
        assert torch.equal(y_mix, y_l * A + Y_u * (1 - A))
        assert y_mix.dtype == torch.float64


def test_branch_draw_is_device_bool():
    g = torch.Generator().manual_seed(0)
    b = torch.stack([PL.copy_paste_branch(g) for _ in range(400)])
    assert b.dtype == torch.bool and b.shape == (400,)
    assert 120 < int(b.sum()) < 280


@pytest.mark.gpu
def test_copy_paste_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    x = torch.rand(2, 3, 64, 64, device=dev)
    y = torch.rand(2, 4, 64, 64, device=dev)
    P = torch.randn(2, 4, 64, 64, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        starts = PL.copy_paste_box((64, 64), device=dev)
        M = PL.copy_paste_mask((64, 64), starts)
        PL.copy_paste_mix(x, x.flip(0), y, y.flip(0), M, PL.copy_paste_branch(device=dev))
        PL.fusion_pseudo_label(P, nms=False)
        PL.fusion_pseudo_label(P[:, :2], nms=False, binary=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
