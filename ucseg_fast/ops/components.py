"""Connected components and per-class largest-component filtering (the `nms` pseudo-label rule).

Why this exists: the reference spends most of a training step in CPU connected-component
labelling (skimage on pseudo-labels copied off the GPU, docs/method.md §6.4). Four backends give the
same partition and the *same ids*:

* native CUDA library (`ucseg_fast.native`, block union-find) for CUDA tensors when it is built;
* Triton kernels (`ops/cc_triton.py`, the same union-find without shared memory: a fixed number
  of launches, no host sync, CUDA-graph capturable) for CUDA tensors without the library when
  Triton is importable — the path of a plain `pip install`;
* a pure-PyTorch fallback (min-label propagation + root hooking + pointer jumping) for CUDA
  tensors with neither (or with the ops backend set to "reference"): it syncs with the host
  every iteration (warned once) — it also runs on CPU, which is how tests check it;
* scipy.ndimage on CPU (the reference's path), except that with the ops backend forced to
  "triton" (`ops.set_backend("triton")`) under TRITON_INTERPRET=1
  CPU tensors run the Triton kernels in the interpreter (so a CPU tool runs what the GPU runs).

Conventions (all paths):
* inputs are batched: `[B, H, W]` (2D) or `[B, D, H, W]` (3D); the batch dim is never connected;
* `connectivity` 4/8 is 2D, 6/26 is 3D, `None` is full connectivity (8 or 26);
* component id = 1 + the C-order linear index, in the whole batched tensor, of the component's
  first pixel (its minimum index); 0 = background. Ids are therefore unique across the batch,
  not consecutive, and identical on every backend;
* ids are int32 when the tensor has fewer than 2**31 - 1 elements, else int64.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _triton_utils

__all__ = [
    "backend",
    "connected_components",
    "largest_component",
    "connected_components_scipy",
    "connected_components_torch",
    "connected_components_triton",
    "largest_component_scipy",
    "largest_component_torch",
    "largest_component_triton",
]

_VALID = {2: (4, 8), 3: (6, 26)}


def _resolve_connectivity(shape: torch.Size, connectivity: int | None) -> int:
    nd = len(shape) - 1
    if nd not in _VALID:
        raise ValueError(f"connected components: expected a batched [B, H, W] or [B, D, H, W] "
                         f"tensor, got shape {tuple(shape)}")
    if connectivity is None:
        return _VALID[nd][1]
    if connectivity not in _VALID[nd]:
        raise ValueError(f"connectivity={connectivity} is not valid for {nd}D input of shape "
                         f"{tuple(shape)}: use one of {_VALID[nd]} (or None for full)")
    return connectivity


def _id_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 - 1 else torch.int64


# ------------------------------------------------------------------------------------------
# scipy (CPU) path
# ------------------------------------------------------------------------------------------
def _structure(nd: int, connectivity: int) -> np.ndarray:
    from scipy import ndimage
    full = connectivity in (8, 26)
    return ndimage.generate_binary_structure(nd, nd if full else 1)


def _first_pixels(lab: np.ndarray) -> np.ndarray:
    """Linear index of the first pixel of each scipy label 1..n.

    scipy numbers components in raster order of their first pixel, so label k first appears
    exactly where the running maximum of the flat map steps from k-1 to k."""
    flat = lab.ravel()
    run = np.maximum.accumulate(flat)
    return np.flatnonzero(np.diff(run, prepend=0) > 0)


def connected_components_scipy(mask: torch.Tensor, connectivity: int | None = None) -> torch.Tensor:
    """scipy.ndimage.label per batch item, ids remapped to 1 + first-pixel index (see module)."""
    from scipy import ndimage
    conn = _resolve_connectivity(mask.shape, connectivity)
    m = mask.detach().cpu().numpy() != 0  # sync-ok: CPU path
    B, S = m.shape[0], int(np.prod(m.shape[1:], dtype=np.int64))
    struct = _structure(m.ndim - 1, conn)
    out = np.zeros(m.shape, np.int64)
    for b in range(B):
        lab, n = ndimage.label(m[b], structure=struct)
        if n == 0:
            continue
        lut = np.zeros(n + 1, np.int64)
        lut[1:] = _first_pixels(lab) + b * S + 1
        out[b] = lut[lab]
    return torch.from_numpy(out).to(device=mask.device, dtype=_id_dtype(mask.numel()))


def largest_component_scipy(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per batch item and class 1..C-1 keep the largest fully connected component of
    {labels == c} (ties: first in C order, i.e. scipy label + argmax); everything else 0."""
    from scipy import ndimage
    _resolve_connectivity(labels.shape, None)
    lab_np = labels.detach().cpu().numpy()  # sync-ok: CPU path
    struct = _structure(lab_np.ndim - 1, 26 if lab_np.ndim == 4 else 8)
    out = np.zeros_like(lab_np)
    for b in range(lab_np.shape[0]):
        for c in range(1, num_classes):
            cc, n = ndimage.label(lab_np[b] == c, structure=struct)
            if n == 0:
                continue
            sizes = np.bincount(cc.ravel(), minlength=n + 1)
            keep = int(np.argmax(sizes[1:])) + 1  # argmax: first (= earliest first pixel) on ties
            out[b][cc == keep] = c
    return torch.from_numpy(out).to(labels.device)


