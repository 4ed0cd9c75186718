"""Networks of UC-Seg: the 2D and 3D subnets, the UPG (uncertainty, cross-attention, fusion head), the pair."""
from .ucseg import ModelOutput, UCSeg, build_ucseg_2d, build_ucseg_3d
from .unet2d import UNet2D
from .unet3d import UNet3D
from .upg import UPG, CrossAttentionBlock, FusionHead, evidential_uncertainty_torch
from .vnet import VNet, VNet3D
from .vnet2d import VNet2D

__all__ = ["UNet2D", "VNet2D", "UNet3D", "VNet", "VNet3D", "UPG", "CrossAttentionBlock", "FusionHead",
           "evidential_uncertainty_torch", "ModelOutput", "UCSeg", "build_ucseg_2d", "build_ucseg_3d"]
