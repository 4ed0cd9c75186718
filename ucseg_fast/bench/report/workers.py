"""The measurements of `bench report`: one worker per kind of measurement, each a function
`w_<what>(emit, deadline, **kwargs)` that emits result rows and checks the deadline before each
measurement (`isolation`). The parts (`parts`) call them by name, in a child process on CUDA.

Rows say what was measured and how (`status` ok, or skipped / n/a / failed with a `reason`);
one measurement failing is recorded in its row and the worker goes on to the next.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from .isolation import check_budget, error_line, fits, free_memory

NO_CUDA = "no CUDA device"


def w_selftest(emit, deadline, *, sleep: float = 0.0, fail: bool = False, rows: int = 1) -> None:
    """Emits `rows` rows, then sleeps or raises: checks the isolation machinery (tests)."""
    for i in range(rows):
        emit({"i": i, "pid": os.getpid()})
    if sleep:
        time.sleep(sleep)
    if fail:
        raise RuntimeError("selftest failure")


def w_copy(emit, deadline, *, nbytes: int | None = None) -> None:
    """The device-to-device copy bandwidth."""
    from ..timing import copy_bandwidth
    r = copy_bandwidth(nbytes)
    emit({"status": "ok", **{k: r[k] for k in ("gbps", "us", "nbytes", "bytes_moved", "mode",
                                                "mode_text", "iters", "rounds", "fallback",
                                                "device")}})


def w_step(emit, deadline, **cfg) -> None:
    """One step configuration (`train.bench.bench_step`)."""
    from ...train.bench import bench_step
    res = bench_step(**cfg)
    keep = ("device", "mode", "phase", "batch", "img", "dims", "nms", "fused", "ms_per_step",
            "img_per_s", "loss", "peak_mem_gb", "gpu_util", "power_w")
    emit({"status": "ok", **{k: res[k] for k in keep if k in res}})


def _time_row(fn, *, graph: bool, device=None, host_clock: bool = False, rounds: int = 5,
              nbytes: int | None = None, copy_gbps: float | None = None) -> dict:
    from ..timing import gbps, time_kernel
    r = time_kernel(fn, rounds=rounds, graph=graph, device=device, host_clock=host_clock,
                    warmup=3 if rounds > 1 else 1)  # one round = a smoke run: one warm-up call
    row = {"us": r["us"], "ms": r["us"] / 1e3, "mode": r["mode"], "iters": r["iters"],
           "rounds": r["rounds"]}
    if r["fallback"]:
        row["fallback"] = r["fallback"]
    if nbytes:
        row["bytes_min"] = int(nbytes)
        row["gbps"] = gbps(nbytes, r["us"])
        if row["gbps"] and copy_gbps:
            row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
    return row


def w_components(emit, deadline, *, shapes: list[str], rounds: int = 5) -> None:
    """The largest-component filter per backend, each checked against scipy."""
    import torch

    from ... import native
    from ...ops import components as cc
    from ..targets import CC_SHAPES, cc_labels
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    lib = native.load()
    triton_fn = getattr(cc, "largest_component_triton", None)
    for name in shapes:
        shape, C = CC_SHAPES[name]
        base = {"shape_name": name, "shape": list(shape), "classes": C}
        if not fits(deadline, 1.0):
            emit({**base, "backend": "all", "status": "skipped", "reason": "out of budget"})
            continue
        lab_cpu = cc_labels(shape, C)
        ref = cc.largest_component_scipy(lab_cpu, C)
        lab = lab_cpu.to(dev)
        backends: list[tuple[str, Callable | None, dict, str | None]] = []
        if lib is None:
            backends.append(("native", None, {}, f"not available: {native.unavailable_reason()}"))
        elif cuda and not lib.has_cuda:
            backends.append(("native", None, {}, "not available: library built without CUDA"))
        else:
            backends.append(("native", lambda: lib.largest_component(lab, C),
                             {"graph": True}, None))
        if triton_fn is None:
            backends.append(("triton", None, {}, "not available: no "
                             "ucseg_fast.ops.components.largest_component_triton"))
        elif not cuda:
            backends.append(("triton", None, {}, f"skipped: {NO_CUDA} (not timed under the "
                             "Triton interpreter)"))
        else:
            backends.append(("triton", lambda: triton_fn(lab, C), {"graph": True}, None))
        # the fallback syncs with the host every iteration: eager launches only
        backends.append(("torch", lambda: cc.largest_component_torch(lab, C), {"graph": False}, None))
        # the reference's path: copy to the host, scipy per item and class, copy back
        backends.append(("scipy", lambda: cc.largest_component_scipy(lab, C),
                         {"graph": False, "host_clock": cuda}, None))
        for bname, fn, kw, why in backends:
            row = {**base, "backend": bname}
            if fn is None:
                emit({**row, "status": "skipped" if why.startswith("skipped") else "n/a",
                      "reason": why.removeprefix("skipped: ")})
                continue
            if not fits(deadline, 1.0):
                emit({**row, "status": "skipped", "reason": "out of budget"})
                continue
            try:
                out = fn()
                row["matches_scipy"] = bool(torch.equal(out.cpu(), ref))
                row.update(_time_row(fn, rounds=rounds, **kw))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 -- one backend failing must not hide the rest
                row.update(status="failed", reason=error_line(e))
            emit(row)
        backends.clear()  # the closures hold this shape's tensors
        free_memory()


def _timed_target(emit, row: dict, build: Callable, info_keys: tuple[str, ...],
                  copy_gbps: float | None, rounds: int) -> None:
    """Build a benchmark target, time it under graph replay (GB/s and % of copy), emit the row
    (a failure is recorded in the row; the table goes on)."""
    from ..timing import peak_memory
    try:
        t = build()
        row.update({k: t.info.get(k) for k in info_keys if k in t.info})
        row.update(_time_row(t.fn, graph=True, nbytes=t.nbytes, copy_gbps=copy_gbps,
                             rounds=rounds))
        row["peak_mb"] = peak_memory(t.fn)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- recorded; the report goes on
        row.update(status="failed", reason=error_line(e))
    emit(row)
    free_memory()


# the op table of the report: (op, pass)
REPORT_OPS = (("evidential_uncertainty", "fwd"), ("evidential_uncertainty", "fwd_bwd"),
              ("entropy_pseudo_label", "fwd"), ("pseudo_label_loss", "fwd_bwd"),
              ("cps_step", "fwd_bwd"), ("fusion_unsup_losses", "fwd_bwd"),
              ("segmentation_loss_terms", "fwd_bwd"))


def w_ops(emit, deadline, *, shapes: list[str], dtype: str, copy_gbps: float | None,
          fused: bool, compiled: bool, rounds: int = 5) -> None:
    """The fused ops against their references: graph timing of every target; the compiled
    references last (Inductor compiles cost seconds each), while the budget allows."""
    from ..targets import OP_SHAPES, op_target

    def one(op, pass_, shape_name, provider):
        row = {"op": op, "pass": pass_, "shape_name": shape_name,
               "shape": list(OP_SHAPES[shape_name]), "dtype": dtype, "provider": provider}
        if not fits(deadline, 1.0):
            emit({**row, "status": "skipped", "reason": "out of budget"})
            return
        _timed_target(emit, row, lambda: op_target(op, OP_SHAPES[shape_name], dtype, provider,
                                                  pass_), ("backend_ran",), copy_gbps, rounds)

    for shape_name in shapes:
        for op, pass_ in REPORT_OPS:
            provs = ["reference_eager"] + (["ours"] if fused else [])
            if fused and op == "cps_step":
                provs.append("ours_fused")
            for p in provs:
                one(op, pass_, shape_name, p)
    if compiled:
        for shape_name in shapes:
            for op, pass_ in REPORT_OPS:
                one(op, pass_, shape_name, "reference_compiled")


def w_upg(emit, deadline, *, head_shapes: list[str], whole_shapes: list[str], dtype: str,
          copy_gbps: float | None, fused: bool, compiled: bool, rounds: int = 5) -> None:
    """The UPG fusion head and the whole UPG against the PyTorch modules (and, on CUDA,
    their compiled forms last)."""
    from ..targets import UPG_SHAPES, WHOLE_SHAPES, upg_head_target, upg_whole_target

    def one(part, shape_name, provider, pass_="fwd_bwd"):
        shapes, build = ((UPG_SHAPES, upg_head_target) if part == "head"
                         else (WHOLE_SHAPES, upg_whole_target))
        row = {"op": f"upg_{part}", "pass": pass_, "shape_name": shape_name,
               "shape": list(shapes[shape_name]), "dtype": dtype, "provider": provider}
        if not fits(deadline, 1.0):
            emit({**row, "status": "skipped", "reason": "out of budget"})
            return
        _timed_target(emit, row, lambda: build(shapes[shape_name], dtype, provider, pass_),
                      ("backend_ran", "dot_precision"), copy_gbps, rounds)

    plan = []
    for s in head_shapes:
        plan += [("head", s, "eager")] + ([("head", s, "fused")] if fused else [])
    for s in whole_shapes:
        plan += [("whole", s, "eager")] + ([("whole", s, "fused_tokens")] if fused else [])
    if compiled:
        plan += [("head", s, "compiled") for s in head_shapes]
        plan += [("whole", s, "compiled") for s in whole_shapes]
    for part, s, p in plan:
        one(part, s, p)


def _data_config(root: str, backend: str, smoke: bool):
    """The `acdc_2d` preset's data on `root` through `backend` (tiny in a smoke run)."""
    from ...config import load_config
    ov = [f"--data.root='{root}'", f"--data.backend='{backend}'"]
    if smoke:
        ov += ["--data.img_size=[32,32]", "--data.labeled_bs=2", "--data.unlabeled_bs=2",
               "--data.labeled_patients=3"]
    return load_config("acdc_2d", ov)


