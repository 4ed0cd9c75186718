"""report.md from the report's record: a summary table of the parts (status, budget, time used,
reason), then one section per part, rendered from its rows. A part's renderer computes the
ratios (× vs eager, × vs the reference, % of copy) from the rows; one that cannot render its
record says so and the rest of the report still renders. The Markdown helpers (`table`, `num`,
`sig`, `shape_str`) are also what `benchmarks/` print their tables with.
"""
from __future__ import annotations

import math

from .isolation import error_line
from .parts import PART_ORDER

DASH = "–"


def cell(x) -> str:
    """`x` as a table cell (pipes escaped, one line)."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def num(x, fmt: str = ".1f") -> str:
    """`x` formatted, or a dash when it is missing or not finite."""
    try:
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return DASH
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return DASH


def sig(x) -> str:
    """3 significant digits below 100, whole numbers above (GB/s, %)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return DASH
    if not math.isfinite(v):
        return DASH
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def shape_str(s) -> str:
    """(12, 4, 256, 256) -> '12×4×256×256'."""
    return "×".join(str(v) for v in s) if isinstance(s, (list, tuple)) else str(s)



def _status_line(rec: dict) -> str | None:
    st = rec.get("status")
    if st in ("ok", None):
        return None
    s = f"**{st}**"
    if rec.get("reason"):
        s += f": {rec['reason']}"
    return s


def _row_note(r: dict) -> str:
    if r.get("status") not in (None, "ok"):
        return f"{r['status']}: {r.get('reason') or ''}".strip()
    return r.get("fallback") or ""


def _render_environment(rec: dict, rep: dict) -> list[str]:
    e = rec.get("env") or {}
    nat = e.get("native") or {}
    if nat.get("cuda_kernels"):
        native = "loaded, with CUDA kernels"
    elif nat.get("loaded"):
        native = "loaded, host code only (no CUDA kernels)"
    else:
        native = f"not loaded ({nat.get('reason')})"
    card = e.get("gpu") or "no CUDA device"
    if e.get("gpu"):
        card += (f", {e.get('gpu_memory_gb')} GB, {e.get('sm_count')} SMs, compute capability "
                 f"{e.get('capability')}, driver {e.get('driver') or 'unknown'}")
    git = e.get("git") or "unknown (not a git checkout)"
    if e.get("git_changed_files"):
        git += f" ({e['git_changed_files']} changed files)"
    return [f"- card: {card}",
            f"- ucseg-fast {e.get('package')}, torch {e.get('torch')}, Triton {e.get('triton')}, "
            f"DALI {e.get('dali') or 'not installed'}, CUDA {e.get('cuda')}, cuDNN "
            f"{e.get('cudnn')}, Python {e.get('python')}",
            f"- native library: {native}",
            f"- git revision: {git}; host {e.get('host')}"]


def _render_copy(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if r.get("gbps")]
    if not rows:
        return []
    r = rows[0]
    return [f"**{num(r['gbps'], '.0f')} GB/s** (read + write) for `dst.copy_(src)` of "
            f"{r['nbytes'] / 2**20:.0f} MiB, {num(r['us'])} µs per copy; {r.get('mode_text')}"
            + (f"; {r['fallback']}" if r.get("fallback") else "") + ". Every \"% of copy\" below "
            "compares with this number."]


def _render_step(rec: dict, rep: dict) -> list[str]:
    rows = rec.get("rows", [])
    if not rows:
        return []
    eager = {(r["dims"], r["ops"], r["phase"]): r.get("ms_per_step") for r in rows
             if r.get("mode") == "eager" and r.get("status") == "ok"}
    body = []
    for r in rows:
        base = eager.get((r["dims"], r["ops"], r["phase"]))
        x = (f"{base / r['ms_per_step']:.2f}×" if base and r.get("ms_per_step")
             and r["mode"] != "eager" else DASH)
        img = f"{r['img']}{'³' if r['dims'] == 3 else '²'}"
        led = r.get("ledger_est_ms")
        ledger = (f"{num(led, '.2f')} ({r.get('ledger_kernels')} kernels)" if led is not None
                  else DASH)
        body.append([f"{r['dims']}D", r["mode"], r["ops"], r["phase"], r["batch"], img,
                     num(r.get("ms_per_step"), ".2f"), num(r.get("img_per_s"), ".0f"),
                     num(r.get("peak_mem_gb"), ".2f"), x, ledger, _row_note(r)])
    out = table(["dims", "mode", "ops", "phase", "batch", "img", "ms/step", "img/s", "peak GB",
                 "× vs eager", "ledger est. ms", "note"], body)
    led_err = next((r["ledger"] for r in rows if r.get("ledger")), None)
    out += ["", "ops: `torch` = the PyTorch modules, `fused` = the fused ops (evidential "
            "uncertainty, UPG head, losses). Synthetic device data, bf16 autocast and "
            "channels-last on CUDA; ms/step = back-to-back steps with one sync at the end "
            "(`ucseg_fast.train.bench.bench_step`); × vs eager = eager ms/step of the same dims, "
            "ops and phase / this one."]
    if led_err:
        out.append(f"Ledger estimates: {led_err}")
    else:
        card = next((r.get("ledger_card") for r in rows if r.get("ledger_card")), None)
        if card:
            out.append(f"Ledger: the `ucseg_fast.bench.ledger` estimate for {card}: one CUDA "
                       "graph for graph / compile rows, the eager lower bound for eager rows.")
    return out


