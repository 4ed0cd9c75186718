// test_cc_host.cpp — the host twin of the CUDA kernels (same phases, same tiles) against a BFS
// oracle: exact canonical ids for every connectivity, and the largest-component filter for every
// dtype, on random masks, adversarial patterns and ties. Also the C API's argument checks.
#include <cstring>

#include "reference.h"
#include "ucseg_native.h"

namespace {

template <class T>
std::vector<T> cast_vec(const std::vector<int64_t>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<T>(v[i]);
  return o;
}

template <class T>
void check_lc(const ref::LabelCase& c, int dtype, const char* tname) {
  // int8/uint8 cannot hold every test value; the reference sees the value after the cast.
  const std::vector<T> lab = cast_vec<T>(c.labels);
  std::vector<int64_t> seen(lab.begin(), lab.end());
  const std::vector<int64_t> want = ref::largest_component(seen, c.shape, c.C);
  std::vector<T> out(lab.size(), T(99));
  int s = ucseg_lc_host(lab.data(), out.data(), dtype, c.shape.ndim(), c.shape.dims.data(), c.C);
  CHECK_MSG(s == UCSEG_OK, "lc_host %s %s: status %d (%s)", c.name.c_str(), tname, s, ucseg_last_error());
  int64_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) bad += static_cast<int64_t>(out[i]) != want[i];
  CHECK_MSG(bad == 0, "lc_host %s %s %s: %lld pixels differ from the reference", c.name.c_str(),
            c.shape.str().c_str(), tname, static_cast<long long>(bad));
  // In place (out aliases labels).
  std::vector<T> io = lab;
  s = ucseg_lc_host(io.data(), io.data(), dtype, c.shape.ndim(), c.shape.dims.data(), c.C);
  bad = 0;
  for (size_t i = 0; i < io.size(); ++i) bad += static_cast<int64_t>(io[i]) != want[i];
  CHECK_MSG(s == UCSEG_OK && bad == 0, "lc_host in place %s %s: %lld differ", c.name.c_str(),
            tname, static_cast<long long>(bad));
}

}  // namespace

int main() {
  CHECK_MSG(ucseg_abi_version() == UCSEG_NATIVE_ABI_VERSION, "abi version");
  int n_cc = 0, n_lc = 0;
  for (const auto& c : ref::mask_cases(1234)) {
    for (int conn : {0, ref::face_conn(c.shape), ref::full_conn(c.shape)}) {
      const bool full = conn != ref::face_conn(c.shape);
      const auto want = ref::bfs_ids(ref::mask_key(c.mask), c.shape, full);
      std::vector<int32_t> got(c.mask.size(), -7);
      const int s = ucseg_cc_host(c.mask.data(), got.data(), c.shape.ndim(), c.shape.dims.data(), conn);
      CHECK_MSG(s == UCSEG_OK, "cc_host %s: status %d (%s)", c.name.c_str(), s, ucseg_last_error());
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i];
      CHECK_MSG(bad == 0, "cc_host %s %s conn=%d: %lld ids differ from BFS", c.name.c_str(),
                c.shape.str().c_str(), conn, static_cast<long long>(bad));
      ++n_cc;
    }
  }
  for (const auto& c : ref::label_cases(99)) {
    check_lc<int64_t>(c, UCSEG_INT64, "int64");
    check_lc<int32_t>(c, UCSEG_INT32, "int32");
    check_lc<int16_t>(c, UCSEG_INT16, "int16");
    check_lc<int8_t>(c, UCSEG_INT8, "int8");
    check_lc<uint8_t>(c, UCSEG_UINT8, "uint8");
    n_lc += 5;
  }

  // Hand-checked 2D case: 8- vs 4-connectivity of a diagonal, ids = 1 + first pixel.
  {
    const uint8_t m[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    const int64_t sh[3] = {1, 3, 3};
    int32_t ids[9];
    ucseg_cc_host(m, ids, 3, sh, 8);
    const int32_t w8[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    CHECK_MSG(std::memcmp(ids, w8, sizeof ids) == 0, "diagonal 8-conn");
    ucseg_cc_host(m, ids, 3, sh, 4);
    const int32_t w4[9] = {1, 0, 0, 0, 5, 0, 0, 0, 9};
    CHECK_MSG(std::memcmp(ids, w4, sizeof ids) == 0, "diagonal 4-conn");
  }

  // Argument checks: clear errors, nothing written.
  {
    const uint8_t m[4] = {1, 1, 1, 1};
    int32_t ids[4] = {0, 0, 0, 0};
    const int64_t sh3[3] = {1, 2, 2}, sh2[2] = {2, 2}, neg[3] = {1, -2, 2};
    CHECK_MSG(ucseg_cc_host(m, ids, 3, sh3, 6) == UCSEG_ERR_INVALID_ARGUMENT &&
                  std::strstr(ucseg_last_error(), "connectivity=6") != nullptr,
              "2D with connectivity 6 must fail: %s", ucseg_last_error());
    CHECK_MSG(ucseg_cc_host(m, ids, 2, sh2, 0) == UCSEG_ERR_INVALID_ARGUMENT, "ndim 2 must fail");
    CHECK_MSG(ucseg_cc_host(m, ids, 3, neg, 0) == UCSEG_ERR_INVALID_ARGUMENT, "negative dim must fail");
    CHECK_MSG(ucseg_cc_host(nullptr, ids, 3, sh3, 0) == UCSEG_ERR_INVALID_ARGUMENT, "NULL must fail");
    CHECK_MSG(ucseg_lc_host(m, ids, 9, 3, sh3, 2) == UCSEG_ERR_INVALID_ARGUMENT, "bad dtype must fail");
    const int64_t big[4] = {1, 2048, 1024, 1024};
    CHECK_MSG(ucseg_cc_host(m, ids, 4, big, 0) == UCSEG_ERR_INVALID_ARGUMENT, ">= 2^31 elements must fail");
    CHECK_MSG(ucseg_cc_host(m, ids, 3, sh3, 8) == UCSEG_OK && ucseg_last_error()[0] == '\0',
              "a good call clears the error");
    CHECK_MSG(ucseg_lc_workspace_bytes(3, sh3, 4) >= 4 * 8 + 2 * 4 * 4, "workspace size");
  }

  const int f = ucseg_test_failures();
  std::printf("test_cc_host: %d cc cases, %d lc cases, cuda=%d: %s\n", n_cc, n_lc, ucseg_has_cuda(),
              f ? "FAILED" : "ok");
  return f ? 1 : 0;
}
