"""The UC-Seg pair: two independent subnets + the UPG (docs/method.md §1.1; 2D §1.2, 3D §1.3, UPG §1.4).

``UCSeg.forward`` is the reference's ``UC_Seg.forward`` with the intermediate maps (u1, u2, A)
returned as well, so that losses and logging need no second pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .unet2d import UNet2D
from .unet3d import UNet3D
from .upg import UPG, evidential_uncertainty_torch
from .vnet import VNet3D
from .vnet2d import VNet2D

__all__ = ["ModelOutput", "UCSeg", "build_ucseg_2d", "build_ucseg_3d"]


class ModelOutput(NamedTuple):
    """All outputs of one forward. ``feats*`` are the subnets' 5 encoder maps (CCP uses -3, -2, -1)."""

    z1: Tensor              # [B,C,*S] logits of net_1
    feats1: list[Tensor]
    z2: Tensor              # [B,C,*S] logits of net_2
    feats2: list[Tensor]
    P: Tensor               # [B,C,*S] fused logits (pseudo-label source and inference output)
    u1: Tensor              # [B,1,*S] vacuity of z1 (attention query side); tokens [B,N,p^d]
    u2: Tensor              # [B,1,*S] vacuity of z2 (key/value side)    when UCSeg.fused_tokens
    A: Tensor               # [B,1,*S] cross-attention map                (see there)


class UCSeg(nn.Module):
    """``net_1``, ``net_2`` (each ``x -> (logits, feats)``) and ``upg`` (:class:`UPG`).

    ``uncertainty_fn`` maps logits ``[B,C,*S]`` to the vacuity ``[B,1,*S]``; the default is the
    plain-PyTorch reference, the fused Triton op can be swapped in without touching the model.
    """

    def __init__(self, net_1: nn.Module, net_2: nn.Module, upg: UPG, num_classes: int,
                 uncertainty_fn: Callable[[Tensor], Tensor] = evidential_uncertainty_torch) -> None:
        super().__init__()
        self.net_1 = net_1
        self.net_2 = net_2
        self.upg = upg
        self.num_classes = num_classes
        self.uncertainty_fn = uncertainty_fn

    #: True: the fused token-layout UPG path (`UPG.forward_fused_tokens`: the evidential kernel
    #: writes u as patch tokens, the fused head reads A's tokens; no Patchify / unpatchify
    #: copies). Then `ModelOutput.u1/u2/A` are token tensors [B, N, p^d] (`upg.unpatchify`
    #: gives the maps). Needs the fused head; `build_model` sets it for model.uncertainty =
    #: model.upg_head = "fused".
    fused_tokens: bool = False

    def forward(self, x: Tensor) -> ModelOutput:
        z1, feats1 = self.net_1(x)
        z2, feats2 = self.net_2(x)
        if z1.shape[1] != self.num_classes or z2.shape != z1.shape:
            raise ValueError(f"UCSeg: subnet logits {tuple(z1.shape)} / {tuple(z2.shape)} do not have "
                             f"num_classes={self.num_classes} channels or differ in shape")
        if self.fused_tokens:
            u1, u2, A, P = self.upg.forward_fused_tokens(z1, z2)
            return ModelOutput(z1, list(feats1), z2, list(feats2), P, u1, u2, A)
        u1 = self.uncertainty_fn(z1)
        u2 = self.uncertainty_fn(z2)
        A, P = self.upg(u1, u2, z1, z2)
        return ModelOutput(z1, list(feats1), z2, list(feats2), P, u1, u2, A)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Fused logits ``P`` (the reference segments with P, not z1/z2). The caller sets ``eval()``."""
        return self.forward(x).P


def build_ucseg_2d(num_classes: int = 4, in_channels: int = 3, img_size: Sequence[int] = (256, 256),
                   patch_size: int = 16,
                   unet_dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
                   head_impl: str = "torch") -> UCSeg:
    """The 2D configuration of the reference: UNet (net_1) + VNet, 16 filters (net_2) + UPG
    (``head_impl="fused"``: the recompute-sweep fused fusion head, same parameters)."""
    net_1 = UNet2D(in_channels, num_classes, dropout=unet_dropout)
    net_2 = VNet2D(in_channels, num_classes, n_filters=16)
    upg = UPG(num_classes, img_size, patch_size, head_impl=head_impl)
    return UCSeg(net_1, net_2, upg, num_classes)


def build_ucseg_3d(num_classes: int = 2, in_channels: int = 1, img_size: Sequence[int] = (96, 96, 96),
                   patch_size: int = 16, head_impl: str = "torch") -> UCSeg:
    """The 3D configuration of the reference (LA / Pancreas, docs/method.md §1.3–1.4): SSL4MIS
    ``unet_3D`` (net_1, InstanceNorm, dropout 0.3) + VNet 3D, 16 filters (net_2) + UPG with the
    3D cross-attention sizes (embed dim 1024, 8 heads × 128, FFN hidden 384, dropout 0.1).
    ``img_size`` is the training patch ``(X, Y, Z)``; the UPG's position embedding is tied to it."""
    img_size = tuple(int(s) for s in img_size)
    if len(img_size) != 3:
        raise ValueError(f"build_ucseg_3d: img_size {img_size} must have 3 entries")
    net_1 = UNet3D(in_channels, num_classes)
    net_2 = VNet3D(in_channels, num_classes, n_filters=16)
    upg = UPG(num_classes, img_size, patch_size, embed_dim=1024, heads=8, dim_head=128, mlp_dim=384,
              dropout=0.1, head_impl=head_impl)
    return UCSeg(net_1, net_2, upg, num_classes)