def _render_components(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "backend" in r]
    if not rows:
        return []
    body = [[shape_str(r.get("shape")), r.get("classes"), r["backend"], num(r.get("ms"), ".3f"),
             r.get("mode", DASH), {True: "yes", False: "**no**"}.get(r.get("matches_scipy"), DASH),
             _row_note(r)] for r in rows]
    return table(["labels", "classes", "backend", "ms/call", "timing", "same as scipy", "note"],
                 body) + ["", "Per batch item and class, the largest fully connected component "
                          "(the pseudo-label `nms` rule) of realistic pseudo-labels (smooth "
                          "class fields + 2 % speckle). `scipy` includes the copies to the host "
                          "and back (the reference's path); the PyTorch fallback syncs every "
                          "iteration, so it is timed as eager launches."]


def _op_table(rows: list[dict], ref_provider: str) -> list[str]:
    refs = {(r["op"], r["pass"], r["shape_name"]): r.get("us") for r in rows
            if r.get("provider") == ref_provider and r.get("status") == "ok"}
    body = []
    for r in rows:
        ref = refs.get((r["op"], r["pass"], r["shape_name"]))
        x = (f"{ref / r['us']:.2f}×" if ref and r.get("us") and r["provider"] != ref_provider
             else DASH)
        body.append([r["op"], r["pass"], shape_str(r.get("shape")), r.get("dtype"), r["provider"],
                     num(r.get("us")), sig(r.get("gbps")), sig(r.get("pct_copy")),
                     num(r.get("peak_mb"), ".0f"), x, r.get("mode", DASH), _row_note(r)])
    return table(["op", "pass", "shape", "dtype", "provider", "µs/call", "GB/s", "% of copy",
                  "peak MB", f"× vs {ref_provider}", "timing", "note"], body)


def _render_ops(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "op" in r]
    if not rows:
        return []
    return _op_table(rows, "reference_eager") + [
        "", "GB/s over the op's minimal bytes (each input read and each output written once per "
        "pass); % of copy against the copy bandwidth above. Working sets that fit in L2 can stay "
        "there across back-to-back calls, so more than 100 % means L2 hits. `cps_step`: both "
        "subnets' entropy pseudo-labels + masked CE + Dice, forward + backward; `ours_fused` is "
        "`cross_pseudo_label_loss`."]


def _render_upg(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "op" in r]
    if not rows:
        return []
    out = _op_table(rows, "eager")
    precs = sorted({f"{r['dot_precision']} ({r['dtype']})" for r in rows if r.get("dot_precision")})
    out += ["", "`upg_head`: the fusion head on (z1, z2, A), train mode; `upg_whole`: both "
            "subnets' uncertainty + cross-attention + head, logits to P (`fused_tokens`: "
            "UPG.forward_fused_tokens). Forward + backward."]
    if precs:
        out.append("Fused head dot products: " + ", ".join(precs) + ".")
    return out


def _render_data(rec: dict, rep: dict) -> list[str]:
    rows = [r for r in rec.get("rows", []) if "backend" in r]
    if not rows:
        return []
    step = (rep["parts"].get("step") or {}).get("rows", [])
    fastest = max((r.get("img_per_s") or 0 for r in step if r.get("dims") == 2
                   and r.get("status") == "ok"), default=0)
    body = []
    for r in rows:
        ips = r.get("img_per_s")
        body.append([r.get("dataset"), r["backend"], r.get("batch", DASH),
                     shape_str(r.get("img", DASH)), num(r.get("batches_per_s"), ".1f"),
                     num(ips, ".0f"), f"{ips / fastest:.1f}×" if ips and fastest else DASH,
                     _row_note(r)])
    out = table(["data", "backend", "batch", "img", "batches/s", "img/s",
                 "× fastest 2D step", "note"], body)
    out += ["", "Training batches (augmented, on the training device) from "
            "`ucseg_fast.data.factory.build_train_stream`, back-to-back with one sync per round."
            + (f" × fastest 2D step = img/s / the fastest 2D step's img/s above ({fastest:.0f})."
               if fastest else "")]
    return out


