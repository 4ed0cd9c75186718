"""The step ledger: what one training step costs, measured on a CPU (`ucseg-fast bench ledger`).

A GPU step is a sequence of kernels; its time is roughly the sum over kernels of
max(bytes / bandwidth, FLOPs / peak, a per-kernel floor). All three can be read off a CPU:

* **Kernels** — one real training step of each phase runs on the CPU at a small shape, with the
  options the CUDA path uses (bf16 autocast, channels-last, the configuration's fused ops as custom
  ops whose Triton kernels run in the interpreter, the Triton connected components) under a
  `TorchDispatchMode` that counts every op that launches work: views and allocations launch
  nothing and are not counted; custom ops are opened and their inner aten ops and Triton launches
  are counted. The count does not depend on the image size, so the small step counts the real one.
* **Bytes and FLOPs** — the same step runs again at the recipe's real shape on fake tensors
  (`FakeTensorMode`: sizes without data, forward and backward). Bytes = the sizes of each op's
  tensor inputs and outputs (a fused op: its custom op's inputs and outputs, i.e. what its
  kernels must move at least); FLOPs from `torch.utils.flop_counter` (matmuls, convolutions,
  attention) and the fused head's own formula.
* **Host syncs** — an op that needs the host (`.item()`, `bool(tensor)`, `nonzero`, a
  data-dependent shape, a copy to NumPy) fails the ledger with `HostSyncError`, naming the op
  and the line of the package that called it. That is the proof, on a CPU and in CI, that the
  step can be captured as one CUDA graph.

The estimate is a roofline over the kernels: per kernel max(bytes / HBM bandwidth, FLOPs /
tensor-core peak of its dtype, `floor_us`), summed per part (`est_ms`, what a captured graph can
approach), and the eager lower bound max(that, kernels × `EAGER_US` of host dispatch). Card
numbers are datasheet values (dense, no sparsity); the floors are assumptions, stated in the
output. CPU autocast keeps some elementwise ops in bf16 that CUDA autocast runs in fp32 (the
`CUDA_FP32_OPS` list); the ledger reports every such op that sees a low-precision input
(`autocast_mismatches`), because on CUDA it would add a cast kernel the CPU run does not show.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Card", "CARDS", "HostSyncError", "Ledger", "PhaseLedger", "step_ledger",
           "count_ops", "PARTS"]

# ----------------------------------------------------------------------------------------------
# cards (datasheet numbers, dense) and the kernel floors (assumptions, printed with the ledger)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    name: str
    hbm_gbs: float        # HBM bandwidth, GB/s
    bf16_tflops: float    # dense bf16 / fp16 tensor-core peak
    tf32_tflops: float    # dense TF32 tensor-core peak (fp32 matmuls with TF32 allowed)
    fp32_tflops: float    # CUDA-core fp32 FMA peak
    floor_us: float = 2.0  # least time a kernel takes inside a CUDA graph (launch + ramp)


CARDS: dict[str, Card] = {
    "H100": Card("NVIDIA H100 SXM5 80 GB (HBM3)", 3350.0, 989.0, 494.0, 67.0),
    "H200": Card("NVIDIA H200 SXM 141 GB (HBM3e)", 4800.0, 989.0, 494.0, 67.0),
    "A100": Card("NVIDIA A100 SXM4 80 GB (HBM2e)", 2039.0, 312.0, 156.0, 19.5),
}
EAGER_US = 8.0  # host time PyTorch spends to dispatch and launch one op in an eager step

PARTS = ("schedules", "input", "weights", "subnets", "upg", "objective", "backward",
         "optimizer", "bookkeeping")

# ----------------------------------------------------------------------------------------------
# op classes
# ----------------------------------------------------------------------------------------------
_aten = torch.ops.aten
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


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t: torch.Tensor) -> int:
    n = t.numel() * t.element_size()
    try:  # an expanded input occupies its storage, not numel elements
        n = min(n, t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - some tensor subclasses have no storage
        pass
    return int(n)


def _caller() -> str:
    """file:line (function): `code` of the innermost frame of this package outside the ledger."""
    here = Path(__file__).resolve()
    pkg = here.parents[1]
    for fr in reversed(traceback.extract_stack()[:-1]):
        p = Path(fr.filename).resolve()
        if p == here or pkg not in p.parents:
            continue
        return f"{p.relative_to(pkg.parent)}:{fr.lineno} ({fr.name}): {(fr.line or '').strip()}"
    return "<outside ucseg_fast>"


def _caller_of(exc: BaseException) -> str:
    here = Path(__file__).resolve()
    pkg = here.parents[1]
    found = "<outside ucseg_fast>"
    for fr in traceback.extract_tb(exc.__traceback__):
        p = Path(fr.filename).resolve()
        if p != here and pkg in p.parents:
            found = f"{p.relative_to(pkg.parent)}:{fr.lineno} ({fr.name}): {(fr.line or '').strip()}"
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
    """Multiply-adds a pixel of the fused UPG head's recompute sweeps (ops/upg_head.py header):
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


