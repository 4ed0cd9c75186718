"""ops.prediction_stats: the step's gradient-free predictions (maps, diff terms, hard gates) in one
kernel sweep, against its PyTorch oracle (Triton under the interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast.losses import diff_loss, queue_gate_hard
from ucseg_fast.ops import reference
from ucseg_fast.ops.predictions import prediction_stats
from ucseg_fast.pseudo_labels import fusion_pseudo_label_map


def _inputs(C, shape, B=4, Bl=2, seed=0, dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    z1, z2, P = (3 * torch.randn(B, C, *shape, generator=g) for _ in range(3))
    y = torch.randint(0, C, (Bl, *shape), generator=g)
    if channels_last and len(shape) == 2:
        z1 = z1.contiguous(memory_format=torch.channels_last)
    return z1.to(dtype), z2.to(dtype), P.to(dtype), y


@pytest.mark.parametrize("C,shape,binary", [(4, (17, 13), False), (3, (8, 8), False),
                                            (5, (6, 5, 7), False), (2, (9, 7, 5), True),
                                            (2, (16, 16), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_oracle(C, shape, binary, dtype):
    z1, z2, P, y = _inputs(C, shape, dtype=dtype, channels_last=True)
    maps, stats = prediction_stats(z1, z2, P, y, binary=binary)
    maps_r, stats_r = reference.prediction_stats(z1, z2, P[2:], y, binary=binary)
    assert maps.dtype == torch.uint8 and maps.shape == (2 * 4 + 2, *shape)
    # discrete maps: exact except pixels within rounding of a tie (softmax in fp32 both sides)
    p = torch.softmax(torch.cat([z1, z2, P[2:]]).float(), 1) if not binary else None
    if p is not None:
        top2 = p.topk(2, dim=1).values
        near_tie = (top2[:, 0] - top2[:, 1]) < 1e-6
        assert ((maps != maps_r) & ~near_tie).sum() == 0
    else:
        assert torch.equal(maps, maps_r)
    torch.testing.assert_close(stats, stats_r, rtol=2e-6, atol=2e-6)


def test_stats_are_the_losses_definitions():
    z1, z2, P, y = _inputs(4, (16, 16))
    _, stats = reference.prediction_stats(z1, z2, None, y)
    p1, p2 = torch.softmax(z1, 1), torch.softmax(z2, 1)
    torch.testing.assert_close(stats[0], diff_loss(p1, p2))
    torch.testing.assert_close(stats[1], diff_loss(p2, p1))
    torch.testing.assert_close(stats[2], queue_gate_hard(p1[:2].argmax(1), y, 4))
    torch.testing.assert_close(stats[3], queue_gate_hard(p2[:2].argmax(1), y, 4))


def test_maps_are_the_pseudo_label_rule_before_components():
    z1, z2, P, y = _inputs(4, (16, 16))
    maps, _ = prediction_stats(z1, z2, P, y)
    assert torch.equal(maps[8:].long(), fusion_pseudo_label_map(P[2:], nms=False))
    assert torch.equal(maps[:4].long(), torch.softmax(z1, 1).argmax(1))
    zb1, zb2, Pb, yb = _inputs(2, (8, 8), seed=1)
    mb, _ = prediction_stats(zb1, zb2, Pb, yb, binary=True)
    assert torch.equal(mb[8:].bool(), torch.sigmoid(Pb[2:, 1]) >= 0.5)


def test_without_labels_or_P():
    z1, z2, _, _ = _inputs(4, (12, 12))
    maps, stats = prediction_stats(z1, z2)
    assert maps.shape == (8, 12, 12) and float(stats[2]) == 0.0 and float(stats[3]) == 0.0
    _, ref = reference.prediction_stats(z1, z2, None, None)
    torch.testing.assert_close(stats, ref, rtol=2e-6, atol=2e-6)


def test_empty_classes_give_a_zero_dice():
    # a class absent from both prediction and label contributes 0 (the reference's rule)
    z = torch.full((2, 3, 4, 4), -5.0)
    z[:, 0] = 5.0  # every pixel predicts class 0
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    _, stats = prediction_stats(z, z, None, y)
    assert float(stats[2]) == 0.0


def test_bad_inputs_name_the_argument():
    z = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="z2"):
        prediction_stats(z, torch.randn(2, 4, 8, 9))
    with pytest.raises(ValueError, match="y_l"):
        prediction_stats(z, z, None, torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="binary needs C = 2"):
        prediction_stats(z, z, binary=True)