def _render_equality(rec: dict, rep: dict) -> list[str]:
    rows = rec.get("rows", [])
    runs = [r for r in rows if r.get("kind") == "run"]
    if not runs:
        return []
    cmp_ = next((r for r in rows if r.get("kind") == "compare"), None)
    noise = next((r for r in rows if r.get("kind") == "noise"), None)
    out = [f"{len(runs[0]['losses'])} steps of the ACDC recipe on {rec.get('data', 'the data')}, "
           f"phase 2 from step {runs[0].get('phase2_from')}, identical seeds per run."]
    if cmp_:
        out.append(f"- graph vs eager: max relative difference of L "
                   f"**{num(cmp_['max_rel_diff'], '.2e')}** ({cmp_['identical_steps']} of "
                   f"{len(cmp_['rel_diff'])} steps bit-identical)")
    if noise:
        out.append(f"- eager vs eager (run-to-run noise): {num(noise['max_rel_diff'], '.2e')} "
                   f"({noise['identical_steps']} bit-identical)")
    for r in runs:
        if r.get("runner_mode") != r.get("mode"):
            out.append(f"- note: the {r['mode']} run ran as {r.get('runner_mode')}")
    if cmp_:
        out += [""] + table(["step", "L eager", "L graph", "rel. diff"],
                            [[t, f"{a:.6f}", f"{b:.6f}", num(d, ".1e")] for t, (a, b, d) in
                             enumerate(zip(runs[0]["losses"], runs[1]["losses"], cmp_["rel_diff"]))])
    return out


def _render_e2e(rec: dict, rep: dict) -> list[str]:
    r = next((r for r in rec.get("rows", []) if r.get("curve") is not None), None)
    if r is None:
        return []
    out = [f"{r.get('config')} on {r.get('device')}, step mode {r.get('step_mode')}, batch "
           f"{r.get('batch')}: {r.get('iterations')} iterations in {num(r.get('wall_s'))} s "
           f"({num(r.get('train_s'))} s of steps, validation "
           f"{num(100 * (r.get('val_share') or 0), '.0f')} %); best validation Dice "
           f"**{num(r.get('best_val_dice'), '.4f')}** at "
           f"iteration {r.get('best_iteration')} (curve: `{r.get('out_dir')}/dice_vs_time.png`)", ""]
    out += table(["iteration", "wall s", "train s", "val Dice"],
                 [[c.get("iteration"), num(c.get("wall_s")), num(c.get("train_s")),
                   num(c.get("val_dice"), ".4f")] for c in r["curve"]])
    return out


RENDERERS = {"environment": _render_environment, "copy": _render_copy, "step": _render_step,
             "components": _render_components, "ops": _render_ops, "upg": _render_upg,
             "data": _render_data, "equality": _render_equality, "e2e": _render_e2e}


def render_markdown(rep: dict) -> str:
    env = (rep["parts"].get("environment") or {}).get("env") or {}
    card = env.get("gpu") or "CPU (no CUDA device)"
    out = [f"# ucseg-fast bench report — {card}", "",
           f"{rep.get('started')}; budget {rep.get('minutes')} min, "
           f"{rep.get('elapsed_s', 0):.0f} s used"
           + ("; **smoke run (tiny shapes): the numbers are not benchmarks**"
              if rep.get("smoke") else "")
           + ("" if rep.get("finished") else "; **incomplete (still running or stopped)**"), ""]
    summary = []
    for name in PART_ORDER:
        rec = rep["parts"].get(name)
        if rec is None:
            summary.append([name, "not run", DASH, DASH, ""])
            continue
        summary.append([name, rec.get("status"), num(rec.get("budget_s"), ".0f"),
                        num(rec.get("seconds"), ".0f"), rec.get("reason") or ""])
    out += table(["part", "status", "budget s", "used s", "reason"], summary) + [""]
    for name in PART_ORDER:
        rec = rep["parts"].get(name)
        if rec is None:
            continue
        out += [f"## {rec.get('title', name)}", ""]
        st = _status_line(rec)
        try:
            body = RENDERERS[name](rec, rep)
        except Exception as e:  # noqa: BLE001 -- one odd record must not hide the rest
            body = [f"could not render: {error_line(e)}"]
        if st:
            out += [st, ""]
        out += [f"- {n}" for n in rec.get("notes", [])]
        if rec.get("notes"):
            out.append("")
        if body:
            out += body + [""]
        elif not st:
            out += ["no results", ""]
    return "\n".join(out).rstrip() + "\n"
