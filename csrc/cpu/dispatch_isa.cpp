// Run-time choice of the kernels' instruction set: AVX2 where the processor has it (and it was built).
#include "isa.h"

namespace pyco::cpu {

#ifdef PYCO_HAVE_AVX2
static const bool kUseAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
static const bool kUseAvx2 = false;
#endif

const char* kernel_isa() { return kUseAvx2 ? "avx2" : "baseline"; }

void sgd_step(const TensorRecord* r, int64_t n, const SgdHyper* h, int64_t g, const LaunchOptions& o) {
#ifdef PYCO_HAVE_AVX2
  if (kUseAvx2) return avx2::sgd_step(r, n, h, g, o);
#endif
  baseline::sgd_step(r, n, h, g, o);
}

void adam_step(const TensorRecord* r, int64_t n, const AdamHyper* h, int64_t g, const LaunchOptions& o) {
#ifdef PYCO_HAVE_AVX2
  if (kUseAvx2) return avx2::adam_step(r, n, h, g, o);
#endif
  baseline::adam_step(r, n, h, g, o);
}

bool grads_all_finite(const TensorRecord* r, int64_t n, int threads) {
#ifdef PYCO_HAVE_AVX2
  if (kUseAvx2) return avx2::grads_all_finite(r, n, threads);
#endif
  return baseline::grads_all_finite(r, n, threads);
}

void block_dot(const void* rows, const void* delta, int32_t dtype, int64_t num_rows, const int64_t* offsets,
               int64_t num_blocks, double* out, int threads) {
#ifdef PYCO_HAVE_AVX2
  if (kUseAvx2) return avx2::block_dot(rows, delta, dtype, num_rows, offsets, num_blocks, out, threads);
#endif
  baseline::block_dot(rows, delta, dtype, num_rows, offsets, num_blocks, out, threads);
}

}  // namespace pyco::cpu
