"""The training step without data: `StepCore` holds the UC-Seg pair (and its DDP wrapper), the
objective with its CCP queues, the schedule tensors, the optimizer, the copy-paste generator
and the `StepRunner` (eager, torch.compile or CUDA graph). The Trainer wraps it with data,
logging, validation and checkpoints; `bench` and the ledger run it on synthetic batches.
Everything it is made of is built by the configuration's `Recipe`.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from ..config import Config, phase2_start_at
from .distributed import DistInfo, init_from_env
from .recipe import Recipe, build_model, resolve_ops
from .state import to_device
from .step import StepRunner, apex_fused_sgd, foreach_sgd_step, resolve_step_mode

__all__ = ["StepCore", "build_model", "build_step_core", "place", "resolve_ops",
           "to_memory_format"]


def place(device_name: str) -> tuple[torch.device, DistInfo]:
    """The device `train.device` names ("auto": CUDA when available) and the process group
    of a torchrun launch (the local rank's GPU becomes the current CUDA device: graph capture,
    the default generator and NCCL use it)."""
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            from ..config import ConfigError
            raise ConfigError(f"train.device = {device_name!r} but CUDA is not available")
    dist = init_from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank if dist.enabled else (device.index or 0))
        torch.cuda.set_device(device)
    return device, dist


class StepCore:
    """Everything one training step needs, without data: the UC-Seg pair (and its DDP wrapper),
    the objective with its CCP queues, the schedule tensors, the optimizer, the copy-paste
    generator and the `StepRunner`. The Trainer wraps it with data, logging, validation and
    checkpoints; `bench` and the ledger run it on synthetic batches."""

    def __init__(self, cfg: Config, device: torch.device, *, dist: DistInfo | None = None,
                 amp: str | None = None, channels_last: bool | None = None,
                 step_mode: str | None = None, compile_backend: str = "inductor") -> None:
        cfg = resolve_ops(cfg, device)
        tc, lc = cfg.train, cfg.loss
        recipe = Recipe(cfg)
        recipe.check(device, dist.world_size if dist is not None else 1, step_mode=step_mode,
                     data=False)
        self.cfg, self.device = cfg, device
        dist = dist if dist is not None else DistInfo()
        self.dist = dist
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # `amp` / `channels_last` default to the configuration as CUDA applies it (bf16 and
        # channels-last on CUDA only); the ledger passes them explicitly to count the CUDA step
        amp = amp if amp is not None else (tc.amp if device.type == "cuda" else "none")
        self.amp_dtype = {"bf16": torch.bfloat16}.get(amp)
        self.model = recipe.model(device)
        if any(p.device != device for p in self.model.parameters()):
            self.model.to(device)
        cl = tc.channels_last if channels_last is None else channels_last
        self.memory_format = recipe.memory_format(cl)
        to_memory_format(self.model, self.memory_format)
        self.objective = recipe.objective(device)
        self.scalars = recipe.schedules(device)
        self.phase2_start = phase2_start_at(cfg)  # never reached by the supervised baseline
        self.optimizer = self._build_optimizer()
        self.train_model: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            if tc.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # static_graph: the set of parameters that get gradients is the same every step
            # (one, the UPG cross-attention temperature, never does) and phase 2 calls the
            # model twice before one backward; DDP learns both from the first iteration
            # instead of searching the autograd graph every step (find_unused_parameters)
            self.train_model = DDP(self.model, device_ids=[device.index]
                                   if device.type == "cuda" else None, static_graph=True)
            # same initial weights on every rank (seeded above, and DDP broadcasts rank 0's);
            # distinct dropout draws per rank from here on
            torch.manual_seed(tc.seed + 1000 * dist.rank)
        self.mix_generator = torch.Generator(device=device)
        self.mix_generator.manual_seed(tc.seed + 7 + 1000 * dist.rank)
        from .precision import WeightCast
        self.step_mode, self.step_mode_reason = resolve_step_mode(
            step_mode or tc.step_mode, nms=lc.nms, device=device, world_size=dist.world_size,
            optimizer=tc.optimizer)
        self.runner = StepRunner(
            model=self.train_model, forward=self._objective_call, update=self._optimizer_update,
            mode=self.step_mode, device=device, memory_format=self.memory_format,
            autocast=self.autocast, generators=(self.mix_generator,), warmup=tc.graph_warmup,
            compile_mode=tc.compile_mode, compile_backend=compile_backend,
            # one cast op for every weight; under DDP autocast keeps its per-parameter casts (a
            # forward on swapped-in weight copies is not combined with the DDP reducer here)
            weight_cast=None if dist.enabled else WeightCast(self.model, self.amp_dtype),
            prepare=self._prepare)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """`foreach`: a torch SGD holds the state, `foreach_sgd_step` updates with the lr
        tensor; `fused`: torch's fused SGD kernel with the lr tensor; `apex`: FusedSGD."""
        tc = self.cfg.train
        kw = dict(momentum=tc.momentum, weight_decay=tc.weight_decay)
        params = self.model.parameters()
        if tc.optimizer == "apex":
            fused = apex_fused_sgd()
            if fused is not None:
                return fused(params, lr=tc.base_lr, **kw)
            warnings.warn("train.optimizer = 'apex' but apex is not importable; using the "
                          "foreach SGD", stacklevel=3)
        if tc.optimizer == "fused":
            return torch.optim.SGD(params, lr=self.scalars.lr, fused=True, **kw)
        return torch.optim.SGD(params, lr=tc.base_lr, foreach=True, **kw)

    def uses_tensor_lr(self) -> bool:
        return self.cfg.train.optimizer == "fused"

    def load_optimizer_state(self, state: dict) -> None:
        """Restore the optimizer from a checkpoint's state (its tensors on this device)."""
        self.optimizer.load_state_dict(to_device(state, self.device))
        if self.uses_tensor_lr():  # load_state_dict put a loaded copy in place of the tensor
            for g in self.optimizer.param_groups:
                g["lr"] = self.scalars.lr

    def _optimizer_update(self) -> None:
        if isinstance(self.optimizer, torch.optim.SGD) and not self.uses_tensor_lr():
            foreach_sgd_step(self.optimizer, self.scalars.lr)
        else:
            self.optimizer.step()

    def _objective_call(self, model, x, y_l, phase2: bool, **mix):
        return self.objective.forward_values(model, x, y_l, self.scalars, phase2, **mix)

    def _prepare(self, x: torch.Tensor, phase2: bool) -> dict[str, torch.Tensor]:
        """The phase-2 copy-paste draw, on the device, outside a compiled forward."""
        if not phase2:
            return {}
        box, branch = self.objective.draw_mix(tuple(x.shape[2:]), x.device, self.mix_generator)
        return {"mix_box": box, "mix_branch_a": branch}

    def update_scalars(self, t: int) -> None:
        self.scalars.update(t)  # in place: a captured graph reads the new values
        if self.uses_tensor_lr():
            return
        lr = self.scalars.values(t)["lr"]  # host float: logged, and what apex reads
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batch, t: int) -> dict[str, torch.Tensor]:
        """One training iteration on a Batch (`x_l`, `y_l`, `x_u`); detached loss terms."""
        self.update_scalars(t)
        return self.runner(batch, t >= self.phase2_start)

    def method_line(self) -> str:
        """One line for the log: the schedules and how much of the method this run trains."""
        lo, T = self.cfg.loss, self.cfg.train.max_iterations
        if not lo.semi_supervised:
            return "supervised baseline (labeled images only, no unlabeled term)"
        full = self.scalars.full_weight_at()
        if full <= T:
            ramp = f"consistency weight full from iteration {full}"
        else:  # absolute schedules in a short run: say how little of the method it trains
            share = self.scalars.values(T - 1)["w"] / self.scalars.values(full)["w"]
            ramp = (f"consistency weight full from iteration {full}, after the run: at most "
                    f"{100 * share:.1f} % of it here (loss.schedules = 'proportional' scales "
                    f"the schedules to the run)")
        cp = self.phase2_start
        return f"{lo.schedules} schedules ({ramp}, copy-paste from {cp if cp < T else 'never'})"



def build_step_core(cfg: Config, device: torch.device | str, **kw) -> StepCore:
    """`StepCore(cfg, device, ...)` (see there)."""
    return StepCore(cfg, torch.device(device), **kw)


def to_memory_format(model: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """`model.to(memory_format=...)` in place (`.data` of the 4-D / 5-D tensors): also for the
    ledger's fake tensors, which `Module.to` cannot swap."""
    nd = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
    if nd is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == nd:
                t.data = t.data.contiguous(memory_format=memory_format)


