/* ucseg_native.h — flat C ABI of libucseg_native.so (connected components for UC-Seg).
 *
 * Why a C ABI: the Python side (ucseg_fast/native.py) calls it through ctypes on raw tensor
 * pointers, so the library never links against torch and works with any torch build.
 *
 * Conventions shared by every entry point
 *   - Tensors are dense, C-contiguous, batched: shape = {B, H, W} (ndim 3, 2D images) or
 *     {B, D, H, W} (ndim 4, 3D volumes). The batch dimension is never connected.
 *   - connectivity: 4 or 8 for 2D, 6 or 26 for 3D (0 = full: 8 or 26).
 *   - Component ids (int32): 0 = background, otherwise 1 + the C-order linear index, in the whole
 *     batched tensor, of the component's first pixel (its minimum index). The union-find links
 *     every root to the smaller one, so the root *is* that first pixel; ids are canonical and
 *     equal on the host and the device. Requires B*D*H*W < 2^31 - 1.
 *   - largest component: per batch item and class c in 1..num_classes-1, keep the pixels of the
 *     largest fully connected (8 / 26) component of {labels == c}; on equal sizes the one whose
 *     first pixel comes first in C order (scipy.ndimage.label + argmax); everything else -> 0.
 *     Values outside 1..num_classes-1 are background.
 *   - *_cuda functions take device pointers and a cudaStream_t passed as void*; they only
 *     enqueue work (no host synchronisation, no allocation: the caller passes a workspace of
 *     ucseg_lc_workspace_bytes() bytes), so they can be captured in a CUDA graph.
 *   - *_host functions are the same algorithm (same phases, same tiles) on host pointers.
 *   - Return value: UCSEG_OK or an error code; ucseg_last_error() describes the last failure of
 *     the calling thread.
 */
#ifndef UCSEG_NATIVE_H
#define UCSEG_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  define UCSEG_API __declspec(dllexport)
#else
#  define UCSEG_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define UCSEG_NATIVE_ABI_VERSION 1

typedef enum ucseg_status {
  UCSEG_OK = 0,
  UCSEG_ERR_INVALID_ARGUMENT = 1, /* shape, connectivity, dtype, null pointer, size limits */
  UCSEG_ERR_CUDA = 2,             /* a CUDA runtime call or kernel launch failed */
  UCSEG_ERR_NOT_BUILT = 3         /* the library was built without CUDA */
} ucseg_status;

/* Element type of a class map. */
typedef enum ucseg_dtype {
  UCSEG_UINT8 = 0,
  UCSEG_INT8 = 1,
  UCSEG_INT16 = 2,
  UCSEG_INT32 = 3,
  UCSEG_INT64 = 4
} ucseg_dtype;

UCSEG_API int ucseg_abi_version(void);
/* 1 when the library was compiled with the CUDA kernels, else 0. */
UCSEG_API int ucseg_has_cuda(void);
/* Thread-local message of the last failing call ("" if none). */
UCSEG_API const char* ucseg_last_error(void);

/* Connected components of a binary mask (uint8, nonzero = foreground) -> int32 ids. */
UCSEG_API int ucseg_cc_host(const uint8_t* mask, int32_t* ids, int ndim, const int64_t* shape,
                            int connectivity);
UCSEG_API int ucseg_cc_cuda(const uint8_t* mask, int32_t* ids, int ndim, const int64_t* shape,
                            int connectivity, void* stream);

/* Bytes of device workspace ucseg_lc_cuda needs (0 on invalid arguments). */
UCSEG_API size_t ucseg_lc_workspace_bytes(int ndim, const int64_t* shape, int num_classes);

/* Largest component per (batch item, class) of a class map; out has the dtype of labels and may
 * alias it. workspace: ucseg_lc_workspace_bytes() bytes, 8-byte aligned (contents ignored). */
UCSEG_API int ucseg_lc_host(const void* labels, void* out, int dtype, int ndim,
                            const int64_t* shape, int num_classes);
UCSEG_API int ucseg_lc_cuda(const void* labels, void* out, int dtype, int ndim,
                            const int64_t* shape, int num_classes, void* workspace,
                            size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* UCSEG_NATIVE_H */
