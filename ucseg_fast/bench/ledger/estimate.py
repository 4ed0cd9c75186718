"""The step ledger's numbers: per part of the step, kernels, bytes, FLOPs and a roofline estimate
for a card, and the ledger's Markdown and JSON forms.

The estimate is a roofline over the kernels: per kernel max(bytes / HBM bandwidth, FLOPs /
tensor-core peak of its dtype, `floor_us`), summed per part (`est_ms`, what a captured graph can
approach), and the eager lower bound max(that, kernels × `EAGER_US` of host dispatch). Card
numbers are datasheet values (dense, no sparsity); the floors are assumptions, stated in the
output.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .passes import count_ops, count_stream, size_ops
from .recorder import OpRecord, Recorder


# cards (datasheet numbers, dense) and the kernel floors (assumptions, printed with the ledger)
@dataclass(frozen=True)
class Card:
    """What the roofline needs of a GPU."""
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


@dataclass
class PartLedger:
    """One part of a step (`PARTS`): its kernels, bytes, FLOPs and estimate."""
    kernels: int = 0            # kernel-launching ops (custom ops: their launches)
    dispatched: int = 0         # ops dispatched (custom ops count once)
    bytes: int = 0
    flops: int = 0
    est_us: float = 0.0         # roofline with the per-kernel floor
    ops: Counter = field(default_factory=Counter)


@dataclass
class PhaseLedger:
    """One step of a phase, part by part."""
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
    """The ledger of a configuration on a card: a `PhaseLedger` per phase (and the training
    stream's kernels when asked for)."""
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


def _assemble(phase: int, counted: Recorder, sized: Recorder | None, card: Card) -> PhaseLedger:
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


def _stream_part(cfg) -> PartLedger | None:
    """The training stream's kernels for one batch (`passes.count_stream`) as one part."""
    rec = count_stream(cfg)
    if rec is None:
        return None
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
        side = 32 if cfg.spec.dims == 3 else 64
    counted = count_ops(cfg, side=side, batch=batch, phases=phases)
    sized = size_ops(cfg, phases=phases) if sizes else {}
    dc = cfg.data
    shape = f"batch {dc.labeled_bs} + {dc.unlabeled_bs}, {'×'.join(map(str, dc.img_size))}, " \
            f"amp {cfg.train.amp}, channels-last {cfg.train.channels_last}"
    return Ledger(cfg.name, card_, shape,
                  {ph: _assemble(ph, counted[ph], sized.get(ph), card_) for ph in phases},
                  _stream_part(cfg) if stream else None)


def _card_key(name: str) -> str:
    up = name.upper()
    for k in CARDS:
        if k in up:
            return k
    raise KeyError(f"bench ledger: unknown card {name!r}; known: {', '.join(CARDS)}")
