"""3D UNet of SSL4MIS (Oktay et al.'s ``unet_3D``), the reference's 3D ``net_1`` (docs/method.md §1.3).

Module and parameter names mirror SSL4MIS ``networks/unet_3D.py`` / ``networks/utils.py``
(``conv1.conv1.0.weight`` …, ``up_concat4.conv.conv1.0.weight``, ``final.weight``) so that a
checkpoint of the authors' code loads with ``load_state_dict`` unchanged; modules are also
registered in the reference's order, so the state_dict order and the initialisation's use of the
random stream match it.

``UnetConv3`` = 2 × (Conv3d 3×3×3 pad 1 → InstanceNorm3d → ReLU). The reference's flag is called
``is_batchnorm`` but the layer is ``nn.InstanceNorm3d`` with its defaults: no affine parameters,
no running statistics, so train and eval normalise identically. ``nn.Dropout(0.3)`` on the
bottleneck output (``dropout1``) and on the last decoder output (``dropout2``) is the only
difference between train and eval. Init: ``kaiming_normal_(a=0, mode='fan_in')`` on every Conv3d
weight, biases keep the PyTorch default.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["UNet3D", "UnetConv3", "UnetUp3_CT"]


class UnetConv3(nn.Module):
    """``conv1``, ``conv2`` = Sequential(Conv3d 3×3×3 pad 1, InstanceNorm3d, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # In-place ReLU as in the reference (InstanceNorm's backward needs its input, not its output).
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, 1, 1),
                                   nn.InstanceNorm3d(out_channels),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(out_channels, out_channels, 3, 1, 1),
                                   nn.InstanceNorm3d(out_channels),
                                   nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class UnetUp3_CT(nn.Module):  # the reference's class name
    """Trilinear ×2 upsample (align_corners=False, no conv) → cat[skip, up] → UnetConv3(skip + deep → skip).

    The reference pads the skip by the size difference; with sizes that are multiples of 16 the
    difference is always 0, so the pad is omitted.
    """

    def __init__(self, deep_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv = UnetConv3(deep_channels + skip_channels, skip_channels)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, skip: Tensor, deep: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


class UNet3D(nn.Module):
    """SSL4MIS ``unet_3D``; ``forward(x) -> (logits [B,C,X,Y,Z], feats)``.

    ``feats = [conv1 16@S, conv2 32@S/2, conv3 64@S/4, conv4 128@S/8, center 256@S/16]``.

    Channels ``[64, 128, 256, 512, 1024] / feature_scale`` (= 16 … 256 for the reference's 4).
    ``center`` is returned after its dropout, as in the reference. Every spatial size must be a
    multiple of 16 and the bottleneck (``S / 16``) must have more than one voxel, as InstanceNorm
    needs (ValueError otherwise; 16³ fails in the reference too).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, feature_scale: int = 4,
                 dropout: float = 0.3) -> None:
        super().__init__()
        f = [int(c / feature_scale) for c in (64, 128, 256, 512, 1024)]
        if min(f) < 1:
            raise ValueError(f"UNet3D: feature_scale {feature_scale} leaves a level without channels ({f})")
        self.filters = f
        self.conv1 = UnetConv3(in_channels, f[0])
        self.maxpool1 = nn.MaxPool3d(2)
        self.conv2 = UnetConv3(f[0], f[1])
        self.maxpool2 = nn.MaxPool3d(2)
        self.conv3 = UnetConv3(f[1], f[2])
        self.maxpool3 = nn.MaxPool3d(2)
        self.conv4 = UnetConv3(f[2], f[3])
        self.maxpool4 = nn.MaxPool3d(2)
        self.center = UnetConv3(f[3], f[4])
        self.up_concat4 = UnetUp3_CT(f[4], f[3])
        self.up_concat3 = UnetUp3_CT(f[3], f[2])
        self.up_concat2 = UnetUp3_CT(f[2], f[1])
        self.up_concat1 = UnetUp3_CT(f[1], f[0])
        self.final = nn.Conv3d(f[0], num_classes, 1)
        self.dropout1 = nn.Dropout(p=dropout)
        self.dropout2 = nn.Dropout(p=dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if x.dim() != 5 or any(s % 16 for s in x.shape[2:]) or math.prod(x.shape[2:]) <= 16 ** 3:
            raise ValueError(f"UNet3D: input shape {tuple(x.shape)} must be [B, C, X, Y, Z] with every "
                             "spatial size a multiple of 16, not all 16 (InstanceNorm needs more than one "
                             "bottleneck voxel)")
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        center = self.dropout1(self.center(self.maxpool4(conv4)))
        y = self.up_concat4(conv4, center)
        y = self.up_concat3(conv3, y)
        y = self.up_concat2(conv2, y)
        y = self.dropout2(self.up_concat1(conv1, y))
        return self.final(y), [conv1, conv2, conv3, conv4, center]
