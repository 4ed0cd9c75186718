"""One full UC-Seg training step on synthetic device data (no I/O): the ACDC recipe (2D,
batch 12+12, 256², 4 classes, softmax) or, with ``dims=3``, the LA recipe (3D, batch 2+2,
96³, 2 classes, sigmoid, queues of 144)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import build_ucseg_2d, build_ucseg_3d
from .objective import UCSegObjective
from .schedules import ScheduleTensors


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


def build_step(*, labeled_bs: int = 12, img: int = 256, num_classes: int = 4,
               device: str | torch.device = "auto", phase2: bool = False, nms: bool = True,
               mode: str = "eager", compile_mode: str = "default",
               compile_backend: str = "inductor", dims: int = 2, fused: bool = False):
    """(step(batch) -> loss, batch, device): the Trainer's StepRunner around a fresh model;
    `mode` eager | compile | graph (graph: the first `warmup` calls are eager, then replays).
    ``dims=3``: the LA recipe's step (3D pair, C = 2, sigmoid supervision, queues of 144,
    phase 2 from 6 000); `num_classes` is then 2. ``fused=True``: the fused ops (evidential
    uncertainty, UPG head, losses), as `model.uncertainty = model.upg_head = "fused"`,
    `loss.fused_losses = true`."""
    if dims not in (2, 3):
        raise ValueError(f"build_step: dims must be 2 or 3, got {dims}")
    from .step import StepRunner, check_graph_capturable, foreach_sgd_step
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    if mode == "graph":
        check_graph_capturable(nms=nms, device=dev, world_size=1, optimizer="foreach")
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if dims == 3:
        model = build_ucseg_3d(num_classes=2, in_channels=1, img_size=(img, img, img),
                               head_impl="fused" if fused else "torch").to(dev)
        mf = torch.channels_last_3d if dev.type == "cuda" else torch.contiguous_format
        objective = UCSegObjective(2, nms=nms, supervision="sigmoid", queue_size=144,
                                   fused_losses=fused).to(dev)
        scalars = ScheduleTensors(dev, thr_base=0.2, thr_span=0.56)
        scalars.update(7000 if phase2 else 3000)
    else:
        model = build_ucseg_2d(num_classes=num_classes, img_size=(img, img),
                               head_impl="fused" if fused else "torch").to(dev)
        mf = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        objective = UCSegObjective(num_classes, nms=nms, fused_losses=fused).to(dev)
        scalars = ScheduleTensors(dev)
        scalars.update(13000 if phase2 else 3000)
    if fused:
        from ..ops import evidential_uncertainty
        model.uncertainty_fn = evidential_uncertainty
        model.fused_tokens = True
    model.to(memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5,
                          foreach=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    amp = torch.bfloat16 if dev.type == "cuda" else None

    def autocast():
        return torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext()

    runner = StepRunner(
        model=model, mode=mode, device=dev, memory_format=mf, autocast=autocast,
        forward=lambda m, x, y, p2: objective(m, x, y, scalars, p2, generator=gen),
        update=lambda: foreach_sgd_step(opt, scalars.lr), generators=(gen,),
        compile_mode=compile_mode, compile_backend=compile_backend)

    def step(batch) -> torch.Tensor:
        return runner(batch, phase2)["L"]
    batch = (synthetic_batch_3d(labeled_bs, labeled_bs, img, dev) if dims == 3
             else synthetic_batch(labeled_bs, labeled_bs, img, num_classes, dev))
    return step, batch, dev


def bench_step(*, steps: int = 20, warmup: int = 5, phase2: bool = False, device="auto",
               labeled_bs: int = 12, img: int = 256, mode: str = "eager",
               compile_mode: str = "default", compile_backend: str = "inductor",
               nms: bool = True, dims: int = 2, fused: bool = False) -> dict:
    step, batch, dev = build_step(labeled_bs=labeled_bs, img=img, device=device, phase2=phase2,
                                  mode=mode, compile_mode=compile_mode,
                                  compile_backend=compile_backend, nms=nms, dims=dims,
                                  fused=fused)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(max(warmup, 4 if mode == "graph" else 1)):  # graph: 3 eager + capture
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
           "mode": mode, "phase": 2 if phase2 else 1, "batch": f"{labeled_bs}+{labeled_bs}",
           "img": img, "dims": dims, "nms": nms, "fused": fused, "ms_per_step": dt * 1000, "img_per_s": 2 * labeled_bs / dt,
           "loss": float(loss), "torch": torch.__version__, **tel}  # sync-ok: after timing
    if dev.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


def bench_e2e(cfg, *, minutes: float, out_dir: str | Path, val_every: int | None = None,
              log=print) -> dict:
    """Train `cfg` (the ACDC recipe) for a wall-clock budget of training time, validating every
    `val_every` iterations; write `dice_vs_time.json` and `dice_vs_time.png` into `out_dir`.

    The budget counts step time only (validation and checkpoints are excluded, see
    `Trainer.train(time_budget_s=)`), so the curve is Dice against training seconds."""
    import dataclasses
    import json
    from .trainer import Trainer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if val_every is not None:
        tc = dataclasses.replace(tc, val_every=val_every)
    # logging every val_every keeps the budget check (a sync) off all other iterations
    tc = dataclasses.replace(tc, out_dir=str(out / "run"),
                             log_every=min(tc.log_every, tc.val_every))
    cfg = dataclasses.replace(cfg, train=tc)
    trainer = Trainer(cfg, log=log)
    summary = trainer.train(time_budget_s=60.0 * minutes)
    curve = [{"iteration": r["iteration"], "train_s": r.get("train_s", 0.0),
              "val_dice": r["val_dice"]} for r in summary["history"]]
    dev = trainer.device
    res = {"config": cfg.name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else "cpu", "step_mode": trainer.runner.mode, "minutes": minutes,
           "iterations": summary["iterations"], "train_s": summary["train_s"],
           "best_val_dice": summary["best_val_dice"], "best_iteration": summary["best_iteration"],
           "batch": f"{cfg.data.labeled_bs}+{cfg.data.unlabeled_bs}",
           "img_size": list(cfg.data.img_size), "torch": torch.__version__, "curve": curve}
    (out / "dice_vs_time.json").write_text(json.dumps(res, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["train_s"] / 60 for c in curve], [c["val_dice"] for c in curve], "o-")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{cfg.name}, {res['device']}, {res['step_mode']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_time.png", dpi=120)
    plt.close(fig)
    return res
