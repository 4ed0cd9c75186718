"""Fused UPG fusion head (ops/upg_head.py, FusedFusionHead, UPG(head_impl="fused")) vs the oracle.

CPU tier: the Triton kernel under TRITON_INTERPRET=1 on tiny 2D/3D shapes (fp32) against
`FusionHead` — outputs, batch statistics, running statistics, num_batches_tracked and every
gradient, train and eval; the tolerance is 2× the fp32 oracle's own error against float64 plus
a small atol. float64 runs the reference (`reference.fusion_head`, differentiated by autograd),
which is what the golden vectors of tests/golden/ (docs/golden.md §7.2, [4,4,256,256]) check.
"""
from __future__ import annotations

import copy

import pytest
import torch

from golden import golden
from ucseg_fast.models.upg import UPG, FusedFusionHead, FusionHead
from ucseg_fast.ops import upg_head
from ucseg_fast.ops._triton_utils import triton_usable

needs_kernel = pytest.mark.skipif(not triton_usable(torch.zeros(1)),
                                  reason="Triton kernel not runnable here (no triton / TRITON_INTERPRET)")


def _heads(C: int, dims: int, dtype: torch.dtype, seed: int = 0) -> tuple[FusionHead, FusedFusionHead]:
    """An oracle head with non-default parameters and running stats, and a fused copy of it."""
    g = torch.Generator().manual_seed(seed)
    ref = FusionHead(C, spatial_dims=dims)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith("running_var") or name.endswith("1.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.rand(t.shape, generator=g) * 2 - 1)
    ref = ref.to(dtype)
    fus = FusedFusionHead(C, spatial_dims=dims).to(dtype)
    fus.load_state_dict(ref.state_dict())
    return ref, fus


def _inputs(B: int, C: int, spatial: tuple[int, ...], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) * 3 + 1
    z2 = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) * 2 - 0.5
    A = torch.rand(B, 1, *spatial, generator=g, dtype=torch.float64) + 0.2
    w = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    return z1, z2, A, w


def _run(head, z1, z2, A, w, fused: bool):
    """Forward + backward of Σ P·w; returns P, input grads, param grads, buffers."""
    z1, z2, A = (t.clone().requires_grad_(True) for t in (z1, z2, A))
    P = head.fused(z1, z2, A) if fused else head(torch.cat([A * z1, A * z2], 1))
    (P * w.to(P.dtype)).sum().backward()
    return {"P": P.detach(), "dz1": z1.grad, "dz2": z2.grad, "dA": A.grad,
            **{f"grad.{n}": p.grad for n, p in head.named_parameters()},
            **{f"buf.{n}": b.clone() for n, b in head.named_buffers()}}


