"""Triton connected components (ops/cc_triton.py) under the CPU interpreter: canonical ids equal
to the BFS oracle and scipy, largest-component filter equal to the brute force (tie rule
included), the dispatch rules of ops/components.py, a fixed launch count and no host sync.

Every case runs with the production tiling (1024-pixel programs, whole rows) and, where it
matters, with a tiny tiling (64-pixel programs, 8-pixel row segments) that spreads a component
over many programs and segments — the unions across programs and the left-edge joins."""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from test_components import bfs_ids, largest_ref, pattern, tie_case
from torch.utils._python_dispatch import TorchDispatchMode

from ucseg_fast.ops import _triton_utils, cc_triton, components as cc
from ucseg_fast.ops import set_backend

pytestmark = pytest.mark.skipif(not cc_triton.usable(torch.zeros(1)),
                                reason="needs triton and TRITON_INTERPRET=1")

TILINGS = {"prod": (1024, 1024), "tiny": (64, 8)}


@pytest.fixture(params=list(TILINGS))
def tiling(request, monkeypatch):
    block, max_w = TILINGS[request.param]
    monkeypatch.setattr(cc_triton, "BLOCK", block)
    monkeypatch.setattr(cc_triton, "MAX_W", max_w)
    return request.param


def oracle(mask: torch.Tensor, conn: int) -> torch.Tensor:
    return torch.from_numpy(bfs_ids((mask != 0).numpy().astype(np.int64), full=conn in (8, 26)))


# ---------------------------------------------------------------------------------------------
# masks that stress the union loop
# ---------------------------------------------------------------------------------------------
def spiral(n: int) -> np.ndarray:
    """One-pixel-wide square spiral with one-pixel gaps: a single path of ~n²/2 pixels whose
    first pixel is the corner, wound around itself (long parent chains, many turns)."""
    a = np.zeros((n, n), bool)
    dirs = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    y = x = d = 0
    a[0, 0] = True

    def free(yy, xx):
        return 0 <= yy < n and 0 <= xx < n and not a[yy, xx]

    while True:
        for _ in range(2):
            dy, dx = dirs[d]
            ny, nx = y + dy, x + dx
            ahead_marked = 0 <= ny + dy < n and 0 <= nx + dx < n and a[ny + dy, nx + dx]
            if free(ny, nx) and not ahead_marked:
                y, x = ny, nx
                a[y, x] = True
                break
            d = (d + 1) % 4
        else:
            return a


def snake2d(h: int, w: int) -> np.ndarray:
    """Boustrophedon: full even rows joined at alternating ends (one path, right-to-left turns)."""
    a = np.zeros((h, w), bool)
    a[::2] = True
    a[1::4, w - 1] = True
    a[3::4, 0] = True
    return a


