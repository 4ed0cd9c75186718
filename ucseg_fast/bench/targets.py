"""What the op benchmarks time: inputs, timed targets and their minimal bytes.

Shared by the pytest-benchmark suites (`benchmarks/bench_ops.py`, `benchmarks/bench_upg.py`)
and `ucseg-fast bench report`, so both time the same calls.

A `Target` is a no-argument callable (inputs bound, the trainer's channels-last layout), the
minimal bytes the op must move (each input read and each output written once per pass; GB/s and
% of the copy bandwidth are computed against it) and descriptive fields.

Providers: ``reference_eager`` (``ops/reference.py`` as written), ``reference_compiled`` (the
same under ``torch.compile``), ``ours`` (the fused Triton ops), ``ours_fused`` (cps_step only:
``cross_pseudo_label_loss``, three launches). UPG: ``eager`` / ``compiled`` (the PyTorch modules)
and ``fused`` (head) / ``fused_tokens`` (whole UPG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

# One registry of op shapes (B, C, *spatial).
OP_SHAPES = {
    "acdc_unlabeled": (12, 4, 256, 256),  # ACDC recipe: the unlabeled half-batch of logits
    "large_2d": (32, 4, 512, 512),
    "la_3d": (2, 2, 96, 96, 96),           # LA recipe: the unlabeled half-batch
    "big_3d": (2, 14, 128, 128, 128),
    "tiny": (2, 4, 16, 16),                # CPU smoke
}
UPG_SHAPES = {"acdc": (24, 4, 256, 256), "la_3d": (4, 2, 96, 96, 96), "tiny": (2, 4, 8, 8)}
WHOLE_SHAPES = {"acdc": (24, 4, 256, 256), "la_3d": (4, 2, 96, 96, 96), "tiny": (1, 2, 16, 16)}
# connected components: (labels shape, classes)
CC_SHAPES = {"acdc_half": ((12, 256, 256), 4), "acdc_batch": ((24, 256, 256), 4),
             "la_3d": ((2, 96, 96, 96), 2), "tiny_2d": ((2, 32, 32), 4),
             "tiny_3d": ((1, 16, 16, 16), 2)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

OPS = ("evidential_uncertainty", "entropy_pseudo_label", "pseudo_label_loss", "cps_step",
       "fusion_unsup_losses", "segmentation_loss_terms")
OP_PASSES = {"evidential_uncertainty": ("fwd", "bwd", "fwd_bwd"), "entropy_pseudo_label": ("fwd",),
             "pseudo_label_loss": ("fwd", "bwd", "fwd_bwd"), "cps_step": ("fwd_bwd",),
             "fusion_unsup_losses": ("fwd_bwd",), "segmentation_loss_terms": ("fwd_bwd",)}
PROVIDERS = ("reference_eager", "reference_compiled", "ours")
CPS_PROVIDERS = ("reference_eager", "reference_compiled", "ours", "ours_fused")
UPG_HEAD_PROVIDERS = ("eager", "compiled", "fused")
UPG_WHOLE_PROVIDERS = ("eager", "compiled", "fused_tokens")
_UPG_ARGS = {2: dict(embed_dim=96, heads=8, dim_head=64), 3: dict(embed_dim=1024, heads=8, dim_head=128)}


@dataclass
class Target:
    fn: Callable[[], Any]
    nbytes: int | None
    info: dict = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _fmt(ndim: int):
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def logits(shape, dtype, seed: int = 0, device=None) -> torch.Tensor:
    """Logits ~ 3·N(0, 1) in the trainer's channels-last layout."""
    device = device or default_device()
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(3).to(dtype)
    return z.contiguous(memory_format=_fmt(len(shape)))


def provider_fn(provider: str, ours: Callable, ref: Callable) -> Callable:
    """`ours`, the reference, or the reference under torch.compile (fresh Dynamo cache, so no
    recompile limit is hit across many shapes)."""
    if provider in ("ours", "ours_fused", "fused", "fused_tokens"):
        return ours
    if provider in ("reference_eager", "eager"):
        return ref
    torch._dynamo.reset()
    return torch.compile(ref, dynamic=False)


def _backend_ran(provider: str, z: torch.Tensor) -> str:
    if not provider.startswith("ours"):
        return "torch"
    from ..ops._triton_utils import use_triton
    return "triton" if use_triton(z) else "reference"


