"""Gradients of the fused ops for inputs whose spatial dims do not collapse (H/W stored
transposed): the launchers must write the gradient back into the returned tensor."""
from __future__ import annotations

import torch

from ucseg_fast.ops import cross_pseudo_label_loss, evidential_uncertainty, pseudo_label_loss
from ucseg_fast.ops import reference as R


def _transposed(t: torch.Tensor) -> torch.Tensor:
    out = t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    return out


def test_gradients_with_transposed_spatial_layout():
    g = torch.Generator().manual_seed(0)
    z = _transposed(torch.randn(2, 3, 6, 5, generator=g)).requires_grad_()
    zr = z.detach().clone().requires_grad_()
    w = torch.randn(2, 1, 6, 5, generator=g)
    (evidential_uncertainty(z) * w).sum().backward()
    (R.evidential_uncertainty(zr) * w).sum().backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)

    lab = torch.randint(0, 3, (2, 6, 5), generator=g)
    m = torch.rand(2, 6, 5, generator=g) > 0.3
    z.grad = zr.grad = None
    pseudo_label_loss(z, lab, m, dice_weight=1.0).backward()
    R.pseudo_label_loss(zr, lab, m, dice_weight=1.0).backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)

    za, zb = z.detach().clone().requires_grad_(), _transposed(0.5 * z.detach()).requires_grad_()
    res = cross_pseudo_label_loss(za, zb, 0.5, dice_weight=1.0)
    (res.loss_a + 2 * res.loss_b).backward()
    za2, zb2 = za.detach().clone().requires_grad_(), zb.detach().clone().requires_grad_()
    pl = R.entropy_pseudo_label(za2.detach(), zb2.detach(), 0.5)
    (R.pseudo_label_loss(za2, pl.labels, pl.mask, dice_weight=1.0)
     + 2 * R.pseudo_label_loss(zb2, pl.labels, pl.mask, dice_weight=1.0)).backward()
    torch.testing.assert_close(za.grad, za2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zb.grad, zb2.grad, rtol=1e-5, atol=1e-6)


def test_strided_label_and_mask_views():
    # labels / masks passed as views (a channel of a bigger tensor) must be read correctly
    from ucseg_fast.ops import segmentation_loss_terms
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 5, 6, generator=g)
    yy = torch.randint(0, 4, (3, 2, 5, 6), generator=g)
    mm = torch.rand(3, 2, 5, 6, generator=g) > 0.4
    lab, m = yy[:, 0], mm[:, 1]
    assert not lab.is_contiguous() and not m.is_contiguous()
    torch.testing.assert_close(pseudo_label_loss(z, lab, m, dice_weight=1.0),
                               R.pseudo_label_loss(z, lab.contiguous(), m.contiguous(),
                                                   dice_weight=1.0), rtol=1e-5, atol=1e-6)
    ours = segmentation_loss_terms(z, lab)
    ref = R.segmentation_loss_terms(z, lab.contiguous())
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
