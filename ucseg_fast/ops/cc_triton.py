"""Connected components and the per-class largest-component filter as Triton kernels.

The path for CUDA users without the native library (`make native`): a port of the block
union-find of kernels/src/cc_core.h without shared memory, with NO host synchronisation and a
FIXED number of launches per call (`LAUNCHES`), so it is CUDA-graph capturable and its cost does
not depend on the data. Same conventions and ids as `ops/components.py` (canonical id = 1 + the
C-order linear index of the component's first pixel; batch dim never connected; 4/8 in 2D, 6/26
in 3D; largest-component ties to the earliest first pixel).

Algorithm (Playne & Hawick 2018 union-find on an int32 parent array L, runs as the local step):
  tiles    a program owns BLOCK = R x BW pixels: R consecutive image rows (rows of W pixels,
           over B*D*H rows) x one segment of BW = next_pow2(min(W, MAX_W)) columns, so a row
           segment lies in one program and a run (maximal equal-key stretch of a row segment) is
           found with one max-scan of the lanes' "I start a run" positions.
  1 init   L[i] = start of i's run (its minimum index), -1 on background: the tile-local
           pre-merge, all pixels of a run are one set before any union. (largest_component:
           also zero the per-root counters at run starts and the [B, C] winner keys.)
  2 union  every run unites with the runs it touches in the previous row (dy = -1) and, in 3D,
           the previous plane (dz = -1 with dy in {0} for 6, {-1, 0, +1} for 26), and a segment's
           first pixel with its left neighbour in the previous segment. Run-based edge pruning:
           face connectivity unites pixel i with u = i + off only where the run's previous pixel
           does not already touch u's run (i is a run start or key[u-1] != k); full connectivity
           unites a run start with u-1 (or u when key[u-1] != k) and any pixel with u+1 where a
           new run of the neighbour row starts (key[u+1] == k != key[u]). Union = find both roots
           (path halving with atomic_min, so parents only decrease) and link the larger root
           under the smaller with atomic_min, retrying with the returned parent when another
           lane re-linked it first. All reads of L are volatile (other lanes and programs write
           it); roots are only ever run starts and every parent points at a run start.
  3 compress  each fg pixel walks from its run start to the root (halving writes from the run
           start's lane only, so a run does not contend on one address).
             connected_components: ids[i] = root + 1 (0 background), into a separate output.
             largest_component: L[start] = root for every run start (then root(i) = L[L[i]] for
           every pixel, two loads), and the run's last pixel adds the run length to cnt[root]
           (one int32 atomic per run, not per pixel).
  4 rank   (largest_component) every root (L[i] == i) proposes the packed key
           (size << 32) | (0xFFFFFFFF - first pixel within its item) to best[b, class] with one
           64-bit atomic_max: the max is "largest, then earliest" (cc_core.h rank_key). size <
           2**31, so the signed int64 max orders like the unsigned one.
  5 write  (largest_component) out[i] = labels[i] where root(i) is the winner of (b, labels[i]).
Launches per call: connected_components 3 (init, union, compress), largest_component 5 (init,
union, compress+count, rank, write); `torch.empty` workspaces only (the caching allocator, no
memset kernels). An extra PyTorch conversion launch is added only for dtypes the kernels do not
read directly (masks: uint16/32/64, bfloat16, complex -> `!= 0`; class maps: uint16/32/64 ->
int64 and back) and for non-contiguous inputs (`.contiguous()`).
Traffic per pixel (e = label/mask bytes, all int32 index math): init reads e (the left
neighbour shares the lines) and writes L (4); union reads e and the neighbour rows (L2 hits: the
previous row / plane was read by the same or a neighbouring program) and L only along the root
paths of the run-adjacency edges; compress reads e and L along root paths from run starts; cc
writes ids (4): ~ 3e + 8 bytes. largest_component: compress writes L and cnt once per run; rank
reads L (4) (+ cnt and labels at roots); write reads labels e, L (4) and L[L[i]] (a run start,
a broadcast load) and writes out e: ~ 5e + 12 bytes (60 for int64 class maps).
Layout: C-contiguous [B, H, W] or [B, D, H, W] (2D is run as D = 1), fewer than 2**31 - 1
elements (int32 indices; larger inputs are refused with a ValueError). Workspaces: L (and cnt)
int32 [N], best int64 [B, C].

Expected cost (NOT measured on a GPU in this change): one ACDC step filters [12, 256, 256] and
2 x [24, 256, 256] int64 maps (3.9 M pixels, 4 classes): 768 / 1536 programs of 1024 pixels per
launch, ~ 60 B/pixel = ~ 240 MB of traffic, much of it L2 re-reads (one call's labels + L fit
the 50 MB L2), i.e. ~ 40-80 us of bandwidth on an H100. On pseudo-label maps runs are tens of
pixels long, so only a few percent of the pixels do finds, and the union loops iterate a few
times per program. The 15 launches of the three calls cost ~ 5-10 us each from Python (less in
a CUDA graph), so ~ 0.15-0.4 ms per step is expected, inside the <= 1 ms budget
(`benchmarks/bench_native.py::test_step_largest_component` measures it). Spiral / snake masks
make long parent chains; path halving keeps them short, and the loops stay on the device.
Concurrency is only modelled, not exercised, by the CPU interpreter (programs run one after
another; lanes of one program read a snapshot and apply their atomics in lane order, which
exercises the stale-root retries of the union).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ._triton_utils import HAS_TRITON, cdiv, interpret_mode, next_pow2, tl, triton

__all__ = ["connected_components", "largest_component", "LAUNCHES", "launches", "usable"]

LAUNCHES = {"connected_components": 3, "largest_component": 5}

# Launch tuning (module globals so a benchmark or a test can change them): pixels per program
# (a power of two) and the widest row segment of one program (a power of two <= BLOCK).
BLOCK = 1024
MAX_W = 1024
NUM_WARPS = 4

_MAX_ELEMS = 2**31 - 1
_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def launches(op: str) -> int:
    """Kernel launches of one call of `op` ("connected_components" | "largest_component") for a
    contiguous input of a directly supported dtype (see the module docstring)."""
    return LAUNCHES[op]


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can run on `t`: Triton importable and a CUDA tensor, or a CPU tensor
    with the interpreter on (TRITON_INTERPRET=1 before the package was imported)."""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpret_mode()))


