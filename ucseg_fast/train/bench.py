"""One full UC-Seg training step on synthetic device data (no I/O): the ACDC recipe (2D,
batch 12+12, 256², 4 classes, softmax) or, with ``dims=3``, the LA recipe (3D, batch 2+2,
96³, 2 classes, sigmoid, queues of 144)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class _Batch:
    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor


def synthetic_batch(labeled_bs: int, unlabeled_bs: int, img: int, num_classes: int,
                    device: torch.device, seed: int = 0) -> _Batch:
    """Images with disc-shaped classes so pseudo-labels and components are realistic."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = labeled_bs + unlabeled_bs
    yy, xx = torch.meshgrid(torch.arange(img), torch.arange(img), indexing="ij")
    labels = torch.zeros(B, img, img, dtype=torch.int64)
    for b in range(B):
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.3) * img
        r = (0.08 + 0.06 * torch.rand((), generator=g)) * img
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        labels[b][d < r * 2.0] = 1
        labels[b][d < r * 1.4] = 2
        labels[b][d < r] = 3
    x = labels.float() / (num_classes - 1) + 0.2 * torch.randn(B, img, img, generator=g)
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)
    return _Batch(x[:labeled_bs].to(device), labels[:labeled_bs].to(device),
                  x[labeled_bs:].to(device))


def synthetic_batch_3d(labeled_bs: int, unlabeled_bs: int, img: int, device: torch.device,
                       seed: int = 0) -> _Batch:
    """LA-like 3D batch: one ellipsoidal foreground blob per volume, 1 input channel."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = labeled_bs + unlabeled_bs
    ax = torch.arange(img, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    labels = torch.zeros(B, img, img, img, dtype=torch.int64)
    for b in range(B):
        c = (torch.rand(3, generator=g) * 0.3 + 0.35) * img
        r = (torch.rand(3, generator=g) * 0.1 + 0.15) * img
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        labels[b][d < 1] = 1
    x = (labels.float() + 0.3 * torch.randn(B, img, img, img, generator=g)).unsqueeze(1)
    return _Batch(x[:labeled_bs].to(device), labels[:labeled_bs].to(device),
                  x[labeled_bs:].to(device))


def step_config(*, labeled_bs: int = 12, img: int = 256, num_classes: int = 4, nms: bool = True,
                mode: str = "eager", compile_mode: str = "default", dims: int = 2,
                fused: bool | str = False):
    """The Config of `bench step`: the `acdc_2d` preset or, ``dims=3``, the `la_3d` preset, at
    the given batch / size / options (the step's torch.compile backend is `build_step`'s)."""
    from ..config import load_config
    if dims not in (2, 3):
        raise ValueError(f"build_step: dims must be 2 or 3, got {dims}")
    f = "true" if fused is True else ("false" if fused is False else '"auto"')
    ov = [f"--data.labeled_bs={labeled_bs}", f"--data.unlabeled_bs={labeled_bs}",
          f"--loss.nms={'true' if nms else 'false'}", f"--train.step_mode={mode}",
          f"--train.compile_mode={compile_mode}", f"--loss.fused_losses={f}"]
    op = "fused" if fused is True else ("torch" if fused is False else "auto")
    ov += [f"--model.uncertainty={op}", f"--model.upg_head={op}"]
    if dims == 3:
        return load_config("la_3d", ov + [f"--data.img_size=[{img},{img},{img}]"])
    return load_config("acdc_2d", ov + [f"--data.img_size=[{img},{img}]",
                                        f"--data.num_classes={num_classes}"])


def build_step(*, labeled_bs: int = 12, img: int = 256, num_classes: int = 4,
               device: str | torch.device = "auto", phase2: bool = False, nms: bool = True,
               mode: str = "eager", compile_mode: str = "default",
               compile_backend: str = "inductor", dims: int = 2, fused: bool | str = False):
    """(step(batch) -> loss, batch, device): the Trainer's own step (`StepCore`) around a fresh
    model on a synthetic batch; `mode` auto | eager | compile | graph (graph: the first
    `warmup` calls are eager, then replays). ``dims=3``: the LA recipe's step (3D pair, C = 2,
    sigmoid supervision, queues of 144, phase 2 from 6 000); `num_classes` is then 2.
    ``fused``: True = the fused ops (evidential uncertainty, UPG head, losses and predictions),
    False = the PyTorch modules, "auto" = what the configuration's default picks (fused on
    CUDA)."""
    from .core import build_step_core
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    cfg = step_config(labeled_bs=labeled_bs, img=img, num_classes=num_classes, nms=nms, mode=mode,
                      compile_mode=compile_mode, dims=dims, fused=fused)
    torch.manual_seed(0)
    core = build_step_core(cfg, dev, compile_backend=compile_backend)
    t = cfg.loss.phase2_start + 1000 if phase2 else 3000

    def step(batch) -> torch.Tensor:
        return core.step(batch, t)["L"]
    batch = (synthetic_batch_3d(labeled_bs, labeled_bs, img, dev) if dims == 3
             else synthetic_batch(labeled_bs, labeled_bs, img, num_classes, dev))
    step.core = core  # type: ignore[attr-defined]
    return step, batch, dev


def bench_step(*, steps: int = 20, warmup: int = 5, phase2: bool = False, device="auto",
               labeled_bs: int = 12, img: int = 256, mode: str = "eager",
               compile_mode: str = "default", compile_backend: str = "inductor",
               nms: bool = True, dims: int = 2, fused: bool | str = False) -> dict:
    step, batch, dev = build_step(labeled_bs=labeled_bs, img=img, device=device, phase2=phase2,
                                  mode=mode, compile_mode=compile_mode,
                                  compile_backend=compile_backend, nms=nms, dims=dims,
                                  fused=fused)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    graph = step.core.runner.mode == "graph"  # type: ignore[attr-defined]
    for _ in range(max(warmup, 4 if graph else 1)):  # graph: 3 eager + capture
        step(batch)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from ..telemetry import GpuSampler
    gpu = GpuSampler(dev.index or 0 if dev.type == "cuda" else None).start()
    gpu.window()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    sync()
    dt = (time.perf_counter() - t0) / steps
    tel = gpu.window()
    gpu.stop()
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "mode": step.core.runner.mode,  # type: ignore[attr-defined]
           "phase": 2 if phase2 else 1, "batch": f"{labeled_bs}+{labeled_bs}",
           "img": img, "dims": dims, "nms": nms, "fused": fused, "ms_per_step": dt * 1000,
           "img_per_s": 2 * labeled_bs / dt,
           "loss": float(loss), "torch": torch.__version__, **tel}  # sync-ok: after timing
    if dev.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


def dice_curve(history: list[dict]) -> list[dict]:
    """The validation rows of a run's log / history: iteration, val_dice, train_s (step time)
    and wall_s (since the start, validation included; absent in logs that predate it)."""
    return [{k: r[k] for k in ("iteration", "val_dice", "train_s", "wall_s", "val_s") if k in r}
            for r in history if "val_dice" in r]


def read_run_curve(folder: str | Path) -> list[dict]:
    """`dice_curve` of a run folder's metrics.jsonl."""
    import json
    from .checkpoint import LOG_NAME
    path = Path(folder) / LOG_NAME
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{i}: not a JSON row") from None
    curve = dice_curve(rows)
    if not curve:
        raise ValueError(f"{path}: no validation row (val_dice) in this log")
    return curve


