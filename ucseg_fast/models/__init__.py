"""Networks of UC-Seg: the 2D subnets, the UPG (uncertainty, cross-attention, fusion head), the pair."""
from .ucseg import ModelOutput, UCSeg, build_ucseg_2d
from .unet2d import UNet2D
from .upg import UPG, CrossAttentionBlock, FusionHead, evidential_uncertainty_torch
from .vnet2d import VNet2D

__all__ = ["UNet2D", "VNet2D", "UPG", "CrossAttentionBlock", "FusionHead", "evidential_uncertainty_torch",
           "ModelOutput", "UCSeg", "build_ucseg_2d"]
