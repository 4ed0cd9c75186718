"""CPU-tier test configuration.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the package is imported. GPU/native/DALI tests are marked and skip when their need is
missing; nothing touches CUDA at import time.

Data: behaviour tests run on small synthetic SSL4MIS sets written once per session
(`synth_acdc`, `synth_la`). Tests about the real ACDC / LA subsets themselves (their exact
counts, shapes, protocol digits) form the `realdata` tier: they read $UCSEG_DATA (default
`../shared/data`, a folder holding `ACDC/` and `LA/`) and skip, saying so, when it is absent.
`acdc_set` / `la_set` run a test on the synthetic set and, in the real-data tier, on the real one.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if not os.environ.get("UCSEG_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("UCSEG_DATA", REPO.parent / "shared" / "data"))
REAL_ACDC = REAL_DATA / "ACDC"  # train_slices.list + val.list (SSL4MIS subset)
REAL_LA = REAL_DATA / "LA"      # train.list (UA-MT layout)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/golden.py

# The session's synthetic sets (ucseg_fast.data.synthetic). ACDC-like: 10 training patients x
# 2 frames x 4 slices = 80 lines (the default 7 labeled patients = the first 56 lines, 3 = 24),
# 2 validation and 1 test patient (4 and 2 volumes), 256 x 216 like many real ACDC slices (an
# evaluation size that hits scipy's zoom overflow column). LA-like: 3 train + 1 test volumes.
SYNTH_ACDC = dict(n_train_patients=10, slices_per_volume=4, n_val=2, n_test=1, size=(256, 216),
                  seed=0)
SYNTH_LA = dict(n_train=3, n_test=1, shape=(40, 36, 34), seed=3)

REAL_FIXTURES = {"real_acdc", "real_la"}

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    slow = os.environ.get("UCSEG_SLOW") == "1"
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) and "realdata" not in item.keywords:
            item.add_marker(pytest.mark.realdata)  # `-m "not realdata"` deselects every reader
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set UCSEG_SLOW=1"))


# ----------------------------------------------------------------------------------------------
# data sets
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synth_acdc(tmp_path_factory) -> Path:
    """The session's synthetic ACDC-like SSL4MIS folder (SYNTH_ACDC). Read-only: copy it first
    to break or change it."""
    from ucseg_fast.data.synthetic import write_synthetic_acdc
    return write_synthetic_acdc(tmp_path_factory.mktemp("synth_acdc"), **SYNTH_ACDC)


@pytest.fixture(scope="session")
def synth_la(tmp_path_factory) -> Path:
    """The session's synthetic LA-like UA-MT folder (SYNTH_LA). Read-only."""
    from ucseg_fast.data.synthetic import write_synthetic_la
    return write_synthetic_la(tmp_path_factory.mktemp("synth_la"), **SYNTH_LA)


def _real(root: Path, list_name: str, what: str) -> Path:
    if not (root / list_name).is_file():
        pytest.skip(f"real-data tier: the {what} subset is not at {root} (set UCSEG_DATA to the "
                    f"folder holding ACDC/ and LA/)")
    return root


@pytest.fixture(scope="session")
def real_acdc() -> Path:
    """The real ACDC subset ($UCSEG_DATA/ACDC); skips when absent."""
    return _real(REAL_ACDC, "train_slices.list", "ACDC")


@pytest.fixture(scope="session")
def real_la() -> Path:
    """The real LA subset ($UCSEG_DATA/LA); skips when absent."""
    return _real(REAL_LA, "train.list", "LA")


@dataclass(frozen=True)
class DataSet:
    """One of the two sets a parametrized test runs on: `kind` "synthetic" or "real"."""
    kind: str
    root: Path

    @property
    def real(self) -> bool:
        return self.kind == "real"


KINDS = ["synthetic", pytest.param("real", marks=pytest.mark.realdata)]


@pytest.fixture(scope="session", params=KINDS)
def acdc_set(request) -> DataSet:
    """The synthetic ACDC-like set, and (realdata tier) the real subset."""
    fixture = "synth_acdc" if request.param == "synthetic" else "real_acdc"
    return DataSet(request.param, request.getfixturevalue(fixture))


@pytest.fixture(scope="session", params=KINDS)
def la_set(request) -> DataSet:
    """The synthetic LA-like set, and (realdata tier) the real subset."""
    fixture = "synth_la" if request.param == "synthetic" else "real_la"
    return DataSet(request.param, request.getfixturevalue(fixture))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
