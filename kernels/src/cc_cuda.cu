// cc_cuda.cu — CUDA connected components and per-class largest-component filter.
//
// Algorithm: block-based union-find (cc_core.h has the per-pixel phases and the proofs).
//   k_local     one 512-thread block per tile: load keys, union-find in shared memory
//               (atomicMin on shared), write the tile-local root as a global index.
//   k_boundary  same grid; tile-face pixels unite with their backward neighbours in other tiles
//               (atomicMin union in global memory).
//   k_compress  L[i] <- find(L, i); then ids = L + 1 (cc) or per-root sizes with warp-aggregated
//               atomics (largest component).
//   k_best      each root proposes rank_key(size, first pixel) for its (batch, class) with a
//               64-bit atomicMax — the max is "largest, then earliest first pixel".
//   k_write     keep the pixels whose root is the winner of their (batch, class).
// Traffic (2D mask, N pixels): read mask ~2N bytes (local + boundary faces), write/read the int32
// parent array ~3 times (12N); largest component adds N int32 sizes and one read of labels.
// No host synchronisation and no allocation: everything is enqueued on the caller's stream, so a
// CUDA graph can capture it.
#include <cuda_runtime.h>

#include <cstdint>

#include "api_util.h"
#include "cc_core.h"
#include "ucseg_native.h"

namespace ucseg {
namespace {

constexpr int kFlatThreads = 256;

dim3 tile_block(const Geom& g) { return dim3(g.TX, g.TY, g.TZ); }
dim3 tile_grid(const Geom& g) {
  return dim3(static_cast<unsigned>(g.ntx), static_cast<unsigned>(g.nty),
              static_cast<unsigned>(g.ntz * g.B));
}
unsigned flat_blocks(int64_t n) { return static_cast<unsigned>((n + kFlatThreads - 1) / kFlatThreads); }

template <bool FULL, class Key>
__global__ void __launch_bounds__(kTileThreads) k_local(Key key, int32_t* __restrict__ L, Geom g) {
  __shared__ int32_t sK[kTileThreads];
  __shared__ int32_t sL[kTileThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int t = (tz * g.TY + ty) * g.TX + tx;
  const Pix p = tile_pixel(g, blockIdx.x, blockIdx.y, blockIdx.z, tx, ty, tz);
  sK[t] = p.inside ? key(p.gi) : 0;
  sL[t] = t;
  __syncthreads();
  local_unite<FULL>(sK, sL, g, tx, ty, tz);
  __syncthreads();
  if (p.inside)
    L[p.gi] = sK[t] ? local_root_global(g, p, tx, ty, tz, find_root(sL, t)) : -1;
}

template <bool FULL, class Key>
__global__ void __launch_bounds__(kTileThreads) k_boundary(Key key, int32_t* L, Geom g) {
  const Pix p = tile_pixel(g, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  boundary_unite<FULL>(key, L, g, p, threadIdx.x, threadIdx.y, threadIdx.z);
}

// cc: compress only. Reads may see a parent or an already written root; both are ancestors.
__global__ void k_compress(int32_t* L, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && L[i] >= 0) L[i] = find_root(L, static_cast<int32_t>(i));
}

__global__ void k_plus_one(int32_t* L, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) L[i] += 1;
}

// largest component: compress and count. Pixels of a warp mostly share few roots, so one
// atomicAdd per distinct root per warp (match_any) instead of one per pixel.
__global__ void k_compress_count(int32_t* L, int32_t* __restrict__ cnt, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int32_t r = -1;
  if (i < n && L[i] >= 0) {
    r = find_root(L, static_cast<int32_t>(i));
    L[i] = r;
  }
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, r);  // all 32 lanes reach this point
  const int leader = __ffs(peers) - 1;
  if (r >= 0 && static_cast<int>(threadIdx.x & 31) == leader) atomicAdd(cnt + r, __popc(peers));
}

template <class Key>
__global__ void k_best(Key key, const int32_t* __restrict__ L, const int32_t* __restrict__ cnt,
                       unsigned long long* __restrict__ best, int64_t n, int64_t S, int C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || L[i] != i) return;  // roots only (background holds -1)
  const int64_t b = i / S;
  atomicMax(best + b * C + key(i),
            static_cast<unsigned long long>(rank_key(static_cast<uint32_t>(cnt[i]),
                                                     static_cast<uint32_t>(i - b * S))));
}

template <class T>
__global__ void k_write(const T* labels, T* out, const int32_t* __restrict__ L,
                        const unsigned long long* __restrict__ best, int64_t n, int64_t S, int C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T v = labels[i];
  const int64_t vi = static_cast<int64_t>(v);
  bool keep = false;
  if (vi >= 1 && vi < C) {
    const int64_t b = i / S;
    keep = static_cast<int64_t>(L[i]) - b * S == static_cast<int64_t>(rank_root(best[b * C + vi]));
  }
  out[i] = keep ? v : T(0);
}

int launch_check(const char* fn) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(UCSEG_ERR_CUDA, "%s: CUDA error: %s", fn, cudaGetErrorString(e));
  return UCSEG_OK;
}

int check_grid(const char* fn, const Geom& g) {
  if (g.nty > 65535 || g.ntz * g.B > 65535)
    return fail(UCSEG_ERR_INVALID_ARGUMENT,
                "%s: grid too large (H tiles %lld, batch x D tiles %lld; limit 65535)", fn,
                static_cast<long long>(g.nty), static_cast<long long>(g.ntz * g.B));
  return UCSEG_OK;
}

