// reference.h — test oracle (plain BFS labelling, brute-force largest component) and the shared
// test cases of the host and CUDA ctests. Independent of the library's union-find code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <vector>

namespace ref {

struct Shape {
  std::vector<int64_t> dims;  // {B,H,W} or {B,D,H,W}
  int ndim() const { return static_cast<int>(dims.size()); }
  int64_t B() const { return dims[0]; }
  int64_t D() const { return ndim() == 4 ? dims[1] : 1; }
  int64_t H() const { return dims[ndim() - 2]; }
  int64_t W() const { return dims[ndim() - 1]; }
  int64_t S() const { return D() * H() * W(); }
  int64_t N() const { return B() * S(); }
  std::string str() const {
    std::string s = "[";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
    return s + "]";
  }
};

// Canonical ids by BFS: pixels with equal nonzero keys connect. Scanning in C order, the first
// unvisited pixel of a component is its minimum index, so its id is that index + 1.
inline std::vector<int32_t> bfs_ids(const std::vector<int32_t>& key, const Shape& sh, bool full) {
  const int64_t D = sh.D(), H = sh.H(), W = sh.W(), S = sh.S();
  std::vector<int32_t> ids(key.size(), 0);
  std::deque<int64_t> q;
  for (int64_t s = 0; s < sh.N(); ++s) {
    if (key[s] == 0 || ids[s] != 0) continue;
    const int32_t id = static_cast<int32_t>(s + 1);
    ids[s] = id;
    q.push_back(s);
    while (!q.empty()) {
      const int64_t i = q.front();
      q.pop_front();
      const int64_t b = i / S, r = i % S, z = r / (H * W), y = (r / W) % H, x = r % W;
      for (int dz = -1; dz <= 1; ++dz)
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) {
            const int m = std::abs(dz) + std::abs(dy) + std::abs(dx);
            if (m == 0 || (!full && m > 1)) continue;
            const int64_t nz = z + dz, ny = y + dy, nx = x + dx;
            if (nz < 0 || nz >= D || ny < 0 || ny >= H || nx < 0 || nx >= W) continue;
            const int64_t j = b * S + (nz * H + ny) * W + nx;
            if (key[j] == key[s] && ids[j] == 0) {
              ids[j] = id;
              q.push_back(j);
            }
          }
    }
  }
  return ids;
}

// Largest component per (batch, class 1..C-1) under full connectivity; ties -> the component
// met first in C order (the strict '>' while scanning components in first-pixel order).
inline std::vector<int64_t> largest_component(const std::vector<int64_t>& labels, const Shape& sh,
                                              int C) {
  std::vector<int32_t> key(labels.size());
  for (size_t i = 0; i < labels.size(); ++i)
    key[i] = (labels[i] >= 1 && labels[i] < C) ? static_cast<int32_t>(labels[i]) : 0;
  const std::vector<int32_t> ids = bfs_ids(key, sh, true);
  std::vector<int64_t> size(labels.size() + 1, 0);
  for (int32_t id : ids)
    if (id) ++size[id];
  std::vector<int64_t> out(labels.size(), 0);
  for (int64_t b = 0; b < sh.B(); ++b)
    for (int c = 1; c < C; ++c) {
      int32_t best = 0;
      for (int64_t i = b * sh.S(); i < (b + 1) * sh.S(); ++i)  // ids[i] == i + 1: a first pixel
        if (key[i] == c && ids[i] == i + 1 && (best == 0 || size[ids[i]] > size[best])) best = ids[i];
      for (int64_t i = b * sh.S(); i < (b + 1) * sh.S(); ++i)
        if (best && ids[i] == best) out[i] = c;
    }
  return out;
}

// ---- cases --------------------------------------------------------------------------------
struct MaskCase {
  std::string name;
  Shape shape;
  std::vector<uint8_t> mask;
};

inline std::vector<Shape> shapes() {
  return {
      {{1, 1, 1}},      {{1, 1, 100}},     {{1, 100, 1}},       {{3, 17, 23}},
      {{2, 40, 70}},    {{1, 33, 65}},     {{4, 16, 32}},       {{1, 1, 1, 1}},
      {{2, 5, 9, 40}},  {{1, 9, 13, 70}},  {{3, 4, 4, 32}},     {{1, 1, 7, 7}},
      {{1, 12, 1, 33}}, {{2, 6, 17, 5}},
  };
}