def op_target(op: str, shape, dtype_name: str = "bf16", provider: str = "ours",
              pass_: str = "fwd_bwd", device=None) -> Target:
    """The timed call of one fused op (or its reference) and its minimal bytes.

    Passes: ``fwd``, ``bwd`` (backward only, autograd graph retained), ``fwd_bwd``. `cps_step`
    is the whole cross-pseudo-supervision chain of both subnets (entropy pseudo-labels + two
    masked CE + Dice losses, forward + backward)."""
    from .. import ops
    from ..ops import reference
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known {OPS}")
    if pass_ not in OP_PASSES[op]:
        raise ValueError(f"{op}: pass {pass_!r} not timed; choose from {OP_PASSES[op]}")
    device = device or default_device()
    shape, dtype = tuple(shape), DTYPES[dtype_name]
    N, C = math.prod(shape) // shape[1], shape[1]
    e = torch.empty((), dtype=dtype).element_size()
    info = {"op": op, "shape": list(shape), "dtype": dtype_name, "provider": provider,
            "pass": pass_}

    if op == "evidential_uncertainty":
        z = logits(shape, dtype, device=device).requires_grad_(pass_ != "fwd")
        fn = provider_fn(provider, ops.evidential_uncertainty, reference.evidential_uncertainty)
        fwd_b, bwd_b = N * C * e + N * 4, 2 * N * C * e + N * 4
        grad_u = torch.ones((shape[0], 1, *shape[2:]), device=device)
        if pass_ == "fwd":
            target, nbytes = (lambda: fn(z)), fwd_b
        elif pass_ == "bwd":
            u = fn(z)
            target, nbytes = (lambda: torch.autograd.grad(u, z, grad_u, retain_graph=True)), bwd_b
        else:
            target, nbytes = (lambda: torch.autograd.grad(fn(z), z, grad_u)), fwd_b + bwd_b
        ref_tensor = z
    elif op == "entropy_pseudo_label":
        za, zb = logits(shape, dtype, 0, device), logits(shape, dtype, 1, device)
        thr = torch.tensor(0.9, device=device)
        fn = provider_fn(provider, ops.entropy_pseudo_label, reference.entropy_pseudo_label)
        target, nbytes = (lambda: fn(za, zb, thr)), 2 * N * C * e + N * (8 + 1 + 4)
        ref_tensor = za
    elif op == "pseudo_label_loss":
        z = logits(shape, dtype, device=device).requires_grad_(pass_ != "fwd")
        pl = reference.entropy_pseudo_label(z.detach(), logits(shape, dtype, 1, device), 0.9)
        ours = lambda x: ops.pseudo_label_loss(x, pl.labels, pl.mask, dice_weight=1.0)  # noqa: E731
        ref = lambda x: reference.pseudo_label_loss(x, pl.labels, pl.mask, dice_weight=1.0)  # noqa: E731
        fn = provider_fn(provider, ours, ref)
        fwd_b, bwd_b = N * C * e + 9 * N, 2 * N * C * e + 9 * N
        if pass_ == "fwd":
            target, nbytes = (lambda: fn(z)), fwd_b
        elif pass_ == "bwd":
            loss = fn(z)
            target, nbytes = (lambda: torch.autograd.grad(loss, z, retain_graph=True)), bwd_b
        else:
            target, nbytes = (lambda: torch.autograd.grad(fn(z), z)), fwd_b + bwd_b
        ref_tensor = z
    elif op == "cps_step":
        za = logits(shape, dtype, 0, device).requires_grad_(True)
        zb = logits(shape, dtype, 1, device).requires_grad_(True)
        thr = torch.tensor(0.9, device=device)

        def chain(epl, loss):
            def step(a, b, t):
                p = epl(a.detach(), b.detach(), t)
                return (loss(a, p.labels, p.mask, dice_weight=1.0)
                        + loss(b, p.labels, p.mask, dice_weight=1.0))
            return step

        def fused(a, b, t):
            out = ops.cross_pseudo_label_loss(a, b, t, dice_weight=1.0)
            return out.loss_a + out.loss_b

        ref = chain(reference.entropy_pseudo_label, reference.pseudo_label_loss)
        ours = fused if provider == "ours_fused" else chain(ops.entropy_pseudo_label,
                                                            ops.pseudo_label_loss)
        fn = provider_fn(provider, ours, ref)
        target = lambda: torch.autograd.grad(fn(za, zb, thr), (za, zb))  # noqa: E731
        # fused minimum: fwd reads both logits, writes labels + mask + uncertainty (13 B/pixel);
        # bwd reads both logits + labels + mask, writes both gradients
        nbytes = (2 * N * C * e + 13 * N) + (4 * N * C * e + 9 * N)
        ref_tensor = za
    elif op == "fusion_unsup_losses":
        z1 = logits(shape, dtype, 0, device).requires_grad_(True)
        z2 = logits(shape, dtype, 1, device).requires_grad_(True)
        Y = logits(shape, dtype, 2, device).argmax(1)  # a hard pseudo-label class map

        def total(pair):
            return sum(t["ce"] + t["dice"] for t in pair)
        ours = lambda a, b: total(ops.fusion_unsup_losses(a, b, Y))  # noqa: E731
        ref = lambda a, b: total(reference.fusion_unsup_losses(a, b, Y))  # noqa: E731
        fn = provider_fn(provider, ours, ref)
        nbytes = (2 * N * C * e + 8 * N) + (4 * N * C * e + 8 * N)
        target = lambda: torch.autograd.grad(fn(z1, z2), (z1, z2))  # noqa: E731
        ref_tensor = z1
    else:  # segmentation_loss_terms
        z = logits(shape, dtype, 0, device).requires_grad_(True)
        Y = logits(shape, dtype, 2, device).argmax(1)
        lam = torch.tensor(0.3, device=device)

        def total(t):
            return t["ce"] + t["au"] + t["dice"]
        ours = lambda x: total(ops.segmentation_loss_terms(x, Y, lam=lam))  # noqa: E731
        ref = lambda x: total(reference.segmentation_loss_terms(x, Y, lam=lam))  # noqa: E731
        fn = provider_fn(provider, ours, ref)
        nbytes = (N * C * e + 8 * N) + (2 * N * C * e + 8 * N)
        target = lambda: torch.autograd.grad(fn(z), z)  # noqa: E731
        ref_tensor = z
    info["backend_ran"] = _backend_ran(provider, ref_tensor)
    return Target(target, int(nbytes), info)