def w_data(emit, deadline, *, root: str, dataset: str, backend: str, smoke: bool) -> None:
    """Batches/s and img/s of the training stream of `backend` on `root`."""
    import torch

    from ...data.factory import build_train_stream
    cfg = _data_config(root, backend, smoke)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    row = {"dataset": dataset, "backend": backend, "img": list(cfg.data.img_size), "device": dev,
           "batch": f"{cfg.data.labeled_bs}+{cfg.data.unlabeled_bs}"}
    if backend == "dali":
        from ...data.dali import dali_unavailable_reason
        why = dali_unavailable_reason()
        if why:
            emit({**row, "status": "n/a", "reason": f"not available: {why}"})
            return
    check_budget(deadline, f"the {backend} stream")
    stream = build_train_stream(cfg.data, device=dev, seed=0)
    stream.next()  # the first batch (pipeline build, cache upload) outside the timing
    r = _time_row(stream.next, graph=False, host_clock=True, rounds=5)
    n = cfg.data.labeled_bs + cfg.data.unlabeled_bs
    sec = r["us"] / 1e6
    emit({**row, "status": "ok", "batches_per_s": 1.0 / sec, "img_per_s": n / sec,
          "ms_per_batch": r["ms"], "mode": r["mode"], "iters": r["iters"], "rounds": r["rounds"]})


