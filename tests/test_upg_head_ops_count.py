"""Op count of the fused UPG head (FusedFusionHead → ucseg::fusion_head_layers): a regression pin.

Every op a training step dispatches is a kernel launch on a GPU. `_OpCounter` counts, on one
forward + backward of `FusedFusionHead` in training mode, every dispatched aten op that launches
a kernel (views and allocations `aten.empty*` / `aten.new_empty*` do not), *including the ops
inside custom ops* (their implementation is re-run with the counter active), plus the Triton
launches (counted by wrapping each kernel's `run`; the interpreter's own host copies during a
launch are not counted). Before the per-layer op, the head dispatched 254 ops + 7 launches forward and
145 ops + 7 launches backward at this shape (per-call packing of the six layers into padded
[6, W, W] / [6, W] tensors, torch merges of the statistics, a per-layer running-statistics loop,
and the padding's backward copies).
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ucseg_fast.models.upg import FusedFusionHead, FusionHead
from ucseg_fast.ops import upg_head_kernels
from ucseg_fast.ops._triton_utils import triton, triton_usable

needs_kernel = pytest.mark.skipif(not triton_usable(torch.zeros(1)),
                                  reason="Triton kernel not runnable here (no triton / TRITON_INTERPRET)")

_ALLOC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


class _OpCounter(TorchDispatchMode):
    """Counts non-view, non-allocation aten ops (inner ops of custom ops included) and the ops'
    custom-op names; `launches` (filled by `_patch_launches`' wrappers) holds the Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.custom: collections.Counter[str] = collections.Counter()
        self.launches: collections.Counter[str] = collections.Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            # a custom op: run its implementation with this mode active again, so that the aten
            # ops inside are seen (a plain `func(...)` under `with self` would re-enter here)
            self.custom[str(func)] += 1
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        name = func.overloadpacket.__name__
        if not (self.in_launch or func.is_view or name in _ALLOC):
            self.ops[str(func)] += 1
        return func(*args, **kwargs)


def _patch_launches(monkeypatch) -> dict:
    """Wrap every kernel's `run` in ops/upg_head_kernels.py; launches go to `state["counter"]`."""
    state: dict = {"counter": None}
    kernels = {n: k for n, k in vars(upg_head_kernels).items()
               if isinstance(k, triton.runtime.jit.KernelInterface)}
    assert "_head_kernel" in kernels
    for name, kern in kernels.items():
        def run(*args, _run=kern.run, _name=name, **kw):
            counter = state["counter"]
            if counter is None:
                return _run(*args, **kw)
            counter.launches[_name] += 1
            counter.in_launch = True
            try:
                return _run(*args, **kw)
            finally:
                counter.in_launch = False
        monkeypatch.setattr(kern, "run", run)
    return state


@contextlib.contextmanager
def _counting(counter: _OpCounter, state: dict):
    state["counter"] = counter
    try:
        with counter:
            yield counter
    finally:
        state["counter"] = None


def _measure(head, z1, z2, A, dP, monkeypatch):
    """(forward counter, backward counter) of P = head.fused(z1, z2, A); P.backward(dP)."""
    state = _patch_launches(monkeypatch)
    ins = [t.clone().requires_grad_(True) for t in (z1, z2, A)]
    with _counting(_OpCounter(), state) as fwd:
        P = head.fused(*ins)
    with _counting(_OpCounter(), state) as bwd:
        P.backward(dP)
    assert all(t.grad is not None for t in ins) and all(p.grad is not None for p in head.parameters())
    return fwd, bwd


def _case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    B, C, S = 2, 4, (16, 16)
    z1, z2, dP = (torch.randn(B, C, *S, generator=g, dtype=dtype) for _ in range(3))
    A = torch.rand(B, 1, *S, generator=g, dtype=dtype)
    torch.manual_seed(0)
    return FusedFusionHead(C).to(dtype), z1, z2, A, dP


@needs_kernel
def test_fused_head_op_count_train(monkeypatch):
    """Training forward + backward at B=2, C=4, 16×16, fp32: nothing but Triton launches.

    forward: 6 × (statistics sweep + `_bn_finalize_kernel`: Chan merge, BN affine, batch
    mean/var), the emit sweep, and `_running_kernel` (all six running-statistics updates, in
    place); backward: 6 × (Σdy, Σdy·x̂ sweep + `_bwd_coef_kernel`), the final sweep (dz1, dz2, dA
    and per-program partials) and `_grad_reduce_kernel` (every layer's dW, dγ, dβ written into
    per-layer gradient tensors). No aten op launches a kernel in either direction."""
    head, z1, z2, A, dP = _case()
    head.train()
    fwd, bwd = _measure(head, z1, z2, A, dP, monkeypatch)
    assert dict(fwd.ops) == {}, fwd.ops
    assert dict(fwd.launches) == {"_head_kernel": 7, "_bn_finalize_kernel": 6, "_running_kernel": 1}
    assert dict(fwd.custom) == {"ucseg.fusion_head_layers.default": 1, "ucseg.bn_running_update.default": 1}
    assert dict(bwd.ops) == {}, bwd.ops
    assert dict(bwd.launches) == {"_head_kernel": 7, "_bwd_coef_kernel": 6, "_grad_reduce_kernel": 1}
    assert dict(bwd.custom) == {"ucseg.fusion_head_layers_backward.default": 1}
    assert all(int(b) == 1 for n, b in head.named_buffers() if n.endswith("num_batches_tracked"))


@needs_kernel
def test_fused_head_op_count_eval(monkeypatch):
    """Eval: one affine kernel from the running statistics, the emit sweep; backward: the final
    sweep and the gradient reduction."""
    head, z1, z2, A, dP = _case()
    head.eval()
    fwd, bwd = _measure(head, z1, z2, A, dP, monkeypatch)
    assert dict(fwd.ops) == {} and dict(bwd.ops) == {}, (fwd.ops, bwd.ops)
    assert dict(fwd.launches) == {"_eval_affine_kernel": 1, "_head_kernel": 1}
    assert dict(bwd.launches) == {"_head_kernel": 1, "_grad_reduce_kernel": 1}


def test_counter_sees_inside_custom_ops(monkeypatch):
    """The counter is not blind: the float64 path (the PyTorch twin, inside the same custom ops)
    and the PyTorch head show their aten ops."""
    head, z1, z2, A, dP = _case(torch.float64)
    head.train()
    fwd, bwd = _measure(head, z1, z2, A, dP, monkeypatch)
    assert sum(fwd.ops.values()) > 50 and sum(bwd.ops.values()) > 50
    assert not fwd.launches and not bwd.launches
    ref = FusionHead(4).double().train()
    counter = _OpCounter()
    with counter:
        ref(torch.cat([A * z1, A * z2], 1))
    assert sum(counter.ops.values()) >= 3 * 6, counter.ops  # conv, batch norm, leaky_relu per layer