# --------------------------------------------------------------------------- kernels
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _any(m):
    return tl.max(m.to(tl.int32), axis=0) != 0


@triton.jit
def _key(src, idx, m, C, IS_CLASS: tl.constexpr):
    """int32 connectivity key of pixel idx (0 = background / masked off): the class for a class
    map (labels outside [1, C) are background), 1 for a nonzero mask pixel."""
    v = tl.load(src + idx, mask=m, other=0)
    if IS_CLASS:
        k = tl.where((v >= 1) & (v < C), v, 0).to(tl.int32)
    else:
        k = (v != 0).to(tl.int32)
    return k


@triton.jit
def _tile(W, NSEG, NROWS, BW: tl.constexpr, BLOCK_: tl.constexpr):
    """Lanes of this program: (lane, column in segment, x, image row, in range, linear index)."""
    R: tl.constexpr = BLOCK_ // BW
    pid = tl.program_id(0)
    seg = pid % NSEG
    rb = pid // NSEG
    lane = tl.arange(0, BLOCK_)
    c = lane % BW
    row = rb * R + lane // BW
    x = seg * BW + c
    valid = (row < NROWS) & (x < W)
    i = tl.where(valid, row * W + x, 0)
    return lane, c, x, row, valid, i


@triton.jit
def _runs(src, i, c, lane, valid, C, IS_CLASS: tl.constexpr):
    """(key, run start flag, linear index of the run's first pixel) of every lane."""
    k = _key(src, i, valid, C, IS_CLASS)
    kl = _key(src, i - 1, valid & (c > 0), C, IS_CLASS)
    is_start = (k != 0) & ((c == 0) | (kl != k))
    # the first foreground lane of a row segment always starts a run, so the scan never carries
    # a start across rows
    first = tl.associative_scan(tl.where(is_start, lane, 0), 0, _max_combine)
    return k, is_start, i - (lane - first)