def snake3d(d: int, h: int, w: int) -> np.ndarray:
    """2D snakes on even planes joined through one pixel on odd planes at alternating corners."""
    a = np.zeros((d, h, w), bool)
    s = snake2d(h, w)
    last = (h - 1, w - 1 if ((h - 1) // 2) % 2 == 0 else 0)
    for z in range(0, d, 2):
        a[z] = s if (z // 2) % 2 == 0 else s[::-1]
        if z + 1 < d:
            a[z + 1][last if (z // 2) % 2 == 0 else (0, last[1])] = True
    return a


# ---------------------------------------------------------------------------------------------
# connected components
# ---------------------------------------------------------------------------------------------
CASES = [((3, 7, 13), 4), ((3, 7, 13), 8), ((1, 1, 1), 4), ((1, 1, 1), 8), ((2, 1, 40), 8),
         ((2, 3, 5, 9), 6), ((2, 3, 5, 9), 26), ((1, 1, 1, 1), 26), ((1, 4, 1, 9), 6)]


@pytest.mark.parametrize("shape,conn", CASES, ids=lambda v: str(v))
def test_cc_random_matches_bfs(shape, conn, tiling):
    for i, p in enumerate((0.35, 0.6)):
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(i + 7 * len(shape))) < p
        got = cc.connected_components_triton(mask, conn)
        assert got.dtype == torch.int32 and got.shape == mask.shape
        assert torch.equal(got.long(), oracle(mask, conn)), f"p={p}"


@pytest.mark.parametrize("pat", ["zeros", "ones", "checker", "diagonal"])
@pytest.mark.parametrize("shape,conns", [((2, 9, 11), (4, 8)), ((2, 3, 4, 5), (6, 26))],
                         ids=["2d", "3d"])
def test_cc_patterns(pat, shape, conns):
    mask = pattern(pat, shape, seed=0)
    for conn in conns:
        got = cc.connected_components_triton(mask, conn)
        assert torch.equal(got.long(), oracle(mask, conn)), f"{pat} {conn}"
        assert torch.equal(got, cc.connected_components_scipy(mask, conn))


def test_cc_full_and_empty_batches(tiling):
    m = torch.zeros(3, 6, 10, dtype=torch.bool)
    m[1] = True  # item 1 full, items 0 and 2 empty: ids never cross the batch dim
    got = cc.connected_components_triton(m, 4)
    assert got[0].eq(0).all() and got[2].eq(0).all() and got[1].eq(61).all()
    m3 = torch.ones(2, 2, 3, 4, dtype=torch.uint8)
    ids = cc.connected_components_triton(m3, 6)
    assert ids[0].unique().tolist() == [1] and ids[1].unique().tolist() == [25]


@pytest.mark.parametrize("conn", [4, 8])
def test_cc_spiral_and_snake_2d(conn, tiling):
    m = torch.from_numpy(np.stack([spiral(21), snake2d(21, 21)[:, ::-1].copy()]))
    got = cc.connected_components_triton(m, conn)
    assert torch.equal(got, cc.connected_components_scipy(m, conn))
    assert got[0][m[0]].unique().tolist() == [1]  # the spiral is one component from (0, 0)


@pytest.mark.parametrize("conn", [6, 26])
def test_cc_snake_3d(conn, tiling):
    m = torch.from_numpy(snake3d(5, 7, 9)[None])
    got = cc.connected_components_triton(m, conn)
    assert torch.equal(got, cc.connected_components_scipy(m, conn))
    assert got[m].unique().numel() == 1


def test_cc_many_small_components(tiling):
    """Isolated pixels (checker under 4) and 2-pixel dominoes: thousands of roots."""
    m = pattern("checker", (1, 24, 30), 0)
    ids = cc.connected_components_triton(m, 4)
    idx = torch.arange(m.numel(), dtype=torch.int32).view(m.shape) + 1
    assert torch.equal(ids, torch.where(m, idx, 0))
    dom = torch.zeros(2, 12, 16, dtype=torch.bool)
    dom[:, ::2, 0::3] = dom[:, ::2, 1::3] = True
    assert torch.equal(cc.connected_components_triton(dom, 8),
                       cc.connected_components_scipy(dom, 8))


def test_cc_realistic_blobs(tiling):
    from scipy import ndimage
    g = torch.Generator().manual_seed(0)
    x = ndimage.gaussian_filter(torch.randn(2, 16, 28, generator=g).numpy(), sigma=[0, 2, 2])
    m = torch.from_numpy(x > 0) ^ (torch.rand(2, 16, 28, generator=g) < 0.05)
    for conn in (4, 8):
        assert torch.equal(cc.connected_components_triton(m, conn),
                           cc.connected_components_scipy(m, conn))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.int8, torch.float32,
                                   torch.uint16])
def test_cc_mask_dtypes(dtype):
    m = pattern("p0.5", (2, 9, 10), 1)
    x = m.to(dtype) * 3 if dtype not in (torch.bool, torch.uint16) else m.to(dtype)
    assert torch.equal(cc.connected_components_triton(x, 8), cc.connected_components_scipy(m, 8))


def test_cc_non_contiguous():
    m = pattern("p0.5", (2, 10, 9), 2).transpose(1, 2)
    assert torch.equal(cc.connected_components_triton(m, 4), cc.connected_components_scipy(m, 4))


def test_cc_default_connectivity_and_errors():
    m = pattern("p0.5", (1, 6, 7), 3)
    assert torch.equal(cc.connected_components_triton(m), cc.connected_components_scipy(m, 8))
    with pytest.raises(ValueError, match="connectivity=6"):
        cc.connected_components_triton(m, 6)
    big = torch.ones(1, dtype=torch.uint8).expand(1, 2**16, 2**15)  # 2**31 elements, no memory
    with pytest.raises(ValueError, match=r"\(1, 65536, 32768\)"):
        cc.connected_components_triton(big, 8)
    with pytest.raises(ValueError, match=r"\(1, 65536, 32768\)"):
        cc.largest_component_triton(big, 3)


# ---------------------------------------------------------------------------------------------
# largest component
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 1, 30), (2, 3, 5, 9), (1, 1, 1, 1), (1, 1, 1)])
@pytest.mark.parametrize("C", [2, 4])
def test_largest_matches_bruteforce(shape, C, tiling):
    g = torch.Generator().manual_seed(C * 100 + len(shape))
    lab = torch.randint(-1, C + 2, shape, generator=g)  # values outside [1, C) are background
    got = cc.largest_component_triton(lab, C)
    assert got.dtype == lab.dtype and got.shape == lab.shape
    assert torch.equal(got, torch.from_numpy(largest_ref(lab.numpy(), C)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.uint16])