inline std::vector<MaskCase> mask_cases(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<MaskCase> out;
  for (const Shape& sh : shapes()) {
    const int64_t N = sh.N(), D = sh.D(), H = sh.H(), W = sh.W();
    auto make = [&](const std::string& n, auto f) {
      MaskCase c{n, sh, std::vector<uint8_t>(N)};
      for (int64_t i = 0; i < N; ++i) {
        const int64_t r = i % sh.S(), z = r / (H * W), y = (r / W) % H, x = r % W;
        c.mask[i] = f(i, z, y, x) ? 1 : 0;
      }
      out.push_back(std::move(c));
    };
    for (double p : {0.2, 0.45, 0.6, 0.8}) {
      std::bernoulli_distribution bern(p);
      make("random p=" + std::to_string(p).substr(0, 4),
           [&](int64_t, int64_t, int64_t, int64_t) { return bern(rng); });
    }
    make("zeros", [](int64_t, int64_t, int64_t, int64_t) { return false; });
    make("ones", [](int64_t, int64_t, int64_t, int64_t) { return true; });
    make("checker", [](int64_t, int64_t z, int64_t y, int64_t x) { return (x + y + z) % 2 == 0; });
    make("anti-diagonals", [](int64_t, int64_t z, int64_t y, int64_t x) { return (x + y + z) % 3 == 0; });
    make("diagonals", [](int64_t, int64_t, int64_t y, int64_t x) { return (x - y + 300) % 4 == 0; });
    // A serpentine: long single component that crosses every tile boundary many times.
    make("serpentine", [&](int64_t, int64_t z, int64_t y, int64_t x) {
      if (z % 2) return false;
      if (y % 2 == 0) return true;
      return ((y / 2) % 2 == 0) ? x == W - 1 : x == 0;
    });
    (void)D;
  }
  return out;
}

struct LabelCase {
  std::string name;
  Shape shape;
  int C;
  std::vector<int64_t> labels;
};

inline std::vector<LabelCase> label_cases(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<LabelCase> out;
  for (const Shape& sh : shapes()) {
    for (int C : {2, 4}) {
      std::uniform_int_distribution<int> u(0, C - 1);
      LabelCase c{"uniform C=" + std::to_string(C), sh, C, std::vector<int64_t>(sh.N())};
      for (auto& v : c.labels) v = u(rng);
      out.push_back(c);
      // Values outside 1..C-1 (negative, >= C) are background.
      std::uniform_int_distribution<int> w(-2, C + 1);
      LabelCase d{"out-of-range C=" + std::to_string(C), sh, C, std::vector<int64_t>(sh.N())};
      for (auto& v : d.labels) v = w(rng);
      out.push_back(d);
    }
    // Equal-size tie: two 1-pixel components of class 1 (and one of class 2) per item.
    if (sh.S() >= 5) {
      LabelCase t{"tie", sh, 3, std::vector<int64_t>(sh.N(), 0)};
      for (int64_t b = 0; b < sh.B(); ++b) {
        t.labels[b * sh.S() + sh.S() - 1] = 1;
        t.labels[b * sh.S() + 2] = 1;
        t.labels[b * sh.S() + 0] = 2;
      }
      out.push_back(t);
    }
  }
  return out;
}

inline std::vector<int32_t> mask_key(const std::vector<uint8_t>& m) {
  std::vector<int32_t> k(m.size());
  for (size_t i = 0; i < m.size(); ++i) k[i] = m[i] != 0;
  return k;
}

inline int face_conn(const Shape& sh) { return sh.ndim() == 4 ? 6 : 4; }
inline int full_conn(const Shape& sh) { return sh.ndim() == 4 ? 26 : 8; }

}  // namespace ref

// Minimal check macro: counts failures, prints the first few.
inline int& ucseg_test_failures() {
  static int n = 0;
  return n;
}
#define CHECK_MSG(cond, ...)                                              \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (++ucseg_test_failures() <= 20) {                                \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);         \
        std::fprintf(stderr, __VA_ARGS__);                                \
        std::fprintf(stderr, "\n");                                       \
      }                                                                   \
    }                                                                     \
  } while (0)