template <bool FULL, class Key>
void launch_label(const Key& key, int32_t* L, const Geom& g, cudaStream_t st) {
  k_local<FULL><<<tile_grid(g), tile_block(g), 0, st>>>(key, L, g);
  k_boundary<FULL><<<tile_grid(g), tile_block(g), 0, st>>>(key, L, g);
}

template <class T>
int lc_cuda(const T* labels, T* out, const Geom& g, int C, char* ws, cudaStream_t st) {
  const LcWorkspace w = lc_workspace(g, C);
  auto* best = reinterpret_cast<unsigned long long*>(ws + w.best_off);
  auto* L = reinterpret_cast<int32_t*>(ws + w.l_off);
  auto* cnt = reinterpret_cast<int32_t*>(ws + w.cnt_off);
  cudaError_t e = cudaMemsetAsync(best, 0, static_cast<size_t>(g.B) * C * 8, st);
  if (e == cudaSuccess) e = cudaMemsetAsync(cnt, 0, static_cast<size_t>(g.N) * 4, st);
  if (e != cudaSuccess)
    return fail(UCSEG_ERR_CUDA, "ucseg_lc_cuda: cudaMemsetAsync: %s", cudaGetErrorString(e));
  const ClassKey<T> key{labels, C};
  launch_label<true>(key, L, g, st);  // the filter is always full connectivity
  const unsigned nb = flat_blocks(g.N);
  k_compress_count<<<nb, kFlatThreads, 0, st>>>(L, cnt, g.N);
  k_best<<<nb, kFlatThreads, 0, st>>>(key, L, cnt, best, g.N, g.S, C);
  k_write<<<nb, kFlatThreads, 0, st>>>(labels, out, L, best, g.N, g.S, C);
  return launch_check("ucseg_lc_cuda");
}

}  // namespace
}  // namespace ucseg

using namespace ucseg;

extern "C" {

int ucseg_has_cuda(void) { return 1; }

int ucseg_cc_cuda(const uint8_t* mask, int32_t* ids, int ndim, const int64_t* shape,
                  int connectivity, void* stream) {
  clear_error();
  Geom g{};
  bool full = true;
  if (int s = check_shape("ucseg_cc_cuda", ndim, shape, &g)) return s;
  if (int s = check_connectivity("ucseg_cc_cuda", ndim, connectivity, &full)) return s;
  if (g.N == 0) return UCSEG_OK;
  if (int s = check_grid("ucseg_cc_cuda", g)) return s;
  if (mask == nullptr || ids == nullptr)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_cc_cuda: NULL mask or ids pointer");
  auto st = static_cast<cudaStream_t>(stream);
  if (full)
    launch_label<true>(MaskKey{mask}, ids, g, st);
  else
    launch_label<false>(MaskKey{mask}, ids, g, st);
  const unsigned nb = flat_blocks(g.N);
  k_compress<<<nb, kFlatThreads, 0, st>>>(ids, g.N);
  k_plus_one<<<nb, kFlatThreads, 0, st>>>(ids, g.N);
  return launch_check("ucseg_cc_cuda");
}

int ucseg_lc_cuda(const void* labels, void* out, int dtype, int ndim, const int64_t* shape,
                  int num_classes, void* workspace, size_t workspace_bytes, void* stream) {
  clear_error();
  Geom g{};
  if (int s = check_shape("ucseg_lc_cuda", ndim, shape, &g)) return s;
  if (dtype_size(dtype) == 0)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_cuda: unknown dtype code %d", dtype);
  if (num_classes < 1)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_cuda: num_classes=%d < 1", num_classes);
  if (g.N == 0) return UCSEG_OK;
  if (int s = check_grid("ucseg_lc_cuda", g)) return s;
  if (labels == nullptr || out == nullptr || workspace == nullptr)
    return fail(UCSEG_ERR_INVALID_ARGUMENT, "ucseg_lc_cuda: NULL labels, out or workspace pointer");
  const size_t need = lc_workspace(g, num_classes).total;
  if (workspace_bytes < need || (reinterpret_cast<uintptr_t>(workspace) & 7u) != 0)
    return fail(UCSEG_ERR_INVALID_ARGUMENT,
                "ucseg_lc_cuda: workspace of %zu bytes at %p; need %zu bytes, 8-byte aligned",
                workspace_bytes, workspace, need);
  auto st = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case UCSEG_UINT8: return lc_cuda(static_cast<const uint8_t*>(labels), static_cast<uint8_t*>(out), g, num_classes, ws, st);
    case UCSEG_INT8: return lc_cuda(static_cast<const int8_t*>(labels), static_cast<int8_t*>(out), g, num_classes, ws, st);
    case UCSEG_INT16: return lc_cuda(static_cast<const int16_t*>(labels), static_cast<int16_t*>(out), g, num_classes, ws, st);
    case UCSEG_INT32: return lc_cuda(static_cast<const int32_t*>(labels), static_cast<int32_t*>(out), g, num_classes, ws, st);
    default: return lc_cuda(static_cast<const int64_t*>(labels), static_cast<int64_t*>(out), g, num_classes, ws, st);
  }
}

}  // extern "C"