def test_largest_dtypes(dtype):
    lab = torch.randint(0, 4, (2, 8, 9), generator=torch.Generator().manual_seed(5))
    want = cc.largest_component_scipy(lab, 4)
    got = cc.largest_component_triton(lab.to(dtype), 4)
    assert got.dtype == dtype and torch.equal(got.long(), want)


def test_largest_bool_and_large_label_values():
    m = pattern("p0.5", (2, 9, 10), 4)
    got = cc.largest_component_triton(m, 2)
    assert got.dtype == torch.bool and torch.equal(got, cc.largest_component_scipy(m, 2))
    # values >= C (and values that would alias a class in int32) are background
    lab = torch.randint(0, 3, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    noisy = lab.clone()
    noisy[0, ::3, ::2] = 2**32 + 1
    assert torch.equal(cc.largest_component_triton(noisy, 3),
                       torch.from_numpy(largest_ref(noisy.numpy(), 3)))


def test_largest_tie_goes_to_first_pixel(tiling):
    lab, want = tie_case()
    assert torch.equal(cc.largest_component_triton(lab, 3), want)
    # many equal squares in 3D: the earliest (first plane, first row) wins in every item
    lab3 = torch.zeros(2, 4, 6, 6, dtype=torch.int64)
    for dy in (0, 1):
        for dx in (0, 1):  # 2x2 squares at rows/cols {0, 1} and {3, 4} of planes 0 and 2
            lab3[:, ::2, dy::3, dx::3] = 1
    got = cc.largest_component_triton(lab3, 2)
    assert torch.equal(got, torch.from_numpy(largest_ref(lab3.numpy(), 2)))
    assert got[0, 0, :2, :2].eq(1).all() and got[0].sum() == 4 and got[1, 0, :2, :2].eq(1).all()


def test_largest_spiral_vs_blobs(tiling):
    """A long spiral (class 1) beside a compact blob (class 2) and speckle of both classes."""
    s = torch.from_numpy(spiral(17)).long()
    lab = torch.zeros(2, 17, 17, dtype=torch.long)
    lab[0] = s
    lab[1, 3:12, 4:14] = 2
    lab[1, ::5, ::4] = 1
    assert torch.equal(cc.largest_component_triton(lab, 3), cc.largest_component_scipy(lab, 3))


def test_largest_trivial_cases():
    lab = torch.randint(0, 3, (2, 5, 6))
    assert cc.largest_component_triton(lab, 1).eq(0).all()
    assert cc.largest_component_triton(torch.zeros(0, 4, 4, dtype=torch.long), 3).shape == (0, 4, 4)
    assert cc.largest_component_triton(torch.zeros(2, 4, 4, dtype=torch.long), 3).eq(0).all()
    with pytest.raises(TypeError, match="integer class map"):
        cc.largest_component_triton(torch.ones(1, 3, 3), 2)


def test_golden_nms1_through_triton():
    from golden import golden
    from test_components import nms1
    g = golden()
    for key in ("pl", "pl.tie"):
        k = nms1(g.tensor(f"{key}.P"))
        g.check(f"{key}.nms1", cc.largest_component_triton(k, 4), "exact")


# ---------------------------------------------------------------------------------------------
# fixed launches, no host sync
# ---------------------------------------------------------------------------------------------
class _Counted:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


def _count_launches(monkeypatch, fn, *args):
    log: list = []
    for name in ("_init_kernel", "_union_kernel", "_compress_kernel", "_rank_kernel",
                 "_write_kernel"):
        monkeypatch.setattr(cc_triton, name, _Counted(getattr(cc_triton, name), log))
    fn(*args)
    return len(log)


def test_fixed_launch_count(monkeypatch):
    easy = torch.zeros(1, 21, 21, dtype=torch.long)
    hard = torch.from_numpy(spiral(21))[None].long()
    assert cc_triton.launches("connected_components") == 3
    assert cc_triton.launches("largest_component") == 5
    for lab in (easy, hard):
        n = _count_launches(monkeypatch, cc_triton.connected_components, lab > 0, 4)
        assert n == cc_triton.LAUNCHES["connected_components"]
        n = _count_launches(monkeypatch, cc_triton.largest_component, lab, 2)
        assert n == cc_triton.LAUNCHES["largest_component"]


class _NoSync(TorchDispatchMode):
    FORBIDDEN = ("aten._local_scalar_dense", "aten.equal", "aten.nonzero", "aten.is_nonzero",
                 "aten.item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if any(name == f or name.startswith(f + ".") for f in self.FORBIDDEN):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync():
    with _NoSync():  # the mode itself catches a sync
        with pytest.raises(AssertionError, match="host synchronisation"):
            torch.ones(2).sum().item()
    m = torch.from_numpy(spiral(11))[None].repeat(2, 1, 1)
    lab = torch.randint(0, 3, (2, 3, 4, 5), generator=torch.Generator().manual_seed(0))
    with _NoSync():
        ids = cc.connected_components_triton(m, 4)
        ids3 = cc.connected_components_triton(lab > 0, 26)
        out = cc.largest_component_triton(lab, 3)
    assert torch.equal(ids, cc.connected_components_scipy(m, 4))
    assert torch.equal(ids3, cc.connected_components_scipy(lab > 0, 26))
    assert torch.equal(out, cc.largest_component_scipy(lab, 3))


# ---------------------------------------------------------------------------------------------
# dispatch (components.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def ops_backend():
    before = _triton_utils.get_backend()
    yield set_backend
    set_backend(before)


def _fake_cuda(numel: int = 16):
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), numel=lambda: numel)