def w_equality(emit, deadline, *, root: str, out: str, steps: int = 20, switch: int = 10,
               modes: tuple[str, ...] = ("eager", "graph", "eager"), nms: bool = True,
               overrides: list[str] | None = None) -> None:
    """`steps` training steps of the ACDC recipe per mode, from identical seeds (same weights,
    batches and copy-paste draws), phase 2 from step `switch`: the total loss L per step. The
    third run (eager again) is the run-to-run noise of eager itself."""
    import torch

    from ...config import load_config
    from ...train import Trainer
    losses: list[list[float]] = []
    phase2_from: list[int | None] = []
    for i, mode in enumerate(modes):
        check_budget(deadline, f"the {mode} run")
        ov = [f"--data.root='{root}'", f"--loss.phase2_start={switch}",
              f"--train.step_mode='{mode}'", f"--train.out_dir='{out}/run{i}_{mode}'",
              "--train.progress=false", f"--loss.nms={'true' if nms else 'false'}",
              *(overrides or [])]
        cfg = load_config("acdc_2d", ov)
        tr = Trainer(cfg, log=lambda s: None)
        Ls, p2 = [], None
        for t in range(steps):
            terms = tr.step(tr.stream.next(), t)
            if p2 is None and "mix1" in terms:
                p2 = t
            Ls.append(float(terms["L"]))  # sync-ok: equality check, not a timing
            del terms  # graph mode: views of the graph's static outputs
        losses.append(Ls)
        phase2_from.append(p2)
        emit({"kind": "run", "mode": mode, "run": i, "runner_mode": tr.runner.mode,
              "phase2_from": p2, "losses": Ls})
        del tr
        free_memory()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def rel(a, b):
        return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    if len(losses) >= 2:
        d = rel(losses[1], losses[0])
        emit({"kind": "compare", "a": modes[1], "b": modes[0], "rel_diff": d,
              "max_rel_diff": max(d) if d else None,
              "identical_steps": sum(x == y for x, y in zip(losses[1], losses[0]))})
    if len(losses) >= 3:
        d = rel(losses[2], losses[0])
        emit({"kind": "noise", "a": modes[2], "b": modes[0], "rel_diff": d,
              "max_rel_diff": max(d) if d else None,
              "identical_steps": sum(x == y for x, y in zip(losses[2], losses[0]))})


