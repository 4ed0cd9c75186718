"""Token-layout UPG path ("Fused UPG"): evidential u written as patch tokens, the fused head reading
A from the tokens, CrossAttentionBlock.forward_tokens and UPG.forward_fused_tokens.

CPU tier: Triton kernels under TRITON_INTERPRET=1 (fp32) and the PyTorch fallbacks (float64 /
backend "reference"), tiny 2D/3D shapes. Oracles: `Patchify(p)` of the pixel-layout op, the head
fed A in pixel layout, and `UPG.forward` with the plain PyTorch head (`head_impl="torch"`).
"""
from __future__ import annotations

import copy

import pytest
import torch

from test_ops_upg_head import _heads
from ucseg_fast import ops
from ucseg_fast.models.upg import (UPG, CrossAttentionBlock, FusedFusionHead, Patchify,
                                   evidential_uncertainty_torch, unpatchify)
from ucseg_fast.ops import _triton_utils, evidential_uncertainty, reference, upg_head
from ucseg_fast.ops._triton_utils import triton_usable
from ucseg_fast.ops.evidential import patchify_map, unpatchify_map

needs_kernel = pytest.mark.skipif(not triton_usable(torch.zeros(1)),
                                  reason="Triton kernel not runnable here (no triton / TRITON_INTERPRET)")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- 1. evidential u in token layout ----------------------------------------------------------
EVID_CASES = [  # (B, C, spatial, p, channels_last)
    (1, 2, (4, 6), 2, False),
    (3, 4, (6, 9), 3, True),
    (3, 2, (4, 2, 6), 2, False),
    (1, 4, (2, 4, 4), 2, True),
    (2, 3, (12,), 4, False),  # 1D spatial also works (Patchify order)
]


@pytest.mark.parametrize("B,C,spatial,p,cl", EVID_CASES,
                         ids=[f"{len(s)}d-B{b}-C{c}-p{p}-{'cl' if cl else 'contig'}" for b, c, s, p, cl in EVID_CASES])
def test_evidential_tokens_equal_patchify(B, C, spatial, p, cl, monkeypatch):
    """u tokens == Patchify(p)(pixel u) bit for bit; dz == autograd of the PyTorch oracle (fp64)."""
    monkeypatch.setattr(_triton_utils, "TILE_ELEMS", 32)  # several programs per sample, masked tail
    z = torch.randn(B, C, *spatial, generator=_gen(0)) * 4
    z[0, 0].view(-1)[:3] = torch.tensor([25.0, -30.0, 19.99])  # both sides of the softplus threshold
    if cl:
        z = _cl(z)
    z.requires_grad_(True)
    u_tok = evidential_uncertainty(z, patch_size=p)
    n_tok = 1
    for s in spatial:
        n_tok *= s // p
    assert u_tok.shape == (B, n_tok, p ** len(spatial)) and u_tok.dtype == torch.float32
    assert u_tok.is_contiguous()
    u_pix = evidential_uncertainty(z)
    assert torch.equal(u_tok, Patchify(p)(u_pix))
    g = torch.randn(u_tok.shape, generator=_gen(1))
    (dz,) = torch.autograd.grad(u_tok, z, g)
    assert dz.shape == z.shape and dz.stride() == z.stride()  # written in z's layout
    (dz_pix,) = torch.autograd.grad(u_pix, z, unpatchify(g, spatial, p))
    assert torch.equal(dz, dz_pix)  # same kernel math, gradient only re-indexed
    z64 = z.detach().double().requires_grad_(True)
    u64 = Patchify(p)(reference.evidential_uncertainty(z64))
    (g64,) = torch.autograd.grad(u64, z64, g.double())
    torch.testing.assert_close(u_tok.double(), u64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dz.double(), g64, rtol=1e-5, atol=1e-7 * g64.abs().max().item())


