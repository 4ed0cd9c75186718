"""2D UNet of SSL4MIS/PyMIC, the reference's ``net_1`` (docs/method.md §1.2).

Module and parameter names mirror SSL4MIS ``networks/unet.py`` (``encoder.in_conv.conv_conv.0``
…, ``decoder.up1.conv1x1`` …) so that a checkpoint of the authors' code loads with
``load_state_dict`` unchanged. Default PyTorch initialisation (the reference's Kaiming helpers
only touch 3D layers and are never called).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet2D", "ConvBlock", "DownBlock", "UpBlock", "StepBatchNorm2d", "advance_bn_counters"]


class StepBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose `num_batches_tracked` is advanced once per network forward for
    all layers together (`advance_bn_counters`: one multi-tensor add) instead of one add kernel
    per layer. Same parameters, buffers, state_dict and numbers: with a momentum set the counter
    never enters the update (momentum=None, the cumulative average, keeps PyTorch's own path)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats) or self.momentum is None:
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                            self.momentum, self.eps)


def advance_bn_counters(module: nn.Module) -> None:
    """num_batches_tracked += 1 for every `StepBatchNorm2d` that skipped its own increment
    (training mode, running statistics, a momentum): one `_foreach_add_` for all of them."""
    counters = [m.num_batches_tracked for m in module.modules()
                if type(m) is StepBatchNorm2d and m.training and m.track_running_stats
                and m.momentum is not None and m.num_batches_tracked is not None]
    if counters:
        with torch.no_grad():
            torch._foreach_add_(counters, 1)


class ConvBlock(nn.Module):
    """conv3x3 → BN → LeakyReLU(0.01) → Dropout(p) → conv3x3 → BN → LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int, dropout_p: float) -> None:
        super().__init__()
        # In-place activations are numerically identical to the reference's out-of-place ones
        # (BN's backward does not need its output) and save one activation buffer per layer.
        self.conv_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            StepBatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout(dropout_p),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            StepBatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_conv(x)


class DownBlock(nn.Module):
    """MaxPool2d(2) then ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, dropout_p: float) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, dropout_p))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class UpBlock(nn.Module):
    """conv1x1 (deep → skip channels) → bilinear ×2 (align_corners=True) → cat[skip, up] → ConvBlock."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(deep_channels, skip_channels, kernel_size=1)
        self.conv = ConvBlock(skip_channels * 2, out_channels, dropout_p)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.conv1x1(deep), scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet2D(nn.Module):
    """SSL4MIS UNet; ``forward(x) -> (logits [B,C,H,W], [x0 16@H, x1 32@H/2, …, x4 256@H/16])``.

    H and W must be multiples of 16. The encoder dropout (active in ``train()``) is the only
    stochastic perturbation inside the UC-Seg subnets.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4,
                 channels: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> None:
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError(f"UNet2D: channels {tuple(channels)} and dropout {tuple(dropout)} need 5 entries each")
        ch, p = list(channels), list(dropout)
        self.encoder = nn.Module()
        self.encoder.in_conv = ConvBlock(in_channels, ch[0], p[0])
        self.encoder.down1 = DownBlock(ch[0], ch[1], p[1])
        self.encoder.down2 = DownBlock(ch[1], ch[2], p[2])
        self.encoder.down3 = DownBlock(ch[2], ch[3], p[3])
        self.encoder.down4 = DownBlock(ch[3], ch[4], p[4])
        self.decoder = nn.Module()
        self.decoder.up1 = UpBlock(ch[4], ch[3], ch[3])
        self.decoder.up2 = UpBlock(ch[3], ch[2], ch[2])
        self.decoder.up3 = UpBlock(ch[2], ch[1], ch[1])
        self.decoder.up4 = UpBlock(ch[1], ch[0], ch[0])
        self.decoder.out_conv = nn.Conv2d(ch[0], num_classes, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        e, d = self.encoder, self.decoder
        advance_bn_counters(self)
        x0 = e.in_conv(x)
        x1 = e.down1(x0)
        x2 = e.down2(x1)
        x3 = e.down3(x2)
        x4 = e.down4(x3)
        y = d.up1(x4, x3)
        y = d.up2(y, x2)
        y = d.up3(y, x1)
        y = d.up4(y, x0)
        return d.out_conv(y), [x0, x1, x2, x3, x4]
