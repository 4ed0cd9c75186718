"""Temporary GPU sweep: per-kernel GPU time (CUDA-graph replay) for tile/warp variants."""
import json, os, time
import torch
from ucseg_fast.ops import _triton_utils as tu, pseudo_loss as pl
import ucseg_fast.ops as ops

def gpu_us(fn, reps=10, rounds=5):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(rounds): g.replay()
    b.record(); torch.cuda.synchronize()
    del g
    return a.elapsed_time(b) * 1e3 / (reps * rounds)

def cases(shape, fmt):
    g = torch.Generator(device="cuda").manual_seed(0)
    za, zb = (torch.randn(shape, generator=g, device="cuda").mul_(3).to(torch.bfloat16).contiguous(memory_format=fmt) for _ in range(2))
    thr = torch.tensor(0.9, device="cuda")
    pl0 = ops.entropy_pseudo_label(za, zb, thr)
    B = shape[0]; C = shape[1]; N = za.numel() // C
    _, coef = torch.ops.ucseg.pseudo_label_loss(za, pl0.labels, pl0.mask, 1.0, 1e-5)
    outs = torch.ops.ucseg.cross_pseudo_label_loss(za, zb, thr, "min_entropy", 1.0, 1e-5)
    gu = torch.ones((B, 1, *shape[2:]), device="cuda"); one = torch.ones((), device="cuda"); two = torch.ones(2, device="cuda")
    return {
        "evid_fwd": (lambda: torch.ops.ucseg.evidential_uncertainty(za), N*C*2 + N*4),
        "evid_bwd": (lambda: torch.ops.ucseg.evidential_uncertainty_backward(gu, za), 2*N*C*2 + N*4),
        "entropy": (lambda: torch.ops.ucseg.entropy_pseudo_label(za, zb, thr, "min_entropy"), 2*N*C*2 + 13*N),
        "loss_fwd": (lambda: torch.ops.ucseg.pseudo_label_loss(za, pl0.labels, pl0.mask, 1.0, 1e-5), N*C*2 + 9*N),
        "loss_bwd": (lambda: torch.ops.ucseg.pseudo_label_loss_backward(one, za, pl0.labels, pl0.mask, coef, 1.0, 1e-5), 2*N*C*2 + 9*N),
        "cps_fwd": (lambda: torch.ops.ucseg.cross_pseudo_label_loss(za, zb, thr, "min_entropy", 1.0, 1e-5), 2*N*C*2 + 13*N),
        "cps_bwd": (lambda: torch.ops.ucseg.cross_pseudo_label_loss_backward(two, za, zb, outs[1], outs[2], outs[4], 1.0, 1e-5), 4*N*C*2 + 9*N),
        "copy": (lambda: za.clone(), 2*N*C*2),
    }

res = []
def run(tag, shape, fmt, only=None):
    try:
        cs = cases(shape, fmt)
    except Exception as e:
        print("FAILED cases", tag, repr(e)[:300]); return
    for name, (fn, nbytes) in cs.items():
        if only and name not in only: continue
        try:
            us = gpu_us(fn)
        except Exception as e:
            print("FAILED", tag, name, repr(e)[:300]); continue
        res.append(dict(tag=tag, shape=list(shape), op=name, us=us, gbps=nbytes/us/1e3))

t0 = time.time()
L = (32, 4, 512, 512); A = (12, 4, 256, 256); CL = torch.channels_last
for v in os.environ.get("SWEEP", "1024:4,2048:4,2048:8,4096:8").split(","):
    tile, warps = map(int, v.split(":"))
    tu.TILE_ELEMS, tu.NUM_WARPS = tile, warps
    run(f"t{tile}w{warps}", L, CL)
tu.TILE_ELEMS, tu.NUM_WARPS = 2048, None
for progs in (512, 4096):
    pl._TARGET_PROGRAMS = progs
    run(f"progs{progs}", L, CL, only=("loss_fwd", "cps_fwd", "copy"))
pl._TARGET_PROGRAMS = 1024
run("default_contig", L, torch.contiguous_format)
run("default_acdc", A, CL)
copy = {r["tag"]: r["gbps"] for r in res if r["op"] == "copy"}
for r in res:
    r["pct_copy"] = 100 * r["gbps"] / copy.get(r["tag"], float("nan"))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "sweep.json"), "w"), indent=1)
tags = list(dict.fromkeys(r["tag"] for r in res))
names = ["evid_fwd", "evid_bwd", "entropy", "loss_fwd", "loss_bwd", "cps_fwd", "cps_bwd", "copy"]
print("tag".ljust(16) + "".join(n.rjust(15) for n in names), "(us / %copy)")
for t in tags:
    row = {r["op"]: r for r in res if r["tag"] == t}
    print(t.ljust(16) + "".join((f"{row[n]['us']:7.1f}/{row[n]['pct_copy']:4.0f}%" if n in row else "-").rjust(15) for n in names))
print(f"sweep {time.time()-t0:.0f}s")
totals = {}
for r in res:
    if r["tag"].startswith("t") and r["op"] != "copy":
        totals[r["tag"]] = totals.get(r["tag"], 0.0) + r["us"]
if totals:
    best = min(totals, key=totals.get)
    tile, warps = best[1:].split("w")
    print("totals", {k: round(v, 1) for k, v in totals.items()}, "best", best)
    open(os.path.join(os.environ.get("OUT", "."), "best.env"), "w").write(
        f"export UCSEG_OPS_TILE={tile} UCSEG_OPS_WARPS={warps}\n")
