"""Fused GPU ops for uncertainty-aware semi-supervised segmentation: the embeddable API.

    from ucseg_fast.ops import entropy_pseudo_label, pseudo_label_loss, evidential_uncertainty

Each op is a Triton kernel behind a `torch.library` custom op (`torch.ops.ucseg.*`, with a fake
kernel and a registered backward), so it works eagerly, under `torch.compile(fullgraph=True)`
and inside captured CUDA graphs. Off CUDA the ops run their plain-PyTorch reference
(`ucseg_fast.ops.reference`), or the Triton kernel under TRITON_INTERPRET=1.
`set_backend("auto" | "triton" | "reference")` overrides the choice.
"""
from __future__ import annotations

from typing import Any

from . import reference
from ._triton_utils import HAS_TRITON, get_backend, set_backend
from .entropy import EntropyPseudoLabel, PseudoLabels, entropy_pseudo_label
from .evidential import EvidentialUncertainty, evidential_uncertainty
from .fusion_loss import (FusionUnsupLosses, SegmentationLossTerms, fusion_unsup_losses,
                          segmentation_loss_terms)
from .upg_head import fusion_head, pack_head_params  # fused UPG fusion head (issue 7)
from .pseudo_loss import (CrossPseudoLabelLoss, CrossPseudoLoss, PseudoLabelLoss,
                          cross_pseudo_label_loss, pseudo_label_loss)

__all__ = [
    "entropy_pseudo_label", "EntropyPseudoLabel", "PseudoLabels",
    "pseudo_label_loss", "PseudoLabelLoss",
    "cross_pseudo_label_loss", "CrossPseudoLabelLoss", "CrossPseudoLoss",
    "evidential_uncertainty", "EvidentialUncertainty",
    "segmentation_loss_terms", "SegmentationLossTerms", "fusion_unsup_losses", "FusionUnsupLosses",
    "fusion_head", "pack_head_params",
    "connected_components", "largest_component",
    "set_backend", "get_backend", "HAS_TRITON", "reference",
]

_LAZY = {"connected_components": "components", "largest_component": "components"}


def __getattr__(name: str) -> Any:
    # components.py (GPU connected components) is optional here: import it only on first use
    # so this package imports before/without it.
    if name in _LAZY:
        from importlib import import_module

        try:
            mod = import_module(f".{_LAZY[name]}", __name__)
        except ImportError as exc:
            raise AttributeError(f"ucseg_fast.ops.{name} is unavailable: {exc}") from exc
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ucseg_fast.ops' has no attribute {name!r}")
