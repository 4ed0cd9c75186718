"""ctypes loader of the optional native library `libucseg_native.so` (kernels/, CMakeLists.txt).

Why ctypes: the library has a flat C ABI on raw pointers (kernels/include/ucseg_native.h) and
never links against torch, so one build serves any torch version; nothing here is compiled.

`load()` returns a `NativeLib` or None (then `unavailable_reason()` says why: not built, wrong
ABI, unloadable). Loading is lazy and cached; importing this module touches neither the file
system nor CUDA. Lookup order: $UCSEG_NATIVE_LIB, then `build/native/libucseg_native.so` in the
source checkout (what `make native` builds). Build it with

    cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release && cmake --build build/native -j

CUDA tensors go to the CUDA kernels on `torch.cuda.current_stream()` (no sync, no allocation
inside the library: CUDA-graph capturable); CPU tensors go to the host twin of the same
algorithm (used by tests; the package's CPU path is scipy).
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

__all__ = ["NativeLib", "NativeError", "load", "unavailable_reason", "library_path"]

ABI_VERSION = 1
_ENV = "UCSEG_NATIVE_LIB"
_DEFAULT = Path(__file__).resolve().parents[1] / "build" / "native" / "libucseg_native.so"

# ucseg_dtype codes of the C header
_DTYPE_CODE = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}

_lock = threading.Lock()
_state: dict = {}


class NativeError(RuntimeError):
    """A call into libucseg_native returned an error status."""


def library_path() -> Path:
    """Where the library is looked for ($UCSEG_NATIVE_LIB or the checkout's build/native)."""
    env = os.environ.get(_ENV)
    return Path(env) if env else _DEFAULT


class NativeLib:
    """Typed wrapper over the C API. Methods take and return torch tensors."""

    def __init__(self, cdll: ctypes.CDLL, path: Path):
        self.path = path
        self._lib = cdll
        c_i64p = ctypes.POINTER(ctypes.c_int64)
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        sig = {
            "ucseg_abi_version": ([], i32),
            "ucseg_has_cuda": ([], i32),
            "ucseg_last_error": ([], ctypes.c_char_p),
            "ucseg_cc_host": ([vp, vp, i32, c_i64p, i32], i32),
            "ucseg_cc_cuda": ([vp, vp, i32, c_i64p, i32, vp], i32),
            "ucseg_lc_workspace_bytes": ([i32, c_i64p, i32], ctypes.c_size_t),
            "ucseg_lc_host": ([vp, vp, i32, i32, c_i64p, i32], i32),
            "ucseg_lc_cuda": ([vp, vp, i32, i32, c_i64p, i32, vp, ctypes.c_size_t, vp], i32),
        }
        for name, (args, res) in sig.items():
            fn = getattr(cdll, name)
            fn.argtypes, fn.restype = args, res
        self.abi_version: int = cdll.ucseg_abi_version()
        self.has_cuda: bool = bool(cdll.ucseg_has_cuda())

    # ---- helpers -----------------------------------------------------------------------------
    def _check(self, status: int, fn: str) -> None:
        if status != 0:
            msg = (self._lib.ucseg_last_error() or b"").decode(errors="replace")
            raise NativeError(f"{self.path.name}: {fn} failed with status {status}: {msg}")

    @staticmethod
    def _shape(t: torch.Tensor):
        return (ctypes.c_int64 * t.dim())(*t.shape)

    @staticmethod
    def _stream(t: torch.Tensor) -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)

    def _require_cuda(self, fn: str) -> None:
        if not self.has_cuda:
            raise NativeError(f"{self.path}: {fn} on a CUDA tensor, but the library was built "
                              f"without CUDA (rebuild where nvcc is available)")

    # ---- API ---------------------------------------------------------------------------------
    def connected_components(self, mask: torch.Tensor, connectivity: int) -> torch.Tensor:
        """int32 canonical ids (0 = background, 1 + first-pixel index) of a batched mask."""
        m = mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0
        m = m.contiguous()
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
        ids = torch.empty(m.shape, dtype=torch.int32, device=m.device)
        if m.numel() == 0:
            return ids
        if m.is_cuda:
            self._require_cuda("ucseg_cc_cuda")
            with torch.cuda.device(m.device):
                st = self._lib.ucseg_cc_cuda(m.data_ptr(), ids.data_ptr(), m.dim(), self._shape(m),
                                             connectivity, self._stream(m))
            self._check(st, "ucseg_cc_cuda")
        else:
            st = self._lib.ucseg_cc_host(m.data_ptr(), ids.data_ptr(), m.dim(), self._shape(m),
                                         connectivity)
            self._check(st, "ucseg_cc_host")
        return ids

    def largest_component(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Largest full-connectivity component per (batch item, class 1..C-1); same dtype out."""
        orig = labels.dtype
        if orig == torch.bool:
            lab = labels.contiguous().view(torch.uint8)
        elif orig in _DTYPE_CODE:
            lab = labels.contiguous()
        else:  # uint16/32/64: compute in int64 (class ids are small), cast back
            lab = labels.to(torch.int64).contiguous()
        out = torch.empty_like(lab)
        if lab.numel() == 0:
            return out.view(orig) if orig == torch.bool else out.to(orig)
        code = _DTYPE_CODE[lab.dtype]
        shape = self._shape(lab)
        if lab.is_cuda:
            self._require_cuda("ucseg_lc_cuda")
            nbytes = int(self._lib.ucseg_lc_workspace_bytes(lab.dim(), shape, num_classes))
            if nbytes == 0:
                raise NativeError(f"ucseg_lc_workspace_bytes rejected shape {tuple(lab.shape)} "
                                  f"num_classes={num_classes}")
            # torch's caching allocator: stream-ordered, 512-byte aligned, no cudaMalloc per call
            ws = torch.empty(nbytes, dtype=torch.uint8, device=lab.device)
            with torch.cuda.device(lab.device):
                st = self._lib.ucseg_lc_cuda(lab.data_ptr(), out.data_ptr(), code, lab.dim(), shape,
                                             num_classes, ws.data_ptr(), nbytes, self._stream(lab))
            self._check(st, "ucseg_lc_cuda")
        else:
            st = self._lib.ucseg_lc_host(lab.data_ptr(), out.data_ptr(), code, lab.dim(), shape,
                                         num_classes)
            self._check(st, "ucseg_lc_host")
        if orig == torch.bool:
            return out.view(torch.bool)
        return out if out.dtype == orig else out.to(orig)


def load() -> NativeLib | None:
    """The loaded library, or None (see `unavailable_reason()`). Cached after the first call."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, reason = None, None
        path = library_path()
        if not path.is_file():
            reason = (f"native library not found at {path} (build it with `make native`, or set "
                      f"${_ENV}); using the PyTorch/scipy fallbacks")
        else:
            try:
                cand = NativeLib(ctypes.CDLL(str(path)), path)
                if cand.abi_version != ABI_VERSION:
                    reason = (f"{path}: ABI version {cand.abi_version}, expected {ABI_VERSION} "
                              f"(rebuild with `make native`)")
                else:
                    lib = cand
            except (OSError, AttributeError) as e:
                reason = f"cannot load {path}: {e}"
        _state["lib"], _state["reason"] = lib, reason
        return lib


def unavailable_reason() -> str | None:
    """Why `load()` returned None; None when the library is loaded."""
    load()
    return _state["reason"]


def _reset_for_tests() -> None:
    """Forget the cached load result (tests switch $UCSEG_NATIVE_LIB)."""
    with _lock:
        _state.clear()