# ------------------------------------------------------------------------------------------
# pure PyTorch path (GPU fallback; runs on CPU for tests)
# ------------------------------------------------------------------------------------------
def _shift_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """min(x, x shifted by +1 and -1 along `dim`); out-of-range neighbours are left out."""
    n = x.shape[dim]
    if n == 1:
        return x
    out = x.clone()
    a, b = x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1)
    out.narrow(dim, 0, n - 1).copy_(torch.minimum(out.narrow(dim, 0, n - 1), a))
    out.narrow(dim, 1, n - 1).copy_(torch.minimum(out.narrow(dim, 1, n - 1), b))
    return out


def _neighbour_min(lab: torch.Tensor, full: bool) -> torch.Tensor:
    """Min label over the neighbourhood (incl. self) of every pixel, spatial dims 1..nd.

    Full connectivity is a box, so the min is separable (one 3-tap min per axis); the
    face connectivity (4/6) is a cross: self and the two neighbours along each axis."""
    if full:
        out = lab
        for d in range(1, lab.dim()):
            out = _shift_min(out, d)
        return out
    out = lab
    for d in range(1, lab.dim()):
        out = torch.minimum(out, _shift_min(lab, d))
    return out


def connected_components_torch(mask: torch.Tensor, connectivity: int | None = None,
                               max_iters: int | None = None, jumps: int = 2) -> torch.Tensor:
    """Label-equivalence connected components in plain PyTorch (device of `mask`).

    Every foreground pixel holds a label that is the index of a pixel of its own component,
    never above its own index. One iteration: take the neighbourhood min m; hook the pixel that
    my label points at onto m (scatter amin — a union on the root); lower my label to m; then
    pointer-jump (label <- label[label]) `jumps` times. Labels only decrease and the fixed point
    is the component's minimum index, i.e. its first pixel: the same canonical ids as the other
    paths. `max_iters=None` iterates to convergence (checked on the host: a sync per check);
    a fixed `max_iters` never syncs but may leave very long snakes unfinished."""
    conn = _resolve_connectivity(mask.shape, connectivity)
    full = conn in (8, 26)
    shape = mask.shape
    N = mask.numel()
    fg = (mask != 0).reshape(-1)
    big = N  # background / out-of-range sentinel; slot N of `lab` holds N so gathers stay valid
    idx = torch.arange(N + 1, device=mask.device, dtype=torch.int64)
    lab = torch.where(torch.cat([fg, fg.new_zeros(1)]), idx, torch.full_like(idx, big))
    fg_pad = torch.cat([fg, fg.new_zeros(1)])
    it = 0
    while True:
        prev = lab
        m = _neighbour_min(lab[:N].view(shape), full).reshape(-1)
        m = torch.where(fg, m, torch.full_like(m, big))
        m = torch.cat([m, m.new_full((1,), big)])
        # hook: the pixel my label points at takes the neighbourhood min (same component)
        lab = lab.scatter_reduce(0, lab, m, reduce="amin")
        lab = torch.minimum(lab, m)
        for _ in range(jumps):
            lab = lab.gather(0, lab)
        lab = torch.where(fg_pad, lab, torch.full_like(lab, big))
        it += 1
        if max_iters is not None:
            if it >= max_iters:
                break
        elif torch.equal(lab, prev):  # sync-ok: convergence check of the fallback path
            break
    ids = torch.where(fg, lab[:N] + 1, torch.zeros_like(lab[:N]))
    return ids.view(shape).to(_id_dtype(N))


