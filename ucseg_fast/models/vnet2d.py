"""2D VNet of the reference (``module/vnet_2D.py``), its ``net_2`` (METHOD.md §1.2).

``normalization='none'``, ``has_dropout=False`` as UC-Seg configures it: no norm layers, no
dropout, ReLU. Module names mirror the reference (``block_one.conv.0`` …, ``out_conv``) so its
checkpoints load unchanged. Init: ``kaiming_normal_`` (fan_in, gain √2) on every conv weight,
biases keep the PyTorch default.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VNet2D"]


class _ConvStage(nn.Module):
    """``n_stages`` × (conv3x3 + ReLU); the reference's plain (non-residual) ``ConvBlock``."""

    def __init__(self, n_stages: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        ops: list[nn.Module] = []
        for i in range(n_stages):
            ops += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                    nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Down(nn.Module):
    """conv 2x2 stride 2 + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 2, stride=2), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Up(nn.Module):
    """ConvTranspose 2x2 stride 2 + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
                                  nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class VNet2D(nn.Module):
    """``forward(x) -> (logits [B,C,H,W], [x1 n@H, x2 2n@H/2, x3 4n@H/4, x4 8n@H/8, x5 16n@H/16])``.

    Encoder stages of 1, 2, 3, 3, 3 convs; decoder stages of 3, 3, 2, 1 convs with *additive*
    skips; output conv 1x1. H and W must be multiples of 16.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, n_filters: int = 16) -> None:
        super().__init__()
        n = n_filters
        self.block_one = _ConvStage(1, in_channels, n)
        self.block_one_dw = _Down(n, 2 * n)
        self.block_two = _ConvStage(2, 2 * n, 2 * n)
        self.block_two_dw = _Down(2 * n, 4 * n)
        self.block_three = _ConvStage(3, 4 * n, 4 * n)
        self.block_three_dw = _Down(4 * n, 8 * n)
        self.block_four = _ConvStage(3, 8 * n, 8 * n)
        self.block_four_dw = _Down(8 * n, 16 * n)
        self.block_five = _ConvStage(3, 16 * n, 16 * n)
        self.block_five_up = _Up(16 * n, 8 * n)
        self.block_six = _ConvStage(3, 8 * n, 8 * n)
        self.block_six_up = _Up(8 * n, 4 * n)
        self.block_seven = _ConvStage(3, 4 * n, 4 * n)
        self.block_seven_up = _Up(4 * n, 2 * n)
        self.block_eight = _ConvStage(2, 2 * n, 2 * n)
        self.block_eight_up = _Up(2 * n, n)
        self.block_nine = _ConvStage(1, n, n)
        self.out_conv = nn.Conv2d(n, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # PyTorch's fan_in of a ConvTranspose2d weight [in, out, k, k] is out·k², as in the reference.
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        y = self.block_six(self.block_five_up(x5) + x4)
        y = self.block_seven(self.block_six_up(y) + x3)
        y = self.block_eight(self.block_seven_up(y) + x2)
        y = self.block_nine(self.block_eight_up(y) + x1)
        return self.out_conv(y), [x1, x2, x3, x4, x5]
