// The kernels' entry points: forward to the instruction set this build compiled them for (see CMakeLists).
#include "isa.h"

namespace pyco::cpu {

namespace isa = PYCO_ISA;  // the one instruction set this build compiled the kernels for

namespace {

#define PYCO_STR2(x) #x
#define PYCO_STR(x) PYCO_STR2(x)
constexpr const char* kIsaName = PYCO_STR(PYCO_ISA);

// A build for AVX2 run on a processor without it must say so rather than die of an illegal instruction.
void require_isa() {
#if defined(__AVX2__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  if (!ok)
    throw KernelError("pyco's CPU kernels were built for AVX2, which this processor lacks: rebuild pyco on this "
                      "machine, or with PYCO_CPU_ISA=baseline (CMake -DPYCO_CPU_ISA=baseline)");
#endif
}

}  // namespace

const char* kernel_isa() { return kIsaName; }

void sgd_step(const TensorRecord* r, int64_t n, const SgdHyper* h, int64_t g, const LaunchOptions& o) {
  require_isa();
  isa::sgd_step(r, n, h, g, o);
}

void adam_step(const TensorRecord* r, int64_t n, const AdamHyper* h, int64_t g, const LaunchOptions& o) {
  require_isa();
  isa::adam_step(r, n, h, g, o);
}

bool grads_all_finite(const TensorRecord* r, int64_t n, int threads) {
  require_isa();
  return isa::grads_all_finite(r, n, threads);
}

void block_dot(const void* rows, const void* delta, int32_t dtype, int64_t num_rows, const int64_t* offsets,
               int64_t num_blocks, double* out, int threads) {
  require_isa();
  isa::block_dot(rows, delta, dtype, num_rows, offsets, num_blocks, out, threads);
}

void stream_add(float* a, const float* b, int64_t n, int threads) {
  require_isa();
  isa::stream_add(a, b, n, threads);
}

}  // namespace pyco::cpu