def test_evidential_tokens_reference_paths_and_errors():
    """backend "reference" and float64 (reference inside the op) give Patchify(u); bad sizes name
    the shape; half inputs give float32 tokens."""
    z = torch.randn(2, 3, 4, 6, generator=_gen(2), dtype=torch.float64) * 3
    want = Patchify(2)(evidential_uncertainty_torch(z))
    torch.testing.assert_close(evidential_uncertainty(z, patch_size=2), want, rtol=1e-15, atol=0)
    prev = ops.get_backend()
    try:
        ops.set_backend("reference")
        zf = z.float().requires_grad_(True)
        u = evidential_uncertainty(zf, patch_size=2)
        assert "ucseg" not in type(u.grad_fn).__name__
        torch.testing.assert_close(u, Patchify(2)(evidential_uncertainty_torch(zf)), rtol=0, atol=0)
    finally:
        ops.set_backend(prev)
    # the op itself, off the Triton path (float64): the PyTorch fallback and its autograd
    zz = z.clone().requires_grad_(True)
    u = torch.ops.ucseg.evidential_uncertainty_tokens(zz, 2)
    (dz,) = torch.autograd.grad(u, zz, torch.ones_like(u))
    (dz_ref,) = torch.autograd.grad(Patchify(2)(evidential_uncertainty_torch(zz)), zz, torch.ones_like(u))
    torch.testing.assert_close(dz, dz_ref, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"\(5, 6\).*patch size 2"):
        evidential_uncertainty(torch.randn(1, 2, 5, 6), patch_size=2)
    with pytest.raises(ValueError, match="patch_size"):
        evidential_uncertainty(torch.randn(1, 2, 4, 4), patch_size=0)
    u16 = evidential_uncertainty(torch.randn(1, 2, 4, 4).half(), patch_size=2)
    assert u16.dtype == torch.float32 and u16.shape == (1, 4, 4)
    assert torch.equal(ops.EvidentialUncertainty(2)(z.detach()), evidential_uncertainty(z.detach(), patch_size=2))


def test_patchify_helpers_match_models():
    x = torch.randn(2, 1, 4, 6, 8, generator=_gen(3))
    t = patchify_map(x, 2)
    assert torch.equal(t, Patchify(2)(x))
    assert torch.equal(unpatchify_map(t, (4, 6, 8), 2), x)
    assert torch.equal(unpatchify_map(t, (4, 6, 8), 2), unpatchify(t, (4, 6, 8), 2))


@needs_kernel
def test_evidential_tokens_opcheck_and_compile():
    z = torch.randn(2, 3, 4, 6, generator=_gen(4)).requires_grad_(True)
    torch.library.opcheck(torch.ops.ucseg.evidential_uncertainty_tokens.default, (z, 2))
    torch.library.opcheck(torch.ops.ucseg.evidential_uncertainty_tokens_backward.default,
                          (torch.randn(2, 6, 4), z.detach(), 2))

    def f(x):
        return (evidential_uncertainty(x, patch_size=2) ** 2).sum()

    eager = f(z)
    (g_eager,) = torch.autograd.grad(eager, z)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(z)
    (g_comp,) = torch.autograd.grad(comp, z)
    assert torch.equal(eager, comp) and torch.equal(g_eager, g_comp)


# ----- 2. fused head reading A from the tokens ---------------------------------------------------
def _head(C: int, dims: int, dtype: torch.dtype, seed: int = 0) -> FusedFusionHead:
    """A fused head with non-default parameters and running stats (test_ops_upg_head's)."""
    return _heads(C, dims, dtype, seed)[1]


def _head_run(head, z1, z2, A, w, a_patch_size=None):
    z1, z2, A = (t.clone().requires_grad_(True) for t in (z1, z2, A))
    P = head.fused(z1, z2, A, a_patch_size=a_patch_size)
    (P * w).sum().backward()
    return {"P": P.detach(), "dz1": z1.grad, "dz2": z2.grad, "dA": A.grad,
            **{f"grad.{n}": p.grad for n, p in head.named_parameters()},
            **{f"buf.{n}": b.clone() for n, b in head.named_buffers()}}


HEAD_CASES = [  # (B, C, spatial, p, channels_last z, strided token A)
    (3, 4, (4, 6), 2, False, False),
    (1, 2, (6, 6), 3, True, True),
    (1, 4, (2, 4, 4), 2, False, True),
    (3, 2, (2, 2, 4), 2, True, False),
]


@needs_kernel
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("B,C,spatial,p,cl,strided", HEAD_CASES,
                         ids=[f"{len(s)}d-B{b}-C{c}-p{p}" for b, c, s, p, _, _ in HEAD_CASES])
