"""Connected components and largest-component filtering: scipy path, PyTorch fallback (run on
CPU here) and a brute-force BFS oracle must give identical canonical ids; the nms pseudo-label
rule must reproduce the reference's golden maps exactly (tie rule included)."""
from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from ucseg_fast.ops import components as cc

# ---------------------------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------------------------


def bfs_ids(key: np.ndarray, full: bool) -> np.ndarray:
    """Canonical ids by BFS over equal nonzero keys: 1 + the index of the first pixel met in C
    order (which is the component's minimum index). Batch dim 0 is never connected."""
    B, spatial = key.shape[0], key.shape[1:]
    offs = [o for o in itertools.product((-1, 0, 1), repeat=len(spatial))
            if any(o) and (full or sum(map(abs, o)) == 1)]
    ids = np.zeros(key.shape, np.int64)
    S = int(np.prod(spatial))
    for b in range(B):
        k, out = key[b], ids[b]
        for flat in range(S):
            p = np.unravel_index(flat, spatial)
            if k[p] == 0 or out[p]:
                continue
            cid = b * S + flat + 1
            out[p] = cid
            q = deque([p])
            while q:
                c = q.popleft()
                for o in offs:
                    n = tuple(ci + oi for ci, oi in zip(c, o))
                    if all(0 <= ni < si for ni, si in zip(n, spatial)) and k[n] == k[p] and not out[n]:
                        out[n] = cid
                        q.append(n)
    return ids


def largest_ref(labels: np.ndarray, C: int) -> np.ndarray:
    """Brute force: per item and class the largest component, ties to the smaller first pixel."""
    key = np.where((labels >= 1) & (labels < C), labels, 0)
    ids = bfs_ids(key, full=True)
    out = np.zeros_like(labels)
    for b in range(labels.shape[0]):
        for c in range(1, C):
            comp = np.unique(ids[b][key[b] == c])
            if comp.size == 0:
                continue
            sizes = np.array([(ids[b] == i).sum() for i in comp])
            win = comp[np.flatnonzero(sizes == sizes.max()).min()]  # comp is sorted by first pixel
            out[b][ids[b] == win] = c
    return out


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
SHAPES_2D = [(3, 17, 23), (1, 1, 1), (2, 1, 40), (1, 33, 35)]
SHAPES_3D = [(2, 5, 9, 11), (1, 1, 1, 1), (1, 7, 1, 9), (1, 4, 6, 5)]


def pattern(name: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(n) for n in shape[1:]], indexing="ij")
    s = sum(grids)
    if name.startswith("p"):
        return torch.rand(shape, generator=g) < float(name[1:])
    if name == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    if name == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if name == "checker":  # 4/6: all isolated; 8/26: one component per parity class
        return (s % 2 == 0).expand(shape).clone()
    if name == "diagonal":  # diagonal lines: connected only under 8/26
        return ((grids[-1] - grids[-2]) % 3 == 0).expand(shape).clone()
    raise ValueError(name)


PATTERNS = ["p0.3", "p0.6", "zeros", "ones", "checker", "diagonal"]
CASES = [(s, c) for s in SHAPES_2D for c in (4, 8)] + [(s, c) for s in SHAPES_3D for c in (6, 26)]


@pytest.mark.parametrize("shape,conn", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("pat", PATTERNS)
def test_cc_matches_bfs(shape, conn, pat):
    mask = pattern(pat, shape, seed=hash((shape, pat)) % 1000)
    want = torch.from_numpy(bfs_ids(mask.numpy().astype(np.int64), full=conn in (8, 26)))
    got_scipy = cc.connected_components(mask, conn)  # CPU -> scipy
    got_torch = cc.connected_components_torch(mask, conn)
    assert got_scipy.dtype == torch.int32 and got_scipy.shape == mask.shape
    assert torch.equal(got_scipy.long(), want), f"scipy path differs from BFS ({pat}, {shape}, {conn})"
    assert torch.equal(got_torch.long(), want), f"torch path differs from BFS ({pat}, {shape}, {conn})"


def test_full_connectivity_is_default():
    m = pattern("p0.5", (2, 13, 14), 3)
    assert torch.equal(cc.connected_components(m), cc.connected_components(m, 8))
    m3 = pattern("p0.5", (1, 5, 6, 7), 4)
    assert torch.equal(cc.connected_components_torch(m3), cc.connected_components(m3, 26))


def test_hand_case_4_vs_8():
    # the anti-diagonal pair is one component under 8 and two under 4; ids = 1 + first pixel
    m = torch.tensor([[[0, 1, 0],
                       [1, 0, 0],
                       [0, 0, 1]]])
    assert cc.connected_components(m, 8).tolist() == [[[0, 2, 0], [2, 0, 0], [0, 0, 9]]]
    assert cc.connected_components(m, 4).tolist() == [[[0, 2, 0], [4, 0, 0], [0, 0, 9]]]
    assert cc.connected_components_torch(m, 4).tolist() == [[[0, 2, 0], [4, 0, 0], [0, 0, 9]]]


def test_ids_are_global_over_the_batch():
    m = torch.ones(2, 3, 4, dtype=torch.uint8)
    ids = cc.connected_components(m)
    assert ids[0].unique().tolist() == [1] and ids[1].unique().tolist() == [13]


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_mask_dtypes(dtype):
    m = pattern("p0.5", (2, 9, 10), 1)
    ref = cc.connected_components(m)
    assert torch.equal(cc.connected_components(m.to(dtype)), ref)
    assert torch.equal(cc.connected_components_torch(m.to(dtype)), ref)


def test_realistic_blobs_torch_vs_scipy():
    """Blobs with holes and pixel noise (pseudo-label-like), 2D and 3D, both connectivities."""
    from scipy import ndimage
    g = torch.Generator().manual_seed(0)
    for shape, conns in (((2, 64, 80), (4, 8)), ((1, 20, 24, 28), (6, 26))):
        x = ndimage.gaussian_filter(torch.randn(shape, generator=g).numpy(),
                                    sigma=[0] + [2] * (len(shape) - 1))
        m = torch.from_numpy(x > 0) ^ (torch.rand(shape, generator=g) < 0.05)
        for conn in conns:
            assert torch.equal(cc.connected_components_torch(m, conn), cc.connected_components(m, conn))


def test_torch_fixed_iterations_is_a_refinement():
    """A fixed iteration budget (sync-free) never merges different components: every id it
    returns lies inside one true component."""
    m = pattern("p0.55", (1, 40, 40), 5)
    exact = cc.connected_components(m)
    part = cc.connected_components_torch(m, max_iters=1)
    for i in part.unique().tolist():
        if i:
            assert exact[part == i].unique().numel() == 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="connectivity=6"):
        cc.connected_components(torch.ones(1, 3, 3), 6)
    with pytest.raises(ValueError, match="connectivity=8"):
        cc.connected_components(torch.ones(1, 3, 3, 3), 8)
    with pytest.raises(ValueError, match="shape"):
        cc.connected_components(torch.ones(3, 3))
    with pytest.raises(TypeError, match="integer class map"):
        cc.largest_component(torch.ones(1, 3, 3), 2)


