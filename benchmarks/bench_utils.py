"""Shared helpers of the benchmark suites: device sync and the shape registry."""
from __future__ import annotations

import torch

# One registry of benchmark shapes: (B, C, *spatial)
SHAPES = {
    "acdc_unlabeled_half": (12, 4, 256, 256),   # ACDC recipe, one half-batch of logits
    "acdc_batch": (24, 4, 256, 256),            # ACDC recipe, the whole batch
    "la_3d": (4, 2, 96, 96, 96),                # 3D recipe (LA), whole batch
    "cpu_smoke": (2, 4, 16, 16),                # tiny shape for CPU smoke runs
}


def sync() -> None:
    """Wait for the device so the timed target measures the work, not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