def test_head_token_A_equals_pixel_A(B, C, spatial, p, cl, strided, train, monkeypatch):
    """Triton sweeps: A as tokens [B,N,p^d] (contiguous or a strided view) == A as [B,1,*S] — P, batch
    and running statistics, every gradient; dA comes back as tokens (== Patchify of the pixel dA)."""
    if B == 3:  # several programs: the in-program merges run with token-indexed A
        monkeypatch.setattr(upg_head, "sm_count", lambda device: 1)  # 2 programs a sweep
        monkeypatch.setattr(upg_head, "SWEEP_PROGRAMS_PER_SM", 2)
    g = _gen(5)
    z1 = torch.randn(B, C, *spatial, generator=g) * 3 + 1
    z2 = torch.randn(B, C, *spatial, generator=g) * 2 - 0.5
    A = torch.rand(B, 1, *spatial, generator=g) + 0.2
    w = torch.randn(B, C, *spatial, generator=g)
    if cl:
        z1, z2 = _cl(z1), _cl(z2)
    A_tok = Patchify(p)(A)
    if strided:  # tokens read through arbitrary strides (a slice of a wider buffer, features strided)
        big = torch.zeros(B, A_tok.shape[1], 2 * A_tok.shape[2])
        big[:, :, ::2] = A_tok
        A_tok = big[:, :, ::2]
        assert not A_tok.is_contiguous()
    head = _head(C, len(spatial), torch.float32).train(train)
    head_tok = copy.deepcopy(head)
    pix = _head_run(head, z1, z2, A, w)
    tok = _head_run(head_tok, z1, z2, A_tok, w, a_patch_size=p)
    assert tok["dA"].shape == A_tok.shape
    tok["dA"] = unpatchify(tok["dA"], spatial, p)
    assert tok.keys() == pix.keys()
    for k in pix:
        assert torch.equal(tok[k], pix[k]), k


def test_head_token_A_reference_float64():
    """float64 (the reference path, A unpatchified): token A == pixel A, train and eval."""
    g = _gen(6)
    B, C, spatial, p = 2, 3, (4, 2, 6), 2
    z1, z2, w = (torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) for _ in range(3))
    A = torch.rand(B, 1, *spatial, generator=g, dtype=torch.float64) + 0.2
    for train in (True, False):
        head = _head(C, 3, torch.float64).train(train)
        head_tok = copy.deepcopy(head)
        pix = _head_run(head, z1, z2, A, w)
        tok = _head_run(head_tok, z1, z2, Patchify(p)(A), w, a_patch_size=p)
        tok["dA"] = unpatchify(tok["dA"], spatial, p)
        for k in pix:
            torch.testing.assert_close(tok[k], pix[k], rtol=1e-13, atol=1e-13, msg=k)


