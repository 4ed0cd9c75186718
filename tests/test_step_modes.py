"""Step modes (eager | compile | graph), the tensor-lr SGD, and the graph-capture guard.

CPU tier: eager vs `torch.compile` on the synthetic ACDC-like set (img 32, batch 1+1, a phase
switch after step 1; the 20-step acceptance run in the real-data tier). torch.compile with
Inductor compiles C++ on the CPU (minutes), so the tests pass `Trainer(compile_backend=
"aot_eager")`: Dynamo tracing + AOTAutograd (the same graph capture and functionalised backward
as Inductor) executed with eager kernels (~45 s on 2 busy cores).
Resume: in compile mode and in graph mode's CPU fallback, N steps straight == N/2 steps, save,
a fresh Trainer that loads the checkpoint, N/2 steps (bit-exact: same mode on both sides). The
straight compile run is shared with the eager comparison (one compile run, one resumed).
GPU tier: graph vs eager over steps across the phase switch, and a sync-debug run.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ucseg_fast.config import load_config
from ucseg_fast.train import Trainer
from ucseg_fast.train.step import check_graph_capturable, foreach_sgd_step

STEPS = 4  # phase 1 at step 0, phase 2 from step 1
SAVE_AT = 2  # checkpoint after steps 0, 1 (queues, momentum, mix generator all moved)


def tiny_cfg(root, out_dir, **over):
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32]", "data.labeled_bs": "1",
          "data.unlabeled_bs": "1", "train.max_iterations": "20", "train.log_every": "1",
          "train.out_dir": f"'{out_dir}'", "train.progress": "false", "train.amp": "'none'",
          "train.channels_last": "false", "loss.phase2_start": "1", "loss.queue_size": "16",
          "train.max_val_volumes": "1"}
    ov.update(over)
    return load_config(None, [f"--{k}={v}" for k, v in ov.items()])


def run_steps(tr: Trainer, n: int, *, save_at: int | None = None, start: int = 0):
    """Steps start..n-1 (as `Trainer.train` would run them); with `save_at`, checkpoint `mid`
    is written before step `save_at` (saving reads state, it changes none)."""
    losses = []
    for t in range(start, n):
        if t == save_at:
            tr.iteration = t
            tr.save("mid")
        terms = tr.step(tr.stream.next(), t)
        losses.append({k: v.clone() for k, v in terms.items()})
    return losses, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


MODE_OVERRIDES = {"compile": {"train.step_mode": "'compile'"},
                  "graph": {"train.step_mode": "'graph'"}}
BACKEND = "aot_eager"  # torch.compile's backend here (Trainer(compile_backend=...))


@pytest.fixture(scope="module")
def eager_run(synth_acdc, tmp_path_factory):
    tr = Trainer(tiny_cfg(synth_acdc, tmp_path_factory.mktemp("eager")), log=lambda s: None)
    return run_steps(tr, STEPS)


@pytest.fixture(scope="module")
def mode_runs(synth_acdc, tmp_path_factory):
    """mode -> (losses, state, out_dir) of a straight run that saved `mid` at SAVE_AT."""
    runs: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in runs:
            out = tmp_path_factory.mktemp(mode)
            if mode == "graph":
                with pytest.warns(UserWarning, match="step_mode = 'graph' needs CUDA"):
                    tr = Trainer(tiny_cfg(synth_acdc, out, **MODE_OVERRIDES[mode]),
                                 log=lambda s: None, compile_backend=BACKEND)
                assert tr.runner.mode == "eager"
            else:
                tr = Trainer(tiny_cfg(synth_acdc, out, **MODE_OVERRIDES[mode]),
                             log=lambda s: None, compile_backend=BACKEND)
                assert tr.runner.mode == mode
            runs[mode] = (*run_steps(tr, STEPS, save_at=SAVE_AT), out)
        return runs[mode]
    return get


def test_compile_matches_eager(eager_run, mode_runs):
    losses, state, _ = mode_runs("compile")
    ref_losses, ref_state = eager_run
    assert "mix1" in losses[-1] and "mix1" not in losses[0]  # the phase switch happened
    for got, ref in zip(losses, ref_losses):
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # AOTAutograd's decomposed backward rounds differently (~1e-7 relative); three SGD steps on
    # batch 1 + 1 amplify it: measured 2026-12-06 on the synthetic set, terms within 7e-6
    # relative at step 3, the weights within 2e-4 of each tensor's scale and a few small
    # BatchNorm biases within 1.2e-2 of theirs; held as in the 20-step run (5e-2 of the scale)
    assert_weights_close(state, ref_state, 5e-2)



@pytest.mark.realdata
def test_compile_matches_eager_over_20_steps(real_acdc, tmp_path):
    """The acceptance length: 20 steps on fixed seeds, the phase switch at step 10.

    Real-data tier: the tolerances below are the drift measured on the real subset. The
    synthetic set amplifies the rounding sooner (measured 2026-12-06 with two data seeds: single
    terms past 1e-5 relative from step 7 or 8, L up to 4e-4 by step 19), so there it would test
    the data, not the compiler; test_compile_matches_eager covers the synthetic set.

    AOTAutograd's decomposed backward rounds differently from eager (~1e-7 relative, see
    test_compile_matches_eager); SGD then amplifies that rounding step by step on this tiny,
    noisy problem (batch 1 + 1 at 32², BatchNorm on one image), measured on 2026-11-26: every
    term within 3e-7 relative for steps 0-10, the total loss L within 3e-5 relative up to step
    19 while single terms drift to ~1.5e-3 and a few small weights to ~1e-2 relative. The test
    holds each phase to what rounding explains: every term as rounding through the phase
    switch, then L (the quantity that is optimised) at 1e-4 relative, the weights at 5e-2 of
    each tensor's scale. A real difference (a term missing, a wrong weight, a stale buffer)
    moves these by orders of magnitude more."""
    runs = {}
    for mode, over in (("eager", {}), ("compile", MODE_OVERRIDES["compile"])):
        tr = Trainer(tiny_cfg(real_acdc, tmp_path / mode, **{"loss.phase2_start": "10", **over}),
                     log=lambda s: None, compile_backend=BACKEND)
        runs[mode] = run_steps(tr, 20)
    (losses, state), (ref_losses, ref_state) = runs["compile"], runs["eager"]
    assert len(losses) == 20 and "mix1" not in losses[9] and "mix1" in losses[10]
    for t, (got, ref) in enumerate(zip(losses, ref_losses)):
        assert got.keys() == ref.keys()
        if t <= 10:
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{k} @ {t}")
        torch.testing.assert_close(got["L"], ref["L"], rtol=1e-4, atol=0.0, msg=f"L @ {t}")
    assert_weights_close(state, ref_state, 5e-2)


def assert_weights_close(state: dict, ref_state: dict, frac: float) -> None:
    """Every float tensor within `frac` of its own scale (max |ref|); other tensors equal."""
    for k, ref in ref_state.items():
        if ref.is_floating_point():
            scale = float(ref.abs().max()) + 1e-12
            assert float((state[k].to(ref.device) - ref).abs().max()) <= frac * scale, k
        else:
            assert torch.equal(state[k].to(ref.device), ref), k

def test_graph_mode_off_cuda_falls_back_to_eager(eager_run, mode_runs):
    losses, state, _ = mode_runs("graph")
    for got, ref in zip(losses, eager_run[0]):
        assert torch.equal(got["L"], ref["L"])
    for k, v in eager_run[1].items():
        assert torch.equal(state[k], v), k



@pytest.mark.parametrize("mode", ["compile", "graph"])
def test_resume_is_exact_in_mode(mode, mode_runs, synth_acdc):
    # N straight == N/2 + save + a fresh Trainer loading the checkpoint + N/2, bit for bit
    ref_losses, ref_state, out = mode_runs(mode)
    fallback = pytest.warns(UserWarning, match="needs CUDA") if mode == "graph" else nullcontext()
    with fallback:
        tr = Trainer(tiny_cfg(synth_acdc, out, **MODE_OVERRIDES[mode]), log=lambda s: None,
                     compile_backend=BACKEND)
    assert tr.runner.mode == ("eager" if mode == "graph" else mode)
    tr.load(out / "mid.json")
    assert tr.iteration == SAVE_AT
    losses, state = run_steps(tr, STEPS, start=SAVE_AT)
    assert len(losses) == STEPS - SAVE_AT
    for got, ref in zip(losses, ref_losses[SAVE_AT:]):
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k


def _toy_params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)),
            torch.nn.Parameter(torch.randn(7, generator=g))]


def test_foreach_sgd_with_lr_tensor_matches_torch_sgd():
    # oracle: torch's SGD with a float lr (its own foreach path), same momentum / weight decay
    ref, mine, fused = _toy_params(0), _toy_params(0), _toy_params(0)
    opt_ref = torch.optim.SGD(ref, lr=0.01, momentum=0.9, weight_decay=1e-5, foreach=True)
    opt_mine = torch.optim.SGD(mine, lr=0.01, momentum=0.9, weight_decay=1e-5, foreach=True)
    lr = torch.tensor(0.0)
    opt_fused = torch.optim.SGD(fused, lr=lr, momentum=0.9, weight_decay=1e-5, fused=True)
    g = torch.Generator().manual_seed(1)
    for step, lr_value in enumerate((0.01, 0.0099, 0.0098)):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for ps in (ref, mine, fused):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        for grp in opt_ref.param_groups:
            grp["lr"] = lr_value
        lr.fill_(lr_value)
        opt_ref.step()
        foreach_sgd_step(opt_mine, lr)
        opt_fused.step()
        for a, b, c in zip(ref, mine, fused):
            torch.testing.assert_close(b, a, rtol=2.5e-7, atol=1e-8)  # <= 2 ulp
            torch.testing.assert_close(c, a, rtol=2.5e-7, atol=1e-8)  # <= 2 ulp
    # same state layout as torch's SGD: checkpoints do not change
    for a, b in zip(ref, mine):
        torch.testing.assert_close(opt_mine.state[b]["momentum_buffer"],
                                   opt_ref.state[a]["momentum_buffer"], rtol=0, atol=1e-7)


def test_graph_guard_names_the_option():
    cuda = torch.device("cuda")  # a device object only: nothing touches CUDA here
    check_graph_capturable(nms=True, device=torch.device("cpu"), world_size=1, optimizer="foreach")
    with pytest.raises(ValueError, match="step_mode = 'graph' is not supported with DDP"):
        check_graph_capturable(nms=False, device=cuda, world_size=2, optimizer="foreach")
    with pytest.raises(ValueError, match="train.optimizer = 'apex'"):
        check_graph_capturable(nms=False, device=cuda, world_size=1, optimizer="apex")
    from ucseg_fast.ops import set_backend
    from ucseg_fast.ops import components
    if components.cuda_backend() in ("native", "triton"):  # Triton (or the library) is sync-free
        check_graph_capturable(nms=True, device=cuda, world_size=1, optimizer="foreach")
    if components._native_cuda() is None:
        set_backend("reference")  # no Triton: connected components would take the syncing path
        try:
            with pytest.raises(ValueError, match="loss.nms = true needs sync-free"):
                check_graph_capturable(nms=True, device=cuda, world_size=1, optimizer="foreach")
            with pytest.raises(ValueError, match="compile_mode = 'reduce-overhead'"):
                check_graph_capturable(nms=True, device=cuda, world_size=2, optimizer="apex",
                                       compile_mode="reduce-overhead")
        finally:
            set_backend("auto")
    # a compile mode that captures graphs only checks the connected components
    check_graph_capturable(nms=False, device=cuda, world_size=2, optimizer="apex",
                           compile_mode="reduce-overhead")
    check_graph_capturable(nms=False, device=cuda, world_size=1, optimizer="fused")


def test_auto_step_mode_resolves_per_device():
    from ucseg_fast.train.step import resolve_step_mode
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kw = dict(nms=False, optimizer="foreach")
    assert resolve_step_mode("auto", device=cpu, world_size=1, **kw)[0] == "eager"
    assert resolve_step_mode("auto", device=cuda, world_size=1, **kw)[0] == "graph"
    mode, why = resolve_step_mode("auto", device=cuda, world_size=2, **kw)
    assert mode == "compile" and "DDP" in why
    assert resolve_step_mode("eager", device=cuda, world_size=1, **kw)[0] == "eager"


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------
def _gpu_cfg(root, out, mode, **over):
    from ucseg_fast.ops.components import _native_cuda
    nms = "true" if _native_cuda() is not None else "false"
    over = {"loss.phase2_start": "6", **over}
    return tiny_cfg(root, out, **{"train.step_mode": f"'{mode}'", "train.device": "'cuda'",
                                  "loss.nms": nms,
                                  "data.img_size": "[64,64]", "data.labeled_bs": "2",
                                  "data.unlabeled_bs": "2", **over})


@pytest.mark.gpu
def test_graph_matches_eager_on_gpu(synth_acdc, tmp_path):
    """The acceptance length: 20 steps on fixed seeds, phase switch at 10 (graph mode: 3 eager
    warm-up steps and a capture per phase, then replays). Replays run the eager kernels, so
    the only differences are CUDA atomics (e.g. interpolation backward) amplified by SGD: L
    per step at 1e-4 relative, the weights at 1e-2 of each tensor's scale (the CPU compile
    test, whose rounding differs everywhere, measured L within 3e-5 and weights within ~1e-2)."""
    # fp32, no cudnn autotuning differences: graph replays must give the eager numbers
    torch.backends.cudnn.deterministic = True
    runs = {}
    for mode in ("eager", "graph"):
        tr = Trainer(_gpu_cfg(synth_acdc, tmp_path / mode, mode, **{"loss.phase2_start": "10"}),
                     log=lambda s: None)
        torch.backends.cudnn.benchmark = False
        losses, state = run_steps(tr, 20)
        runs[mode] = ([{k: v.cpu() for k, v in d.items()} for d in losses], state)
    assert "mix1" not in runs["graph"][0][9] and "mix1" in runs["graph"][0][10]
    for got, ref in zip(runs["graph"][0], runs["eager"][0]):
        torch.testing.assert_close(got["L"], ref["L"], rtol=1e-4, atol=1e-5)
    assert_weights_close(runs["graph"][1], runs["eager"][1], 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_step_has_no_host_sync(synth_acdc, tmp_path, mode):
    tr = Trainer(_gpu_cfg(synth_acdc, tmp_path, mode), log=lambda s: None)
    batches = [tr.stream.next() for _ in range(10)]
    for t in range(4):  # warm-up / capture outside the check (cudnn autotuning may sync)
        tr.step(batches[t], t)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(4, 10):  # crosses the phase switch at 6
            tr.step(batches[t], t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
