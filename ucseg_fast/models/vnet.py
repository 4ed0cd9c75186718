"""VNet of the reference, 2D and 3D (``module/vnet_2D.py``, ``module/vnet.py``): its ``net_2``
(docs/method.md §1.2, §1.3).

One dimension-generic implementation; :class:`~ucseg_fast.models.vnet2d.VNet2D` and
:class:`VNet3D` only fix ``spatial_dims`` and the initialisation. ``normalization='none'``,
``has_dropout=False`` as UC-Seg configures both: no norm layers, no dropout, ReLU. Module names
mirror the reference (``block_one.conv.0`` …, ``out_conv``) so its checkpoints load unchanged
(the reference's unused ``nn.Dropout3d`` has no state, so it is left out).

Initialisation differs between the reference's two files: the 2D VNet applies ``kaiming_normal_``
(fan_in, gain √2) to every conv / transposed-conv weight, the 3D VNet keeps the PyTorch default
(its ``__init_weight`` call is commented out). Biases keep the PyTorch default in both.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VNet", "VNet3D"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _check_dims(spatial_dims: int, where: str) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"{where}: spatial_dims {spatial_dims} must be 2 or 3")


class _ConvStage(nn.Module):
    """``n_stages`` × (conv3 + ReLU); the reference's plain (non-residual) ``ConvBlock``."""

    def __init__(self, n_stages: int, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_dims(spatial_dims, "_ConvStage")
        conv = _CONV[spatial_dims]
        ops: list[nn.Module] = []
        for i in range(n_stages):
            ops += [conv(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                    nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Down(nn.Module):
    """conv 2 stride 2 + ReLU (the reference's ``DownsamplingConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_dims(spatial_dims, "_Down")
        self.conv = nn.Sequential(_CONV[spatial_dims](in_channels, out_channels, 2, stride=2),
                                  nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Up(nn.Module):
    """ConvTranspose 2 stride 2 + ReLU (the reference's ``UpsamplingDeconvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_dims(spatial_dims, "_Up")
        self.conv = nn.Sequential(_CONV_T[spatial_dims](in_channels, out_channels, 2, stride=2),
                                  nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """``forward(x) -> (logits [B,C,*S], [x1 n@S, x2 2n@S/2, x3 4n@S/4, x4 8n@S/8, x5 16n@S/16])``.

    Encoder stages of 1, 2, 3, 3, 3 convs; decoder stages of 3, 3, 2, 1 convs with *additive*
    skips; output conv 1 (×1). Every spatial size must be a multiple of 16 (ValueError otherwise).
    ``kaiming_init``: ``kaiming_normal_`` (fan_in, gain √2) on every conv / transposed-conv
    weight (the reference's 2D VNet) or the PyTorch default (its 3D VNet).
    """

    def __init__(self, in_channels: int, num_classes: int, n_filters: int = 16, *,
                 spatial_dims: int, kaiming_init: bool) -> None:
        super().__init__()
        _check_dims(spatial_dims, type(self).__name__)
        self.spatial_dims = spatial_dims
        d, n = spatial_dims, n_filters
        self.block_one = _ConvStage(1, in_channels, n, d)
        self.block_one_dw = _Down(n, 2 * n, d)
        self.block_two = _ConvStage(2, 2 * n, 2 * n, d)
        self.block_two_dw = _Down(2 * n, 4 * n, d)
        self.block_three = _ConvStage(3, 4 * n, 4 * n, d)
        self.block_three_dw = _Down(4 * n, 8 * n, d)
        self.block_four = _ConvStage(3, 8 * n, 8 * n, d)
        self.block_four_dw = _Down(8 * n, 16 * n, d)
        self.block_five = _ConvStage(3, 16 * n, 16 * n, d)
        self.block_five_up = _Up(16 * n, 8 * n, d)
        self.block_six = _ConvStage(3, 8 * n, 8 * n, d)
        self.block_six_up = _Up(8 * n, 4 * n, d)
        self.block_seven = _ConvStage(3, 4 * n, 4 * n, d)
        self.block_seven_up = _Up(4 * n, 2 * n, d)
        self.block_eight = _ConvStage(2, 2 * n, 2 * n, d)
        self.block_eight_up = _Up(2 * n, n, d)
        self.block_nine = _ConvStage(1, n, n, d)
        self.out_conv = _CONV[d](n, num_classes, 1)
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, (_CONV[d], _CONV_T[d])):
                    # PyTorch's fan_in of a ConvTranspose weight [in, out, k, …] is out·k^d, as in the reference.
                    nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if x.dim() != 2 + self.spatial_dims or any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"{type(self).__name__}: input shape {tuple(x.shape)} must be [B, C, *S] with "
                             f"{self.spatial_dims} spatial sizes, each a multiple of 16")
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


class VNet3D(VNet):
    """The reference's 3D VNet (``module/vnet.py``, LA / Pancreas ``net_2``): Conv3d /
    ConvTranspose3d, no norm, no dropout, default PyTorch init. Input ``[B, in, X, Y, Z]``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16) -> None:
        super().__init__(in_channels, num_classes, n_filters, spatial_dims=3, kaiming_init=False)
