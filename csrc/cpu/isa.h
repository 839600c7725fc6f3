// The kernel sources are compiled for one instruction set per build (CMake's PYCO_CPU_ISA: baseline, or
// avx2) into namespace pyco::cpu::<isa>; cpu/dispatch_isa.cpp forwards the public entry points to it.
// Every instruction set computes the same IEEE operations in the same order (no FMA contraction, fixed
// lanes), so results do not depend on it.
#pragma once

#include "../kernels.h"

#ifndef PYCO_ISA
#define PYCO_ISA baseline
#endif

namespace pyco::cpu {

#define PYCO_DECLARE_KERNELS(isa)                                                                          \
  namespace isa {                                                                                          \
  void sgd_step(const TensorRecord*, int64_t, const SgdHyper*, int64_t, const LaunchOptions&);             \
  void adam_step(const TensorRecord*, int64_t, const AdamHyper*, int64_t, const LaunchOptions&);           \
  bool grads_all_finite(const TensorRecord*, int64_t, int);                                                \
  void block_dot(const void*, const void*, int32_t, int64_t, const int64_t*, int64_t, double*, int);         \
  void stream_add(float*, const float*, int64_t, int);                                                     \
  }

PYCO_DECLARE_KERNELS(baseline)
PYCO_DECLARE_KERNELS(avx2)

}  // namespace pyco::cpu
