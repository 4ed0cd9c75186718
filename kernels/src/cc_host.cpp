// cc_host.cpp — host twin of the CUDA connected-component kernels, plus the C API plumbing
// (errors, argument checks, version). The phases call the same per-pixel functions of
// cc_core.h as the kernels, looping over tiles and "threads" in order; sequential execution is
// one valid interleaving of the GPU's concurrent unions, so the result is the same canonical ids.
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "api_util.h"
#include "cc_core.h"
#include "ucseg_native.h"

namespace ucseg {

namespace {
thread_local std::string g_last_error;
}

int fail(int status, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_last_error = buf;
  return status;
}

void clear_error() { g_last_error.clear(); }

int check_shape(const char* fn, int ndim, const int64_t* shape, Geom* g) {
  if (shape == nullptr) return fail(UCSEG_ERR_INVALID_ARGUMENT, "%s: shape is NULL", fn);
  if (ndim != 3 && ndim != 4)
    return fail(UCSEG_ERR_INVALID_ARGUMENT,
                "%s: ndim=%d, expected 3 ([B,H,W]) or 4 ([B,D,H,W])", fn, ndim);
  for (int d = 0; d < ndim; ++d)
    if (shape[d] < 0)
      return fail(UCSEG_ERR_INVALID_ARGUMENT, "%s: shape[%d]=%lld is negative", fn, d,
                  static_cast<long long>(shape[d]));
  // Guard the product against overflow before forming it.
  double n = 1.0;
  for (int d = 0; d < ndim; ++d) n *= static_cast<double>(shape[d]);
  if (n >= 2147483647.0)
    return fail(UCSEG_ERR_INVALID_ARGUMENT,
                "%s: %.0f elements; int32 ids need fewer than 2^31 - 1", fn, n);
  *g = make_geom(ndim, shape);
  return UCSEG_OK;
}

int check_connectivity(const char* fn, int ndim, int connectivity, bool* full) {
  if (ndim == 3 && (connectivity == 0 || connectivity == 4 || connectivity == 8)) {
    *full = connectivity != 4;
    return UCSEG_OK;
  }
  if (ndim == 4 && (connectivity == 0 || connectivity == 6 || connectivity == 26)) {
    *full = connectivity != 6;
    return UCSEG_OK;
  }
  return fail(UCSEG_ERR_INVALID_ARGUMENT, "%s: connectivity=%d is not valid for ndim=%d (%s)", fn,
              connectivity, ndim, ndim == 3 ? "2D: 4 or 8" : "3D: 6 or 26");
}

namespace {

template <bool FULL, class Key>
void label_host(const Key& key, int32_t* L, const Geom& g) {
  std::vector<int32_t> sK(kTileThreads), sL(kTileThreads);
  const int64_t nbz = g.ntz * g.B;
  // Phase 1: tile-local union-find; each loop over (tz, ty, tx) is one __syncthreads() section.
  for (int64_t bzb = 0; bzb < nbz; ++bzb)
    for (int64_t by = 0; by < g.nty; ++by)
      for (int64_t bx = 0; bx < g.ntx; ++bx) {
        for (int tz = 0; tz < g.TZ; ++tz)
          for (int ty = 0; ty < g.TY; ++ty)
            for (int tx = 0; tx < g.TX; ++tx) {
              const int t = (tz * g.TY + ty) * g.TX + tx;
              const Pix p = tile_pixel(g, bx, by, bzb, tx, ty, tz);
              sK[t] = p.inside ? key(p.gi) : 0;
              sL[t] = t;
            }
        for (int tz = 0; tz < g.TZ; ++tz)
          for (int ty = 0; ty < g.TY; ++ty)
            for (int tx = 0; tx < g.TX; ++tx) local_unite<FULL>(sK.data(), sL.data(), g, tx, ty, tz);
        for (int tz = 0; tz < g.TZ; ++tz)
          for (int ty = 0; ty < g.TY; ++ty)
            for (int tx = 0; tx < g.TX; ++tx) {
              const int t = (tz * g.TY + ty) * g.TX + tx;
              const Pix p = tile_pixel(g, bx, by, bzb, tx, ty, tz);
              if (!p.inside) continue;
              L[p.gi] = sK[t] ? local_root_global(g, p, tx, ty, tz, find_root(sL.data(), t)) : -1;
            }
      }
  // Phase 2: unions across tile borders.
  for (int64_t bzb = 0; bzb < nbz; ++bzb)
    for (int64_t by = 0; by < g.nty; ++by)
      for (int64_t bx = 0; bx < g.ntx; ++bx)
        for (int tz = 0; tz < g.TZ; ++tz)
          for (int ty = 0; ty < g.TY; ++ty)
            for (int tx = 0; tx < g.TX; ++tx)
              boundary_unite<FULL>(key, L, g, tile_pixel(g, bx, by, bzb, tx, ty, tz), tx, ty, tz);
  // Phase 3: compress.
  for (int64_t i = 0; i < g.N; ++i)
    if (L[i] >= 0) L[i] = find_root(L, static_cast<int32_t>(i));
}

template <class Key>
void label_host_dispatch(const Key& key, int32_t* L, const Geom& g, bool full) {
  if (full)
    label_host<true>(key, L, g);
  else
    label_host<false>(key, L, g);
}

template <class T>
void lc_host(const T* labels, T* out, const Geom& g, int C) {
  const ClassKey<T> key{labels, C};
  std::vector<int32_t> L(static_cast<size_t>(g.N)), cnt(static_cast<size_t>(g.N), 0);
  std::vector<uint64_t> best(static_cast<size_t>(g.B * C), 0);
  label_host<true>(key, L.data(), g);
  for (int64_t i = 0; i < g.N; ++i)
    if (L[i] >= 0) ++cnt[L[i]];
  for (int64_t i = 0; i < g.N; ++i)
    if (L[i] == i) {
      const int64_t b = i / g.S;
      uint64_t& slot = best[b * C + key(i)];
      const uint64_t k = rank_key(static_cast<uint32_t>(cnt[i]), static_cast<uint32_t>(i - b * g.S));
      if (k > slot) slot = k;
    }
  for (int64_t i = 0; i < g.N; ++i) {
    const int32_t k = key(i);
    const int64_t b = i / g.S;
    const bool keep = k != 0 && static_cast<int64_t>(L[i]) - b * g.S ==
                                    static_cast<int64_t>(rank_root(best[b * C + k]));
    out[i] = keep ? labels[i] : T(0);
  }
}

}  // namespace
}  // namespace ucseg

