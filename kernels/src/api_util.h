// api_util.h — argument checking and the thread-local error string shared by the host and CUDA
// entry points of libucseg_native (internal; not installed).
#pragma once

#include <cstdint>

#include "cc_core.h"
#include "ucseg_native.h"

namespace ucseg {

// printf-style; stores the message for ucseg_last_error() and returns `status`.
int fail(int status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();

// Validates (ndim, shape) and fills `g`. Returns UCSEG_OK or UCSEG_ERR_INVALID_ARGUMENT.
int check_shape(const char* fn, int ndim, const int64_t* shape, Geom* g);

// Validates connectivity for ndim and returns through `full` whether it is 8/26 (0 = full).
int check_connectivity(const char* fn, int ndim, int connectivity, bool* full);

// Element size of a ucseg_dtype code, 0 if unknown.
inline int dtype_size(int dtype) {
  switch (dtype) {
    case UCSEG_UINT8: case UCSEG_INT8: return 1;
    case UCSEG_INT16: return 2;
    case UCSEG_INT32: return 4;
    case UCSEG_INT64: return 8;
    default: return 0;
  }
}

// Workspace layout of the largest-component filter: best keys (uint64, B*C) | L (int32, N) |
// sizes (int32, N). Offsets are 8-byte aligned.
struct LcWorkspace {
  size_t best_off, l_off, cnt_off, total;
};
inline LcWorkspace lc_workspace(const Geom& g, int num_classes) {
  LcWorkspace w{};
  auto align8 = [](size_t v) { return (v + 7) & ~static_cast<size_t>(7); };
  w.best_off = 0;
  w.l_off = align8(static_cast<size_t>(g.B) * static_cast<size_t>(num_classes) * 8);
  w.cnt_off = align8(w.l_off + static_cast<size_t>(g.N) * 4);
  w.total = align8(w.cnt_off + static_cast<size_t>(g.N) * 4);
  return w;
}

}  // namespace ucseg
