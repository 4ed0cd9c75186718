"""2D VNet of the reference (``module/vnet_2D.py``), its ``net_2`` (docs/method.md §1.2).

``normalization='none'``, ``has_dropout=False`` as UC-Seg configures it: no norm layers, no
dropout, ReLU. Module names mirror the reference (``block_one.conv.0`` …, ``out_conv``) so its
checkpoints load unchanged. Init: ``kaiming_normal_`` (fan_in, gain √2) on every conv weight,
biases keep the PyTorch default. The implementation is the dimension-generic
:class:`~ucseg_fast.models.vnet.VNet` (shared with the 3D VNet); this class fixes 2D + Kaiming.
"""
from __future__ import annotations

from .vnet import VNet

__all__ = ["VNet2D"]


class VNet2D(VNet):
    """``forward(x) -> (logits [B,C,H,W], [x1 n@H, x2 2n@H/2, x3 4n@H/4, x4 8n@H/8, x5 16n@H/16])``.

    Encoder stages of 1, 2, 3, 3, 3 convs; decoder stages of 3, 3, 2, 1 convs with *additive*
    skips; output conv 1x1. H and W must be multiples of 16 (ValueError otherwise).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, n_filters: int = 16) -> None:
        super().__init__(in_channels, num_classes, n_filters, spatial_dims=2, kaiming_init=True)
