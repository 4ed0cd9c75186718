"""The step ledger: what one training step costs, measured on a CPU (`ucseg-fast bench ledger`).

A GPU step is a sequence of kernels; its time is roughly the sum over kernels of
max(bytes / bandwidth, FLOPs / peak, a per-kernel floor). All three can be read off a CPU:

* **Kernels** — one real training step of each phase runs on the CPU at a small shape, with the
  options the CUDA path uses (bf16 autocast, channels-last, the configuration's fused ops as custom
  ops whose Triton kernels run in the interpreter, the Triton connected components) under a
  `TorchDispatchMode` that counts every op that launches work: views and allocations launch
  nothing and are not counted; custom ops are opened and their inner aten ops and Triton launches
  are counted. The count does not depend on the image size, so the small step counts the real one.
* **Bytes and FLOPs** — the same step runs again at the recipe's real shape on fake tensors
  (`FakeTensorMode`: sizes without data, forward and backward). Bytes = the sizes of each op's
  tensor inputs and outputs (a fused op: its custom op's inputs and outputs, i.e. what its
  kernels must move at least); FLOPs from `torch.utils.flop_counter` (matmuls, convolutions,
  attention) and the fused head's own formula.
* **Host syncs** — an op that needs the host (`.item()`, `bool(tensor)`, `nonzero`, a
  data-dependent shape, a copy to NumPy) fails the ledger with `HostSyncError`, naming the op
  and the line of the package that called it. That is the proof, on a CPU and in CI, that the
  step can be captured as one CUDA graph.

The estimate is a roofline over the kernels (`estimate`). CPU autocast keeps some elementwise ops
in bf16 that CUDA autocast runs in fp32 (`recorder.CUDA_FP32_OPS`); the ledger reports every such
op that sees a low-precision input (`autocast_mismatches`), because on CUDA it would add a cast
kernel the CPU run does not show.

Modules, in the order they work: `recorder` (the dispatch mode that counts and sizes ops, host
syncs, FLOPs), `passes` (the step under the recorder: the count pass, the size pass, the
stream), `estimate` (cards, the roofline, the ledger's Markdown and JSON).
"""
from __future__ import annotations

from .estimate import CARDS, EAGER_US, PARTS, Card, Ledger, PartLedger, PhaseLedger, step_ledger
from .passes import count_ops, size_ops
from .recorder import HostSyncError

__all__ = ["Card", "CARDS", "EAGER_US", "HostSyncError", "Ledger", "PartLedger", "PhaseLedger",
           "PARTS", "count_ops", "size_ops", "step_ledger"]
