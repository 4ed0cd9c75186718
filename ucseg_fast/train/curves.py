"""Loss curves of configuration variants trained from identical seeds.

The question this answers: does a change that should not alter the math (the fused UPG, the fused
losses, a step mode) follow the baseline's training curve, and is what remains of the difference
smaller than what the precision itself does? Every variant is the same config plus its own
overrides, so all of them start from the same weights, draw the same batches in the same order
and the same copy-paste boxes (`train.seed`). The *noise floor* is the difference between the
baseline and a variant that changes only the precision (by default: the baseline without
autocast against the baseline in bf16 autocast; on CUDA the Trainer allows TF32 matmuls and
convolutions, so that run is the trainer's full-precision setting): a variant "follows" the
baseline when its difference is within `factor` times that floor (or within `rtol` where there
is no floor, e.g. an fp32 run).

Measure: total loss L per step; means over consecutive windows of `window` steps (one window of
all steps when fewer); deviation = max over windows of |mean_v - mean_base| / |mean_base|. Single
terms (sup, pseudo, unsup, ...) are reported the same way, for diagnosis. Per-step values are
collected on the device and read once at the end (no sync inside the run).

`ucseg-fast bench curves` runs it from the CLI and writes `curves.json` + `curves.png`.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Config, apply_overrides, phase2_start_at

#: the fused UPG against the PyTorch modules, and the precision noise floor of the baseline
UPG_VARIANTS: dict[str, list[str]] = {
    "oracle": ["model.uncertainty='torch'", "model.upg_head='torch'"],
    "fused": ["model.uncertainty='fused'", "model.upg_head='fused'"],
    "oracle_fp32": ["model.uncertainty='torch'", "model.upg_head='torch'", "train.amp='none'"],
}
#: terms reported beside L (when present in the step's terms)
DIAG_TERMS = ("sup1", "sup2", "pseudo", "unsup1", "unsup2", "ic", "ife1", "ife2")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:key=value key=value' (whitespace-separated overrides, TOML values) -> (name, list)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME:section.key=value [section.key=value ...]")
    return name, shlex.split(rest)


def run_curve(cfg: Config, steps: int) -> dict[str, Any]:
    """Train `cfg` for `steps` iterations (no validation, no checkpoints); per-step terms.

    A benchmark run: it writes nothing into `train.out_dir` (the steps run outside
    `Trainer.train`) and its results are `loss_curves`' output, so its Trainer is created with
    `overwrite=True`: an earlier run in that folder never stops it."""
    from .trainer import Trainer
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tr = Trainer(cfg, log=lambda s: None, overwrite=True)
    recs: list[dict[str, torch.Tensor]] = []
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for t in range(steps):
        terms = tr.step(tr.stream.next(), t)
        recs.append({k: v.detach().clone() for k, v in terms.items()})
    sync()
    dt = time.perf_counter() - t0
    keys = ["L", *[k for k in DIAG_TERMS if k in recs[0]]]
    cols = {k: torch.stack([r[k].float() for r in recs]).cpu().tolist()  # sync-ok: after the run
            for k in keys}
    nonfinite = [t for t, v in enumerate(cols["L"]) if not math.isfinite(v)]
    return {"terms": cols, "ms_per_step": 1000.0 * dt / steps, "step_mode": tr.runner.mode,
            "device": torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda"
            else "cpu", "first_nonfinite_step": nonfinite[0] if nonfinite else None}


def window_means(x: Sequence[float], window: int) -> list[float]:
    """Means of consecutive full windows (one window of everything when len(x) < window)."""
    n = len(x)
    if n == 0:
        return []
    if n < window:
        return [sum(x) / n]
    return [sum(x[i:i + window]) / window for i in range(0, n - window + 1, window)]


def curve_deviation(a: Sequence[float], b: Sequence[float], window: int) -> float:
    """max over windows of |mean(a) - mean(b)| / |mean(b)| (inf when either is not finite)."""
    wa, wb = window_means(a, window), window_means(b, window)
    dev = 0.0
    for x, y in zip(wa, wb):
        if not (math.isfinite(x) and math.isfinite(y)):
            return math.inf
        dev = max(dev, abs(x - y) / max(abs(y), 1e-12))
    return dev


def compare(curves: Mapping[str, Mapping[str, Any]], *, baseline: str, noise: str | None,
            window: int, factor: float = 2.0, rtol: float = 2e-3) -> dict[str, Any]:
    """Deviation of every variant from `baseline` (L and the diagnostic terms), the noise floor
    (`noise` against `baseline`) and, per variant, whether L is within
    tolerance = max(factor · floor, rtol)."""
    base = curves[baseline]["terms"]
    floor = (curve_deviation(curves[noise]["terms"]["L"], base["L"], window)
             if noise is not None else None)
    tol = max(factor * floor, rtol) if floor is not None and math.isfinite(floor) else rtol
    out: dict[str, Any] = {"baseline": baseline, "noise_variant": noise, "noise_floor": floor,
                           "window": window, "factor": factor, "rtol": rtol, "tolerance": tol,
                           "variants": {}}
    for name, c in curves.items():
        if name == baseline:
            continue
        terms = c["terms"]
        devs = {k: curve_deviation(terms[k], base[k], window) for k in terms if k in base}
        out["variants"][name] = {"deviation": devs["L"], "term_deviation": devs,
                                 "within": name == noise or devs["L"] <= tol}
    return out


def loss_curves(cfg: Config, variants: Mapping[str, Sequence[str]], *, steps: int,
                window: int = 20, baseline: str | None = None, noise: str | None = None,
                factor: float = 2.0, rtol: float = 2e-3,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every variant (cfg + its overrides) for `steps` steps and compare the curves."""
    if not variants:
        raise ValueError("loss_curves: no variants")
    names = list(variants)
    baseline = baseline or names[0]
    for role, n in (("baseline", baseline), ("noise", noise)):
        if n is not None and n not in variants:
            raise ValueError(f"loss_curves: {role} variant {n!r} is not one of {names}")
    cfgs = {n: apply_overrides(cfg, list(ov)) for n, ov in variants.items()}  # errors first
    curves: dict[str, Any] = {}
    for n in names:
        log(f"curves: {n} ({' '.join(variants[n]) or 'the config as given'}), {steps} steps")
        curves[n] = {"overrides": list(variants[n]), **run_curve(cfgs[n], steps)}
        log(f"curves: {n}: {curves[n]['ms_per_step']:.1f} ms/step ({curves[n]['step_mode']}), "
            f"L {curves[n]['terms']['L'][0]:.4f} -> {curves[n]['terms']['L'][-1]:.4f}")
    res = {"config": cfg.name, "steps": steps, "torch": torch.__version__,
           "device": curves[baseline]["device"], "img_size": list(cfg.data.img_size),
           "batch": f"{cfg.data.labeled_bs}+{cfg.data.unlabeled_bs}", "amp": cfg.train.amp,
           "phase2_start": phase2_start_at(cfg), "curves": curves,
           "comparison": compare(curves, baseline=baseline, noise=noise, window=window,
                                 factor=factor, rtol=rtol)}
    return res