@triton.jit
def _find(L, x, go, halve):
    """Root of x for the lanes in `go` (x elsewhere), path halving by atomic_min where `halve`."""
    todo = go
    while _any(todo):
        p = tl.load(L + x, mask=todo, other=0, volatile=True)
        todo = todo & (p != x)
        gp = tl.load(L + p, mask=todo, other=0, volatile=True)
        top = todo & (gp == p)
        x = tl.where(top, p, x)
        todo = todo & (gp != p)
        tl.atomic_min(L + x, gp, mask=todo & halve, sem="relaxed")
        x = tl.where(todo, gp, x)
    return x


@triton.jit
def _unite(L, a, b, go):
    """Union of the sets of a and b for the lanes in `go` (Playne & Hawick): link the larger
    root under the smaller; when atomic_min finds the larger root already re-linked (old != hi),
    that link survives as min(old, lo) and the lane retries with (lo, old)."""
    while _any(go):
        a = _find(L, a, go, go)
        b = _find(L, b, go, go)
        go = go & (a != b)
        lo = tl.minimum(a, b)
        hi = tl.maximum(a, b)
        old = tl.atomic_min(L + hi, lo, mask=go, sem="relaxed")
        go = go & (old != hi)
        a = lo
        b = tl.where(go, old, lo)


@triton.jit
def _unite_row(src, L, i, x, W, k, is_start, ok, off, C, IS_CLASS: tl.constexpr,
               FULL: tl.constexpr):
    """Unite the lanes' runs with the runs they touch in the neighbour row at offset `off`."""
    fg = (k != 0) & ok
    u = i + off
    ku = _key(src, u, fg, C, IS_CLASS)
    kum = _key(src, u - 1, fg & (x > 0), C, IS_CLASS)
    if FULL:
        kup = _key(src, u + 1, fg & (x + 1 < W), C, IS_CLASS)
        # a run start takes u-1 (or u, a run of the neighbour row starting there); every lane
        # takes u+1 where a new neighbour run starts — together every touching run, once
        _unite(L, i, tl.where(kum == k, u - 1, u), fg & is_start & ((kum == k) | (ku == k)))
        _unite(L, i, u + 1, fg & (kup == k) & (ku != k))
    else:
        _unite(L, i, u, fg & (ku == k) & (is_start | (kum != k)))


@triton.jit
def _init_kernel(src, L, cnt, best, W, NSEG, NROWS, C, BC, IS_CLASS: tl.constexpr,
                 BW: tl.constexpr, BLOCK_: tl.constexpr):
    lane, c, x, row, valid, i = _tile(W, NSEG, NROWS, BW, BLOCK_)
    k, is_start, start = _runs(src, i, c, lane, valid, C, IS_CLASS)
    tl.store(L + i, tl.where(k != 0, start, -1), mask=valid)
    if IS_CLASS:
        tl.store(cnt + i, tl.zeros_like(i), mask=is_start)
        if tl.program_id(0) == 0:
            for j in range(0, BC, BLOCK_):
                tl.store(best + j + lane, tl.zeros([BLOCK_], tl.int64), mask=j + lane < BC)


