"""One cast for every low-precision weight of a step (bf16 / fp16 autocast).

Under autocast each convolution and linear layer casts its fp32 weight (and bias) to bf16 on
every forward, and autograd casts each weight gradient back to fp32 in the backward: two kernels
per parameter tensor and step, about 250 of a UC-Seg step's kernels. `WeightCast` replaces them
with one multi-tensor copy (`torch._foreach_copy_`, one kernel on CUDA for all tensors) before the
forward and one after the backward:

* `ucseg::cast_params(params, dtype)` returns bf16 copies of the fp32 parameters; its backward
  copies the bf16 gradients into fp32 tensors laid out like the parameters (so `AccumulateGrad`
  stores them without another copy);
* for the duration of the forward the modules read the copies instead of their parameters
  (`torch.nn.utils.stateless._reparametrize_module`, what `torch.func.functional_call` uses);
  autocast finds bf16 weights and casts nothing.

The numbers are the autocast ones: the same round-to-nearest-even fp32 → bf16 cast of the same
values, the same bf16 weight gradients, summed in bf16 before the single cast back as with
autocast's weight cache. Phase 2 runs the model twice; each forward gets its own copies (so
autograd never adds two gradients of one copy tensor by tensor) and the cast's backward sums
them with one multi-tensor add: bit for bit autocast's gradient for every weight used once per
forward, the same sum in another order (bf16 rounding) for a weight used several times in one
forward (the UPG's patch embedding). Only parameters that autocast would cast are selected: weights and biases of
`nn.Conv{1,2,3}d`, `nn.ConvTranspose{1,2,3}d` and `nn.Linear`, outside modules that read their
weights in fp32 themselves (`keep_fp32_weights = True`, e.g. the fused UPG head).

Eager steps and captured CUDA graphs use it; `torch.compile` does not need it (Inductor fuses the
casts) and would recompile on swapped parameters, so the compiled step leaves weights to autocast.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn

__all__ = ["WeightCast", "low_precision_params", "cast_params"]

_CAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear)


@torch.library.custom_op("ucseg::cast_params", mutates_args=())
def cast_params(params: list[Tensor], dtype: torch.dtype, copies: int) -> list[Tensor]:
    """`copies` sets of copies of `params` in `dtype` (same shapes and strides), flat: set k is
    outputs[k·n : (k+1)·n]; one multi-tensor copy per set."""
    outs = [torch.empty_like(p, dtype=dtype) for _ in range(copies) for p in params]
    n = len(params)
    for k in range(copies if params else 0):
        torch._foreach_copy_(outs[k * n:(k + 1) * n], params)
    return outs


@cast_params.register_fake
def _(params: list[Tensor], dtype: torch.dtype, copies: int) -> list[Tensor]:
    return [torch.empty_like(p, dtype=dtype) for _ in range(copies) for p in params]


def _setup_context(ctx, inputs, output) -> None:
    params, _, copies = inputs
    ctx.save_for_backward(*params)
    ctx.copies = copies
    ctx.set_materialize_grads(False)  # an unused copy gets None, not a zero-filled tensor


def _backward(ctx, grads: list[Tensor | None]):
    """fp32 gradient of each parameter = the sum of its copies' low-precision gradients, summed
    in their dtype (as autograd sums the two uses of autocast's cached weight in phase 2) with
    one multi-tensor add, then one multi-tensor copy into tensors laid out like the parameters
    (so AccumulateGrad keeps them instead of copying)."""
    params = ctx.saved_tensors
    n = len(params)
    per = [[grads[k * n + i] for k in range(ctx.copies) if grads[k * n + i] is not None]
           for i in range(n)]
    while any(len(g) > 1 for g in per):
        two = [i for i, g in enumerate(per) if len(g) > 1]
        sums = torch._foreach_add([per[i][0] for i in two], [per[i][1] for i in two])
        for i, s in zip(two, sums):
            per[i] = [s] + per[i][2:]
    idx = [i for i, g in enumerate(per) if g]
    outs: list[Tensor | None] = [None] * n
    if idx:
        dst = [torch.empty_like(params[i]) for i in idx]
        torch._foreach_copy_(dst, [per[i][0] for i in idx])
        for i, d in zip(idx, dst):
            outs[i] = d
    return outs, None, None


cast_params.register_autograd(_backward, setup_context=_setup_context)


def low_precision_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every fp32 weight / bias that autocast casts to lower precision."""
    out: list[tuple[str, nn.Parameter]] = []

    def visit(mod: nn.Module, prefix: str) -> None:
        if getattr(mod, "keep_fp32_weights", False):
            return
        if isinstance(mod, _CAST_MODULES):
            for n, p in mod.named_parameters(recurse=False):
                if p is not None and p.dtype == torch.float32:
                    out.append((prefix + n, p))
        for name, child in mod.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return out


def _no_part(name: str) -> ContextManager[None]:
    return nullcontext()


class WeightCast:
    """`with WeightCast(model, torch.bfloat16)():` runs the model on bf16 weight copies made by
    one op (see the module docstring). `dtype=None` (fp32 training) does nothing. `part`
    (optional) wraps the cast op: `part("weights")` (the ledger attributes ops with it)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        self.model = model
        self.dtype = dtype
        named = low_precision_params(model) if dtype is not None else []
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def __bool__(self) -> bool:
        return bool(self.params)

    @contextmanager
    def __call__(self, part: Callable[[str], ContextManager[Any]] | None = None,
                 uses: int = 1) -> Iterator[None]:
        """`uses` = how many forwards of the model run inside (2 in phase 2): each gets its own
        copies, so autograd never sums two gradients of one copy tensor by tensor — the
        backward of the one cast op sums them for every parameter with one multi-tensor add."""
        if not self.params:
            yield
            return
        with (part or _no_part)("weights"):
            casts = torch.ops.ucseg.cast_params(self.params, self.dtype, uses)
        from torch.nn.utils.stateless import _reparametrize_module
        n = len(self.params)
        sets = [dict(zip(self.names, casts[k * n:(k + 1) * n])) for k in range(uses)]
        if uses == 1:
            with _reparametrize_module(self.model, sets[0]):
                yield
            return
        state = {"calls": 0, "ctx": None}

        def pre(module, args):
            k = min(state["calls"], uses - 1)
            state["calls"] += 1
            state["ctx"] = _reparametrize_module(self.model, sets[k])
            state["ctx"].__enter__()

        def post(module, args, out):
            ctx, state["ctx"] = state["ctx"], None
            ctx.__exit__(None, None, None)

        h1 = self.model.register_forward_pre_hook(pre)
        h2 = self.model.register_forward_hook(post)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()
            if state["ctx"] is not None:  # a forward that raised
                state["ctx"].__exit__(None, None, None)