def _flops(name: str, func, args, kwargs, out) -> tuple[int, str]:
    """(FLOPs, the peak that bounds them: 'bf16' | 'tf32' | 'fp32' | 'mem')."""
    from torch.utils.flop_counter import flop_registry
    tens = [t for t in _tensors(args) if t.is_floating_point()]
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
    part: str
    name: str
    launches: int = 1          # kernels this op launches (custom ops: inner aten kernels + Triton)
    bytes: int = 0
    flops: int = 0
    peak: str = "mem"
    inner: list[str] = field(default_factory=list)


class _Recorder(TorchDispatchMode):
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
            rec.inner.append(f"triton:{kernel}")
        else:
            self.ops.append(OpRecord(self.part, f"triton:{kernel}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in SYNC_OPS:
            raise HostSyncError(f"host sync in the step: {name} at {_caller()}")
        if name.startswith("prim::"):  # metadata queries of fake tensors (prim::device, ...)
            return func(*args, **kwargs)
        if _is_view(func):
            self.views += 1
            return func(*args, **kwargs)
        if name in ALLOC_OPS:
            self.allocs += 1
            return func(*args, **kwargs)
        if name in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu") and any(
                t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(args)
                if t.is_floating_point()):
            self.autocast_mismatches[f"{name} at {_caller()}"] += 1
        if self._inner is not None:  # an aten op inside an opened custom op
            self._inner.launches += 1
            self._inner.inner.append(name)
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
            rec.bytes = sum(_nbytes(t) for t in _tensors(args)) + sum(
                _nbytes(t) for t in _tensors(out))
            rec.flops, rec.peak = _flops(name, func, args, kwargs, out)
        return out


@contextlib.contextmanager
def _count_triton(rec: _Recorder) -> Iterator[None]:
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
def _as_on_cuda() -> Iterator[None]:
    import torch.nn.functional as F
    orig = F.dropout
    F.dropout = _cuda_dropout
    try:
        yield
    finally:
        F.dropout = orig


# ----------------------------------------------------------------------------------------------
# the step under the recorder
# ----------------------------------------------------------------------------------------------
def _small_config(cfg, side: int, batch: int):
    """The same recipe at a small shape (the op count does not depend on it)."""
    from ..config import apply_overrides
    nd = len(cfg.data.img_size)
    p = cfg.model.patch_size
    side = max(side, 2 * p)
    side -= side % 16
    size = "[" + ",".join([str(side)] * nd) + "]"
    return apply_overrides(cfg, [f"--data.img_size={size}", f"--data.labeled_bs={batch}",
                                 f"--data.unlabeled_bs={batch}"])


def _batch(cfg, device="cpu"):
    from ..train.bench import synthetic_batch, synthetic_batch_3d
    dc = cfg.data
    if len(dc.img_size) == 3:
        return synthetic_batch_3d(dc.labeled_bs, dc.unlabeled_bs, dc.img_size[0], device)
    b = synthetic_batch(dc.labeled_bs, dc.unlabeled_bs, dc.img_size[0], dc.num_classes, device)
    if cfg.model.in_channels != b.x_l.shape[1]:
        b.x_l, b.x_u = b.x_l[:, :cfg.model.in_channels], b.x_u[:, :cfg.model.in_channels]
    return b


def _hook_parts(core, rec: _Recorder) -> list:
    """Forward hooks: the subnets' ops → "subnets", the rest of the pair's forward → "upg";
    what the objective does around the forward stays "objective"."""
    model = core.model
    handles = []

    def enter(name):
        def pre(module, args):
            rec.parts.append(name)
        return pre

    def leave(module, args, out):
        rec.parts.pop()

    for mod, name in ((model, "upg"), (model.net_1, "subnets"), (model.net_2, "subnets")):
        handles.append(mod.register_forward_pre_hook(enter(name)))
        handles.append(mod.register_forward_hook(leave))
    return handles


def _run_phase(core, batch, t: int, rec: _Recorder) -> None:
    """One Trainer iteration: schedules, the step, the term accumulation, attributed to parts."""
    from ..train.trainer import accumulate_terms
    part_names = {"input": "input", "weights": "weights", "forward": "objective",
                  "backward": "backward", "optimizer": "optimizer"}
    # the schedule values are host arithmetic (CPU tensors on purpose, see schedules.au_lambda);
    # on the device the update is one fill_ per scalar, counted as such
    with torch.utils._python_dispatch._disable_current_modes():
        core.update_scalars(t)
    rec.ops += [OpRecord("schedules", "aten::fill_") for _ in range(core.scalars.DEVICE_WRITES)]
    core.runner.part = lambda name: rec.in_part(part_names[name])
    try:
        terms = core.runner(batch, t >= core.phase2_start)
        with rec.in_part("bookkeeping"):
            accumulate_terms({}, terms)
    finally:
        core.runner.part = lambda name: contextlib.nullcontext()


def _phase_ts(cfg) -> dict[int, int]:
    from ..config import phase2_start_at
    p2 = phase2_start_at(cfg)
    return {1: max(0, min(p2 - 1, p2 // 2)), 2: p2}


def count_ops(cfg, *, side: int = 64, batch: int = 2, phases=(1, 2)) -> dict[int, _Recorder]:
    """Count pass: real CPU steps at a small shape, bf16 autocast, channels-last, Triton kernels
    in the interpreter (fused ops and connected components). Needs TRITON_INTERPRET=1 set before
    the ops were imported when the configuration uses Triton kernels."""
    from ..ops import _triton_utils as tu
    from ..train.trainer import build_step_core
    if batch < 2:
        raise ValueError("count_ops: batch must be >= 2 a half: with one image some reshapes are "
                         "views that are copies at the real batch, so the count would differ")
    small = _small_config(cfg, side, batch)
    uses_triton = (cfg.model.upg_head == "fused" or cfg.model.uncertainty == "fused"
                   or cfg.loss.fused_losses is True or cfg.loss.nms)
    if uses_triton and not (tu.HAS_TRITON and tu.interpret_mode()):
        raise RuntimeError("the ledger counts the Triton kernels the CUDA step launches by "
                           "running them in the interpreter: set TRITON_INTERPRET=1 before "
                           "ucseg_fast.ops is imported (`ucseg-fast bench ledger` does)"
                           if tu.HAS_TRITON else "the ledger of a configuration with fused ops "
                           "or connected components needs Triton (pip install triton)")
    prev = tu.get_backend()
    if tu.HAS_TRITON and tu.interpret_mode():
        tu.set_backend("triton")  # the kernels the GPU runs, connected components included
    try:
        torch.manual_seed(0)
        core = build_step_core(small, "cpu", amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                               step_mode="eager")
        batch_ = _batch(small)
        ts = _phase_ts(small)
        out: dict[int, _Recorder] = {}
        with _as_on_cuda():
            for ph in sorted(set(phases) | {1}):  # warm-up: momentum buffers, first-call paths
                core.step(batch_, ts[ph])
            for ph in phases:
                rec = _Recorder(sizing=False)
                handles = _hook_parts(core, rec)
                try:
                    with _count_triton(rec), rec:
                        _run_phase(core, batch_, ts[ph], rec)
                finally:
                    for h in handles:
                        h.remove()
                out[ph] = rec
        return out
    finally:
        tu.set_backend(prev)


def size_ops(cfg, *, phases=(1, 2)) -> dict[int, _Recorder]:
    """Size pass: the same steps at the configuration's shape on fake tensors (no data, no
    compute): bytes and FLOPs of every op; a data-dependent op raises HostSyncError."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ..ops import _triton_utils as tu
    from ..train.trainer import build_step_core
    prev = tu.get_backend()
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    real_batch = _batch(cfg)
    out: dict[int, _Recorder] = {}
    try:
        with _as_on_cuda(), fake:
            torch.manual_seed(0)
            core = build_step_core(cfg, "cpu", amp=cfg.train.amp,
                                   channels_last=cfg.train.channels_last, step_mode="eager")
            batch_ = type(real_batch)(*(fake.from_tensor(t) for t in
                                        (real_batch.x_l, real_batch.y_l, real_batch.x_u)))
            ts = _phase_ts(cfg)
            for ph in sorted(set(phases) | {1}):
                _guard_sync(lambda: core.step(batch_, ts[ph]))
            for ph in phases:
                rec = _Recorder(sizing=True)
                handles = _hook_parts(core, rec)
                try:
                    with rec:
                        _guard_sync(lambda: _run_phase(core, batch_, ts[ph], rec))
                finally:
                    for h in handles:
                        h.remove()
                out[ph] = rec
    finally:
        tu.set_backend(prev)
    return out


def _guard_sync(fn: Callable[[], Any]) -> Any:
    from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                               DynamicOutputShapeException)
    try:
        return fn()
    except HostSyncError:
        raise
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        raise HostSyncError(f"host sync in the step: {e} at {_caller_of(e)}") from e
    except Exception as e:  # noqa: BLE001 - a fake tensor refuses data access (.numpy(), ...)
        msg = str(e)
        if any(k in msg for k in ("data_ptr", "FakeTensor", "fake tensor", "data-dependent",
                                  "numpy", "Cannot access storage")):
            raise HostSyncError(f"host access to tensor data in the step ({type(e).__name__}: "
                                f"{msg.splitlines()[0][:200]}) at {_caller_of(e)}") from e
        raise


# ----------------------------------------------------------------------------------------------
# the ledger
# ----------------------------------------------------------------------------------------------
@dataclass
class PartLedger:
    kernels: int = 0            # kernel-launching ops (custom ops: their launches)
    dispatched: int = 0         # ops dispatched (custom ops count once)
    bytes: int = 0
    flops: int = 0
    est_us: float = 0.0         # roofline with the per-kernel floor
    ops: Counter = field(default_factory=Counter)


@dataclass
class PhaseLedger:
    phase: int
    parts: dict[str, PartLedger]
    views: int
    allocs: int
    autocast_mismatches: dict[str, int]
    shape_dependent: list[str]

    @property
    def kernels(self) -> int:
        return sum(p.kernels for p in self.parts.values())

    def step_kernels(self) -> int:
        """Kernels of `Trainer.step` proper (the bar of the ledger test): every part but the
        schedules' scalar writes and the trainer's term accumulation around it."""
        return sum(p.kernels for n, p in self.parts.items() if n not in ("schedules", "bookkeeping"))

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts.values())

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.parts.values())

    @property
    def est_ms(self) -> float:
        return sum(p.est_us for p in self.parts.values()) / 1e3

    def eager_ms(self) -> float:
        return max(self.est_ms, sum(p.dispatched for p in self.parts.values()) * EAGER_US / 1e3)


@dataclass
class Ledger:
    config: str
    card: Card
    shape: str
    phases: dict[int, PhaseLedger]
    stream: PartLedger | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "card": dataclasses.asdict(self.card), "shape": self.shape,
            "eager_us_per_op": EAGER_US,
            "phases": {str(k): {
                "kernels": v.kernels, "step_kernels": v.step_kernels(), "bytes": v.bytes,
                "flops": v.flops, "est_ms": v.est_ms, "eager_ms": v.eager_ms(),
                "views": v.views, "allocations": v.allocs,
                "autocast_mismatches": v.autocast_mismatches,
                "shape_dependent": v.shape_dependent,
                "parts": {n: {"kernels": p.kernels, "dispatched": p.dispatched, "bytes": p.bytes,
                              "flops": p.flops, "est_us": p.est_us,
                              "top_ops": dict(p.ops.most_common(12))}
                          for n, p in v.parts.items()}}
                for k, v in self.phases.items()},
            "stream": None if self.stream is None else {
                "kernels": self.stream.kernels, "top_ops": dict(self.stream.ops.most_common(12))},
        }

    def markdown(self, top: int = 0) -> str:
        c = self.card
        lines = [f"# Step ledger: {self.config} ({self.shape})", "",
                 f"Roofline for {c.name}: {c.hbm_gbs:.0f} GB/s, bf16 {c.bf16_tflops:.0f} / TF32 "
                 f"{c.tf32_tflops:.0f} TFLOP/s dense, at least {c.floor_us:g} µs per kernel in a "
                 f"CUDA graph; eager steps at least {EAGER_US:g} µs of host time per op "
                 "(floors are assumptions).", ""]
        for ph, L in self.phases.items():
            lines += [f"## Phase {ph}", "",
                      "| part | kernels | MB moved | GFLOP | est. µs (graph) |",
                      "|---|---:|---:|---:|---:|"]
            for n in PARTS:
                p = L.parts.get(n)
                if p is None or (p.kernels == 0 and p.bytes == 0):
                    continue
                lines.append(f"| {n} | {p.kernels} | {p.bytes / 1e6:.1f} | {p.flops / 1e9:.1f} | "
                             f"{p.est_us:.0f} |")
            lines.append(f"| **step** | **{L.kernels}** | **{L.bytes / 1e6:.0f}** | "
                         f"**{L.flops / 1e9:.0f}** | **{L.est_ms * 1e3:.0f}** |")
            lines += ["", f"Estimate: {L.est_ms:.2f} ms per step as one CUDA graph, ≥ "
                      f"{L.eager_ms():.2f} ms eager. Kernels of Trainer.step proper (without the "
                      f"schedule writes and the term accumulation): {L.step_kernels()}. "
                      f"Not counted: {L.views} views, {L.allocs} allocations. Host syncs: none.", ""]
            if L.autocast_mismatches:
                lines.append("CUDA autocast would add a cast before: " + "; ".join(
                    f"{k} ×{v}" for k, v in L.autocast_mismatches.items()))
                lines.append("")
            if L.shape_dependent:
                lines.append("Ops that differ between the small and the real shape: "
                             + "; ".join(L.shape_dependent))
                lines.append("")
            if top:
                lines += [f"Most frequent ops per part (top {top}):", ""]
                for n in PARTS:
                    p = L.parts.get(n)
                    if p is None or not p.ops:
                        continue
                    lines.append(f"- {n}: " + ", ".join(f"{k.replace('aten::', '')} ×{v}"
                                                         for k, v in p.ops.most_common(top)))
                lines.append("")
        if self.stream is not None:
            lines += [f"Training stream (torch backend, one batch): {self.stream.kernels} kernels "
                      "(augmentation on the device; not part of the step above).", ""]
        return "\n".join(lines)


def _roofline_us(rec: OpRecord, card: Card) -> float:
    t_mem = rec.bytes / (card.hbm_gbs * 1e3)  # bytes / (GB/s) in µs
    peak = {"bf16": card.bf16_tflops, "tf32": card.tf32_tflops, "fp32": card.fp32_tflops}.get(
        rec.peak)
    t_flop = rec.flops / (peak * 1e6) if peak else 0.0
    return max(t_mem, t_flop, rec.launches * card.floor_us)


def _assemble(phase: int, counted: _Recorder, sized: _Recorder | None, card: Card) -> PhaseLedger:
    parts: dict[str, PartLedger] = defaultdict(PartLedger)
    for r in counted.ops:
        p = parts[r.part]
        p.kernels += r.launches
        p.dispatched += 1
        p.ops[r.name] += r.launches if r.launches else 0
    shape_dep: list[str] = []
    if sized is not None:
        # top-level ops in order, per part; launches come from the count pass
        by_part_c: dict[str, list[OpRecord]] = defaultdict(list)
        for r in counted.ops:
            if not r.name.startswith("triton:"):
                by_part_c[r.part].append(r)
        by_part_s: dict[str, list[OpRecord]] = defaultdict(list)
        for r in sized.ops:
            by_part_s[r.part].append(r)
        for part in set(by_part_c) | set(by_part_s):
            c_ops, s_ops = by_part_c.get(part, []), by_part_s.get(part, [])
            cn, sn = Counter(r.name for r in c_ops), Counter(r.name for r in s_ops)
            if cn != sn:
                diff = (cn - sn) + (sn - cn)
                shape_dep.append(f"{part}: " + ", ".join(f"{k} ×{v}" for k, v in diff.items()))
            launches = defaultdict(list)
            for r in c_ops:
                launches[r.name].append(r.launches)
            used: Counter[str] = Counter()
            p = parts[part]
            for r in s_ops:
                k = used[r.name]
                used[r.name] += 1
                lst = launches.get(r.name, [])
                r.launches = lst[k] if k < len(lst) else 1
                p.bytes += r.bytes
                p.flops += r.flops
                p.est_us += _roofline_us(r, card)
    else:
        for r in counted.ops:
            parts[r.part].est_us += r.launches * card.floor_us
    return PhaseLedger(phase, dict(parts), counted.views, counted.allocs,
                       dict(counted.autocast_mismatches), shape_dep)


def _stream_kernels(cfg) -> PartLedger | None:
    """Kernels of one `stream.next()` of the torch backend on a small synthetic set (2D)."""
    import tempfile
    if len(cfg.data.img_size) != 2 or cfg.data.format != "ssl4mis":
        return None
    from ..config import apply_overrides
    from ..data.factory import build_train_stream
    from ..data.synthetic import write_synthetic_acdc
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_acdc(tmp, n_train_patients=7, slices_per_volume=2, n_val=1, n_test=1,
                             size=(64, 64), seed=0)
        small = apply_overrides(_small_config(cfg, 64, 2),
                                [f"--data.root={tmp}", "--data.labeled_patients=3",
                                 "--data.backend=torch"])
        stream = build_train_stream(small.data, device=torch.device("cpu"), seed=0,
                                    channels=small.model.in_channels)
        stream.next()
        rec = _Recorder(sizing=False)
        with rec, rec.in_part("stream"):
            stream.next()
    p = PartLedger()
    for r in rec.ops:
        p.kernels += r.launches
        p.dispatched += 1
        p.ops[r.name] += r.launches
    return p


def step_ledger(cfg, *, card: str | Card = "H100", phases=(1, 2), side: int | None = None,
                batch: int = 2, sizes: bool = True, stream: bool = False) -> Ledger:
    """The ledger of one training step of each phase of `cfg` (a `Config`) for `card`. The count
    pass runs at `side` (default 64 in 2D, 32 in 3D) with `batch` + `batch` images (at least 2 a
    half: with one image some reshapes are views that copy at the real batch)."""
    card_ = card if isinstance(card, Card) else CARDS[_card_key(card)]
    if side is None:
        side = 32 if len(cfg.data.img_size) == 3 else 64
    counted = count_ops(cfg, side=side, batch=batch, phases=phases)
    sized = size_ops(cfg, phases=phases) if sizes else {}
    dc = cfg.data
    shape = f"batch {dc.labeled_bs} + {dc.unlabeled_bs}, {'×'.join(map(str, dc.img_size))}, " \
            f"amp {cfg.train.amp}, channels-last {cfg.train.channels_last}"
    return Ledger(cfg.name, card_, shape,
                  {ph: _assemble(ph, counted[ph], sized.get(ph), card_) for ph in phases},
                  _stream_kernels(cfg) if stream else None)


def _card_key(name: str) -> str:
    up = name.upper()
    for k in CARDS:
        if k in up:
            return k
    raise KeyError(f"bench ledger: unknown card {name!r}; known: {', '.join(CARDS)}")