def w_e2e(emit, deadline, *, root: str, minutes: float, out: str, smoke: bool,
          step_mode: str | None = None) -> None:
    """The ACDC preset as the engine trains it by default (its step mode unless `step_mode`)."""
    from ...config import load_config
    from ...train.bench import bench_e2e
    ov = [f"--data.root='{root}'", "--train.progress=false"]
    if step_mode:
        ov.append(f"--train.step_mode='{step_mode}'")
    val_every = None  # planned from the budget (train.budget)
    if smoke:
        val_every = 2
        ov += ["--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
               "--train.max_iterations=4", "--train.amp='none'", "--train.channels_last=false",
               "--train.max_val_volumes=1", "--loss.queue_size=16", "--loss.phase2_start=2"]
    else:
        ov += ["--train.max_val_volumes=8"]
    cfg = load_config("acdc_2d", ov)
    res = bench_e2e(cfg, minutes=minutes, out_dir=out, val_every=val_every, log=lambda s: None)
    emit({"status": "ok", **res, "out_dir": out})


def ledger_config(dims: int, fused: bool, smoke: bool, nms: bool):
    """The Config of the measured step (`train.bench.step_config`, as `bench_step` builds it):
    the same preset, batch, size, ops and nms."""
    from ...train.bench import step_config
    bs, img = (1, 32) if smoke else ((2, 96) if dims == 3 else (12, 256))
    return step_config(labeled_bs=bs, img=img, nms=nms, dims=dims, fused=fused)


def ledger_estimate(dims: int, fused: bool, card: str, smoke: bool, *, nms: bool = True) -> dict:
    """The step ledger's per-phase estimate of a measured step config, or {"error": reason}."""
    try:
        from ..ledger import step_ledger
        d = step_ledger(ledger_config(dims, fused, smoke, nms), card=card).to_dict()
        return {"card": d.get("card"), "phases": d.get("phases", {})}
    except Exception as e:  # noqa: BLE001 -- another module's estimate; never fatal here
        return {"error": error_line(e)}


def w_ledger(emit, deadline, *, combos: list, card: str, smoke: bool, nms: bool) -> None:
    """The step ledger of each (dims, fused) in `combos`, one row each, while time is left."""
    for dims, fused in combos:
        if not fits(deadline, 0.5):
            emit({"dims": dims, "fused": fused, "error": "out of budget"})
            continue
        emit({"dims": dims, "fused": fused, **ledger_estimate(dims, fused, card, smoke, nms=nms)})