def test_backend_cuda_rules(monkeypatch, ops_backend):
    ops_backend("auto")
    t = _fake_cuda()
    monkeypatch.setattr(cc, "_native_cuda", lambda: object())
    assert cc.backend(t) == "native"
    monkeypatch.setattr(cc, "_native_cuda", lambda: None)
    assert cc.backend(t) == "triton"
    assert cc.backend(_fake_cuda(2**31 - 1)) == "torch"  # int32 indices: too large for Triton
    ops_backend("reference")
    assert cc.backend(t) == "torch"
    ops_backend("auto")
    monkeypatch.setattr(cc_triton, "HAS_TRITON", False)
    assert cc.backend(t) == "torch"


def test_backend_cpu_rules(monkeypatch, ops_backend):
    m = pattern("p0.5", (2, 7, 9), 2)
    lab = torch.randint(0, 3, (2, 7, 9), generator=torch.Generator().manual_seed(1))
    ops_backend("auto")
    assert cc.backend(m) == "scipy"
    ops_backend("triton")
    assert cc.backend(m) == "triton"
    want_ids, want_lc = cc.connected_components_scipy(m, 4), cc.largest_component_scipy(lab, 3)

    def no_scipy(*a, **k):
        raise AssertionError("scipy used while the ops backend is forced to triton")

    monkeypatch.setattr(cc, "connected_components_scipy", no_scipy)
    monkeypatch.setattr(cc, "largest_component_scipy", no_scipy)
    assert torch.equal(cc.connected_components(m, 4), want_ids)
    assert torch.equal(cc.largest_component(lab, 3), want_lc)
    assert torch.equal(torch.ops.ucseg.largest_component(lab, 3), want_lc)
    monkeypatch.setattr(_triton_utils, "_INTERPRET", False)  # no interpreter: scipy again
    assert cc.backend(m) == "scipy"
    monkeypatch.setattr(cc_triton, "interpret_mode", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cc.connected_components_triton(m, 4)


def test_torch_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(cc, "backend", lambda t: "torch")
    monkeypatch.setattr(cc, "_warned_torch", False)
    m = pattern("p0.5", (1, 6, 6), 0)
    with pytest.warns(RuntimeWarning, match="synchronises with the host") as rec:
        cc.connected_components(m, 8)
    msg = str(rec[0].message)
    assert "pip install triton" in msg and "make native" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.largest_component(torch.randint(0, 3, (1, 6, 6)), 3)  # no second warning


# ---------------------------------------------------------------------------------------------
# compiled kernels on a GPU (UCSEG_TEST_CUDA=1 keeps the interpreter off)
# ---------------------------------------------------------------------------------------------
def _smooth_classes(shape, C, seed):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal((C,) + shape).astype(np.float32),
                                sigma=[0, 0] + [3.0] * (len(shape) - 1))
    lab = f.argmax(0)
    speckle = rng.random(shape) < 0.02
    lab[speckle] = rng.integers(0, C, int(speckle.sum()))
    return torch.from_numpy(lab.astype(np.int64))


