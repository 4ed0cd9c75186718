"""Benchmark conventions: synchronize inside the timed target, provenance in extra_info.

Run `pytest benchmarks --benchmark-only` on a GPU machine; on CPU `make test` runs them as
smoke tests with --benchmark-disable (each target runs once, tiny shapes).
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (set before any @triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def provenance():
    """extra_info every benchmark records: card, versions, host."""
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


@pytest.fixture
def on_gpu() -> bool:
    return torch.cuda.is_available()
