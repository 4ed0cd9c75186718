"""The parts of `bench report`, in order: what each measures, planned against its share of the
budget, recorded row by row in its part of report.json.

A part gets a `Ctx`: its deadline, its record and a way to run a worker (`Ctx.call`: in a child
process when isolating, else in this process). It decides what to measure (and at which shapes,
smaller in a smoke run), skips with a reason what does not apply here or does not fit the time
left, and records every row as it comes (`Ctx.add`, which saves report.json).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .isolation import CallResult, run_in_process, run_isolated
from .workers import NO_CUDA

PART_ORDER = ("environment", "copy", "step", "components", "ops", "upg", "data", "equality", "e2e")
PART_TITLES = {
    "environment": "Environment", "copy": "Device copy bandwidth",
    "step": "Training step", "components": "Connected components (largest-component filter)",
    "ops": "Fused ops vs PyTorch references", "upg": "UPG: fusion head and whole UPG",
    "data": "Data throughput", "equality": "Graph vs eager equality",
    "e2e": "Time to Dice",
}
_W = "ucseg_fast.bench.report.workers"  # the workers' module, as `Ctx.call` names a target


@dataclass
class Ctx:
    """What a part sees: its deadline, where to record, how to run a measurement."""
    name: str
    deadline: float                     # time.time() by which the part must be done
    cuda: bool
    smoke: bool
    isolate: bool
    out: Path
    work: Path                          # scratch folder (synthetic data, child logs)
    data: str | None
    record: dict
    save: Callable[[], None]
    shared: dict = field(default_factory=dict)  # results of earlier parts (copy GB/s, ...)

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, row: dict) -> dict:
        self.record.setdefault("rows", []).append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        self.record.setdefault("notes", []).append(text)

    def call(self, target: str, kwargs: dict, *, label: str, timeout: float | None = None,
             on_row: Callable[[dict], None] | None = None) -> CallResult:
        """Run worker `target` ("module:function", called as fn(emit, deadline, **kwargs)) until
        the part's deadline (or `timeout` seconds, whichever comes first): in a child process
        with a hard kill when isolating, else in this process (the worker itself checks the
        deadline before each measurement). Rows it emitted before failing are kept."""
        deadline = self.deadline if timeout is None else min(self.deadline, time.time() + timeout)
        if self.isolate:
            return run_isolated(target, kwargs, deadline=deadline, work=self.work, label=label,
                                on_row=on_row)
        return run_in_process(target, kwargs, deadline=deadline, on_row=on_row)


def _part_environment(ctx: Ctx) -> None:
    from ..timing import environment
    env = environment()
    ctx.record["env"] = env
    ctx.shared["env"] = env


def _part_copy(ctx: Ctx) -> None:
    nbytes = (4 * 2**20) if ctx.smoke and not ctx.cuda else None
    res = ctx.call(f"{_W}:w_copy", {"nbytes": nbytes}, label="copy")
    for r in res.rows:
        ctx.add(r)
        ctx.shared["copy_gbps"] = r.get("gbps")
    if res.status != "ok":
        raise RuntimeError(res.reason or res.status)


def step_configs(cuda: bool, smoke: bool) -> list[dict]:
    """The step table's configurations, most important first (what runs when the budget is
    short): 2D eager/graph × ops × phase, the 3D step, then compile."""
    if smoke:
        base2, base3 = dict(labeled_bs=1, img=32), dict(labeled_bs=1, img=32)
        steps, warm = 1, 1
    else:
        base2, base3 = dict(labeled_bs=12, img=256), dict(labeled_bs=2, img=96)
        steps, warm = 20, 5
    out = []

    def add(dims, mode, fused, phase2):
        b = base3 if dims == 3 else base2
        out.append(dict(dims=dims, mode=mode, fused=fused, phase2=phase2, steps=steps,
                        warmup=warm, **b))
    for phase2 in (False, True):
        for fused in (False, True):
            for mode in ("eager", "graph"):
                add(2, mode, fused, phase2)
    for mode in ("eager", "graph"):
        add(3, mode, False, False)
    for fused in (False, True):
        add(2, "compile", fused, False)
    for mode in ("eager", "graph"):
        add(3, mode, False, True)
    for fused in (False, True):
        add(2, "compile", fused, True)
    return out


# rough seconds a step config needs on a GPU (process start, cuDNN autotune, compile), and the
# most it may take before it is stopped
_STEP_NEED_S = {"eager": 12, "graph": 15, "compile": 60}
_STEP_CAP_S = {"eager": 90, "graph": 120, "compile": 300}


def graph_nms(cuda: bool) -> tuple[bool, str | None]:
    """(loss.nms, why off): the largest-component rule stays on unless graph mode cannot
    capture it here; then it is off in every mode, so the modes compare the same step."""
    if not cuda:
        return True, None
    import torch
    try:
        from ...train.step import check_graph_capturable
        check_graph_capturable(nms=True, device=torch.device("cuda"), world_size=1,
                               optimizer="foreach")
    except Exception as e:  # noqa: BLE001 -- ValueError names the option; anything else: off too
        return False, (str(e).splitlines() or [type(e).__name__])[0]
    return True, None


def _fill_ledger(row: dict, led: dict | None, why: str | None) -> None:
    """Beside a measured step row: the ledger's estimate for its phase and mode, or why none."""
    if led is None or "error" in led:
        row["ledger"] = f"ledger unavailable: {(led or {}).get('error') or why or 'no result'}"
        return
    ph = (led.get("phases") or {}).get(str(row["phase"])) or {}
    # graph / compile rows: the one-CUDA-graph estimate; eager rows: the eager lower bound
    est = ph.get("eager_ms") if row["mode"] == "eager" and ph.get("eager_ms") is not None \
        else ph.get("est_ms")
    card = led.get("card")
    row.update(ledger_est_ms=est, ledger_kernels=ph.get("kernels"),
               ledger_card=card.get("name") if isinstance(card, dict) else card)


