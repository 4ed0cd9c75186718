"""The two passes of the step ledger over one training step of each phase.

* `count_ops`: real CPU steps at a small shape with the options the CUDA path uses (bf16
  autocast, channels-last, the configuration's fused ops with their Triton kernels in the
  interpreter, the Triton connected components): every kernel-launching op, per part. The count
  does not depend on the image size, so the small step counts the real one.
* `size_ops`: the same steps at the configuration's shape on fake tensors (`FakeTensorMode`:
  sizes without data): bytes and FLOPs of every op; a data-dependent op fails the pass with
  `HostSyncError`.
* `count_stream`: the kernels of one batch of the training stream (torch backend, 2D).

The step is the Trainer's own (`train.core.StepCore`); forward hooks and the step runner's part
context attribute each op to a part of the step (`estimate.PARTS`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .recorder import HostSyncError, OpRecord, Recorder, as_on_cuda, caller_of, count_triton


def _small_config(cfg, side: int, batch: int):
    """The same recipe at a small shape (the op count does not depend on it)."""
    from ...config import apply_overrides
    nd = cfg.spec.dims
    p = cfg.model.patch_size
    side = max(side, 2 * p)
    side -= side % 16
    size = "[" + ",".join([str(side)] * nd) + "]"
    return apply_overrides(cfg, [f"--data.img_size={size}", f"--data.labeled_bs={batch}",
                                 f"--data.unlabeled_bs={batch}"])


def _batch(cfg, device="cpu"):
    """A synthetic batch of the configuration's shape (`train.bench`)."""
    from ...train.bench import synthetic_batch, synthetic_batch_3d
    dc = cfg.data
    if cfg.spec.dims == 3:
        return synthetic_batch_3d(dc.labeled_bs, dc.unlabeled_bs, dc.img_size[0], device)
    b = synthetic_batch(dc.labeled_bs, dc.unlabeled_bs, dc.img_size[0], dc.num_classes, device)
    if cfg.model.in_channels != b.x_l.shape[1]:
        b.x_l, b.x_u = b.x_l[:, :cfg.model.in_channels], b.x_u[:, :cfg.model.in_channels]
    return b


def _hook_parts(core, rec: Recorder) -> list:
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


def _run_phase(core, batch, t: int, rec: Recorder) -> None:
    """One Trainer iteration: schedules, the step, the term accumulation, attributed to parts."""
    from ...train.logbook import accumulate_terms
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
    """An iteration of each phase."""
    from ...config import phase2_start_at
    p2 = phase2_start_at(cfg)
    return {1: max(0, min(p2 - 1, p2 // 2)), 2: p2}


def count_ops(cfg, *, side: int = 64, batch: int = 2, phases=(1, 2)) -> dict[int, Recorder]:
    """Count pass: real CPU steps at a small shape, bf16 autocast, channels-last, Triton kernels
    in the interpreter (fused ops and connected components). Needs TRITON_INTERPRET=1 set before
    the ops were imported when the configuration uses Triton kernels."""
    from ...ops import _triton_utils as tu
    from ...train.core import build_step_core
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
        core = build_step_core(small, "cpu", amp=cfg.train.amp,
                               channels_last=cfg.train.channels_last, step_mode="eager")
        batch_ = _batch(small)
        ts = _phase_ts(small)
        out: dict[int, Recorder] = {}
        with as_on_cuda():
            for ph in sorted(set(phases) | {1}):  # warm-up: momentum buffers, first-call paths
                core.step(batch_, ts[ph])
            for ph in phases:
                rec = Recorder(sizing=False)
                handles = _hook_parts(core, rec)
                try:
                    with count_triton(rec), rec:
                        _run_phase(core, batch_, ts[ph], rec)
                finally:
                    for h in handles:
                        h.remove()
                out[ph] = rec
        return out
    finally:
        tu.set_backend(prev)


def size_ops(cfg, *, phases=(1, 2)) -> dict[int, Recorder]:
    """Size pass: the same steps at the configuration's shape on fake tensors (no data, no
    compute): bytes and FLOPs of every op; a data-dependent op raises HostSyncError."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ...ops import _triton_utils as tu
    from ...train.core import build_step_core
    prev = tu.get_backend()
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    real_batch = _batch(cfg)
    out: dict[int, Recorder] = {}
    try:
        with as_on_cuda(), fake:
            torch.manual_seed(0)
            core = build_step_core(cfg, "cpu", amp=cfg.train.amp,
                                   channels_last=cfg.train.channels_last, step_mode="eager")
            batch_ = type(real_batch)(*(fake.from_tensor(t) for t in
                                        (real_batch.x_l, real_batch.y_l, real_batch.x_u)))
            ts = _phase_ts(cfg)
            for ph in sorted(set(phases) | {1}):
                _guard_sync(lambda: core.step(batch_, ts[ph]))
            for ph in phases:
                rec = Recorder(sizing=True)
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
    """`fn()`, with the fake tensors' refusals of data access raised as HostSyncError."""
    from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                               DynamicOutputShapeException)
    try:
        return fn()
    except HostSyncError:
        raise
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        raise HostSyncError(f"host sync in the step: {e} at {caller_of(e)}") from e
    except Exception as e:  # noqa: BLE001 - a fake tensor refuses data access (.numpy(), ...)
        msg = str(e)
        if any(k in msg for k in ("data_ptr", "FakeTensor", "fake tensor", "data-dependent",
                                  "numpy", "Cannot access storage")):
            raise HostSyncError(f"host access to tensor data in the step ({type(e).__name__}: "
                                f"{msg.splitlines()[0][:200]}) at {caller_of(e)}") from e
        raise


def count_stream(cfg) -> Recorder | None:
    """The ops of one `stream.next()` of the torch backend on a small synthetic set (2D, SSL4MIS
    format; None for other configurations)."""
    import tempfile
    if cfg.spec.dims != 2 or cfg.data.format != "ssl4mis":
        return None
    from ...config import apply_overrides
    from ...data.factory import build_train_stream
    from ...data.synthetic import write_synthetic_acdc
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_acdc(tmp, n_train_patients=7, slices_per_volume=2, n_val=1, n_test=1,
                             size=(64, 64), seed=0)
        small = apply_overrides(_small_config(cfg, 64, 2),
                                [f"--data.root={tmp}", "--data.labeled_patients=3",
                                 "--data.backend=torch"])
        stream = build_train_stream(small.data, device=torch.device("cpu"), seed=0,
                                    channels=small.model.in_channels)
        stream.next()
        rec = Recorder(sizing=False)
        with rec, rec.in_part("stream"):
            stream.next()
    return rec
