"""Shared plumbing of the fused ops: optional Triton import, backend switch, layout helpers,
launch geometry.

Triton is an optional dependency (`pip install ucseg-fast[triton]`): without it every op runs
its plain-PyTorch reference (`ops/reference.py`), so the package imports and trains anywhere.
Nothing here touches CUDA at import time, and no environment variable but TRITON_INTERPRET
(which triton itself reads) is consulted: the backend is chosen by `set_backend`, and launch
geometry is computed per call from the shapes and the device —
  `tile_sizes`: a [BLOCK_C, BLOCK_S] register tile of ~TILE_ELEMS = 2048 elements, all classes
    (BLOCK_C = next_pow2(C)) of BLOCK_S ≥ 16 pixels;
  `num_warps_for`: 8 warps for a tile of 4096 elements or more, else 4;
  `sm_count`: the device's streaming multiprocessors, for kernels that size their grid to the
    machine (128 under the CPU interpreter, where there are none).
"""
from __future__ import annotations

import functools
import math
import os
import types
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    # Stand-ins so the kernel modules still import; their kernels are never launched.
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn)
    tl = types.SimpleNamespace(constexpr=object)

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")
_backend: str = "auto"

# Per-sample element offsets are int32 inside the kernels (the batch offset is int64).
_MAX_SAMPLE_ELEMS = 2**31 - 1


def set_backend(name: Backend) -> None:
    """Select how the functional ops run: "auto" (Triton on CUDA, or on CPU when
    TRITON_INTERPRET=1; the reference elsewhere), "triton" (error where it cannot run) or
    "reference" (plain PyTorch, differentiated by autograd; what `torch.compile` fuses itself)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"ops backend {name!r}: expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


# triton.jit decides interpreted-or-compiled when a kernel is defined (at import), so the value
# that counts is the one at import time; reading it later could disagree with the kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_mode() -> bool:
    return _INTERPRET


def triton_usable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `t` (CUDA, or CPU under the interpreter).

    float64 always takes the reference: the kernels accumulate in float32, and float64 is only
    used for golden-vector parity, where float32 rounding would break the f64 tolerances."""
    if not HAS_TRITON or t.dtype == torch.float64:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpret_mode())


def use_triton(t: torch.Tensor) -> bool:
    """The functional API's dispatch decision (device/dtype only; never data-dependent)."""
    if _backend == "reference":
        return False
    ok = triton_usable(t)
    if _backend == "triton" and not ok and t.dtype != torch.float64:
        raise RuntimeError(
            f"ops backend 'triton' cannot run on a {t.device.type} tensor "
            f"(triton installed: {HAS_TRITON}; on CPU set TRITON_INTERPRET=1 before importing)")
    return ok


def out_float_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 outputs/accumulation, float64 kept for float64 inputs (golden parity)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_logits(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor [B, C, *spatial], got {type(t).__name__}")
    if t.dim() < 3:
        raise ValueError(f"{name}: expected [B, C, *spatial] (2D or 3D), got shape {tuple(t.shape)}")
    if t.shape[1] < 2:
        raise ValueError(f"{name}: needs C >= 2 classes on dim 1, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name}: dtype {t.dtype} not supported (fp32/fp16/bf16, fp64 via reference)")
    if t.numel() // max(1, t.shape[0]) > _MAX_SAMPLE_ELEMS:
        raise ValueError(f"{name}: {t.numel() // t.shape[0]} elements per sample exceed int32 offsets")


_INT64 = (-(2**63), 2**63 - 1)


def check_ignore_index(op: str, ignore_index: int) -> int:
    """`ignore_index` of a class-map loss: a Python int (a kernel argument, like torch's)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be a Python int, got "
                        f"{type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"{op}: ignore_index {ignore_index} is outside the int64 range")
    return ignore_index


def spatial_size(t: torch.Tensor) -> int:
    return math.prod(t.shape[2:])


def flat_layout(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(t', stride_b, stride_c, stride_s) so that element (b, c, s) of the spatially flattened
    tensor sits at b*stride_b + c*stride_c + s*stride_s.

    Contiguous (stride_s = 1) and channels-last (stride_c = 1, stride_s = C) both qualify
    without a copy; any other layout whose spatial dims do not collapse is copied once."""
    dims = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    collapsible = all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))
    if not collapsible:
        t = t.contiguous()
        dims = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    stride_s = dims[-1][1] if dims else 1
    return t, t.stride(0), t.stride(1), stride_s


# Elements of one [BLOCK_C, BLOCK_S] register tile (module docstring: the launch geometry).
TILE_ELEMS = 2048
_INTERPRETER_SMS = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Plain-Python next power of two (triton's is a JIT-wrapped call, ~3 µs each)."""
    return 1 << max(0, n - 1).bit_length()


def tile_sizes(C: int, S: int, target: int | None = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): all classes of BLOCK_S pixels in one register tile of ~`target`
    elements (the whole softmax of a pixel stays in registers; one read of the logits)."""
    block_c = next_pow2(C)
    block_s = max(16, (target or TILE_ELEMS) // block_c)
    return block_c, min(block_s, max(16, next_pow2(S)))


def num_warps_for(block_c: int, block_s: int) -> int:
    return 8 if block_c * block_s >= 4096 else 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached per device); 128 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


if HAS_TRITON:

    @triton.jit
    def softplus_f32(x):
        """PyTorch's softplus (beta 1, threshold 20): x for x > 20, else log1p(exp(x))."""
        # log(1 + e) loses the relative precision of tiny e (x < -17), but softplus only enters
        # through S = C + Σ softplus >= C, where that absolute error (< 1.2e-7) is invisible
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def softplus_grad_f32(x):
        """d softplus / dx as PyTorch's backward computes it: exactly 1 above the threshold."""
        e = tl.exp(tl.minimum(x, 20.0))
        return tl.where(x > 20.0, 1.0, e / (e + 1.0))
    @triton.jit
    def softmax_logp_f32(z, valid_c):
        """(p, log p) over axis 0 of a [BLOCK_C, BLOCK_S] fp32 tile; padded class rows
        (valid_c False) get p = 0 and log p = 0, so p·log p and y·log p sums stay finite."""
        z = tl.where(valid_c, z, float("-inf"))
        shifted = z - tl.max(z, axis=0)[None, :]
        e = tl.exp(shifted)
        denom = tl.sum(e, axis=0)
        logp = tl.where(valid_c, shifted - tl.log(denom)[None, :], 0.0)
        # one reciprocal per pixel, not a division per element (full-precision fp32 division
        # is a multi-instruction sequence and made these kernels compute-bound)
        return e * (1.0 / denom)[None, :], logp

else:  # pragma: no cover
    softplus_f32 = softplus_grad_f32 = softmax_logp_f32 = None