def test_empty_tensor():
    assert cc.connected_components(torch.ones(0, 4, 4)).shape == (0, 4, 4)
    assert cc.largest_component(torch.ones(0, 4, 4, dtype=torch.long), 3).shape == (0, 4, 4)


# ---------------------------------------------------------------------------------------------
# largest component
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 1, 30), (2, 5, 9, 11), (1, 1, 1, 1)])
@pytest.mark.parametrize("C", [2, 4])
def test_largest_component_matches_bruteforce(shape, C):
    g = torch.Generator().manual_seed(C * 100 + len(shape))
    lab = torch.randint(-1, C + 1, shape, generator=g)  # values outside 1..C-1 are background
    want = torch.from_numpy(largest_ref(lab.numpy(), C))
    for dtype in (torch.int64, torch.int32, torch.int8):
        x = lab.to(dtype)
        got = cc.largest_component(x, C)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got.long(), want), f"scipy path, {dtype}"
        assert torch.equal(cc.largest_component_torch(x, C).long(), want), f"torch path, {dtype}"


def tie_case() -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, the largest-component result): two equal components, the earlier one wins."""
    lab = torch.zeros(2, 6, 6, dtype=torch.uint8)
    lab[0, 4, 4] = lab[0, 4, 5] = 1         # size 2, first pixel (4, 4)
    lab[0, 0, 5] = lab[0, 1, 4] = 1         # size 2 (diagonal), first pixel (0, 5): wins
    lab[1, 5, 0] = 2                        # item 1: class 2 alone; class 1 absent
    want = torch.zeros_like(lab)
    want[0, 0, 5] = want[0, 1, 4] = 1
    want[1, 5, 0] = 2
    return lab, want


def test_largest_component_tie_goes_to_first_pixel():
    lab, want = tie_case()
    assert torch.equal(cc.largest_component(lab, 3), want)
    assert torch.equal(cc.largest_component_torch(lab, 3), want)


def nms1(P: torch.Tensor) -> torch.Tensor:
    """The ACDC nms=1 rule: argmax of softmax (first index on ties) + largest component."""
    return torch.softmax(P, dim=1).argmax(dim=1)


@pytest.mark.parametrize("path", ["dispatch", "torch"])
@pytest.mark.parametrize("key", ["pl", "pl.tie"])
def test_golden_nms1(key, path):
    from golden import golden
    g = golden()
    P = g.tensor(f"{key}.P")
    k = nms1(P)
    if key == "pl":
        g.check("pl.argmax", k, "exact")
    fn = cc.largest_component if path == "dispatch" else cc.largest_component_torch
    out = fn(k, 4)
    assert out.dtype == k.dtype
    g.check(f"{key}.nms1", out, "exact")
    # also through the uint8 class map the reference's skimage call sees
    g.check(f"{key}.nms1", fn(k.to(torch.uint8), 4), "exact")


def test_custom_ops_registered():
    """torch.compile sees the dispatch as opaque custom ops with correct fake kernels."""
    lab = torch.randint(0, 3, (2, 7, 8))
    assert torch.equal(torch.ops.ucseg.largest_component(lab, 3), cc.largest_component(lab, 3))
    m = lab > 0
    assert torch.equal(torch.ops.ucseg.connected_components(m, 4), cc.connected_components(m, 4))
    torch.library.opcheck(torch.ops.ucseg.largest_component.default, (lab, 3),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ucseg.connected_components.default, (m, 8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_torch_fallback_on_cuda_matches_scipy():
    m = pattern("p0.5", (3, 70, 90), 11)
    ref = cc.connected_components(m, 8)
    assert torch.equal(cc.connected_components_torch(m.cuda(), 8).cpu(), ref)
    lab = torch.randint(0, 4, (3, 70, 90), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cc.largest_component_torch(lab.cuda(), 4).cpu(), cc.largest_component(lab, 4))