@needs_kernel
def test_head_token_A_opcheck_compile_and_errors():
    head = _head(2, 2, torch.float32)
    wt, gamma, beta, rm, rv, chans = upg_head.pack_head_params(head)
    wt, gamma, beta = (t.detach().requires_grad_(True) for t in (wt, gamma, beta))
    g = _gen(7)
    z1, z2 = (torch.randn(2, 2, 4, 4, generator=g).requires_grad_(True) for _ in range(2))
    A_tok = torch.rand(2, 4, 4, generator=g).requires_grad_(True)
    torch.library.opcheck(torch.ops.ucseg.fusion_head.default,
                          (z1, z2, A_tok, wt, gamma, beta, rm.detach(), rv.detach(), chans, True, 1e-5, 2))
    # compile (aot_eager: Inductor is the GPU test) of the head on token A: same P, grads, buffers
    head2 = copy.deepcopy(head)
    w = torch.randn(2, 2, 4, 4, generator=g)
    fn = torch.compile(lambda a, b, c: head2.fused(a, b, c, a_patch_size=2), backend="aot_eager", fullgraph=True)
    outs = []
    for f in (lambda a, b, c: head.fused(a, b, c, a_patch_size=2), fn):
        ins = [t.detach().clone().requires_grad_(True) for t in (z1, z2, A_tok)]
        P = f(*ins)
        (P * w).sum().backward()
        outs.append([P.detach(), *(t.grad for t in ins)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for a, b in zip(head.buffers(), head2.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tokens"):
        head.fused(z1, z2, torch.rand(2, 1, 4, 4), a_patch_size=2)
    with pytest.raises(ValueError, match=r"\(4, 4\).*patch size 3"):
        head.fused(z1, z2, A_tok, a_patch_size=3)


# ----- 3. CrossAttentionBlock.forward_tokens and UPG.forward_fused_tokens ------------------------
def test_block_forward_tokens_equals_forward():
    torch.manual_seed(0)
    blk = CrossAttentionBlock((4, 6), 2, embed_dim=16, heads=2, dim_head=8, mlp_dim=32, dropout=0.1)
    u1, u2 = torch.rand(2, 3, 1, 4, 6, generator=_gen(8))
    for train in (True, False):
        blk.train(train)
        torch.manual_seed(1)
        a = blk(u1, u2)
        torch.manual_seed(1)  # same dropout draws, same order
        t = blk.forward_tokens(Patchify(2)(u1), Patchify(2)(u2))
        assert t.shape == (3, 6, 4)
        assert torch.equal(unpatchify(t, (4, 6), 2), a)
    with pytest.raises(ValueError, match="forward_tokens"):
        blk.forward_tokens(u1, u2)


UPG_CASES = [  # (B, C, img_size, p, channels_last z, dtype)
    (3, 4, (8, 4), 2, True, torch.float32),
    (1, 2, (4, 4, 2), 2, False, torch.float32),
    (2, 2, (4, 6), 2, False, torch.float64),
]


def _upg_pair(C, img, p, dtype):
    torch.manual_seed(0)
    kw = dict(embed_dim=16, heads=2, dim_head=8, mlp_dim=32, dropout=0.1)
    ref = UPG(C, img, p, **kw).to(dtype)
    fus = UPG(C, img, p, head_impl="fused", **kw).to(dtype)
    fus.load_state_dict(ref.state_dict(), strict=True)
    assert list(fus.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # non-default running statistics, so eval mode is not trivial
        g = _gen(9)
        for name, t in ref.final_head.named_buffers():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.rand(t.shape, generator=g) - 0.5)
        fus.final_head.load_state_dict(ref.final_head.state_dict())
    return ref, fus


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("B,C,img,p,cl,dtype", UPG_CASES,
                         ids=[f"{len(s)}d-B{b}-C{c}-{str(dt)[6:]}" for b, c, s, p, _, dt in UPG_CASES])
def test_upg_forward_fused_tokens_equals_torch_forward(B, C, img, p, cl, dtype, train):
    """UPG.forward_fused_tokens(z1, z2) == UPG(head_impl="torch").forward(u(z1), u(z2), z1, z2): u, A
    (unpatchified), P, running statistics and the gradients of every parameter and of z1, z2 (the
    loss also reads u and A, so their token-layout gradients are exercised). Dropout 0.1 in
    training: both paths draw the same masks in the same order under the same seed."""
    if dtype == torch.float32 and not triton_usable(torch.zeros(1)):
        pytest.skip("Triton kernel not runnable here")
    ref, fus = _upg_pair(C, img, p, dtype)
    g = _gen(10)
    z1 = torch.randn(B, C, *img, generator=g, dtype=dtype) * 3
    z2 = torch.randn(B, C, *img, generator=g, dtype=dtype) * 2 + 0.5
    if cl:
        z1, z2 = _cl(z1), _cl(z2)
    w, wa, wu1, wu2 = (torch.randn(B, c, *img, generator=g, dtype=dtype) for c in (C, 1, 1, 1))
    res = []
    for upg in (ref, fus):
        upg.train(train)
        ins = [t.clone().requires_grad_(True) for t in (z1, z2)]
        torch.manual_seed(123)
        if upg is ref:
            u1, u2 = evidential_uncertainty_torch(ins[0]), evidential_uncertainty_torch(ins[1])
            A, P = upg(u1, u2, *ins)
        else:
            u1t, u2t, At, P = upg.forward_fused_tokens(*ins)
            n_tok = ref.cross_attn.pos_embed.shape[1]
            for t in (u1t, u2t, At):
                assert t.shape == (B, n_tok, p ** len(img))
            u1, u2, A = (unpatchify(t, img, p) for t in (u1t, u2t, At))
        ((P * w).sum() + (A * wa).sum() + (u1 * wu1).sum() + (u2 * wu2).sum()).backward()
        res.append({"u1": u1, "u2": u2, "A": A, "P": P, "dz1": ins[0].grad, "dz2": ins[1].grad,
                    **{f"grad.{n}": q.grad for n, q in upg.named_parameters()},
                    **{f"buf.{n}": b for n, b in upg.named_buffers()}})
    ref_out, fus_out = res
    assert ref_out.keys() == fus_out.keys()
    assert fus_out["grad.cross_attn.attn.temperature"] is None and ref_out["grad.cross_attn.attn.temperature"] is None
    tight = dtype == torch.float64
    for k, a in ref_out.items():
        if a is None:
            continue
        b = fus_out[k]
        assert b is not None, k
        scale = max(1.0, a.detach().abs().max().item())
        if tight:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * scale, msg=k)
        else:  # fp32: kernel C/S vs PyTorch reciprocal(S)·C, other fp32 summation orders
            # (observed ≤ 2e-6 · scale on these cases)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * scale, msg=k)


def test_upg_forward_fused_tokens_needs_fused_head():
    upg = UPG(2, (4, 4), 2, embed_dim=16, heads=2, dim_head=8, mlp_dim=32)
    with pytest.raises(ValueError, match="head_impl='fused'"):
        upg.forward_fused_tokens(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    upg_f = UPG(2, (4, 4), 2, embed_dim=16, heads=2, dim_head=8, mlp_dim=32, head_impl="fused")
    with pytest.raises(ValueError, match="forward_fused_tokens: z1"):
        upg_f.forward_fused_tokens(torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6))


# ----- GPU tier (skipped without CUDA) ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape,p", [((12, 4, 256, 256), 16), ((24, 4, 224, 224), 14), ((2, 2, 96, 96, 96), 16)],
                         ids=["acdc", "generic2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_evidential_tokens_real_shapes(shape, p, dtype):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    z = (torch.randn(shape, device="cuda") * 4).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    u_tok = evidential_uncertainty(z, patch_size=p)
    u_pix = evidential_uncertainty(z)
    assert torch.equal(u_tok, Patchify(p)(u_pix))
    g = torch.randn(u_tok.shape, device="cuda")
    (dz,) = torch.autograd.grad(u_tok, z, g)
    (dz_pix,) = torch.autograd.grad(u_pix, z, unpatchify(g, shape[2:], p))
    assert torch.equal(dz, dz_pix)
    comp = torch.compile(lambda x: evidential_uncertainty(x, patch_size=p), fullgraph=True)(z.detach())
    assert torch.equal(comp, u_tok.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("shape,p", [((24, 4, 256, 256), 16), ((4, 2, 96, 96, 96), 16)], ids=["acdc", "3d"])
def test_gpu_head_token_A_equals_pixel_A(shape, p):
    B, C, *S = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    z1, z2, w = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    A = torch.rand((B, 1, *S), device="cuda", generator=g)
    head = _head(C, len(S), torch.float32).cuda().train()
    head_tok = copy.deepcopy(head)
    pix = _head_run(head, z1, z2, A, w)
    tok = _head_run(head_tok, z1, z2, Patchify(p)(A), w, a_patch_size=p)
    tok["dA"] = unpatchify(tok["dA"], S, p)
    for k in pix:
        assert torch.equal(tok[k], pix[k]), k


@needs_kernel
def test_upg_forward_fused_tokens_compiles_fullgraph():
    """torch.compile(fullgraph=True) (aot_eager) traces the whole token path — both custom ops, the
    attention GEMMs, the running-statistics update — with the eager numbers and gradients."""
    _, fus = _upg_pair(2, (4, 4), 2, torch.float32)
    fus.train()
    fus2 = copy.deepcopy(fus)
    g = _gen(11)
    z1, z2 = (torch.randn(2, 2, 4, 4, generator=g) for _ in range(2))
    comp = torch.compile(fus2.forward_fused_tokens, backend="aot_eager", fullgraph=True)
    outs = []
    for upg, f in ((fus, fus.forward_fused_tokens), (fus2, comp)):
        ins = [t.clone().requires_grad_(True) for t in (z1, z2)]
        torch.manual_seed(5)
        u1, u2, A, P = f(*ins)
        (P.sum() + (A * A).sum() + u1.sum() - u2.sum()).backward()
        outs.append([u1, u2, A, P, *(t.grad for t in ins),
                     *(q.grad for q in upg.parameters() if q.grad is not None), *upg.buffers()])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_build_model_wires_the_token_path():
    """model.uncertainty = model.upg_head = "fused" -> UCSeg.fused_tokens: same P and gradients
    as the plain modules (same weights), u/A returned as tokens."""
    from ucseg_fast.config import load_config
    from ucseg_fast.models.upg import unpatchify
    from ucseg_fast.train.recipe import build_model

    base = ["--data.img_size=[32,32]", "--data.num_classes=2", "--model.patch_size=16"]
    torch.manual_seed(0)
    ref = build_model(load_config(None, base)).eval()
    fused = build_model(load_config(None, base + ["--model.uncertainty=fused",
                                                  "--model.upg_head=fused"])).eval()
    assert fused.fused_tokens and not ref.fused_tokens
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_r, out_f = ref(x), fused(x)
    assert out_f.u1.shape == (2, 4, 256) and out_f.A.shape == (2, 4, 256)
    torch.testing.assert_close(unpatchify(out_f.A, (32, 32), 16), out_r.A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f.P, out_r.P, rtol=1e-4, atol=1e-4)
    out_r.P.square().sum().backward()
    out_f.P.square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=n)