def _part_step(ctx: Ctx) -> None:
    env = ctx.shared.get("env") or {}
    card = env.get("card") or "cpu"
    nms, nms_note = graph_nms(ctx.cuda)
    ctx.record["nms"] = nms
    if nms_note:
        ctx.note(f"loss.nms off in every step row (the same pseudo-label rule in every mode): "
                 f"{nms_note}")
    # the ledger (CPU work) runs after the measurements, never beside them; time kept for it
    reserve = min(60.0, 0.2 * max(ctx.left(), 0.0)) if ctx.cuda else 0.0
    measured: list[dict] = []
    for c in step_configs(ctx.cuda, ctx.smoke):
        row = {"dims": c["dims"], "mode": c["mode"], "ops": "fused" if c["fused"] else "torch",
               "phase": 2 if c["phase2"] else 1, "batch": f"{c['labeled_bs']}+{c['labeled_bs']}",
               "img": c["img"], "nms": nms}
        if not ctx.cuda and (c["mode"] != "eager" or c["fused"] or c["dims"] == 3):
            why = NO_CUDA if c["mode"] != "eager" else \
                f"{NO_CUDA} (the CPU smoke run times the 2D eager step with the PyTorch modules)"
            ctx.add({**row, "status": "skipped", "reason": why})
            continue
        need = _STEP_NEED_S[c["mode"]] if ctx.cuda else 1.0
        left = ctx.left() - reserve
        if left < need:
            ctx.add({**row, "status": "skipped",
                     "reason": f"out of budget ({max(left, 0):.0f} s left, needs ~{need} s)"})
            continue
        kw = dict(c, nms=nms, device="cuda" if ctx.cuda else "cpu")
        label = f"step_{c['dims']}d_{c['mode']}_{row['ops']}_p{row['phase']}"
        res = ctx.call(f"{_W}:w_step", kw, label=label,
                       timeout=min(_STEP_CAP_S[c["mode"]], left) if ctx.cuda else None)
        got = next((r for r in res.rows if r.get("status") == "ok"), None)
        if got is not None:
            row.update({k: got.get(k) for k in ("ms_per_step", "img_per_s", "peak_mem_gb",
                                                "gpu_util", "loss", "device")})
            row["status"] = "ok"
            measured.append(row)
        else:
            row.update(status=res.status if res.status != "ok" else "failed",
                       reason=res.reason or "no result")
        row["seconds"] = round(res.seconds, 1)
        ctx.add(row)
    combos = sorted({(r["dims"], r["ops"] == "fused") for r in measured})
    if not combos:
        return
    res = ctx.call(f"{_W}:w_ledger",
                   {"combos": [list(k) for k in combos], "card": card, "smoke": ctx.smoke,
                    "nms": nms}, label="ledger")
    got = {(r["dims"], r["fused"]): r for r in res.rows}
    for row in measured:
        _fill_ledger(row, got.get((row["dims"], row["ops"] == "fused")), res.reason)
    ctx.save()


def _rounds(ctx: Ctx) -> int:
    return 1 if ctx.smoke else 5


def _component_shapes(ctx: Ctx) -> list[str]:
    return ["tiny_2d", "tiny_3d"] if ctx.smoke else ["acdc_half", "acdc_batch", "la_3d"]


def _part_components(ctx: Ctx) -> None:
    res = ctx.call(f"{_W}:w_components",
                   {"shapes": _component_shapes(ctx), "rounds": _rounds(ctx)},
                   label="components", on_row=ctx.add)
    _finish_call(ctx, res)


