"""CPU-tier test configuration.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the package is imported. GPU/native/DALI tests are marked and skip when their need is
missing; nothing touches CUDA at import time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if not os.environ.get("UCSEG_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UCSEG_DATA", REPO.parent / "shared" / "data"))
ACDC_ROOT = SHARED_DATA / "ACDC"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/golden.py

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    slow = os.environ.get("UCSEG_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set UCSEG_SLOW=1"))


@pytest.fixture
def acdc_root() -> Path:
    if not (ACDC_ROOT / "train_slices.list").exists():
        pytest.skip(f"ACDC subset not found at {ACDC_ROOT} (set UCSEG_DATA)")
    return ACDC_ROOT


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