using namespace ucseg;

extern "C" {

int ucseg_abi_version(void) { return UCSEG_NATIVE_ABI_VERSION; }

const char* ucseg_last_error(void) { return g_last_error.c_str(); }

int ucseg_cc_host(const uint8_t* mask, int32_t* ids, int ndim, const int64_t* shape,
                  int connectivity) {
  clear_error();
  Geom g{};
  bool full = true;
  if (int s = check_shape("ucseg_cc_host", ndim, shape, &g)) return s;
  if (int s = check_connectivity("ucseg_cc_host", ndim, connectivity, &full)) return s;
  if (g.N == 0) return UCSEG_OK;
  if (mask == nullptr || ids == nullptr)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_cc_host: NULL mask or ids pointer");
  label_host_dispatch(MaskKey{mask}, ids, g, full);
  for (int64_t i = 0; i < g.N; ++i) ids[i] += 1;  // -1 (background) -> 0, root r -> r + 1
  return UCSEG_OK;
}

size_t ucseg_lc_workspace_bytes(int ndim, const int64_t* shape, int num_classes) {
  Geom g{};
  if (num_classes < 1 || check_shape("ucseg_lc_workspace_bytes", ndim, shape, &g)) return 0;
  return lc_workspace(g, num_classes).total;
}

int ucseg_lc_host(const void* labels, void* out, int dtype, int ndim, const int64_t* shape,
                  int num_classes) {
  clear_error();
  Geom g{};
  if (int s = check_shape("ucseg_lc_host", ndim, shape, &g)) return s;
  if (dtype_size(dtype) == 0)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_host: unknown dtype code %d", dtype);
  if (num_classes < 1)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_host: num_classes=%d < 1", num_classes);
  if (g.N == 0) return UCSEG_OK;
  if (labels == nullptr || out == nullptr)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_host: NULL labels or out pointer");
  switch (dtype) {
    case UCSEG_UINT8: lc_host(static_cast<const uint8_t*>(labels), static_cast<uint8_t*>(out), g, num_classes); break;
    case UCSEG_INT8: lc_host(static_cast<const int8_t*>(labels), static_cast<int8_t*>(out), g, num_classes); break;
    case UCSEG_INT16: lc_host(static_cast<const int16_t*>(labels), static_cast<int16_t*>(out), g, num_classes); break;
    case UCSEG_INT32: lc_host(static_cast<const int32_t*>(labels), static_cast<int32_t*>(out), g, num_classes); break;
    default: lc_host(static_cast<const int64_t*>(labels), static_cast<int64_t*>(out), g, num_classes); break;
  }
  return UCSEG_OK;
}

}  // extern "C"