@pytest.mark.gpu
def test_gpu_kernels_match_scipy():
    if _triton_utils.interpret_mode():
        pytest.skip("TRITON_INTERPRET=1: set UCSEG_TEST_CUDA=1 to run the compiled kernels")
    for shape, C, conns in (((12, 256, 256), 4, (4, 8)), ((2, 48, 40, 56), 2, (6, 26))):
        lab = _smooth_classes(shape, C, 0)
        assert torch.equal(cc.largest_component_triton(lab.cuda(), C).cpu(),
                           cc.largest_component_scipy(lab, C))
        for conn in conns:
            assert torch.equal(cc.connected_components_triton(lab.cuda() > 0, conn).cpu(),
                               cc.connected_components_scipy(lab > 0, conn))
    m = torch.from_numpy(np.stack([spiral(255), snake2d(255, 255)]))
    for conn in (4, 8):
        assert torch.equal(cc.connected_components_triton(m.cuda(), conn).cpu(),
                           cc.connected_components_scipy(m, conn))
    m3 = torch.from_numpy(snake3d(33, 31, 37)[None])
    for conn in (6, 26):
        assert torch.equal(cc.connected_components_triton(m3.cuda(), conn).cpu(),
                           cc.connected_components_scipy(m3, conn))


@pytest.mark.gpu
def test_gpu_cuda_graph_and_dispatch(monkeypatch):
    if _triton_utils.interpret_mode():
        pytest.skip("TRITON_INTERPRET=1: set UCSEG_TEST_CUDA=1 to run the compiled kernels")
    lab = _smooth_classes((12, 128, 128), 4, 1).cuda()
    monkeypatch.setattr(cc, "_native_cuda", lambda: None)
    assert cc.backend(lab) == "triton"
    want = cc.largest_component_scipy(lab.cpu(), 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cc.largest_component(lab, 4)  # compile outside the capture
        cc.connected_components(lab > 0, 8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync inside would make the capture fail
        out = cc.largest_component(lab, 4)
        ids = cc.connected_components(lab > 0, 8)
    lab.copy_(_smooth_classes((12, 128, 128), 4, 2).cuda())  # replay sees the new input
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), cc.largest_component_scipy(lab.cpu(), 4))
    assert torch.equal(ids.cpu(), cc.connected_components_scipy(lab.cpu() > 0, 8))
    assert not torch.equal(out.cpu(), want)