def _finish_call(ctx: Ctx, res: CallResult) -> None:
    if res.status != "ok":
        ctx.add({"status": res.status, "reason": res.reason, "what": "the rest of this part"})


def _part_ops(ctx: Ctx) -> None:
    fused = ctx.cuda
    if not fused:
        ctx.note("CPU smoke run: the PyTorch references only (the fused Triton ops are timed on "
                 "CUDA, never under the interpreter)")
    shapes = ["tiny"] if ctx.smoke else ["acdc_unlabeled", "la_3d"]
    dtype = "bf16" if ctx.cuda else "fp32"
    res = ctx.call(f"{_W}:w_ops",
                   {"shapes": shapes, "dtype": dtype, "copy_gbps": ctx.shared.get("copy_gbps"),
                    "fused": fused, "compiled": ctx.cuda, "rounds": _rounds(ctx)},
                   label="ops", on_row=ctx.add)
    _finish_call(ctx, res)


def _part_upg(ctx: Ctx) -> None:
    fused = ctx.cuda
    if not fused:
        ctx.note("CPU smoke run: the PyTorch modules only")
    shapes = ["tiny"] if ctx.smoke else ["acdc", "la_3d"]
    res = ctx.call(f"{_W}:w_upg",
                   {"head_shapes": shapes, "whole_shapes": shapes,
                    "dtype": "bf16" if ctx.cuda else "fp32",
                    "copy_gbps": ctx.shared.get("copy_gbps"), "fused": fused,
                    "compiled": ctx.cuda, "rounds": _rounds(ctx)}, label="upg", on_row=ctx.add)
    _finish_call(ctx, res)


def synthetic_root(ctx: Ctx) -> Path:
    """An ACDC-like SSL4MIS set in the scratch folder, written once per report."""
    root = ctx.work / "synthetic_acdc"
    if not (root / "train_slices.list").exists():
        from ...data.synthetic import write_synthetic_acdc
        if ctx.smoke:
            write_synthetic_acdc(root, n_train_patients=5, slices_per_volume=4, n_val=1, n_test=0,
                                 size=(64, 64), seed=0)
        else:
            write_synthetic_acdc(root, n_train_patients=14, seed=0)
    return root


def _part_data(ctx: Ctx) -> None:
    sets = [("synthetic ACDC-like", str(synthetic_root(ctx)))]
    if ctx.data:
        sets.append((f"--data {ctx.data}", ctx.data))
    for name, root in sets:
        for backend in ("torch", "dali"):
            if ctx.left() < (8 if ctx.isolate else 0.5):
                ctx.add({"dataset": name, "backend": backend, "status": "skipped",
                         "reason": "out of budget"})
                continue
            res = ctx.call(f"{_W}:w_data",
                           {"root": root, "dataset": name, "backend": backend, "smoke": ctx.smoke},
                           label=f"data_{backend}_{len(ctx.record.get('rows', []))}")
            if res.rows:
                for r in res.rows:
                    ctx.add(r)
            else:
                ctx.add({"dataset": name, "backend": backend,
                         "status": res.status if res.status != "ok" else "failed",
                         "reason": res.reason or "no result"})


def _part_equality(ctx: Ctx) -> None:
    root = ctx.data or str(synthetic_root(ctx))
    nms, why = graph_nms(ctx.cuda)
    if why:
        ctx.note(f"loss.nms off in both modes: {why}")
    tiny = (["--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
             "--data.labeled_patients=3", "--loss.queue_size=16"] if ctx.smoke else [])
    res = ctx.call(f"{_W}:w_equality",
                   {"root": root, "out": str(ctx.work / "equality"), "nms": nms,
                    "overrides": tiny}, label="equality", on_row=ctx.add)
    ctx.record["data"] = "--data" if ctx.data else "synthetic ACDC-like"
    _finish_call(ctx, res)


def _part_e2e(ctx: Ctx) -> None:
    share_min = max(ctx.left(), 0) / 60.0
    # training time; process start, data loading and validation come on top
    minutes = round(max(0.05, 0.4 * share_min), 3)
    out = str(ctx.out / "e2e")
    res = ctx.call(f"{_W}:w_e2e",
                   {"root": ctx.data, "minutes": minutes, "out": out, "smoke": ctx.smoke},
                   label="e2e", on_row=ctx.add)
    _finish_call(ctx, res)


PARTS: dict[str, Callable[[Ctx], None]] = {
    "environment": _part_environment, "copy": _part_copy, "step": _part_step,
    "components": _part_components, "ops": _part_ops, "upg": _part_upg, "data": _part_data,
    "equality": _part_equality, "e2e": _part_e2e,
}

