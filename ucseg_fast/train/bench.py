"""One full UC-Seg training step at the ACDC shape on synthetic device data (no I/O)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models import build_ucseg_2d
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


def make_step(model, objective, optimizer, scalars, amp_dtype, memory_format, phase2,
              generator):
    def step(batch) -> torch.Tensor:
        x = torch.cat([batch.x_l, batch.x_u], 0).contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None \
            else torch.autocast(x.device.type, enabled=False)
        with ctx:
            loss, _ = objective(model, x, batch.y_l, scalars, phase2, generator=generator)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def build_step(*, labeled_bs: int = 12, img: int = 256, num_classes: int = 4,
               device: str | torch.device = "auto", phase2: bool = False, nms: bool = True):
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_ucseg_2d(num_classes=num_classes, img_size=(img, img)).to(dev)
    mf = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model.to(memory_format=mf)
    objective = UCSegObjective(num_classes, nms=nms).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5,
                          foreach=True)
    scalars = ScheduleTensors(dev)
    scalars.update(13000 if phase2 else 3000)
    gen = torch.Generator(device=dev).manual_seed(1)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    step = make_step(model, objective, opt, scalars, amp, mf, phase2, gen)
    batch = synthetic_batch(labeled_bs, labeled_bs, img, num_classes, dev)
    return step, batch, dev


def bench_step(*, steps: int = 20, warmup: int = 5, phase2: bool = False, device="auto",
               labeled_bs: int = 12, img: int = 256) -> dict:
    step, batch, dev = build_step(labeled_bs=labeled_bs, img=img, device=device, phase2=phase2)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(batch)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    sync()
    dt = (time.perf_counter() - t0) / steps
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "phase": 2 if phase2 else 1, "batch": f"{labeled_bs}+{labeled_bs}",
           "img": img, "ms_per_step": dt * 1000, "img_per_s": 2 * labeled_bs / dt,
           "loss": float(loss), "torch": torch.__version__}
    if dev.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res