def _keep_largest(ids: torch.Tensor, S: int) -> torch.Tensor:
    """Boolean map of the pixels that belong to the largest component of their batch item.

    ids: 1 + first-pixel index (0 = background). Ties go to the smaller root (earlier first
    pixel) by ranking with key = size * (N + 1) + (N - root) and taking the max per item."""
    flat = ids.reshape(-1).to(torch.int64)
    N = flat.numel()
    fg = flat > 0
    root = torch.where(fg, flat - 1, torch.full_like(flat, N))
    size = torch.zeros(N + 1, dtype=torch.int64, device=ids.device)
    size.scatter_add_(0, root, fg.to(torch.int64))
    roots = torch.arange(N, device=ids.device, dtype=torch.int64)
    key = torch.where(size[:N] > 0, size[:N] * (N + 1) + (N - roots), torch.zeros_like(roots))
    B = N // S
    best = key.view(B, S).amax(dim=1)  # per item: the winning key (0 when the class is absent)
    best_root = torch.where(best > 0, N - best % (N + 1), torch.full_like(best, -1))
    item = torch.arange(N, device=ids.device) // S
    return (fg & (root == best_root[item])).view(ids.shape)


def largest_component_torch(labels: torch.Tensor, num_classes: int,
                            max_iters: int | None = None) -> torch.Tensor:
    """PyTorch fallback of `largest_component` (one batched labelling per class)."""
    _resolve_connectivity(labels.shape, None)
    S = labels[0].numel() if labels.shape[0] else 1
    out = torch.zeros_like(labels)
    for c in range(1, num_classes):
        ids = connected_components_torch(labels == c, None, max_iters=max_iters)
        out = torch.where(_keep_largest(ids, S), torch.full_like(labels, c), out)
    return out


# ------------------------------------------------------------------------------------------
# public dispatch
# ------------------------------------------------------------------------------------------
def _native_cuda():
    """The native library when it is loaded *and* has its CUDA kernels, else None."""
    from .. import native
    lib = native.load()
    return lib if lib is not None and lib.has_cuda else None


def _triton_ok(t: torch.Tensor) -> bool:
    from . import cc_triton
    return cc_triton.usable(t) and t.numel() < 2**31 - 1


def cuda_backend() -> str:
    """The backend CUDA tensors get ("native", "triton" or "torch"), decided without touching a
    device (what `check_graph_capturable` asks before any CUDA tensor exists)."""
    if _native_cuda() is not None:
        return "native"
    if _triton_utils.get_backend() != "reference" and _triton_utils.HAS_TRITON:
        return "triton"
    return "torch"


def backend(t: torch.Tensor) -> str:
    """Which backend the public functions use for `t`: "native", "triton", "torch" or "scipy".

    CUDA: the native library when loaded, else Triton when importable (unless the ops backend
    is "reference"), else the PyTorch fallback. CPU: scipy, or Triton when the ops backend is
    forced to "triton" and the interpreter is on (TRITON_INTERPRET=1 at import)."""
    if not t.is_cuda:
        forced = _triton_utils.get_backend() == "triton" and _triton_utils.interpret_mode()
        return "triton" if forced and _triton_ok(t) else "scipy"
    if _native_cuda() is not None and t.numel() < 2**31 - 1:
        return "native"
    if _triton_utils.get_backend() != "reference" and _triton_ok(t):
        return "triton"
    return "torch"


_warned_torch = False


def _warn_torch_fallback() -> None:
    global _warned_torch
    if _warned_torch:
        return
    _warned_torch = True
    warnings.warn(
        "connected components on CUDA: using the pure-PyTorch fallback, which synchronises with "
        "the host every iteration (slow, and not capturable in a CUDA graph). For the fast "
        "sync-free path install Triton (`pip install triton`) or build the native library "
        "(`make native`); with the ops backend set to 'reference' this fallback is chosen on "
        "purpose.", RuntimeWarning, stacklevel=4)