# --------------------------------------------------------------------------------- UPG
def upg_inputs(shape, dtype_name: str = "bf16", device=None):
    """z1, z2 (logits) and A (the uncertainty-derived attention map) in channels-last."""
    device = device or default_device()
    dtype = DTYPES[dtype_name]
    B, C, *S = shape
    g = torch.Generator(device=device).manual_seed(0)
    fmt = _fmt(len(shape))
    z1, z2 = (torch.randn(tuple(shape), generator=g, device=device).mul_(3).to(dtype)
              .contiguous(memory_format=fmt) for _ in range(2))
    A = torch.rand((B, 1, *S), generator=g, device=device).to(dtype).contiguous(memory_format=fmt)
    return z1, z2, A


def _pass_target(fn: Callable, ins: list[torch.Tensor], pass_: str, dtype: torch.dtype,
                 device: str) -> Callable:
    """fwd (no grad), bwd (backward only, graph retained) or fwd_bwd of `fn(*ins)`, under bf16
    autocast on CUDA for bf16 inputs."""
    use_ac = torch.device(device).type == "cuda" and dtype == torch.bfloat16

    def fwd():
        if use_ac:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(*ins)
        return fn(*ins)

    if pass_ == "fwd":
        def target():
            with torch.no_grad():
                return fwd()
    elif pass_ == "bwd":
        P = fwd()
        gP = torch.ones_like(P)

        def target():
            return torch.autograd.grad(P, ins, gP, retain_graph=True)
    elif pass_ == "fwd_bwd":
        def target():
            P = fwd()
            return torch.autograd.grad(P, ins, torch.ones_like(P))
    else:
        raise ValueError(f"pass {pass_!r}: choose fwd, bwd or fwd_bwd")
    return target


def _upg_bytes(ins: list[torch.Tensor], out_numel: int, out_elem: int, pass_: str) -> int:
    from .timing import bytes_moved
    inb, outb = bytes_moved(ins), out_numel * out_elem
    if pass_ == "fwd":
        return inb + outb
    if pass_ == "bwd":
        return 2 * inb + outb  # inputs and dP read, input gradients written
    return 3 * inb + 2 * outb  # both of the above