def _compare(fused: dict, ref32: dict, ref64: dict, atol: float) -> None:
    """fused fp32 within 2× the fp32 oracle's error (both against float64) + atol."""
    assert fused.keys() == ref64.keys()
    for k in ref64:
        exact = ref64[k].double()
        err_ref = (ref32[k].double() - exact).abs().max().item()
        err = (fused[k].double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2 * err_ref + atol * max(1.0, scale), f"{k}: fused err {err:.3g}, fp32 oracle err {err_ref:.3g}"


CASES = [((5, 7), 4, 3), ((5, 7), 2, 1), ((3, 4, 5), 2, 3), ((3, 4, 5), 4, 1)]


def _two_programs(monkeypatch) -> None:
    """Every sweep on 2 programs (1 SM, 2 programs per SM; the final backward sweep's 2 per SM)."""
    monkeypatch.setattr(upg_head, "sm_count", lambda device: 1)
    monkeypatch.setattr(upg_head, "SWEEP_PROGRAMS_PER_SM", 2)


@needs_kernel
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial,C,B", CASES, ids=[f"{len(s)}d-C{c}-B{b}" for s, c, b in CASES])
def test_kernel_matches_oracle(spatial, C, B, train, monkeypatch):
    if B == 3:  # 2 programs over 2-3 tiles: the in-program Chan merge and dW accumulation run
        _two_programs(monkeypatch)
    dims = len(spatial)
    z1, z2, A, w = _inputs(B, C, spatial)
    out = {}
    for tag, dtype, fused in (("ref64", torch.float64, False), ("ref32", torch.float32, False),
                              ("fused", torch.float32, True)):
        ref, fus = _heads(C, dims, dtype)
        head = fus if fused else ref
        head.train(train)
        out[tag] = _run(head, *(t.to(dtype) for t in (z1, z2, A)), w, fused)
    _compare(out["fused"], out["ref32"], out["ref64"], atol=2e-6)
    nbt = [v for k, v in out["fused"].items() if k.endswith("num_batches_tracked")]
    assert len(nbt) == 6 and all(int(v) == (4 if train else 3) for v in nbt)


@needs_kernel
def test_kernel_channels_last_and_mixed_layouts():
    """z1 channels-last, z2 contiguous, A a strided view: read in place, same numbers."""
    z1, z2, A, w = (t.float() for t in _inputs(2, 4, (6, 5)))
    ref, fus = _heads(4, 2, torch.float32)
    fus2 = copy.deepcopy(fus)
    base = _run(fus, z1, z2, A, w, True)
    A_big = torch.zeros(2, 3, 6, 5)
    A_big[:, 1:2] = A
    z1_cl = z1.contiguous(memory_format=torch.channels_last)
    other = _run(fus2, z1_cl, z2, A_big[:, 1:2], w, True)
    for k in base:
        torch.testing.assert_close(other[k], base[k], rtol=1e-6, atol=1e-6, msg=k)


@needs_kernel
def test_kernel_statistics_large_mean(monkeypatch):
    """|mean| ≫ std in the first layer: Chan-merged fp32 statistics stay at fp32-ulp level of var."""
    _two_programs(monkeypatch)  # 5 tiles on 2 programs
    B, C, spatial = 3, 4, (9, 11)
    z1, z2, A, _ = _inputs(B, C, spatial)
    z1 = z1 * 0.01 + 300.0
    z2 = z2 * 0.01 - 200.0
    _, fus = _heads(C, 2, torch.float64)
    wt, gamma, beta, rm, rv, chans = upg_head.pack_head_params(fus)
    m64, v64 = upg_head.fusion_head(z1, z2, A, wt, gamma, beta, rm, rv, chans, True)[1:]
    m32, v32 = upg_head.fusion_head(z1.float(), z2.float(), A.float(), wt.float(), gamma.float(),
                                    beta.float(), rm.float(), rv.float(), chans, True)[1:]
    rel = ((v32[0, :16].double() - v64[0, :16]).abs() / v64[0, :16]).max().item()
    # naive Σx² − N·mean² in fp32 loses everything here (mean² / var ≈ 1e8 ≫ 2^24)
    assert rel < 1e-3, rel
    torch.testing.assert_close(m32[0].double(), m64[0], rtol=1e-6, atol=0)


@needs_kernel
def test_kernel_bf16_inputs():
    """bf16 z1/z2/A (fp32 parameters, as under autocast): fp32 math inside, bf16 P/dz/dA rounded once."""
    z1, z2, A, w = (t.to(torch.bfloat16) for t in _inputs(3, 4, (5, 7)))
    ref, fus = _heads(4, 2, torch.float32)
    a = _run(ref, z1.float(), z2.float(), A.float(), w.float(), False)
    b = _run(fus, z1, z2, A, w, True)
    for k in a:
        assert b[k].dtype == (torch.bfloat16 if k in ("P", "dz1", "dz2", "dA") else a[k].dtype), k
        scale = a[k].abs().max().item()
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=8e-3, atol=1e-5 * max(1.0, scale), msg=k)