def connected_components_triton(mask: torch.Tensor,
                                connectivity: int | None = None) -> torch.Tensor:
    """The Triton path explicitly (CUDA, or CPU under TRITON_INTERPRET=1): same ids as
    `connected_components`, 3 launches, no host synchronisation (`cc_triton.LAUNCHES`)."""
    from . import cc_triton
    conn = _resolve_connectivity(mask.shape, connectivity)
    return cc_triton.connected_components(mask, conn)


def largest_component_triton(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The Triton path of `largest_component` explicitly: 5 launches, no host synchronisation."""
    from . import cc_triton
    _resolve_connectivity(labels.shape, None)
    return cc_triton.largest_component(labels, num_classes)


def _cc_eager(mask: torch.Tensor, conn: int) -> torch.Tensor:
    if mask.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
    which = backend(mask)
    if which == "native":
        return _native_cuda().connected_components(mask, conn)
    if which == "triton":
        return connected_components_triton(mask, conn)
    if which == "torch":
        _warn_torch_fallback()
        return connected_components_torch(mask, conn)
    return connected_components_scipy(mask, conn)


def _lc_eager(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.numel() == 0 or num_classes <= 1:
        return torch.zeros_like(labels)
    which = backend(labels)
    if which == "native":
        return _native_cuda().largest_component(labels, num_classes)
    if which == "triton":
        return largest_component_triton(labels, num_classes)
    if which == "torch":
        _warn_torch_fallback()
        return largest_component_torch(labels, num_classes)
    return largest_component_scipy(labels, num_classes)


# Custom ops so that torch.compile sees one opaque node (a ctypes call or a data-dependent loop
# would otherwise break the graph); eager calls skip the op dispatch overhead.
@torch.library.custom_op("ucseg::connected_components", mutates_args=())
def _cc_op(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    return _cc_eager(mask, connectivity)


@_cc_op.register_fake
def _(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    return mask.new_empty(mask.shape, dtype=_id_dtype(mask.numel()))


@torch.library.custom_op("ucseg::largest_component", mutates_args=())
def _lc_op(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return _lc_eager(labels, num_classes)


@_lc_op.register_fake
def _(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.empty_like(labels)


def _as_op() -> bool:
    """Call through the custom op (one opaque node) under torch.compile and whenever a
    TorchDispatchMode is active (fake tensors, the step ledger's op counter): a ctypes call or a
    scipy round trip cannot run on fake tensors. Plain eager calls skip the op dispatch."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def connected_components(mask: torch.Tensor, connectivity: int | None = None) -> torch.Tensor:
    """Connected-component ids of a batched mask (nonzero = foreground).

    mask: `[B, H, W]` or `[B, D, H, W]`, any dtype. Returns ids of the same shape and device
    (int32, or int64 for >= 2**31 - 1 elements): 0 = background, else 1 + the linear index of
    the component's first pixel in C order. Backend (`backend(mask)`): native CUDA library →
    Triton → PyTorch fallback on CUDA tensors; scipy on CPU (Triton when forced, see module)."""
    conn = _resolve_connectivity(mask.shape, connectivity)
    if _as_op():
        return torch.ops.ucseg.connected_components(mask, conn)
    return _cc_eager(mask, conn)


def largest_component(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per batch item and foreground class c in 1..num_classes-1, keep only the largest fully
    connected (8 in 2D, 26 in 3D) component of {labels == c}; everything else → 0.

    On equal sizes the component whose first pixel in C order comes first wins (what
    `scipy.ndimage.label` / skimage `label` + argmax pick, docs/method.md §6.4). labels: integer
    class map `[B, H, W]` or `[B, D, H, W]`; the result has its shape, dtype and device."""
    _resolve_connectivity(labels.shape, None)
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"largest_component: labels must be an integer class map, got {labels.dtype}")
    if _as_op():
        return torch.ops.ucseg.largest_component(labels, num_classes)
    return _lc_eager(labels, num_classes)