def plot_dice_curves(curves: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """One PNG: validation Dice against wall-clock minutes (validation included; step time
    where a log has no wall clock) of every run in `curves`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    clock = "wall_s" if all("wall_s" in c for cv in curves.values() for c in cv) else "train_s"
    for name, curve in curves.items():
        ax.plot([c[clock] / 60 for c in curve], [c["val_dice"] for c in curve], "o-",
                ms=3, label=name)
    ax.set_xlabel("wall-clock time (min), validation included" if clock == "wall_s"
                  else "training time (min)")
    ax.set_ylabel("validation Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bench_e2e(cfg, *, minutes: float, out_dir: str | Path, val_every: int | None = None,
              variants: dict[str, list[str]] | None = None, log=print) -> dict:
    """Time to Dice: train `cfg` -- or each of `variants` (name -> config overrides, e.g.
    {"ssl": [], "supervised": ["loss.semi_supervised=false"]}) in turn -- within `minutes` of
    wall-clock time each, and write `dice_vs_time.json` and one `dice_vs_time.png` of all of
    them into `out_dir` (each run in `out_dir/<name>`).

    `val_every=None` plans each run to fill its budget (`train.budget`: a probe, then
    max_iterations and val_every, proportional schedules). With `val_every` the configuration
    trains as given and the budget only stops it (a smoke test at a fixed length).

    A benchmark run: `out_dir` is its output, so each training run replaces whatever an
    earlier `bench e2e` left in its folder (`overwrite=True`); the folder is still locked for
    the run (two benchmarks on one folder refuse each other)."""
    import dataclasses
    import json
    from ..config import apply_overrides
    from .budget import train_for_budget
    from .trainer import Trainer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = variants or {cfg.name: []}
    runs: dict[str, dict] = {}
    for name, overrides in variants.items():
        v = apply_overrides(cfg, [o if o.startswith("--") else f"--{o}" for o in overrides])
        tc = dataclasses.replace(v.train, out_dir=str(out / name))
        if val_every is not None:
            # logging every val_every keeps the budget check (a sync) off other iterations
            tc = dataclasses.replace(tc, val_every=val_every,
                                     log_every=min(tc.log_every, val_every))
        v = dataclasses.replace(v, train=tc)
        if val_every is None:
            summary = train_for_budget(v, minutes, log=log, overwrite=True)
        else:
            t0 = time.perf_counter()
            trainer = Trainer(v, log=log, overwrite=True)
            summary = trainer.train(time_budget_s=60.0 * minutes)
            summary.update(elapsed_s=time.perf_counter() - t0, step_mode=trainer.runner.mode,
                           device=(torch.cuda.get_device_name(trainer.device)
                                   if trainer.device.type == "cuda" else "cpu"))
        runs[name] = {
            "overrides": list(overrides), "step_mode": summary["step_mode"],
            "iterations": summary["iterations"], "train_s": summary["train_s"],
            "wall_s": summary["wall_s"], "val_s": summary["val_s"],
            "val_share": summary["val_share"], "elapsed_s": summary["elapsed_s"],
            "best_val_dice": summary["best_val_dice"],
            "best_iteration": summary["best_iteration"], "plan": summary.get("plan"),
            "curve": dice_curve(summary["history"])}
        device = summary["device"]
    first = next(iter(runs.values()))
    res = {"config": cfg.name, "device": device, "minutes": minutes,
           "batch": f"{cfg.data.labeled_bs}+{cfg.data.unlabeled_bs}",
           "img_size": list(cfg.data.img_size), "torch": torch.__version__,
           "runs": runs,
           # the first run's figures at the top level (one-run readers, the report)
           **{k: first[k] for k in ("step_mode", "iterations", "train_s", "wall_s", "val_share",
                                    "best_val_dice", "best_iteration", "curve")}}
    (out / "dice_vs_time.json").write_text(json.dumps(res, indent=1))
    plot_dice_curves({n: r["curve"] for n, r in runs.items()}, out / "dice_vs_time.png",
                     f"{cfg.name}, {device}, {minutes:g} min each")
    return res
