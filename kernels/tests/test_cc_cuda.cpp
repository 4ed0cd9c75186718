// test_cc_cuda.cpp — the CUDA kernels against the BFS oracle on the cases of the host test:
// exact canonical ids (every connectivity), largest component for every dtype, in place and on a
// non-default stream. Exits 77 (ctest SKIP_RETURN_CODE) when no CUDA device is usable.
#include <cuda_runtime.h>

#include <cstring>

#include "reference.h"
#include "ucseg_native.h"

namespace {

#define CUDA_OK(expr)                                                                     \
  do {                                                                                    \
    cudaError_t e_ = (expr);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

template <class T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t n_) : n(n_) { CUDA_OK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(p); }
  void up(const std::vector<T>& v) { CUDA_OK(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> v(n);
    CUDA_OK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

template <class T>
void check_lc(const ref::LabelCase& c, int dtype, const char* tname, cudaStream_t st) {
  std::vector<T> lab(c.labels.size());
  for (size_t i = 0; i < lab.size(); ++i) lab[i] = static_cast<T>(c.labels[i]);
  const std::vector<int64_t> seen(lab.begin(), lab.end());
  const std::vector<int64_t> want = ref::largest_component(seen, c.shape, c.C);
  const size_t ws_bytes = ucseg_lc_workspace_bytes(c.shape.ndim(), c.shape.dims.data(), c.C);
  DevBuf<uint64_t> ws((ws_bytes + 7) / 8);
  DevBuf<T> d_lab(lab.size()), d_out(lab.size());
  d_lab.up(lab);
  for (int inplace = 0; inplace < 2; ++inplace) {
    T* out = inplace ? d_lab.p : d_out.p;
    if (inplace) d_lab.up(lab);
    int s = ucseg_lc_cuda(d_lab.p, out, dtype, c.shape.ndim(), c.shape.dims.data(), c.C, ws.p,
                          ws_bytes, st);
    CHECK_MSG(s == UCSEG_OK, "lc_cuda %s %s: status %d (%s)", c.name.c_str(), tname, s, ucseg_last_error());
    CUDA_OK(cudaStreamSynchronize(st));
    const std::vector<T> got = inplace ? d_lab.down() : d_out.down();
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += static_cast<int64_t>(got[i]) != want[i];
    CHECK_MSG(bad == 0, "lc_cuda %s %s %s inplace=%d: %lld pixels differ", c.name.c_str(),
              c.shape.str().c_str(), tname, inplace, static_cast<long long>(bad));
  }
}

}  // namespace

int main() {
  int ndev = 0;
  const cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) {
    std::printf("SKIP test_cc_cuda: no usable CUDA device (%s)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 77;
  }
  if (!ucseg_has_cuda()) {
    std::printf("SKIP test_cc_cuda: library built without CUDA\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  int n_cc = 0, n_lc = 0;
  for (const auto& c : ref::mask_cases(4321)) {
    DevBuf<uint8_t> d_mask(c.mask.size());
    DevBuf<int32_t> d_ids(c.mask.size());
    d_mask.up(c.mask);
    for (int conn : {0, ref::face_conn(c.shape), ref::full_conn(c.shape)}) {
      const bool full = conn != ref::face_conn(c.shape);
      const auto want = ref::bfs_ids(ref::mask_key(c.mask), c.shape, full);
      const int s = ucseg_cc_cuda(d_mask.p, d_ids.p, c.shape.ndim(), c.shape.dims.data(), conn, st);
      CHECK_MSG(s == UCSEG_OK, "cc_cuda %s: status %d (%s)", c.name.c_str(), s, ucseg_last_error());
      CUDA_OK(cudaStreamSynchronize(st));
      const auto got = d_ids.down();
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i];
      CHECK_MSG(bad == 0, "cc_cuda %s %s conn=%d: %lld ids differ from BFS", c.name.c_str(),
                c.shape.str().c_str(), conn, static_cast<long long>(bad));
      ++n_cc;
    }
  }
  // A large random case: many tiles and heavy contention in the global unions.
  {
    ref::Shape sh{{2, 37, 129, 131}};
    std::mt19937 rng(7);
    std::bernoulli_distribution bern(0.3);
    std::vector<uint8_t> m(sh.N());
    for (auto& v : m) v = bern(rng);
    DevBuf<uint8_t> d_mask(m.size());
    DevBuf<int32_t> d_ids(m.size());
    d_mask.up(m);
    for (int conn : {6, 26}) {
      const auto want = ref::bfs_ids(ref::mask_key(m), sh, conn == 26);
      CHECK_MSG(ucseg_cc_cuda(d_mask.p, d_ids.p, 4, sh.dims.data(), conn, st) == UCSEG_OK, "big");
      CUDA_OK(cudaStreamSynchronize(st));
      const auto got = d_ids.down();
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i];
      CHECK_MSG(bad == 0, "cc_cuda big conn=%d: %lld ids differ", conn, static_cast<long long>(bad));
      ++n_cc;
    }
  }
  for (const auto& c : ref::label_cases(77)) {
    check_lc<int64_t>(c, UCSEG_INT64, "int64", st);
    check_lc<int32_t>(c, UCSEG_INT32, "int32", st);
    check_lc<int16_t>(c, UCSEG_INT16, "int16", st);
    check_lc<int8_t>(c, UCSEG_INT8, "int8", st);
    check_lc<uint8_t>(c, UCSEG_UINT8, "uint8", st);
    n_lc += 5;
  }
  // Argument checks on the CUDA entry points.
  {
    const int64_t sh[3] = {1, 4, 4};
    CHECK_MSG(ucseg_lc_cuda(reinterpret_cast<void*>(8), reinterpret_cast<void*>(8), UCSEG_INT64, 3, sh, 4,
                            reinterpret_cast<void*>(8), 1, st) == UCSEG_ERR_INVALID_ARGUMENT,
              "too small workspace must fail");
    const int64_t huge_b[3] = {70000, 2, 2};
    CHECK_MSG(ucseg_cc_cuda(reinterpret_cast<uint8_t*>(8), reinterpret_cast<int32_t*>(8), 3, huge_b, 0, st) ==
                  UCSEG_ERR_INVALID_ARGUMENT, "grid limit must fail: %s", ucseg_last_error());
  }
  CUDA_OK(cudaStreamDestroy(st));
  const int f = ucseg_test_failures();
  std::printf("test_cc_cuda on %s: %d cc cases, %d lc cases: %s\n", prop.name, n_cc, n_lc, f ? "FAILED" : "ok");
  return f ? 1 : 0;
}
