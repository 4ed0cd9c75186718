"""CCP (IC, IFE, queues) on tiny hand-checkable cases, against plain-loop oracles written here
independently of the vectorised implementation (docs/method.md §2.4)."""
from __future__ import annotations

import math

import pytest
import torch

from ucseg_fast.ccp import (CCP, CCPLevel, adaptive_pool_grid, class_prototypes, ic_cell_losses,
                            ife_class_losses, resize_mask)

T = 0.3


# ------------------------------------------------------------------------------------------------
# loop oracles
# ------------------------------------------------------------------------------------------------
def bins(n: int, g: int = 3) -> list[range]:
    """PyTorch adaptive-pool bins: cell i covers floor(i*n/g) .. ceil((i+1)*n/g) - 1."""
    return [range(i * n // g, -(-(i + 1) * n // g)) for i in range(g)]


def pool_oracle(f: torch.Tensor, g: int = 3) -> torch.Tensor:
    """[B, Cf, *S] -> [B, Cf, g^d], cells row-major, by explicit loops over the bins."""
    B, Cf, *S = f.shape
    axes = [bins(n, g) for n in S]
    out = torch.zeros(B, Cf, g ** len(S), dtype=f.dtype)
    cells = [(i, j) for i in range(g) for j in range(g)] if len(S) == 2 else \
        [(i, j, k) for i in range(g) for j in range(g) for k in range(g)]
    for cell_idx, cell in enumerate(cells):
        ranges = [axes[a][cell[a]] for a in range(len(S))]
        idx = [torch.tensor(list(r)) for r in ranges]
        block = f
        for a, ix in enumerate(idx):
            block = block.index_select(2 + a, ix)
        out[:, :, cell_idx] = block.flatten(2).mean(-1)
    return out


def ce_target0(logits: list[float]) -> float:
    m = max(logits)
    return -(logits[0] - m) + math.log(sum(math.exp(x - m) for x in logits))


def ic_oracle(p1: torch.Tensor, p2: torch.Tensor) -> list[float]:
    B, _, G = p1.shape
    cells = []
    for g in range(G):
        tot = 0.0
        for b in range(B):
            logits = [float(p1[b, :, g] @ p2[b, :, g]) / T]
            logits += [float(p1[b, :, g] @ p2[b2, :, g2]) / T
                       for b2 in range(B) for g2 in range(G) if g2 != g]
            tot += ce_target0(logits)
        cells.append(tot / B)
    return cells


def mask_rule_2d(m_BCHW: torch.Tensor, s: int) -> torch.Tensor:
    """Even stride s: cell set iff >= 3 of the 4 pixels (s*i + s/2 - 1 + {0,1}, ...) are set."""
    B, C, H, W = m_BCHW.shape
    out = torch.zeros(B, C, H // s, W // s, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for i in range(H // s):
                for j in range(W // s):
                    r, q = s * i + s // 2 - 1, s * j + s // 2 - 1
                    out[b, c, i, j] = float(m_BCHW[b, c, r:r + 2, q:q + 2].sum() >= 3)
    return out


def proto_oracle(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, Cf = f.shape[:2]
    C = mask.shape[1]
    out = torch.zeros(C, B, Cf, dtype=torch.float64)
    for c in range(C):
        for b in range(B):
            for ch in range(Cf):
                out[c, b, ch] = (f[b, ch] * mask[b, c]).mean()
    return out


def ife_oracle(proto: torch.Tensor, queue: torch.Tensor) -> list[float]:
    C, B, _ = proto.shape
    K = queue.shape[2]
    out = []
    for c in range(C):
        tot = 0.0
        for b in range(B):
            logits = [float(proto[c, b] @ queue[c].mean(1)) / T]
            logits += [float(proto[c, b] @ queue[c2, :, j]) / T
                       for c2 in range(C) if c2 != c for j in range(K)]
            tot += ce_target0(logits)
        out.append(tot / B)
    return out


def rand(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_map(B, C, *S, seed=0) -> torch.Tensor:
    """float64 one-hot [B, C, *S] of a uniform random class map."""
    cls = torch.randint(0, C, (B, *S), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(cls, C).movedim(-1, 1).to(torch.float64)


def mask_rule_3d_stride2(m: torch.Tensor) -> torch.Tensor:
    """Trilinear at stride 2 weighs the 8 voxels of a block by 1/8 each: set iff >= 5 of 8."""
    blocks = m.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2).sum((-1, -2, -3))
    return (blocks >= 5).to(torch.float64)


# ------------------------------------------------------------------------------------------------
# pooling, masks, prototypes
# ------------------------------------------------------------------------------------------------
def test_bin_rule_examples():
    # docs/method.md §2.4 / docs/golden.md §6 (CCP, item 4): bins overlap when 3 does not divide n
    assert [(r.start, r.stop) for r in bins(14)] == [(0, 5), (4, 10), (9, 14)]
    assert [(r.start, r.stop) for r in bins(16)] == [(0, 6), (5, 11), (10, 16)]
    assert [(r.start, r.stop) for r in bins(5)] == [(0, 2), (1, 4), (3, 5)]


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 7, 14), (2, 2, 3, 3), (1, 2, 4, 5, 7)])
def test_adaptive_pool_grid_matches_bins(shape):
    f = rand(*shape)
    got = adaptive_pool_grid(f, 3)
    assert got.shape == (shape[0], shape[1], 3 ** (len(shape) - 2))
    torch.testing.assert_close(got, pool_oracle(f), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_resize_mask_even_stride_rule(s):
    m = rand_map(2, 3, 4 * s, 3 * s, seed=s)
    torch.testing.assert_close(resize_mask(m, (4, 3)), mask_rule_2d(m, s), rtol=0, atol=0)


def test_resize_mask_odd_stride_is_centre_pixel_and_3d_rule():
    m = rand_map(2, 3, 9, 6, seed=1)            # stride 3: bilinear samples the centre exactly
    torch.testing.assert_close(resize_mask(m, (3, 2)), m[:, :, 1::3, 1::3], rtol=0, atol=0)
    m3 = rand_map(1, 2, 4, 4, 6, seed=2)        # stride 2 on every axis
    torch.testing.assert_close(resize_mask(m3, (2, 2, 3)), mask_rule_3d_stride2(m3),
                               rtol=0, atol=0)


def test_prototype_is_mean_over_all_positions():
    f = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    mask[0, 0, 0, 0] = 1                                    # class 0: 1 of 4 pixels
    mask[0, 1] = 1 - mask[0, 0]                             # class 1: the other 3
    torch.testing.assert_close(class_prototypes(f, mask)[:, 0, 0],
                               torch.tensor([0.25, 0.75], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# IC
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2])
def test_ic_hand_case_all_logits_zero(B):
    # f2 = 0: every logit is 0, 1 positive + B*(G-1) negatives -> CE = log(1 + 8B) per cell
    lvl = CCPLevel(2, 2, queue_size=4)
    f1 = rand(B, 2, 6, 6).float()
    cells = lvl.ic_cells(f1, torch.zeros_like(f1))
    torch.testing.assert_close(cells, torch.full((9,), math.log(1 + 8 * B)))
    assert lvl.ic(f1, torch.zeros_like(f1)).dtype == torch.float32


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 2, 7, 14), (2, 2, 4, 5, 3)])
def test_ic_matches_loop_oracle(shape):
    f1, f2 = rand(*shape, seed=1), rand(*shape, seed=2)
    lvl = CCPLevel(2, shape[1], queue_size=4)
    want = torch.tensor(ic_oracle(pool_oracle(f1), pool_oracle(f2)), dtype=torch.float64)
    got = lvl.ic_cells(f1, f2)
    assert got.dtype == torch.float64 and got.shape == (3 ** (len(shape) - 2),)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the reference stores cells in a float32 buffer and takes the float32 mean
    ic = lvl.ic(f1, f2)
    assert ic.dtype == torch.float32 and ic.dim() == 0
    assert ic == want.float().mean()


def test_ic_gradcheck_and_grad_reaches_both_subnets():
    p1, p2 = rand(2, 3, 9, seed=3).requires_grad_(), rand(2, 3, 9, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ic_cell_losses(a, b, T), (p1, p2))
    lvl = CCPLevel(2, 3, queue_size=4)
    f1, f2 = rand(2, 3, 6, 5, seed=5).requires_grad_(), rand(2, 3, 6, 5, seed=6).requires_grad_()
    lvl.ic(f1, f2).backward()
    assert f1.grad is not None and f1.grad.abs().min() > 0
    assert f2.grad is not None and f2.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# IFE
# ------------------------------------------------------------------------------------------------
def test_ife_hand_case_zero_queue():
    # zero queue: pos and all (C-1)*K negatives are 0 -> CE = log(1 + (C-1)K) = log 5 (C=2, K=4)
    lvl = CCPLevel(2, 2, queue_size=4)
    lvl.load_queues(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    f = rand(2, 2, 4, 4).float()
    m = rand_map(2, 2, 8, 8)
    torch.testing.assert_close(lvl.ife_classes(f, m, 1), torch.full((2,), math.log(5.0)))


@pytest.mark.parametrize("k,dims", [(1, 2), (2, 2), (1, 3)])
def test_ife_matches_loop_oracle(k, dims):
    B, C, Cf, K = 2, 3, 2, 4
    lvl = CCPLevel(C, Cf, queue_size=K).double()
    q1, q2 = rand(C, Cf, K, seed=7), rand(C, Cf, K, seed=8)
    lvl.load_queues(q1, q2)
    f, m = rand(B, Cf, *(4,) * dims, seed=9), rand_map(B, C, *(8,) * dims, seed=10)
    proto = proto_oracle(f, mask_rule_2d(m, 2) if dims == 2 else mask_rule_3d_stride2(m))
    torch.testing.assert_close(lvl.prototypes(f, m), proto, rtol=1e-13, atol=1e-14)
    want = torch.tensor(ife_oracle(proto, (q1, q2)[k - 1]), dtype=torch.float64)
    torch.testing.assert_close(lvl.ife_classes(f, m, k), want, rtol=1e-12, atol=1e-12)
    ife = lvl.ife(f, m, k)
    assert ife.dtype == torch.float32 and ife == want.float().mean()


def test_ife_grad_to_features_not_queue():
    proto = rand(3, 2, 2, seed=11).requires_grad_()
    queue = rand(3, 2, 4, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ife_class_losses(p, queue, T), (proto,))
    (g_q,) = torch.autograd.grad(ife_class_losses(proto, queue, T).sum(), queue,
                                 allow_unused=True)
    assert g_q is None                                     # queues are read detached
    lvl = CCPLevel(3, 2, queue_size=4)
    f = rand(2, 2, 4, 4, seed=13).float().requires_grad_()
    lvl.ife(f, rand_map(2, 3, 8, 8, seed=14), 2).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert not lvl.queue1.requires_grad and not lvl.queue2.requires_grad


def test_autocast_runs_contrast_in_fp32():
    lvl = CCPLevel(3, 4, queue_size=8)
    f1, f2 = rand(2, 4, 6, 6, seed=15).bfloat16(), rand(2, 4, 6, 6, seed=16).bfloat16()
    m = rand_map(2, 3, 12, 12, seed=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ic, ife = lvl.ic(f1, f2), lvl.ife(f1, m, 1)
    assert ic.dtype == ife.dtype == torch.float32
    assert ic == lvl.ic(f1.float(), f2.float())
    assert ife == lvl.ife(f1.float(), m, 1)


# ------------------------------------------------------------------------------------------------
# queues
# ------------------------------------------------------------------------------------------------
def test_queue_init_axes():
    ref = CCPLevel(3, 5, queue_size=7, queue_init="reference")
    fn = CCPLevel(3, 5, queue_size=7, queue_init="feature_norm")
    torch.testing.assert_close(ref.queue1.norm(dim=0), torch.ones(5, 7))   # class axis
    torch.testing.assert_close(fn.queue2.norm(dim=1), torch.ones(3, 7))    # feature axis
    assert ref.queue1.dtype == torch.float32 and ref.ptr1.shape == () and ref.ptr1 == 0
    assert CCPLevel(3, 5, pointer="per_class").ptr2.shape == (3,)


def _setup(pointer, ptr):
    B, C, Cf, K = 2, 2, 2, 6
    lvl = CCPLevel(C, Cf, queue_size=K, pointer=pointer).double()
    lvl.load_queues(rand(C, Cf, K, seed=20), rand(C, Cf, K, seed=21), 0)
    lvl.ptr1.copy_(torch.as_tensor(ptr))
    f, lab = rand(B, Cf, 3, 3, seed=22), rand_map(B, C, 6, 6, seed=23)
    return lvl, f, lab, proto_oracle(f, mask_rule_2d(lab, 2))


@pytest.mark.parametrize("pointer,ptr", [("shared", 4), ("per_class", [4, 1])])
def test_enqueue_gate_false_changes_nothing(pointer, ptr):
    lvl, f, lab, _ = _setup(pointer, ptr)
    before = {k: v.clone() for k, v in lvl.state_dict().items()}
    lvl.enqueue(f, lab, 1, torch.tensor(False))
    for k, v in lvl.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_enqueue_shared_pointer_wraps():
    # K = 6, B = 2, ptr 4: class 0 -> columns 4, 5; class 1 -> 0, 1 (wrap); ptr -> 2
    lvl, f, lab, proto = _setup("shared", 4)
    q_old, q2_old = lvl.queue1.clone(), lvl.queue2.clone()
    lvl.enqueue(f, lab, 1, torch.tensor(True))
    want = q_old.clone()
    want[0][:, [4, 5]] = proto[0].T
    want[1][:, [0, 1]] = proto[1].T
    torch.testing.assert_close(lvl.queue1, want, rtol=1e-14, atol=1e-15)
    assert int(lvl.ptr1) == 2
    assert torch.equal(lvl.queue2, q2_old) and int(lvl.ptr2) == 0   # the other subnet untouched
    lvl.enqueue(f, lab, 1, True)                                    # class 0 -> 2, 3; 1 -> 4, 5
    want[0][:, [2, 3]] = proto[0].T
    want[1][:, [4, 5]] = proto[1].T
    torch.testing.assert_close(lvl.queue1, want, rtol=1e-14, atol=1e-15)
    assert int(lvl.ptr1) == 0


def test_enqueue_per_class_pointer():
    # per-class pointers [4, 1]: class 0 -> 4, 5; class 1 -> 1, 2; ptr -> [0, 3]
    lvl, f, lab, proto = _setup("per_class", [4, 1])
    want = lvl.queue1.clone()
    lvl.enqueue(f, lab, 1, torch.tensor(True))
    want[0][:, [4, 5]] = proto[0].T
    want[1][:, [1, 2]] = proto[1].T
    torch.testing.assert_close(lvl.queue1, want, rtol=1e-14, atol=1e-15)
    assert lvl.ptr1.tolist() == [0, 3]


def test_enqueue_casts_to_queue_dtype_and_checks_batch():
    lvl = CCPLevel(2, 2, queue_size=6, batch_size=2)
    f = rand(2, 2, 3, 3, seed=24).bfloat16()
    lvl.enqueue(f, rand_map(2, 2, 6, 6, seed=25), 2, torch.tensor(True))
    assert lvl.queue2.dtype == torch.float32 and int(lvl.ptr2) == 4
    with pytest.raises(ValueError, match="batch_size"):
        lvl.enqueue(f[:1], rand_map(1, 2, 6, 6), 2, True)
    with pytest.raises(ValueError, match="subnet"):
        lvl.ife(f, rand_map(2, 2, 6, 6), 3)


# ------------------------------------------------------------------------------------------------
# the three levels
# ------------------------------------------------------------------------------------------------
def test_ccp_levels_and_float32_mean():
    ccp = CCP(2, channels=(2, 3, 4), queue_size=4)
    extra = rand(2, 5, 16, 16, seed=30).float()        # deeper lists: only the last three count
    feats1 = [extra] + [rand(2, c, s, s, seed=31 + c).float() for c, s in ((2, 8), (3, 4), (4, 2))]
    feats2 = [extra] + [rand(2, c, s, s, seed=41 + c).float() for c, s in ((2, 8), (3, 4), (4, 2))]
    m = rand_map(2, 2, 16, 16, seed=50)
    ic, ic_per = ccp.ic(feats1, feats2)
    assert [float(v) for v in ic_per] == [float(lvl.ic(a, b)) for lvl, a, b in
                                          zip(ccp.levels, feats1[1:], feats2[1:])]
    assert ic == (ic_per[2] + ic_per[1] + ic_per[0]) / 3     # the trainer's order, float32
    ife, ife_per = ccp.ife(feats1, m, 1)
    assert ife == (ife_per[2] + ife_per[1] + ife_per[0]) / 3
    ccp.enqueue(feats1, m, 1, torch.tensor(True))
    assert all(int(lvl.ptr1) == 0 for lvl in ccp.levels)      # (0 + C*B) mod 4 = 0
    with pytest.raises(ValueError, match="channels"):
        ccp.ic(feats1[:-1] + [feats1[1]], feats2)


def test_no_graph_breaks_for_compile():
    """No host syncs / data-dependent branches: dynamo traces each call in one graph."""
    lvl = CCPLevel(2, 2, queue_size=6)
    f1, f2 = rand(2, 2, 4, 4, seed=60).float(), rand(2, 2, 4, 4, seed=61).float()
    m = rand_map(2, 2, 8, 8, seed=62)

    def step(gate):
        loss = lvl.ic(f1, f2) + lvl.ife(f1, m, 1)
        lvl.enqueue(f1, m, 1, gate)
        return loss

    explain = torch._dynamo.explain(step)(torch.tensor(True))
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.gpu
def test_enqueue_cuda_graph_capture():
    dev = torch.device("cuda")
    lvl = CCPLevel(2, 4, queue_size=8).to(dev)
    f = torch.randn(2, 4, 4, 4, device=dev)
    m = rand_map(2, 2, 8, 8).float().to(dev)
    gate = torch.tensor(False, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lvl.enqueue(f, m, 1, gate)                   # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lvl.enqueue(f, m, 1, gate)
    q0 = lvl.queue1.clone()
    graph.replay()
    assert torch.equal(lvl.queue1, q0) and int(lvl.ptr1) == 0
    gate.fill_(True)
    graph.replay()
    assert int(lvl.ptr1) == 4 and not torch.equal(lvl.queue1, q0)
    graph.replay()
    assert int(lvl.ptr1) == 0


# --- CCP.step: every level, both subnets and the gated update in a few batched ops ----------
@pytest.mark.parametrize("pointer", ["per_class", "shared"])
@pytest.mark.parametrize("gates", [(True, False), (False, True), None])
def test_step_equals_the_per_level_oracle(pointer, gates):
    import copy
    torch.manual_seed(0)
    C, B, ch = 4, 3, (4, 6, 8)
    ccp = CCP(C, channels=ch, queue_size=10, pointer=pointer).double()
    ref = copy.deepcopy(ccp)
    for c in (ccp, ref):
        c._P.fill_(7)
    sizes = [(16, 16), (8, 8), (4, 4)]
    f1 = [torch.randn(B, c, *s, dtype=torch.float64, requires_grad=True) for c, s in zip(ch, sizes)]
    f2 = [torch.randn(B, c, *s, dtype=torch.float64, requires_grad=True) for c, s in zip(ch, sizes)]
    maps = torch.randint(0, C, (B, 3, 32, 32))
    oh = (maps.unsqueeze(2) == torch.arange(C).view(1, 1, C, 1, 1)).double()
    masks = oh.flatten(1, 2) if gates is not None else oh[:, :2].flatten(1, 2)
    g = torch.tensor(gates) if gates is not None else None
    ic, ife = ccp.step(f1, f2, masks, gates=g)
    r1 = [f.detach().clone().requires_grad_() for f in f1]
    r2 = [f.detach().clone().requires_grad_() for f in f2]
    ric, _ = ref.ic(r1, r2)
    rife = torch.stack([ref.ife(r1, oh[:, 0], 1)[0], ref.ife(r2, oh[:, 1], 2)[0]])
    if gates is not None:
        for k, (f, gk) in enumerate(((r1, gates[0]), (r2, gates[1])), start=1):
            ref.enqueue([t.detach() for t in f], oh[:, 2], k, torch.tensor(gk))
    # the oracle rounds each level to float32 first (the reference's buffers): f32 tolerance
    torch.testing.assert_close(ic, ric, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ife, rife, rtol=2e-6, atol=1e-6)
    (ic + 0.3 * ife[0] + 0.7 * ife[1]).backward()
    (ric + 0.3 * rife[0] + 0.7 * rife[1]).backward()
    for a, b in zip(f1 + f2, r1 + r2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    for la, lb in zip(ccp.levels, ref.levels):
        for k in (1, 2):
            torch.testing.assert_close(la.queue(k), lb.queue(k), rtol=1e-12, atol=1e-14)
            assert torch.equal(la.ptr(k), lb.ptr(k))


def test_level_buffers_are_views_of_the_stacked_storage_across_moves():
    ccp = CCP(3, channels=(2, 3, 4), queue_size=5)
    ccp.levels[1].load_queues(torch.ones(3, 3, 5), torch.full((3, 3, 5), 2.0), 4)
    ccp = ccp.double()
    assert ccp._Q.dtype == torch.float64
    assert torch.equal(ccp._Q[0, 2:5], torch.ones(3, 3, 5, dtype=torch.float64))
    assert int(ccp._P[1, 1]) == 4  # the default pointer is the reference's shared one
    ccp._Q.zero_()  # a write through the storage shows in every level's buffers
    assert all(float(lvl.queue1.abs().sum()) == 0 for lvl in ccp.levels)
    sd = ccp.state_dict()
    assert set(sd) == {f"levels.{i}.{b}{k}" for i in range(3) for b in ("queue", "ptr")
                       for k in (1, 2)}
    other = CCP(3, channels=(2, 3, 4), queue_size=5).double()
    other.load_state_dict(sd)
    assert torch.equal(other._Q, ccp._Q) and torch.equal(other._P, ccp._P)