@needs_kernel
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck_custom_op(train):
    """Schema, fake kernel, autograd registration, AOT dispatch: what torch.compile relies on."""
    _, fus = _heads(2, 2, torch.float32)
    wt, gamma, beta, rm, rv, chans = upg_head.pack_head_params(fus)
    wt, gamma, beta = (t.detach().requires_grad_(True) for t in (wt, gamma, beta))
    z1, z2, A, _ = (t.float().requires_grad_(True) for t in _inputs(2, 2, (4, 5)))
    torch.library.opcheck(torch.ops.ucseg.fusion_head.default,
                          (z1, z2, A, wt, gamma, beta, rm.detach(), rv.detach(), chans, train, 1e-5))


@needs_kernel
def test_compile_fullgraph_aot_eager():
    """torch.compile(fullgraph=True) traces FusedFusionHead.fused (custom op + running-stat update);
    aot_eager keeps it cheap on CPU (Inductor is the GPU test). Same P, grads, buffers as eager."""
    _, fus = _heads(2, 2, torch.float32)
    fus2 = copy.deepcopy(fus)
    z1, z2, A, w = (t.float() for t in _inputs(2, 2, (4, 5)))
    fn = torch.compile(fus2.fused, backend="aot_eager", fullgraph=True)
    outs = []
    for f in (fus.fused, fn):
        ins = [t.clone().requires_grad_(True) for t in (z1, z2, A)]
        P = f(*ins)
        (P * w).sum().backward()
        outs.append([P.detach(), *(t.grad for t in ins)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for a, b in zip(fus.buffers(), fus2.buffers()):
        assert torch.equal(a, b)


def test_float64_reference_matches_oracle_tightly():
    """The reference path (float64, also the golden path) equals the oracle module."""
    z1, z2, A, w = _inputs(3, 4, (5, 7))
    ref, fus = _heads(4, 2, torch.float64)
    a, b = _run(ref, z1, z2, A, w, False), _run(fus, z1, z2, A, w, True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-11, atol=1e-11, msg=k)


def test_state_dict_interchange_both_ways():
    ref, fus = _heads(4, 2, torch.float32)
    assert list(ref.state_dict()) == list(fus.state_dict())
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fus.named_parameters()]
    fresh_ref, fresh_fus = FusionHead(4), FusedFusionHead(4)
    fresh_ref.load_state_dict(fus.state_dict(), strict=True)
    fresh_fus.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh_ref.state_dict()[k], v) and torch.equal(fresh_fus.state_dict()[k], v)
    u_t, u_f = UPG(4, (32, 32), 16), UPG(4, (32, 32), 16, head_impl="fused")
    assert isinstance(u_f.final_head, FusedFusionHead)
    assert list(u_t.state_dict()) == list(u_f.state_dict())
    u_f.load_state_dict(u_t.state_dict(), strict=True)
    with pytest.raises(ValueError, match="head_impl"):
        UPG(4, (32, 32), 16, head_impl="triton")


