"""libucseg_native through ctypes: the host twin (runs here whenever the library is built) and
the CUDA kernels (gpu) against scipy — identical canonical ids, identical largest-component maps,
golden nms=1 maps, CUDA-graph capture. Skips, saying why, when the library is not built."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast import native
from ucseg_fast.ops import components as cc

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def lib() -> native.NativeLib:
    got = native.load()
    if got is None:
        pytest.skip(native.unavailable_reason())
    return got


@pytest.fixture(scope="module")
def cuda_lib(lib) -> native.NativeLib:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not lib.has_cuda:
        pytest.skip(f"{lib.path} was built without CUDA")
    return lib


def masks(seed: int = 0):
    """(name, mask) pairs: random densities, patterns that separate 4/8 and 6/26, blobs."""
    from scipy import ndimage
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(3, 17, 23), (2, 40, 70), (1, 1, 1), (1, 1, 100), (2, 5, 9, 40), (1, 9, 13, 70),
                  (1, 1, 1, 1)]:
        grids = torch.meshgrid(*[torch.arange(n) for n in shape[1:]], indexing="ij")
        s = sum(grids)
        for p in (0.3, 0.6):
            out.append((f"p{p}{shape}", torch.rand(shape, generator=g) < p))
        out.append((f"checker{shape}", (s % 2 == 0).expand(shape).clone()))
        out.append((f"ones{shape}", torch.ones(shape, dtype=torch.bool)))
        out.append((f"zeros{shape}", torch.zeros(shape, dtype=torch.bool)))
        if min(shape[1:]) > 3:
            x = ndimage.gaussian_filter(torch.randn(shape, generator=g).numpy(),
                                        sigma=[0] + [2] * (len(shape) - 1))
            out.append((f"blobs{shape}", torch.from_numpy(x > 0) ^ (torch.rand(shape, generator=g) < 0.05)))
    return out


def conns(mask):
    return (4, 8, None) if mask.dim() == 3 else (6, 26, None)


def resolve(mask, conn):
    return conn if conn is not None else (8 if mask.dim() == 3 else 26)


# ---------------------------------------------------------------------------------------------
# always runs: loader behaviour
# ---------------------------------------------------------------------------------------------
def test_missing_library_gives_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("UCSEG_NATIVE_LIB", str(tmp_path / "nope.so"))
    native._reset_for_tests()
    try:
        assert native.load() is None
        reason = native.unavailable_reason()
        assert "nope.so" in reason and "make native" in reason
        # the public API still works (scipy on CPU)
        assert cc.backend(torch.ones(1, 2, 2)) == "scipy"
    finally:
        monkeypatch.undo()
        native._reset_for_tests()


# ---------------------------------------------------------------------------------------------
# host twin through ctypes (CPU)
# ---------------------------------------------------------------------------------------------
def test_host_cc_matches_scipy(lib):
    for name, m in masks():
        for conn in conns(m):
            got = lib.connected_components(m, resolve(m, conn))
            want = cc.connected_components(m, conn)
            assert got.dtype == torch.int32
            assert torch.equal(got, want), f"{name} conn={conn}"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.uint16])
def test_host_largest_component_matches_scipy(lib, dtype):
    g = torch.Generator().manual_seed(3)
    for shape in [(3, 17, 23), (2, 40, 70), (2, 5, 9, 40), (1, 1, 1)]:
        for C in (2, 4):
            lab = torch.randint(0, C + 1, shape, generator=g).to(dtype)  # C itself is background
            got = lib.largest_component(lab, C)
            assert got.dtype == dtype and got.shape == lab.shape
            assert torch.equal(got, cc.largest_component_scipy(lab, C)), f"{shape} C={C}"


def test_host_bool_labels(lib):
    lab = torch.rand(2, 30, 31, generator=torch.Generator().manual_seed(2)) < 0.5
    got = lib.largest_component(lab, 2)
    assert got.dtype == torch.bool
    assert torch.equal(got, cc.largest_component_scipy(lab.to(torch.uint8), 2).bool())


def test_host_golden_nms1(lib):
    from golden import golden
    g = golden()
    for key in ("pl", "pl.tie"):
        k = torch.softmax(g.tensor(f"{key}.P"), dim=1).argmax(dim=1)
        g.check(f"{key}.nms1", lib.largest_component(k, 4), "exact")


def test_errors_are_raised_with_the_library_message(lib):
    with pytest.raises(native.NativeError, match="connectivity=6 is not valid for ndim=3"):
        lib.connected_components(torch.ones(1, 3, 3, dtype=torch.bool), 6)
    if not lib.has_cuda and torch.cuda.is_available():
        with pytest.raises(native.NativeError, match="without CUDA"):
            lib.connected_components(torch.ones(1, 3, 3, device="cuda"), 8)


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_dispatch_uses_native(cuda_lib):
    assert cc.backend(torch.ones(1, 2, 2, device="cuda")) == "native"


@pytest.mark.gpu
def test_cuda_cc_matches_scipy(cuda_lib):
    for name, m in masks(1):
        for conn in conns(m):
            want = cc.connected_components(m, conn)
            got = cc.connected_components(m.cuda(), conn)
            assert got.is_cuda and got.dtype == torch.int32
            assert torch.equal(got.cpu(), want), f"{name} conn={conn}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12, 256, 256), (2, 96, 96, 96)])
def test_cuda_realistic_sizes(cuda_lib, shape):
    """Benchmark-sized pseudo-label-like masks: blobs + noise, and a class map."""
    from scipy import ndimage
    g = torch.Generator().manual_seed(5)
    x = ndimage.gaussian_filter(torch.randn(shape, generator=g).numpy(), sigma=[0] + [3] * (len(shape) - 1))
    m = torch.from_numpy(x > 0.0) ^ (torch.rand(shape, generator=g) < 0.03)
    for conn in conns(m):
        assert torch.equal(cc.connected_components(m.cuda(), conn).cpu(), cc.connected_components(m, conn))
    lab = torch.bucketize(torch.from_numpy(x), torch.tensor([-0.3, 0.0, 0.3], dtype=torch.float64))
    lab = torch.where(torch.rand(shape, generator=g) < 0.02, torch.randint(0, 4, shape, generator=g), lab)
    assert torch.equal(cc.largest_component(lab.cuda(), 4).cpu(), cc.largest_component(lab, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.bool])
def test_cuda_largest_component_matches_scipy(cuda_lib, dtype):
    g = torch.Generator().manual_seed(4)
    for shape in [(3, 17, 23), (2, 40, 70), (2, 5, 9, 40), (1, 9, 13, 70), (1, 1, 1)]:
        C = 2 if dtype == torch.bool else 4
        lab = torch.randint(0, C, shape, generator=g).to(dtype)
        want = cc.largest_component_scipy(lab.to(torch.uint8), C).to(dtype)
        got = cc.largest_component(lab.cuda(), C)
        assert got.dtype == dtype and got.is_cuda
        assert torch.equal(got.cpu(), want), f"{shape} {dtype}"


@pytest.mark.gpu
def test_cuda_golden_nms1(cuda_lib):
    from golden import golden
    g = golden()
    for key in ("pl", "pl.tie"):
        k = torch.softmax(g.tensor(f"{key}.P").cuda(), dim=1).argmax(dim=1)
        g.check(f"{key}.nms1", cc.largest_component(k, 4).cpu(), "exact")


@pytest.mark.gpu
def test_cuda_graph_capture_and_side_stream(cuda_lib):
    """No sync and no allocation inside the library: the filter captures into a CUDA graph and
    runs on whatever stream is current."""
    g = torch.Generator().manual_seed(9)
    lab = torch.randint(0, 4, (4, 64, 64), generator=g).cuda()
    want = cc.largest_component(lab.cpu(), 4)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = cc.largest_component(lab, 4)  # warm-up on the side stream
    side.synchronize()
    assert torch.equal(got.cpu(), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cc.largest_component(lab, 4)
    new = torch.randint(0, 4, (4, 64, 64), generator=g)
    lab.copy_(new.cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), cc.largest_component(new, 4))
