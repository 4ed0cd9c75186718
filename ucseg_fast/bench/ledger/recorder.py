"""The recorder of the step ledger: a `TorchDispatchMode` that sees every op of a training step.

In the count pass (`sizing=False`, real CPU tensors) it records each op that launches work, per
part of the step: views and allocations launch nothing and are only tallied; a custom op is
opened, and its inner aten ops and Triton launches (`count_triton`) are its kernels. In the size
pass (`sizing=True`, fake tensors) it records each op's bytes (its tensor inputs and outputs)
and FLOPs (`op_flops`). In both, an op that needs the host raises `HostSyncError` naming the
line of the package that called it, and an op CUDA autocast would run in fp32 on a
low-precision input is reported (`autocast_mismatches`): on CUDA it adds a cast kernel.
`as_on_cuda` makes the CPU step take the ops a CUDA step takes where the two differ.
"""
from __future__ import annotations

import contextlib
import math
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that make the host wait for the device or depend on data for their output shape
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
    "aten::allclose", "aten::nonzero", "aten::argwhere", "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::bincount", "aten::repeat_interleave", "aten::tolist", "aten::_assert_async",
}
# ops that only allocate (the caching allocator hands memory out without a kernel)
ALLOC_OPS = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::resize_", "aten::empty_permuted", "aten::lift_fresh",
}
# CUDA autocast runs these in fp32 (casting a bf16/fp16 input up: a kernel CPU autocast skips)
CUDA_FP32_OPS = {
    "aten::acos", "aten::asin", "aten::cosh", "aten::erfinv", "aten::exp", "aten::expm1",
    "aten::log", "aten::log10", "aten::log2", "aten::log1p", "aten::reciprocal", "aten::rsqrt",
    "aten::sinh", "aten::tan", "aten::pow", "aten::softplus", "aten::native_layer_norm",
    "aten::native_group_norm", "aten::logsumexp", "aten::binary_cross_entropy_with_logits",
    "aten::mse_loss", "aten::l1_loss", "aten::smooth_l1_loss", "aten::nll_loss",
    "aten::nll_loss2d", "aten::kl_div", "aten::cdist", "aten::dist", "aten::renorm",
    "aten::_softmax", "aten::_log_softmax", "aten::sum", "aten::prod", "aten::cumsum",
    "aten::cumprod", "aten::mean",
}


class HostSyncError(RuntimeError):
    """The step would synchronise with the host (or its shapes depend on data)."""


def _op_name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


def _is_view(func) -> bool:
    return bool(getattr(func, "is_view", False))


def tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors in `obj` (nested lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)


def nbytes(t: torch.Tensor) -> int:
    """Bytes `t` occupies."""
    n = t.numel() * t.element_size()
    try:  # an expanded input occupies its storage, not numel elements
        n = min(n, t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - some tensor subclasses have no storage
        pass
    return int(n)


_LEDGER = Path(__file__).resolve().parent   # frames in here are the ledger's own
_PKG = _LEDGER.parents[1]                    # the ucseg_fast package


def _where(filename: str) -> Path | None:
    """The file of a frame of this package outside the ledger, else None."""
    p = Path(filename).resolve()
    if _PKG not in p.parents or _LEDGER in p.parents:
        return None
    return p


def _frame_text(p: Path, fr: traceback.FrameSummary) -> str:
    return f"{p.relative_to(_PKG.parent)}:{fr.lineno} ({fr.name}): {(fr.line or '').strip()}"


def caller() -> str:
    """file:line (function): `code` of the innermost frame of this package outside the ledger."""
    for fr in reversed(traceback.extract_stack()[:-1]):
        p = _where(fr.filename)
        if p is not None:
            return _frame_text(p, fr)
    return "<outside ucseg_fast>"


def caller_of(exc: BaseException) -> str:
    """The same for the traceback of `exc`: its innermost frame of this package."""
    found = "<outside ucseg_fast>"
    for fr in traceback.extract_tb(exc.__traceback__):
        p = _where(fr.filename)
        if p is not None:
            found = _frame_text(p, fr)
    return found


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def _sdpa_cpu_flops(args, out, backward: bool) -> int:
    q = args[0] if not backward else args[1]
    B, h, N, d = q.shape
    Nk = (args[1] if not backward else args[2]).shape[-2]
    f = 4 * B * h * N * Nk * d  # QKᵀ and PV
    return int(f * 2.5) if backward else int(f)


def _head_macs_per_pixel(num_classes: int) -> tuple[int, int]:
    """Multiply-adds a pixel of the fused UPG head's recompute sweeps (ops/upg_head_kernels.py header):
    forward: sweep j recomputes layers 1..j and reduces x_j's statistics (j = 1..6), sweep 7
    emits P; backward: sweep k = 6..1 recomputes the forward and the backward down to layer k,
    the final sweep the forward, every dh and every dW. Widths padded to powers of two ≥ 16."""
    widths = [2 * num_classes, 16, 32, 64, 32, 16, num_classes]
    w = [max(16, 1 << (c - 1).bit_length()) for c in widths]
    m = [w[i] * w[i + 1] for i in range(6)]
    M = sum(m)
    prefix = [sum(m[: j + 1]) for j in range(6)]
    fwd = sum(prefix) + M
    suffix = [sum(m[k + 1:]) for k in range(6)]  # backward below layer k+1
    bwd = 6 * M + sum(suffix) + 3 * M
    return fwd, bwd


def op_flops(name: str, func, args, kwargs, out) -> tuple[int, str]:
    """(FLOPs, the peak that bounds them: 'bf16' | 'tf32' | 'fp32' | 'mem')."""
    from torch.utils.flop_counter import flop_registry
    tens = [t for t in tensors(args) if t.is_floating_point()]
    low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tens)
    peak = "bf16" if low else "tf32"
    packet = getattr(func, "overloadpacket", None)
    try:
        if packet in flop_registry:
            return int(flop_registry[packet](*args, **(kwargs or {}), out_val=out)), peak
        if name == "aten::_scaled_dot_product_flash_attention_for_cpu":
            return _sdpa_cpu_flops(args, out, False), peak
        if name == "aten::_scaled_dot_product_flash_attention_for_cpu_backward":
            return _sdpa_cpu_flops(args, out, True), peak
        if name in ("ucseg::fusion_head", "ucseg::fusion_head_backward"):
            z1 = args[0] if name == "ucseg::fusion_head" else args[1]
            px = z1.shape[0] * math.prod(z1.shape[2:])
            fwd, bwd = _head_macs_per_pixel(z1.shape[1])
            return 2 * px * (fwd if name == "ucseg::fusion_head" else bwd), (
                "tf32" if z1.dtype != torch.float32 or
                torch.get_float32_matmul_precision() != "highest" else "fp32")
    except Exception:  # noqa: BLE001 - a formula that does not fit the call counts as 0 FLOPs
        return 0, "mem"
    return 0, "mem"