def upg_head_target(shape, dtype_name: str = "bf16", provider: str = "fused",
                    pass_: str = "fwd_bwd", device=None) -> Target:
    """The UPG fusion head on (z1, z2, A): `eager` = FusionHead(cat(A·z1, A·z2)) as the model runs
    it, `compiled` = the same under torch.compile, `fused` = FusedFusionHead.fused (train mode:
    batch statistics and the running-stat update)."""
    from ..models.upg import FusedFusionHead, FusionHead
    from ..ops.upg_head import dot_precision
    device = device or default_device()
    dtype = DTYPES[dtype_name]
    C, dims = shape[1], len(shape) - 2
    z1, z2, A = upg_inputs(shape, dtype_name, device)
    ins = [t.requires_grad_(pass_ != "fwd") for t in (z1, z2, A)]
    ref = FusionHead(C, spatial_dims=dims).to(device).train()

    def eager(a, b, att):
        return ref(torch.cat([att * a, att * b], 1))

    if provider == "fused":
        fus = FusedFusionHead(C, spatial_dims=dims).to(device).train()
        fus.load_state_dict(ref.state_dict())
        fn = fus.fused
    else:
        fn = provider_fn(provider, None, eager)
    target = _pass_target(fn, ins, pass_, dtype, device)
    info = {"op": "upg_head", "shape": list(shape), "dtype": dtype_name, "provider": provider,
            "pass": pass_, "backend_ran": "torch"}
    if provider == "fused":
        from ..ops._triton_utils import use_triton
        info["backend_ran"] = "triton" if use_triton(z1) else "reference"
        info["dot_precision"] = dot_precision(z1)
    e = z1.element_size()
    return Target(target, _upg_bytes(ins, z1.numel(), e, pass_), info)


def upg_whole_target(shape, dtype_name: str = "bf16", provider: str = "fused_tokens",
                     pass_: str = "fwd_bwd", device=None) -> Target:
    """The whole UPG from the logits z1, z2 to P: both subnets' evidential uncertainty, the
    cross-attention block and the fusion head. `eager` / `compiled`: UPG.forward on the PyTorch
    uncertainty (the reference's modules); `fused_tokens`: UPG.forward_fused_tokens."""
    from ..models.upg import UPG, evidential_uncertainty_torch
    from ..ops.upg_head import dot_precision
    device = device or default_device()
    dtype = DTYPES[dtype_name]
    B, C, *S = shape
    z1, z2, _ = upg_inputs(shape, dtype_name, device)
    ins = [t.requires_grad_(pass_ != "fwd") for t in (z1, z2)]
    upg = UPG(C, tuple(S), 16, head_impl="fused" if provider == "fused_tokens" else "torch",
              **_UPG_ARGS[len(S)]).to(device).train()

    def ours(a, b):
        return upg.forward_fused_tokens(a, b)[3]

    def eager(a, b):
        return upg(evidential_uncertainty_torch(a), evidential_uncertainty_torch(b), a, b)[1]

    fn = provider_fn(provider, ours, eager)
    target = _pass_target(fn, ins, pass_, dtype, device)
    info = {"op": "upg_whole", "shape": list(shape), "dtype": dtype_name, "provider": provider,
            "pass": pass_}
    if provider == "fused_tokens":
        info["dot_precision"] = dot_precision(z1)
    return Target(target, _upg_bytes(ins, z1.numel(), z1.element_size(), pass_), info)


# --------------------------------------------------------------------- connected components
def cc_labels(shape, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Pseudo-labels of a partly trained model (CPU int64): argmax of smooth per-class fields plus
    2 % speckle, so many small components lie beside the big ones."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    nd = len(shape) - 1
    fields = rng.standard_normal((num_classes,) + tuple(shape)).astype(np.float32)
    fields = ndimage.gaussian_filter(fields, sigma=[0, 0] + [4.0] * nd)
    fields[0] += 0.02  # more background, as in a cardiac / atrium crop
    lab = fields.argmax(0)
    speckle = rng.random(shape) < 0.02
    lab[speckle] = rng.integers(0, num_classes, int(speckle.sum()))
    return torch.from_numpy(lab.astype(np.int64))