def test_upg_fused_forward_equals_torch():
    """UPG(head_impl="fused") == UPG(head_impl="torch"): A, P, running stats and all gradients."""
    torch.manual_seed(0)
    u_t = UPG(2, (32, 32), 16, dropout=0.0).double()
    u_f = UPG(2, (32, 32), 16, dropout=0.0, head_impl="fused").double()
    u_f.load_state_dict(u_t.state_dict())
    z1, z2, _, w = _inputs(2, 2, (32, 32))
    u1, u2 = torch.rand(2, 2, 1, 32, 32, dtype=torch.float64)
    res = []
    for upg in (u_t, u_f):
        ins = [t.clone().requires_grad_(True) for t in (u1, u2, z1, z2)]
        A, P = upg(*ins)
        (P * w).sum().backward()
        res.append([A, P, *(t.grad for t in ins), *(p.grad for p in upg.parameters() if p.grad is not None),
                    *upg.buffers()])
    assert len(res[0]) == len(res[1])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_float64_takes_the_reference_packed_and_per_layer(monkeypatch):
    """float64 runs `reference.fusion_head` without entering the custom ops; the packed
    `fusion_head` (per-layer views of wt, γ, β) and `fusion_head_layers` agree, and the packed
    form's gradients reach the packed tensors through the views."""
    z1, z2, A, w = _inputs(2, 4, (5, 7))
    _, fus = _heads(4, 2, torch.float64)
    wt, gamma, beta, rm, rv, chans = upg_head.pack_head_params(fus)
    wt, gamma, beta = (t.detach().requires_grad_(True) for t in (wt, gamma, beta))
    ins = [t.clone().requires_grad_(True) for t in (z1, z2, A)]
    called = []
    for name in ("_fusion_head_op", "_fusion_head_layers_op"):
        real = getattr(upg_head, name)
        monkeypatch.setattr(upg_head, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
    P, mean, var = upg_head.fusion_head(*ins, wt, gamma, beta, rm, rv, chans, True)
    (P * w).sum().backward()
    lay = _run(copy.deepcopy(fus), z1, z2, A, w, True)
    assert called == []
    torch.testing.assert_close(P.detach(), lay["P"], rtol=1e-13, atol=1e-13)
    for k, t in zip(("dz1", "dz2", "dA"), ins):
        torch.testing.assert_close(t.grad, lay[k], rtol=1e-12, atol=1e-12, msg=k)
    for k in range(6):
        ci, co = chans[k], chans[k + 1]
        g_w = lay[f"grad.conv{k + 1}.0.weight"].reshape(co, ci).t()
        torch.testing.assert_close(wt.grad[k, :ci, :co], g_w, rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(wt.grad[k, ci:]) == 0 and torch.count_nonzero(wt.grad[k, :, co:]) == 0
        torch.testing.assert_close(gamma.grad[k, :co], lay[f"grad.conv{k + 1}.1.weight"],
                                   rtol=1e-12, atol=1e-12)
    assert mean.shape == var.shape == (6, wt.shape[-1]) and mean.dtype == torch.float64


def test_forward_dropin_and_errors():
    """FusedFusionHead(x) == FusionHead(x) on the concatenated input (A = 1); shape errors name the op."""
    z1, z2, _, _ = _inputs(2, 2, (4, 4))
    ref, fus = _heads(2, 2, torch.float64)
    x = torch.cat([z1, z2], 1)
    torch.testing.assert_close(fus(x), ref(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="fusion_head"):
        fus.fused(z1, z2[:, :1], torch.ones(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value"):
        fus.fused(z1[:1, :, :1, :1], z2[:1, :, :1, :1], torch.ones(1, 1, 1, 1, dtype=torch.float64))


# ----- golden item 2 with head_impl="fused" (float64: the reference path) ---------------------------
@pytest.fixture(scope="module")
def golden_run():
    from test_golden_upg import _set_submodule  # same dropout handling as the oracle's golden test

    g = golden()
    cfg = g.meta["config"]
    upg = UPG(cfg["num_classes"], tuple(cfg["img_size"]), cfg["patch_size"], head_impl="fused").double()
    sd = {k[len("upg.sd."):]: g.tensor(k) for k in g.meta["tensors"] if k.startswith("upg.sd.")}
    upg.load_state_dict(sd, strict=True)
    for name in g.meta["dropout_replaced_by_identity"]:
        _set_submodule(upg, name, torch.nn.Identity())
    z1, z2, u1, u2, w = (g.input(f"upg.in.{k}") for k in ("z1", "z2", "u1", "u2", "w"))
    out = {}
    upg.eval()
    with torch.no_grad():
        out["upg.P_eval"] = upg(u1, u2, z1, z2)[1]
    head = upg.final_head
    chans = upg_head.pack_head_params(head)[-1]
    upg.train()
    z1, z2, u1, u2 = (t.clone().requires_grad_(True) for t in (z1, z2, u1, u2))
    # UPG.forward with head_impl="fused" is exactly these two calls (checked on a tiny shape by
    # test_upg_fused_forward_equals_torch); calling them here also returns the batch statistics
    A = upg.cross_attn(u1, u2)
    P, mean, var = head.fused_with_stats(z1, z2, A)
    (P * w).sum().backward()
    out.update({"upg.A": A.detach(), "upg.P_train": P.detach(), "upg.grad.z1": z1.grad,
                "upg.grad.z2": z2.grad, "upg.grad.u1": u1.grad, "upg.grad.u2": u2.grad})
    for i in range(1, 7):
        bn = getattr(head, f"conv{i}")[1]
        co = chans[i]
        out[f"upg.bn{i}.batch_mean"] = mean[i - 1, :co]
        out[f"upg.bn{i}.batch_var"] = var[i - 1, :co]
        out[f"upg.bn{i}.running_mean_after"] = bn.running_mean.clone()
        out[f"upg.bn{i}.running_var_after"] = bn.running_var.clone()
        out[f"upg.bn{i}.num_batches_tracked"] = bn.num_batches_tracked.clone()
    out["params"] = dict(upg.named_parameters())
    return g, out


def test_golden_fused_forward_and_stats(golden_run):
    g, out = golden_run
    for key in ("upg.P_eval", "upg.A", "upg.P_train"):
        g.check(key, out[key], "f64")
    for i in range(1, 7):
        for what in ("batch_mean", "batch_var", "running_mean_after", "running_var_after"):
            g.check(f"upg.bn{i}.{what}", out[f"upg.bn{i}.{what}"], "f64")
        assert int(out[f"upg.bn{i}.num_batches_tracked"]) == g.scalar("upg.num_batches_tracked_after")


def test_golden_fused_grads(golden_run):
    g, out = golden_run
    for key in ("upg.grad.z1", "upg.grad.z2", "upg.grad.u1", "upg.grad.u2"):
        g.check(key, out[key], "f64g")
    for i in range(1, 7):
        for s in ("0.weight", "1.weight", "1.bias"):
            name = f"final_head.conv{i}.{s}"
            g.check(f"upg.grad.param.{name}", out["params"][name].grad, "f64g")
    g.check("upg.grad.param.cross_attn.to_out.0.weight", out["params"]["cross_attn.to_out.0.weight"].grad, "f64g")


# ----- GPU tier ------------------------------------------------------------------------------------
def _gpu_case(dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool):
    B, C, *S = shape
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    z1 = torch.randn(shape, device=dev, generator=g).to(dtype)
    z2 = torch.randn(shape, device=dev, generator=g).to(dtype)
    A = torch.rand((B, 1, *S), device=dev, generator=g).to(dtype)
    if channels_last:
        fmt = torch.channels_last if len(S) == 2 else torch.channels_last_3d
        z1, z2, A = (t.contiguous(memory_format=fmt) for t in (z1, z2, A))
    w = torch.randn(shape, device=dev, generator=g)
    return z1, z2, A, w


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(24, 4, 256, 256), (4, 2, 96, 96, 96)], ids=["acdc", "3d"])
def test_gpu_real_shape_matches_oracle(shape, monkeypatch):
    # exact fp32 products whatever an earlier test left in torch's matmul precision (the
    # Trainer allows TF32 on CUDA); tf32 accuracy: test_tf32_error_is_below_bf16_autocast
    monkeypatch.setattr(upg_head, "DOT_PRECISION", "ieee")
    z1, z2, A, w = _gpu_case(torch.float32, shape, channels_last=True)
    dims = len(shape) - 2
    out = {}
    for tag, dtype, fused in (("ref64", torch.float64, False), ("ref32", torch.float32, False),
                              ("fused", torch.float32, True)):
        ref, fus = _heads(shape[1], dims, dtype)
        head = (fus if fused else ref).cuda().train()
        out[tag] = _run(head, *(t.to(dtype) for t in (z1, z2, A)), w, fused)
    _compare(out["fused"], out["ref32"], out["ref64"], atol=1e-5)


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph():
    z1, z2, A, w = _gpu_case(torch.bfloat16, (12, 4, 256, 256), channels_last=True)
    _, fus = _heads(4, 2, torch.float32)
    fus = fus.cuda().train()
    eager_head = copy.deepcopy(fus)
    eager = _run(eager_head, z1, z2, A, w, True)
    comp_head = copy.deepcopy(fus)
    fn = torch.compile(lambda a, b, c: comp_head.fused(a, b, c), fullgraph=True)
    zz = [t.clone().requires_grad_(True) for t in (z1, z2, A)]
    P = fn(*zz)
    (P.float() * w).sum().backward()
    torch.testing.assert_close(P.float(), eager["P"].float(), rtol=0, atol=0)
    torch.testing.assert_close(zz[0].grad.float(), eager["dz1"].float(), rtol=0, atol=0)
    # CUDA graph: warm up, capture forward + backward, replay, same numbers as eager
    graph_head = copy.deepcopy(fus)
    zz = [t.clone().requires_grad_(True) for t in (z1, z2, A)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            (graph_head.fused(*zz).float() * w).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for t in zz:
        t.grad = None
    with torch.cuda.graph(graph):
        Pg = graph_head.fused(*zz)
        (Pg.float() * w).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(Pg.float(), eager["P"].float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Dot precision: the auto rule, and the accuracy of the tf32 products it picks for bf16 training
# ---------------------------------------------------------------------------------------------
def test_dot_precision_rule(monkeypatch):
    monkeypatch.setattr(upg_head, "DOT_PRECISION", "auto")
    z32, z16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert upg_head.dot_precision(z32) == "ieee"           # exact unless TF32 is allowed
        assert upg_head.dot_precision(z16) == "tf32"           # autocast training
        assert upg_head.dot_precision(z16.half()) == "tf32"
        torch.set_float32_matmul_precision("high")             # what the Trainer sets on CUDA
        assert upg_head.dot_precision(z32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev)
    monkeypatch.setattr(upg_head, "DOT_PRECISION", "ieee")
    assert upg_head.dot_precision(z16) == "ieee"
    monkeypatch.setattr(upg_head, "DOT_PRECISION", "tf64")
    with pytest.raises(ValueError, match="UCSEG_UPG_DOT = 'tf64'"):
        upg_head.dot_precision(z32)
    x = torch.tensor([1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, -(1.0 + 3 * 2.0 ** -12)])
    assert _truncate_tf32(x).tolist() == [1.0 + 2.0 ** -10, 1.0, -1.0]


def _truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values with the mantissa cut to tf32's 10 bits (round toward zero: how tensor cores
    read fp32 registers as tf32 operands; the worst case of the two roundings in use)."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)  # -8192 = ~0x1FFF


class _TF32MatMul(torch.autograd.Function):
    """a @ b with both operands cut to tf32 in the forward and in both backward products — the
    kernels' tl.dot products x = h·Wᵀ, dh = dx·W, dW = hᵀ·dx — accumulated in fp32."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _truncate_tf32(a) @ _truncate_tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = (_truncate_tf32(t) for t in ctx.saved_tensors)
        g = _truncate_tf32(g)
        return g @ b.t(), a.t() @ g


class _BatchNormLReLU(torch.autograd.Function):
    """Training BatchNorm + LeakyReLU(0.2) of [N, c] as the kernels compute it: y = x·scale +
    shift, scale = γ·rstd, shift = β − μ·scale; dx = scale·(dy − Σdy/N − x̂·Σdy·x̂/N)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        mean = x.mean(0)
        rstd = 1.0 / torch.sqrt(((x - mean) ** 2).sum(0) / x.shape[0] + eps)
        scale = gamma * rstd
        y = x * scale + (beta - mean * scale)
        ctx.save_for_backward(x, y, mean, rstd, scale)
        return torch.where(y > 0, y, 0.2 * y)

    @staticmethod
    def backward(ctx, dh):
        x, y, mean, rstd, scale = ctx.saved_tensors
        dy = torch.where(y > 0, dh, 0.2 * dh)
        xh = (x - mean) * rstd
        db, dg = dy.sum(0), (dy * xh).sum(0)
        n = x.shape[0]
        return (dy - db / n - xh * (dg / n)) * scale, dg, db, None


def _run_products(head, z1, z2, A, w, tf32: bool) -> dict:
    """`_run` of the training head in fp32 as the kernels compute it (pixel-major products,
    `_BatchNormLReLU`), with exact (ieee) or tf32-operand products."""
    z1, z2, A = (t.clone().requires_grad_(True) for t in (z1, z2, A))
    mm = _TF32MatMul.apply if tf32 else torch.matmul
    pix = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
    h = torch.cat([pix(z1), pix(z2)], 1) * pix(A)
    for k in range(1, 7):
        conv, bn = getattr(head, f"conv{k}")[:2]
        x = mm(h, conv.weight.reshape(conv.weight.shape[0], -1).t())
        h = _BatchNormLReLU.apply(x, bn.weight, bn.bias, bn.eps)
    P = h.reshape(z1.shape[0], *z1.shape[2:], z1.shape[1]).movedim(-1, 1)
    (P * w).sum().backward()
    return {"P": P.detach(), "dz1": z1.grad, "dz2": z2.grad, "dA": A.grad,
            **{f"grad.{n}": p.grad for n, p in head.named_parameters()}}


@pytest.mark.parametrize("shape", [(4, 4, 32, 32), (2, 2, 10, 10, 10)], ids=["2d", "3d"])
def test_tf32_error_is_below_bf16_autocast(shape):
    """What `dot_precision` picks for bf16 training is more accurate than what the PyTorch head
    does there: the head with tf32 products (`_run_products`: the kernels' products with operands
    truncated to tf32 — the worst case) against the PyTorch head under bf16 autocast, both from the same bf16 inputs
    at default initialisation, norm-wise relative error against float64. Measured 2026-11-26:
    P 1.0e-3 vs 1.1e-2 (2D) and 1.1e-3 vs 1.2e-2 (3D); gradients 1.8-5.8× (2D) and 1.2-6.7×
    (3D) closer; over 8 more cases (other shapes and seeds) P always ~10×, gradients 1.05-4×.
    Gradients are noisy at this level in both (LeakyReLU slopes flip where rounding moves y
    across 0). Only a GPU can time it or check Triton's own tf32 dots."""
    B, C, *S = shape
    z1, z2, A, w = _inputs(B, C, tuple(S))
    z1, z2, A = (t.to(torch.bfloat16).double() for t in (z1, z2, A))

    def heads(dtype):
        torch.manual_seed(0)
        ref = FusionHead(C, spatial_dims=len(S)).to(dtype)
        fus = FusedFusionHead(C, spatial_dims=len(S)).to(dtype)
        fus.load_state_dict(ref.state_dict())
        return ref.train(), fus.train()

    exact = _run(heads(torch.float64)[0], z1, z2, A, w, False)
    keys = [k for k in exact if not k.startswith("buf.")]
    x32 = [t.float() for t in (z1, z2, A, w)]

    def err(out):
        return {k: ((out[k].double() - exact[k]).norm() / exact[k].norm()).item() for k in keys}
    errs = {}
    for prec in ("ieee", "tf32"):
        errs[prec] = err(_run_products(heads(torch.float32)[1], *x32, tf32=prec == "tf32"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errs["bf16"] = err(_run(heads(torch.float32)[0], *x32, False))
    assert max(errs["ieee"].values()) < 1e-5
    assert min(errs["tf32"].values()) > 1e-5  # the emulation is active
    assert errs["tf32"]["P"] < 0.2 * errs["bf16"]["P"], errs
    for k in keys:
        assert errs["tf32"][k] < errs["bf16"][k], (k, errs["tf32"][k], errs["bf16"][k])


# ----- per-layer ops: running statistics, weight layouts, op checks ------------------------------
@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "m0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel", "reference"])
def test_running_statistics_like_batchnorm(momentum, dtype):
    """FusedFusionHead updates running mean / var / num_batches_tracked as nn.BatchNorm does, for
    momentum=None (cumulative average: the kernel reads num_batches_tracked) and another momentum,
    over two training steps; fp32 runs `_running_kernel`, float64 `reference.bn_running_update`."""
    if dtype == torch.float32 and not triton_usable(torch.zeros(1)):
        pytest.skip("Triton kernel not runnable here")
    ref, fus = _heads(4, 2, dtype)
    for head in (ref, fus):
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momentum
        head.train()
    for step in range(2):
        z1, z2, A, _ = (t.to(dtype) for t in _inputs(2, 4, (5, 6), seed=10 + step))
        with torch.no_grad():
            ref(torch.cat([A * z1, A * z2], 1))
            fus.fused(z1, z2, A)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for (k, a), b in zip(ref.state_dict().items(), fus.state_dict().values()):
        assert b.dtype == a.dtype, k
        torch.testing.assert_close(b, a, **tol, msg=k)
    assert all(int(v) == 5 for k, v in fus.state_dict().items() if k.endswith("num_batches_tracked"))


@needs_kernel
def test_weights_read_in_place_any_layout():
    """Conv weights are read in place when element (o, i) sits at o·ci + i (contiguous, and
    channels-last: the same for 1×1 kernels); other layouts (here column-major) are copied once
    inside the op: same numbers either way."""
    z1, z2, A, w = (t.float() for t in _inputs(2, 4, (6, 5)))
    _, fus = _heads(4, 2, torch.float32)
    fus_cm = copy.deepcopy(fus)
    for conv in (getattr(fus_cm, f"conv{k + 1}")[0] for k in range(6)):
        co, ci = conv.weight.shape[:2]
        conv.weight.data = torch.empty_strided(conv.weight.shape, (1, co, 1, 1)).copy_(conv.weight.data)
    assert fus_cm.conv2[0].weight.stride()[:2] == (1, 32)
    a, b = _run(fus, z1, z2, A, w, True), _run(fus_cm, z1, z2, A, w, True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@needs_kernel
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck_layer_ops(train):
    """Schema, fake kernels, autograd registration, AOT dispatch of the per-layer ops."""
    _, fus = _heads(2, 2, torch.float32)
    convs = [getattr(fus, f"conv{k + 1}")[0] for k in range(6)]
    bns = [getattr(fus, f"conv{k + 1}")[1] for k in range(6)]
    ws = [c.weight.detach().clone().requires_grad_(True) for c in convs]
    gs = [b.weight.detach().clone().requires_grad_(True) for b in bns]
    bs = [b.bias.detach().clone().requires_grad_(True) for b in bns]
    rms, rvs = [b.running_mean.clone() for b in bns], [b.running_var.clone() for b in bns]
    z1, z2, A, _ = (t.float().requires_grad_(True) for t in _inputs(2, 2, (4, 5)))
    args = (z1, z2, A, ws, gs, bs, rms, rvs, train, 1e-5, 0)
    torch.library.opcheck(torch.ops.ucseg.fusion_head_layers.default, args)
    P, mean, var, vec = torch.ops.ucseg.fusion_head_layers.default(*args)
    dP = torch.randn_like(P)
    torch.library.opcheck(torch.ops.ucseg.fusion_head_layers_backward.default,
                          (dP, z1.detach(), z2.detach(), A.detach(), [w.detach() for w in ws],
                           [g.detach() for g in gs], [b.detach() for b in bs], vec, train, 0))
    nbts = [b.num_batches_tracked.clone() for b in bns]
    for momentum in (0.1, None):
        torch.library.opcheck(torch.ops.ucseg.bn_running_update.default,
                              (mean, var, rms, rvs, nbts, momentum, 40))
