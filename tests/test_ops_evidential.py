"""evidential_uncertainty: Triton kernel (interpreter on CPU) against the fp64 oracle, golden
vectors of the authors' code, custom-op registration, compile, and a GPU tier."""
from __future__ import annotations

import pytest
import torch

from golden import golden
from ucseg_fast import ops
from ucseg_fast.models.upg import Patchify, unpatchify
from ucseg_fast.ops import EvidentialUncertainty, evidential_uncertainty, reference
from ucseg_fast.ops.reference import tolerance

CASES = [  # (shape, dtype, memory format)
    ((2, 4, 5, 7), torch.float32, torch.contiguous_format),
    ((1, 5, 3, 4, 5), torch.bfloat16, torch.contiguous_format),
    ((2, 2, 5, 7), torch.float16, torch.channels_last),
    ((2, 3, 3, 4, 5), torch.float32, torch.channels_last_3d),
]


def _logits(shape, dtype, fmt, scale=4.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g) * scale).to(dtype)
    return z.to(device).contiguous(memory_format=fmt)


def _oracle_and_baseline(z, grad_u):
    """fp64 oracle and the same-precision PyTorch baseline: (u, du/dz · grad_u) each."""
    out = []
    for dt in (torch.float64, z.dtype):
        x = z.detach().to(dt).requires_grad_(True)
        u = reference.evidential_uncertainty(x, dtype=dt)
        (g,) = torch.autograd.grad(u, x, grad_u.to(dt))
        out.append((u.detach(), g))
    return out


@pytest.mark.parametrize("shape,dtype,fmt", CASES)
def test_matches_oracle(shape, dtype, fmt):
    z = _logits(shape, dtype, fmt).requires_grad_(True)
    u = evidential_uncertainty(z)
    assert u.shape == (shape[0], 1, *shape[2:]) and u.dtype == torch.float32
    grad_u = torch.randn(u.shape, generator=torch.Generator().manual_seed(1))
    (dz,) = torch.autograd.grad(u, z, grad_u)
    assert dz.dtype == dtype and dz.shape == z.shape
    (u64, g64), (ub, gb) = _oracle_and_baseline(z, grad_u)
    assert reference.max_abs_err(u, u64) <= tolerance(u64, ub, atol=1e-6)
    assert reference.max_abs_err(dz, g64) <= tolerance(g64, gb, atol=1e-7, out_dtype=dtype)


def test_softplus_threshold_and_extremes():
    # z around the softplus threshold 20, large ±, and values whose softplus underflows
    row = torch.tensor([19.99, 20.0, 20.01, 30.0, -30.0, 40.0, -40.0, 1e4, -1e4, -200.0, 0.0, 1e-6])
    z = torch.stack([row, row.flip(0), torch.zeros(12)]).view(1, 3, 12).requires_grad_(True)
    u = evidential_uncertainty(z)
    (dz,) = torch.autograd.grad(u.sum(), z)
    z64 = z.detach().double().requires_grad_(True)
    u64 = reference.evidential_uncertainty(z64)
    (g64,) = torch.autograd.grad(u64.sum(), z64)
    assert reference.max_abs_err(u, u64) < 1e-6 * float(u64.detach().abs().max())
    assert reference.max_abs_err(dz, g64) < 1e-6 * float(g64.abs().max())
    # hand values: for z > 20 the softplus derivative is exactly 1 -> dz = -C/S^2 exactly
    S = 3.0 / u.detach()
    above = z.detach() > 20
    expect = (-3.0 / S**2).expand_as(dz)[above]
    torch.testing.assert_close(dz[above], expect, rtol=1e-6, atol=0)
    # all-zero logits: alpha = 1 + log 2 per class, u = 1 / (1 + log 2)
    z0 = torch.zeros(1, 4, 3, 3)
    expect = torch.full((1, 1, 3, 3), 1 / (1 + 0.6931471805599453))
    torch.testing.assert_close(evidential_uncertainty(z0), expect)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, "f64"), (torch.float32, "f32")])
def test_golden(dtype, tol):
    """fp64 takes the reference path (f64 class); fp32 runs the Triton kernel (f32 class)."""
    g = golden()
    # clone: g.tensor() hands out the cached golden tensor itself (for float64 `.to` is a no-op),
    # and requires_grad_ on it would leak into later tests that read "evid.z" (test_golden_upg)
    z = g.tensor("evid.z").to(dtype).clone().requires_grad_(True)
    u = evidential_uncertainty(z)
    (dz,) = torch.autograd.grad((u * g.tensor("evid.w").to(u.dtype)).sum(), z)
    g.check("evid.u", u.detach(), tol)
    g.check("evid.du_dz", dz, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, "f64"), (torch.float32, "f32")])
def test_golden_token_layout(dtype, tol):
    """patch_size=4: u as tokens [B, N, 16] = Patchify(golden u); the gradient of Σ u·Patchify(w)
    is the golden du/dz (fp32: the token-layout kernels; fp64: reference + Patchify)."""
    g = golden()
    z = g.tensor("evid.z").to(dtype).clone().requires_grad_(True)
    u_tok = evidential_uncertainty(z, patch_size=4)
    assert u_tok.shape == (z.shape[0], 4, 16) and u_tok.is_contiguous()
    (dz,) = torch.autograd.grad((u_tok * Patchify(4)(g.tensor("evid.w")).to(u_tok.dtype)).sum(), z)
    g.check("evid.u", unpatchify(u_tok.detach(), z.shape[2:], 4), tol)
    g.check("evid.du_dz", dz, tol)


def test_opcheck_compile_module_backend():
    z = _logits((2, 3, 5, 7), torch.float32, torch.contiguous_format).requires_grad_(True)
    torch.library.opcheck(torch.ops.ucseg.evidential_uncertainty.default, (z,))
    torch.library.opcheck(torch.ops.ucseg.evidential_uncertainty_backward.default,
                          (torch.randn(2, 1, 5, 7), z.detach()))

    def f(x):
        return (evidential_uncertainty(x) ** 2).sum()

    eager = f(z)
    (g_eager,) = torch.autograd.grad(eager, z)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(z)
    (g_comp,) = torch.autograd.grad(comp, z)
    assert torch.equal(eager, comp) and torch.equal(g_eager, g_comp)

    assert torch.equal(EvidentialUncertainty()(z), evidential_uncertainty(z))
    prev = ops.get_backend()
    try:
        ops.set_backend("reference")
        u_ref = evidential_uncertainty(z)
        assert u_ref.grad_fn is not None and "ucseg" not in type(u_ref.grad_fn).__name__
    finally:
        ops.set_backend(prev)
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="C >= 2"):
        evidential_uncertainty(torch.zeros(2, 1, 4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12, 4, 256, 256), (2, 2, 96, 96, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_shapes(shape, dtype):
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    z = _logits(shape, dtype, fmt, device="cuda").requires_grad_(True)
    grad_u = torch.randn((shape[0], 1, *shape[2:]), device="cuda")
    u = evidential_uncertainty(z)
    (dz,) = torch.autograd.grad(u, z, grad_u)
    (u64, g64), (ub, gb) = _oracle_and_baseline(z, grad_u)
    assert reference.max_abs_err(u, u64) <= tolerance(u64, ub, atol=1e-6)
    assert reference.max_abs_err(dz, g64) <= tolerance(g64, gb, atol=1e-7, out_dtype=dtype)
    comp = torch.compile(evidential_uncertainty, fullgraph=True)(z.detach())
    assert torch.equal(comp, u.detach())