@triton.jit
def _union_kernel(src, L, W, H, D, NSEG, NROWS, C, IS_CLASS: tl.constexpr, FULL: tl.constexpr,
                  THREE_D: tl.constexpr, BW: tl.constexpr, BLOCK_: tl.constexpr):
    lane, c, x, row, valid, i = _tile(W, NSEG, NROWS, BW, BLOCK_)
    k, is_start, start = _runs(src, i, c, lane, valid, C, IS_CLASS)
    fg = k != 0
    # a segment's first pixel joins the run that the previous segment ends with
    kl = _key(src, i - 1, fg & (c == 0) & (x > 0), C, IS_CLASS)
    _unite(L, i, i - 1, fg & (kl == k))
    y = row % H
    _unite_row(src, L, i, x, W, k, is_start, y > 0, -W, C, IS_CLASS, FULL)
    if THREE_D:
        z = (row // H) % D
        HW = H * W
        _unite_row(src, L, i, x, W, k, is_start, z > 0, -HW, C, IS_CLASS, FULL)
        if FULL:
            _unite_row(src, L, i, x, W, k, is_start, (z > 0) & (y > 0), -HW - W, C, IS_CLASS,
                       FULL)
            _unite_row(src, L, i, x, W, k, is_start, (z > 0) & (y + 1 < H), W - HW, C,
                       IS_CLASS, FULL)


@triton.jit
def _compress_kernel(src, L, out, cnt, W, NSEG, NROWS, C, IS_CLASS: tl.constexpr,
                     BW: tl.constexpr, BLOCK_: tl.constexpr):
    lane, c, x, row, valid, i = _tile(W, NSEG, NROWS, BW, BLOCK_)
    k, is_start, start = _runs(src, i, c, lane, valid, C, IS_CLASS)
    fg = k != 0
    if IS_CLASS:
        kr = _key(src, i + 1, fg & (c + 1 < BW) & (x + 1 < W), C, IS_CLASS)
        is_end = fg & (kr != k)
        root = _find(L, start, is_start | is_end, is_start)
        tl.atomic_min(L + start, root, mask=is_start & (root != start), sem="relaxed")
        tl.atomic_add(cnt + root, i - start + 1, mask=is_end, sem="relaxed")
    else:
        root = _find(L, start, fg, is_start)
        tl.store(out + i, tl.where(fg, root + 1, 0), mask=valid)


@triton.jit
def _rank_kernel(src, L, cnt, best, N, S, C, BLOCK_: tl.constexpr):
    i = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    valid = i < N
    is_root = tl.load(L + i, mask=valid, other=-1) == i
    k = _key(src, i, is_root, C, True)
    size = tl.load(cnt + i, mask=is_root, other=0)
    b = i // S
    low = tl.full([BLOCK_], 0xFFFFFFFF, tl.int64)
    rk = (size.to(tl.int64) << 32) | (low - (i - b * S).to(tl.int64))
    tl.atomic_max(best + b * C + k, rk, mask=is_root, sem="relaxed")


@triton.jit
def _write_kernel(src, L, best, out, N, S, C, BLOCK_: tl.constexpr):
    i = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    valid = i < N
    v = tl.load(src + i, mask=valid, other=0)
    cls = valid & (v >= 1) & (v < C)
    k = tl.where(cls, v, 0).to(tl.int32)
    parent = tl.load(L + i, mask=cls, other=0)
    root = tl.load(L + parent, mask=cls, other=0)  # a run start, holding its root since compress
    b = i // S
    bk = tl.load(best + b * C + k, mask=cls, other=0)
    low = tl.full([BLOCK_], 0xFFFFFFFF, tl.int64)
    win = low - (bk & low)
    keep = cls & ((root - b * S).to(tl.int64) == win)
    tl.store(out + i, tl.where(keep, v, tl.zeros_like(v)), mask=valid)


# --------------------------------------------------------------------------- host side
def _geometry(shape: torch.Size) -> dict:
    B = shape[0]
    D = shape[1] if len(shape) == 4 else 1
    H, W = shape[-2], shape[-1]
    bw = min(next_pow2(min(W, MAX_W)), BLOCK)
    nseg = cdiv(W, bw)
    nrows = B * D * H
    grid = (nseg * cdiv(nrows, BLOCK // bw),)
    return dict(B=B, D=D, H=H, W=W, S=D * H * W, BW=bw, NSEG=nseg, NROWS=nrows, grid=grid)


def _check(t: torch.Tensor, fn: str) -> None:
    if t.dim() not in (3, 4):
        raise ValueError(f"{fn}: expected a batched [B, H, W] or [B, D, H, W] tensor, got shape "
                         f"{tuple(t.shape)}")
    if t.numel() >= _MAX_ELEMS:
        raise ValueError(f"{fn}: the Triton path indexes in int32 and takes fewer than 2**31 - 1 "
                         f"elements, got shape {tuple(t.shape)} ({t.numel()} elements); use the "
                         f"native library or the PyTorch fallback")
    if not usable(t):
        raise RuntimeError(f"{fn}: Triton cannot run on a {t.device.type} tensor (triton "
                           f"installed: {HAS_TRITON}; on CPU set TRITON_INTERPRET=1 before "
                           f"importing)")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (no-op on CPU and in
    the common single-device case)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return nullcontext()


def _launch_label(src: torch.Tensor, g: dict, conn_full: bool, C: int, is_class: bool,
                  L: torch.Tensor, cnt: torch.Tensor, best: torch.Tensor, out: torch.Tensor
                  ) -> None:
    bw, grid = g["BW"], g["grid"]
    _init_kernel[grid](src, L, cnt, best, g["W"], g["NSEG"], g["NROWS"], C, best.numel(),
                       IS_CLASS=is_class, BW=bw, BLOCK_=BLOCK, num_warps=NUM_WARPS)
    _union_kernel[grid](src, L, g["W"], g["H"], g["D"], g["NSEG"], g["NROWS"], C,
                        IS_CLASS=is_class, FULL=conn_full, THREE_D=g["D"] > 1, BW=bw,
                        BLOCK_=BLOCK, num_warps=NUM_WARPS)
    _compress_kernel[grid](src, L, out, cnt, g["W"], g["NSEG"], g["NROWS"], C,
                           IS_CLASS=is_class, BW=bw, BLOCK_=BLOCK, num_warps=NUM_WARPS)


def connected_components(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    """int32 canonical ids (0 background, 1 + first-pixel index) of a batched mask, nonzero =
    foreground; `connectivity` 4/8 (2D) or 6/26 (3D), already validated by the caller. Three
    launches, no host synchronisation."""
    _check(mask, "connected_components (triton)")
    ids = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    if mask.numel() == 0:
        return ids
    m = mask
    if m.dtype == torch.bool:
        m = m.contiguous().view(torch.uint8)
    elif m.dtype not in _MASK_DTYPES:
        m = (m != 0).view(torch.uint8)
    m = m.contiguous()
    g = _geometry(m.shape)
    L = torch.empty(m.shape, dtype=torch.int32, device=m.device)
    with _on_device(m):
        _launch_label(m, g, connectivity in (8, 26), 2, False, L, L, L, ids)
    return ids


def largest_component(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per batch item and class 1..num_classes-1 the largest 8/26-connected component of
    {labels == c} (ties: earliest first pixel), everything else 0; shape, dtype and device of
    `labels` (an integer or bool class map). Five launches, no host synchronisation."""
    _check(labels, "largest_component (triton)")
    orig = labels.dtype
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"largest_component: labels must be an integer class map, got {orig}")
    if labels.numel() == 0 or num_classes <= 1:
        return torch.zeros_like(labels)
    if num_classes >= 2**31:
        raise ValueError(f"largest_component: num_classes={num_classes} does not fit int32")
    if orig == torch.bool:
        lab = labels.contiguous().view(torch.uint8)
    elif orig in _LABEL_DTYPES:
        lab = labels.contiguous()
    else:  # uint16/32/64: class ids are small, compute in int64 and cast back (as native.py)
        lab = labels.to(torch.int64).contiguous()
    g = _geometry(lab.shape)
    N = lab.numel()
    dev = lab.device
    L = torch.empty(N, dtype=torch.int32, device=dev)
    cnt = torch.empty(N, dtype=torch.int32, device=dev)
    best = torch.empty(g["B"] * num_classes, dtype=torch.int64, device=dev)
    out = torch.empty_like(lab)
    flat = (cdiv(N, BLOCK),)
    with _on_device(lab):
        _launch_label(lab, g, True, num_classes, True, L, cnt, best, out)
        _rank_kernel[flat](lab, L, cnt, best, N, g["S"], num_classes, BLOCK_=BLOCK,
                           num_warps=NUM_WARPS)
        _write_kernel[flat](lab, L, best, out, N, g["S"], num_classes, BLOCK_=BLOCK,
                            num_warps=NUM_WARPS)
    if orig == torch.bool:
        return out.view(torch.bool)
    return out if out.dtype == orig else out.to(orig)

