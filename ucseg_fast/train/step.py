"""The training step as one function of static device buffers: eager, compiled or CUDA graph.

`StepRunner` owns how one UC-Seg iteration (forward of both subnets + UPG, every loss,
backward, SGD) runs; the Trainer owns what surrounds it (schedules, data, logging).

Why the step can be captured whole:
* every per-step scalar (lr, w(t), λ_t, thr(t), τ) is a 0-D device tensor written in place
  (`ScheduleTensors.update`) before the step, so a replay reads the new values;
* SGD reads the lr tensor (`foreach_sgd_step`): torch's foreach SGD turns a Tensor lr into a
  Python scalar with `Tensor.item` outside `torch.compile` (a host sync, and a value a graph would
  freeze), so the momentum update is written here with `torch._foreach_*` ops on the state of a
  plain `torch.optim.SGD` (same state layout, so checkpoints are unchanged);
* the batch is copied (`copy_`) into static buffers; the phase-2 copy-paste box and branch are
  drawn on the device from `mix_generator` (`prepare`, just before the forward), which is
  registered with the graph (`CUDAGraph.register_generator_state`); dropout uses the default
  CUDA generator, which graph capture tracks by itself;
* connected components run the native library or the Triton union-find, both a fixed number
  of kernels without a host sync (`ops.components`);
* every fp32 weight is cast to bf16 by one op (`precision.WeightCast`), whose outputs the
  graph's memory pool holds like any other activation.

What cannot be captured, and is refused by `check_graph_capturable` (naming the option):
* `loss.nms = true` where connected components would take the PyTorch fallback (neither Triton
  nor the native library): it iterates to convergence with a host-side check;
* DDP (world size > 1): the all-reduce of the gradients is not captured here;
* `train.optimizer = "apex"`: FusedSGD takes lr as a host float, which a graph would freeze.
The same check guards `torch.compile` modes that capture CUDA graphs themselves
(`compile_mode` "reduce-overhead", "max-autotune"): there only the connected components count.

"auto" (`resolve_step_mode`): graph on one GPU, compile where a graph is refused (the reason is
logged), eager off CUDA. "graph" mode: each phase runs `graph_warmup` eager steps on a side
stream (real training steps — cuDNN autotuning, Triton JIT and the momentum buffers happen
there), then captures one graph for that phase and replays it; phase 1's graph is dropped when
phase 2 starts. Off CUDA, graph mode warns and runs eager steps. "compile" mode compiles the
forward + objective with `torch.compile(fullgraph=True)` — a graph break is an error, never a
silent split; the copy-paste draw happens before, outside the compiled region — the backward
runs the compiled backward, SGD stays foreach.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn

from ..config import ConfigError

__all__ = ["StepRunner", "foreach_sgd_step", "check_graph_capturable", "resolve_step_mode",
           "apex_fused_sgd"]


def apex_fused_sgd():
    """apex.optimizers.FusedSGD when importable, else None (apex is never required)."""
    try:
        from apex.optimizers import FusedSGD  # type: ignore
    except Exception:  # ImportError, or a broken apex build raising on import
        return None
    return FusedSGD


@torch.no_grad()
def foreach_sgd_step(optimizer: torch.optim.SGD, lr: Tensor) -> None:
    """SGD with momentum and weight decay (torch semantics, dampening 0, no Nesterov), reading
    the learning rate from the 0-D device tensor `lr`; momentum buffers live in
    `optimizer.state[p]["momentum_buffer"]` exactly as torch.optim.SGD keeps them.

    No host sync and no value-dependent Python: the only branch is whether the buffers exist
    yet (true after the first step, i.e. always inside a captured graph)."""
    for group in optimizer.param_groups:
        if group.get("dampening", 0) or group.get("nesterov") or group.get("maximize"):
            raise ValueError("foreach_sgd_step implements SGD with dampening 0, no Nesterov and "
                             "no maximize (the reference recipe); this param group sets one")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            states = [optimizer.state[p] for p in params]
            if all("momentum_buffer" in s and s["momentum_buffer"] is not None for s in states):
                bufs = [s["momentum_buffer"] for s in states]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            else:
                bufs = []
                for s, g in zip(states, grads):
                    buf = s.get("momentum_buffer")
                    if buf is None:
                        buf = s["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(momentum).add_(g)
                    bufs.append(buf)
            grads = bufs
        upd = torch._foreach_mul(grads, lr.to(params[0].dtype))
        torch._foreach_sub_(params, upd)


def check_graph_capturable(*, nms: bool, device: torch.device, world_size: int,
                           optimizer: str, compile_mode: str | None = None) -> None:
    """Raise ConfigError naming the option when a configuration cannot be one CUDA graph.
    With `compile_mode` (a torch.compile mode that captures CUDA graphs) only what breaks a
    capture inside the compiled forward is checked: the connected components."""
    if device.type != "cuda":
        return  # graph mode falls back to eager off CUDA (with a warning)
    if compile_mode is not None:
        if nms and not _sync_free_components(device):
            raise ConfigError(f"train.compile_mode = {compile_mode!r} captures CUDA graphs, and "
                             "loss.nms = true would take the PyTorch connected components, "
                             "which sync with the host: pip install triton or make native, or "
                             "use compile_mode 'default' / 'max-autotune-no-cudagraphs'")
        return
    if world_size > 1:
        raise ConfigError("train.step_mode = 'graph' is not supported with DDP (world size "
                         f"{world_size}): use step_mode 'compile' or 'eager' for multi-GPU runs")
    if optimizer == "apex":
        raise ConfigError("train.step_mode = 'graph' cannot capture train.optimizer = 'apex' "
                         "(FusedSGD reads lr as a host float); use 'foreach' or 'fused'")
    if nms and not _sync_free_components(device):
        raise ConfigError("train.step_mode = 'graph' with loss.nms = true needs sync-free "
                         "connected components on the GPU: Triton (pip install triton) or the "
                         "native library (make native); the PyTorch fallback syncs to check "
                         "convergence. Or set loss.nms = false")


def _sync_free_components(device: torch.device) -> bool:
    from ..ops.components import cuda_backend
    return cuda_backend() in ("native", "triton")


def resolve_step_mode(requested: str, *, nms: bool, device: torch.device, world_size: int,
                      optimizer: str) -> tuple[str, str]:
    """(mode, why) for `train.step_mode`: "auto" = one CUDA graph per phase on one GPU; where
    a graph cannot be captured (DDP, apex, connected components that sync) torch.compile of
    the step; eager steps off CUDA. An explicit mode is kept as it is."""
    if requested != "auto":
        return requested, f"step_mode {requested!r} (configured)"
    if device.type != "cuda":
        return "eager", f"step_mode auto: eager steps on {device.type}"
    try:
        check_graph_capturable(nms=nms, device=device, world_size=world_size,
                               optimizer=optimizer)
    except ValueError as e:
        return "compile", f"step_mode auto: torch.compile (no CUDA graph: {e})"
    return "graph", "step_mode auto: one CUDA graph per phase"


def _no_part(name: str) -> ContextManager[None]:
    return nullcontext()


class StepRunner:
    """Runs one training step in `mode` ("eager" | "compile" | "graph").

    forward(model, x, y_l, phase2, **prepared) -> (loss, values, names) is the objective
    closure (`UCSegObjective.forward_values`); `prepare(x, phase2)` -> dict runs just before it,
    eagerly in every mode (the phase-2 copy-paste draw: a compiled step stays one graph without
    random draws of its own); `update` is the optimizer update (reads device scalars only).
    `__call__(batch, phase2)` returns the detached loss terms as `StepTerms` (in graph mode the
    graph's static outputs, valid until the next step — the Trainer adds them to its sums at
    once). "compile" compiles the forward with `fullgraph=True`: a graph break is an error,
    never a silent split."""

    def __init__(self, *, model: nn.Module, forward: Callable[..., tuple[Tensor, Tensor, tuple]],
                 update: Callable[[], None], mode: str, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 autocast: Callable[[], Any] = nullcontext,
                 generators: tuple[torch.Generator, ...] = (), warmup: int = 3,
                 compile_mode: str = "default", compile_backend: str = "inductor",
                 weight_cast: Any = None,
                 prepare: Callable[[Tensor, bool], dict[str, Tensor]] | None = None) -> None:
        self.prepare = prepare
        self.model, self.update = model, update
        # `train.precision.WeightCast`: one cast of every low-precision weight per step (eager
        # and graph steps; a compiled step leaves the casts to autocast and Inductor)
        self.weight_cast = weight_cast if weight_cast and mode != "compile" else None
        # part(name) -> context manager around each stage of the step; the ledger uses it to
        # attribute every op to a part (input, weights, forward, backward, optimizer)
        self.part: Callable[[str], ContextManager[Any]] = _no_part
        self.device, self.memory_format, self.autocast = device, memory_format, autocast
        self.generators = generators
        self.warmup = max(int(warmup), 1)
        if mode == "graph" and device.type != "cuda":
            warnings.warn("train.step_mode = 'graph' needs CUDA; running eager steps on "
                          f"{device}", stacklevel=3)
            mode = "eager"
        self.mode = mode
        self._forward = forward
        if mode == "compile":
            kw: dict[str, Any] = {"backend": compile_backend}
            if compile_backend == "inductor":
                kw["mode"] = compile_mode
            self._forward = torch.compile(forward, fullgraph=True, **kw)
        self.reset()

    def reset(self) -> None:
        """Drop captured graphs and static buffers (after a checkpoint load replaced the
        optimizer state tensors that a graph would have baked in)."""
        self._graphs: dict[bool, tuple[Any, dict[str, Tensor]]] = {}
        self._eager_steps: dict[bool, int] = {False: 0, True: 0}
        self._static: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------------
    @contextmanager
    def _weights(self, phase2: bool) -> Iterator[None]:
        if self.weight_cast is None:
            yield
            return
        with self.weight_cast(self.part, uses=2 if phase2 else 1):  # phase 2: two forwards
            yield

    def _body(self, x_l: Tensor, y_l: Tensor, x_u: Tensor, phase2: bool):
        from .objective import StepTerms
        with self.part("input"):
            x = torch.cat([x_l, x_u], 0).contiguous(memory_format=self.memory_format)
        with self.autocast(), self._weights(phase2), self.part("forward"):
            kw = self.prepare(x, phase2) if self.prepare is not None else {}
            loss, values, names = self._forward(self.model, x, y_l, phase2, **kw)
        with self.part("backward"):
            loss.backward()
        with self.part("optimizer"):
            self.update()
        return StepTerms(names, values)

    def _eager(self, x_l: Tensor, y_l: Tensor, x_u: Tensor, phase2: bool) -> dict[str, Tensor]:
        self.model.zero_grad(set_to_none=True)
        return self._body(x_l, y_l, x_u, phase2)

    def __call__(self, batch, phase2: bool) -> dict[str, Tensor]:
        self.model.train()
        if self.mode != "graph":
            return self._eager(batch.x_l, batch.y_l, batch.x_u, phase2)
        return self._graph_step(batch, phase2)

    # ------------------------------------------------------------------------------------
    def _graph_step(self, batch, phase2: bool) -> dict[str, Tensor]:
        if self._static is None:
            self._static = {k: getattr(batch, k).clone() for k in ("x_l", "y_l", "x_u")}
        st = self._static
        for k in ("x_l", "y_l", "x_u"):
            st[k].copy_(getattr(batch, k), non_blocking=True)
        if phase2 not in self._graphs:
            self._graphs.pop(not phase2, None)  # phases only move forward: free the other pool
            if self._eager_steps[phase2] < self.warmup:
                self._eager_steps[phase2] += 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    terms = self._eager(st["x_l"], st["y_l"], st["x_u"], phase2)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return terms
            self._capture(phase2)
        graph, terms = self._graphs[phase2]
        graph.replay()
        return terms

    def _capture(self, phase2: bool) -> None:
        st = self._static
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            reg = getattr(graph, "register_generator_state", None)
            if reg is None:
                raise RuntimeError("train.step_mode = 'graph': this torch has no "
                                   "CUDAGraph.register_generator_state for the copy-paste "
                                   "generator; use step_mode 'compile' or 'eager'")
            reg(gen)
        # grads are allocated inside the graph's pool and overwritten (not accumulated) by
        # every replay, so no zero_grad runs inside the graph
        self.model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            terms = self._body(st["x_l"], st["y_l"], st["x_u"], phase2)
        self._graphs[phase2] = (graph, terms)