# ----------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------
@dataclass
class OpRecord:
    """One op of the step, in the part of the step that ran it."""
    part: str
    name: str
    launches: int = 1          # kernels this op launches (custom ops: inner aten kernels + Triton)
    bytes: int = 0
    flops: int = 0
    peak: str = "mem"


class Recorder(TorchDispatchMode):
    """Counts (count pass) or sizes (size pass) every op of a step, per part."""

    def __init__(self, *, sizing: bool) -> None:
        super().__init__()
        self.sizing = sizing
        self.parts: list[str] = ["other"]
        self.ops: list[OpRecord] = []
        self.views = 0
        self.allocs = 0
        self.autocast_mismatches: Counter[str] = Counter()
        self._inner: OpRecord | None = None  # the custom op being opened (count pass)

    @property
    def part(self) -> str:
        return self.parts[-1]

    @contextlib.contextmanager
    def in_part(self, name: str) -> Iterator[None]:
        self.parts.append(name)
        try:
            yield
        finally:
            self.parts.pop()

    def triton_launch(self, kernel: str) -> None:
        rec = self._inner
        if rec is not None:
            rec.launches += 1
        else:
            self.ops.append(OpRecord(self.part, f"triton:{kernel}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in SYNC_OPS:
            raise HostSyncError(f"host sync in the step: {name} at {caller()}")
        if name.startswith("prim::"):  # metadata queries of fake tensors (prim::device, ...)
            return func(*args, **kwargs)
        if _is_view(func):
            self.views += 1
            return func(*args, **kwargs)
        if name in ALLOC_OPS:
            self.allocs += 1
            return func(*args, **kwargs)
        if name in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu") and any(
                t.dtype in (torch.bfloat16, torch.float16) for t in tensors(args)
                if t.is_floating_point()):
            self.autocast_mismatches[f"{name} at {caller()}"] += 1
        if self._inner is not None:  # an aten op inside an opened custom op
            self._inner.launches += 1
            return func(*args, **kwargs)
        custom = not name.startswith("aten::")
        rec = OpRecord(self.part, name, launches=0 if (custom and not self.sizing) else 1)
        self.ops.append(rec)
        if custom and not self.sizing:
            # open the custom op: its inner aten kernels and Triton launches are what runs
            self._inner = rec
            try:
                with self:
                    out = func(*args, **kwargs)
            finally:
                self._inner = None
        else:
            out = func(*args, **kwargs)
        if self.sizing:
            rec.bytes = sum(nbytes(t) for t in tensors(args)) + sum(
                nbytes(t) for t in tensors(out))
            rec.flops, rec.peak = op_flops(name, func, args, kwargs, out)
        return out


@contextlib.contextmanager
def count_triton(rec: Recorder) -> Iterator[None]:
    """Count Triton launches (interpreter: `InterpretedFunction.run`; compiled: `JITFunction.run`)."""
    patched = []
    try:
        from triton.runtime import interpreter as _interp
        from triton.runtime import jit as _jit
    except ImportError:
        yield
        return
    for cls in (getattr(_interp, "InterpretedFunction", None), getattr(_jit, "JITFunction", None)):
        if cls is None:
            continue
        orig = cls.run

        def run(self, *args, _orig=orig, **kw):
            if not kw.get("warmup", False):
                rec.triton_launch(getattr(self, "__name__", None) or self.fn.__name__)
            return _orig(self, *args, **kw)
        cls.run = run
        patched.append((cls, orig))
    try:
        yield
    finally:
        for cls, orig in patched:
            cls.run = orig


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """What `F.dropout` runs on CUDA (`at::dropout` picks the fused `native_dropout` kernel there);
    on CPU it decomposes into bernoulli_ / div_ / mul, which a CUDA step does not launch."""
    if not training or p == 0.0:
        return input
    out = torch.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


@contextlib.contextmanager
def as_on_cuda() -> Iterator[None]:
    """`F.dropout` as CUDA runs it (`_cuda_dropout`), for the CPU passes."""
    import torch.nn.functional as F
    orig = F.dropout
    F.dropout = _cuda_dropout
    try:
        yield
    finally:
        F.dropout = orig

