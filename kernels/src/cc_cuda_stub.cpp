// cc_cuda_stub.cpp — the CUDA entry points of a library built without a CUDA compiler: they
// exist (one ABI for every build) and fail with UCSEG_ERR_NOT_BUILT, saying why.
#include "api_util.h"
#include "ucseg_native.h"

using namespace ucseg;

extern "C" {

int ucseg_has_cuda(void) { return 0; }

int ucseg_cc_cuda(const uint8_t*, int32_t*, int, const int64_t*, int, void*) {
  return fail(UCSEG_ERR_NOT_BUILT, "ucseg_cc_cuda: libucseg_native was built without CUDA "
                                   "(no CUDA compiler found by CMake)");
}

int ucseg_lc_cuda(const void*, void*, int, int, const int64_t*, int, void*, size_t, void*) {
  return fail(UCSEG_ERR_NOT_BUILT, "ucseg_lc_cuda: libucseg_native was built without CUDA "
                                   "(no CUDA compiler found by CMake)");
}

}  // extern "C"
