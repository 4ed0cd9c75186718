"""Benchmark conventions: rounds of back-to-back calls with one sync per round
(`bench_utils.measure`, `ucseg_fast.bench.timing`), provenance in extra_info.

Run `pytest benchmarks --benchmark-only` on a GPU machine; on CPU `make test` runs them as
smoke tests with --benchmark-disable (each target runs once, tiny shapes). For one Markdown
report of the whole engine on a card, use `ucseg-fast bench report --out DIR`.
"""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (set before any @triton.jit).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_utils import provenance_info, session_copy_bandwidth  # noqa: E402


@pytest.fixture(scope="session")
def copy_bw() -> dict:
    """The device-to-device copy bandwidth, measured once per session (256 MiB on CUDA):
    `measure` reports every op's GB/s as a share of this number."""
    return session_copy_bandwidth()


@pytest.fixture
def provenance() -> dict:
    """extra_info every benchmark records: card, driver, versions, git revision, host (a fresh
    dict per test)."""
    return provenance_info()


@pytest.fixture
def on_gpu() -> bool:
    return torch.cuda.is_available()
