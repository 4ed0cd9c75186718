// cc_core.h — the connected-component algorithm shared by the CUDA kernels and the host twin.
//
// Block-based union-find (Playne & Hawick 2018; Allegretti et al. 2019), every phase written as a
// per-pixel function that the CUDA kernels call once per thread and the host twin calls in loops
// over the same tiles, so `ctest` on a machine without a GPU exercises the very code the GPU runs
// (tile decomposition, local/boundary split, neighbour tables, root rule):
//
//   1. local:    per tile (512 pixels), union-find in shared memory over the neighbours inside the
//                tile; write each pixel's tile-local root as a global index.
//   2. boundary: every pixel unites with its backward neighbours that lie in another tile, in
//                global memory (atomicMin-based union, Playne & Hawick).
//   3. compress: L[i] <- find(L, i).
//
// Root rule: a union always links the larger root under the smaller (atomicMin), so a root is
// never linked to a larger index and the surviving root of a component is its minimum linear
// index = its first pixel in C order. That makes ids canonical (equal on every backend) and the
// "first pixel wins" tie rule of the largest-component filter a plain comparison of roots.
// Invariant during the merge: L[i] <= i and L[i] lies in i's component, so concurrent readers of a
// stale parent still walk to a valid ancestor; values only decrease, so every walk terminates.
//
// 2D is run as 3D with D = 1: z-neighbours are then always out of range, so 4 == 6 ("face") and
// 8 == 26 ("full") and only the neighbour set (FULL or not) is a template parameter.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define UCSEG_HD __host__ __device__ __forceinline__
#define UCSEG_UNROLL _Pragma("unroll")
#else
#define UCSEG_HD inline
#define UCSEG_UNROLL
#endif