def format_comparison(res: Mapping[str, Any]) -> str:
    """Markdown table of a `loss_curves` result."""
    cmp_ = res["comparison"]
    floor = cmp_["noise_floor"]
    lines = [f"{res['config']}, {res['steps']} steps, batch {res['batch']}, "
             f"img {res['img_size']}, {res['device']}; L window means over {cmp_['window']} "
             f"steps, relative to `{cmp_['baseline']}`; noise floor "
             + (f"{floor:.2e} (`{cmp_['noise_variant']}`)" if floor is not None else "none")
             + f"; tolerance {cmp_['tolerance']:.2e}", "",
             "| variant | ms/step | L first → last window | max rel. deviation of L | within |",
             "|---|---|---|---|---|"]
    for name, c in res["curves"].items():
        wm = window_means(c["terms"]["L"], cmp_["window"])
        row = cmp_["variants"].get(name)
        dev = "baseline" if row is None else f"{row['deviation']:.2e}"
        ok = "" if row is None else ("noise floor" if name == cmp_["noise_variant"]
                                     else ("yes" if row["within"] else "**no**"))
        lines.append(f"| {name} | {c['ms_per_step']:.1f} | {wm[0]:.4f} → {wm[-1]:.4f} | "
                     f"{dev} | {ok} |")
    return "\n".join(lines)


def write_curves(res: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """curves.json (everything) and curves.png (L per step + window means; deviations)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "curves.json", out / "curves.png"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(jpath)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cmp_ = res["comparison"]
    w = cmp_["window"]
    base = res["curves"][cmp_["baseline"]]["terms"]["L"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in res["curves"].items():
        L = c["terms"]["L"]
        line, = ax.plot(range(len(L)), L, lw=0.6, alpha=0.5)
        wm = window_means(L, w)
        xs = ([(len(L) - 1) / 2] if len(L) < w else [i * w + (w - 1) / 2 for i in range(len(wm))])
        ax.plot(xs, wm, "o-", color=line.get_color(), label=name)
        if name != cmp_["baseline"]:
            wb = window_means(base, w)
            # 1e-9: a bit-identical window still shows (on the log axis) as "below everything"
            bx.plot(xs, [max(abs(a - b) / max(abs(b), 1e-12), 1e-9) for a, b in zip(wm, wb)], "o-",
                    color=line.get_color(), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss L")
    ax.legend()
    ax.grid(alpha=0.3)
    bx.axhline(cmp_["tolerance"], color="k", ls="--", lw=0.8, label="tolerance")
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel(f"|ΔL| / L vs {cmp_['baseline']} ({w}-step means)")
    bx.legend()
    bx.grid(alpha=0.3)
    fig.suptitle(f"{res['config']}, {res['device']}")
    fig.tight_layout()
    fig.savefig(ppath, dpi=120)
    plt.close(fig)
    return jpath, ppath