namespace ucseg {

constexpr int kTileThreads = 512;

struct Geom {
  int64_t B, D, H, W;  // 2D: D == 1
  int64_t S;           // D * H * W, pixels per batch item
  int64_t N;           // B * S
  int TX, TY, TZ;      // tile = CUDA block (TX * TY * TZ == kTileThreads)
  int64_t ntx, nty, ntz;
};

// Backward neighbours (smaller linear index): the 3 face ones first, then the 10 others.
struct Off { int8_t dz, dy, dx; };
UCSEG_HD Off backward_offset(int k) {
  // face: (0,0,-1) (0,-1,0) (-1,0,0); full adds (0,-1,-1) (0,-1,+1) and dz=-1 with (dy,dx) != (0,0)
  switch (k) {
    case 0: return {0, 0, -1};
    case 1: return {0, -1, 0};
    case 2: return {-1, 0, 0};
    case 3: return {0, -1, -1};
    case 4: return {0, -1, 1};
    case 5: return {-1, -1, -1};
    case 6: return {-1, -1, 0};
    case 7: return {-1, -1, 1};
    case 8: return {-1, 0, -1};
    case 9: return {-1, 0, 1};
    case 10: return {-1, 1, -1};
    case 11: return {-1, 1, 0};
    default: return {-1, 1, 1};
  }
}
template <bool FULL>
UCSEG_HD constexpr int num_backward() { return FULL ? 13 : 3; }

// ---- keys: which pixels are foreground and which neighbours connect (equal nonzero keys) ----
struct MaskKey {
  const uint8_t* p;
  UCSEG_HD int32_t operator()(int64_t i) const { return p[i] != 0 ? 1 : 0; }
};
template <class T>
struct ClassKey {
  const T* p;
  int32_t C;
  UCSEG_HD int32_t operator()(int64_t i) const {
    const int64_t v = static_cast<int64_t>(p[i]);
    return (v >= 1 && v < C) ? static_cast<int32_t>(v) : 0;
  }
};

// ---- union-find on an int32 parent array -----------------------------------------------------
UCSEG_HD int32_t atomic_min_i32(int32_t* a, int32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicMin(a, v);
#else
  const int32_t old = *a;  // the host twin runs the phases sequentially
  if (v < old) *a = v;
  return old;
#endif
}

// Find with path halving: every visited node is re-pointed to its grandparent. The store is an
// atomicMin (a fire-and-forget RED on the GPU), so parents still only decrease and always stay
// ancestors in the same component: it commutes with the unions' atomicMin, a root is never
// touched (only nodes with L[x] != x are re-pointed), and every invariant above holds. Without it
// the chains of tile roots of a large component (hundreds of tiles) are walked again by every
// pixel of the boundary and compress phases. volatile: parents change under concurrent unions,
// every read must go to memory.
UCSEG_HD int32_t find_root(volatile int32_t* L, int32_t x) {
  for (;;) {
    const int32_t p = L[x];
    if (p == x) return x;
    const int32_t gp = L[p];
    if (gp == p) return p;
    atomic_min_i32(const_cast<int32_t*>(L + x), gp);
    x = gp;
  }
}

// Link the larger root under the smaller. If atomicMin finds the root already re-linked by
// another thread (old != b), that link survives as min(old, a); continue with the union of a and
// the old parent so no edge is lost.
UCSEG_HD void unite(volatile int32_t* L, int32_t a, int32_t b) {
  for (;;) {
    a = find_root(L, a);
    b = find_root(L, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomic_min_i32(const_cast<int32_t*>(L + b), a);
    if (old == b) return;
    b = old;
  }
}

// ---- geometry -------------------------------------------------------------------------------
inline Geom make_geom(int ndim, const int64_t* shape) {
  Geom g{};
  g.B = shape[0];
  g.D = ndim == 4 ? shape[1] : 1;
  g.H = shape[ndim - 2];
  g.W = shape[ndim - 1];
  g.S = g.D * g.H * g.W;
  g.N = g.B * g.S;
  if (ndim == 4) {
    g.TX = 32; g.TY = 4; g.TZ = 4;
  } else {
    g.TX = 32; g.TY = 16; g.TZ = 1;
  }
  g.ntx = (g.W + g.TX - 1) / g.TX;
  g.nty = (g.H + g.TY - 1) / g.TY;
  g.ntz = (g.D + g.TZ - 1) / g.TZ;
  return g;
}

// Pixel of thread (tx, ty, tz) in tile (bx, by, bzb); bzb enumerates (batch, z-tile) pairs.
struct Pix {
  int64_t b, z, y, x, gi;
  bool inside;
};
UCSEG_HD Pix tile_pixel(const Geom& g, int64_t bx, int64_t by, int64_t bzb, int tx, int ty, int tz) {
  Pix p;
  p.b = bzb / g.ntz;
  p.z = (bzb % g.ntz) * g.TZ + tz;
  p.y = by * g.TY + ty;
  p.x = bx * g.TX + tx;
  p.inside = p.z < g.D && p.y < g.H && p.x < g.W;
  p.gi = ((p.b * g.D + p.z) * g.H + p.y) * g.W + p.x;
  return p;
}

// ---- phase 1: tile-local union-find over the tile's shared arrays sK (keys) / sL (parents) ----
template <bool FULL>
UCSEG_HD void local_unite(const int32_t* sK, volatile int32_t* sL, const Geom& g, int tx, int ty,
                          int tz) {
  const int t = (tz * g.TY + ty) * g.TX + tx;
  const int32_t k = sK[t];
  if (k == 0) return;
UCSEG_UNROLL
  for (int n = 0; n < num_backward<FULL>(); ++n) {
    const Off o = backward_offset(n);
    const int nx = tx + o.dx, ny = ty + o.dy, nz = tz + o.dz;
    if (nx < 0 || nx >= g.TX || ny < 0 || ny >= g.TY || nz < 0) continue;  // dz <= 0 always
    const int nt = (nz * g.TY + ny) * g.TX + nx;
    if (sK[nt] == k) unite(sL, t, nt);  // out-of-image tile slots hold key 0
  }
}

// Tile-local root (a local index) -> the global index of that pixel. Local and global C order
// agree inside a tile, so the local minimum is also the global minimum of the tile component.
UCSEG_HD int32_t local_root_global(const Geom& g, const Pix& p, int tx, int ty, int tz, int32_t r) {
  const int rx = r % g.TX, ry = (r / g.TX) % g.TY, rz = r / (g.TX * g.TY);
  return static_cast<int32_t>(p.gi + ((static_cast<int64_t>(rz - tz) * g.H + (ry - ty)) * g.W +
                                      (rx - tx)));
}

// ---- phase 2: unions across tile borders, in the global parent array --------------------------
template <bool FULL, class Key>
UCSEG_HD void boundary_unite(const Key& key, volatile int32_t* L, const Geom& g, const Pix& p,
                             int tx, int ty, int tz) {
  if (!p.inside) return;
  // Only pixels on a tile face have backward neighbours in another tile (dy = +1 and dz = -1
  // come together, so the last tile row matters only when a previous plane exists).
  const bool face = tx == 0 || tx == g.TX - 1 || ty == 0 || ((ty == g.TY - 1 || tz == 0) && p.z > 0);
  if (!face) return;
  const int32_t k = key(p.gi);
  if (k == 0) return;
UCSEG_UNROLL
  for (int n = 0; n < num_backward<FULL>(); ++n) {
    const Off o = backward_offset(n);
    const int ltx = tx + o.dx, lty = ty + o.dy, ltz = tz + o.dz;
    if (ltx >= 0 && ltx < g.TX && lty >= 0 && lty < g.TY && ltz >= 0) continue;  // phase 1 did it
    const int64_t nx = p.x + o.dx, ny = p.y + o.dy, nz = p.z + o.dz;
    if (nx < 0 || nx >= g.W || ny < 0 || ny >= g.H || nz < 0) continue;
    const int64_t gn = p.gi + (static_cast<int64_t>(o.dz) * g.H + o.dy) * g.W + o.dx;
    if (key(gn) == k) unite(L, static_cast<int32_t>(p.gi), static_cast<int32_t>(gn));
  }
}

// ---- largest component: ranking key of a root --------------------------------------------------
// (size, then the smaller first pixel) packed so that one unsigned max picks the winner; 0 means
// "class absent" because every real key has size >= 1 in the high word.
UCSEG_HD uint64_t rank_key(uint32_t size, uint32_t local_root) {
  return (static_cast<uint64_t>(size) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - local_root);
}
UCSEG_HD uint32_t rank_root(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

}  // namespace ucseg
