// The update rules of the CUDA kernels, one small functor per rule (apex / llm.c style). A rule knows its
// hyper-parameters and one element's arithmetic, nothing about memory or threads (multi_tensor.cuh does
// that). Everything is __host__ __device__: the host test (csrc/tests/test_cuda_rules.cu) holds these
// functors against the CPU kernels. The arithmetic mirrors csrc/cpu/sgd.cpp and adam.cpp operation for
// operation (same constants in the same type, same order, no FMA contraction: nvcc runs with -fmad=false),
// so a GPU step and a CPU step of the same tensors agree bitwise wherever the math library does (division
// and square root are IEEE-rounded on both sides; only pow() in Adam's bias corrections may differ by an ulp).
//
// Interface of a rule:
//   Params                        per param group, in device memory (csrc/cuda/launch.h)
//   Consts<M> prepare<M>(P, rec)  per tensor: constants in the arithmetic type M (reads lr / step counters)
//   apply(c, p, g, s)             one element: p (in/out), g (the unscaled gradient), s[3] the state slots
//   kStepCounters                 whether records carry step counters (incremented by the launch)
#pragma once

#include <cmath>

#include "launch.h"

#ifdef __CUDACC__
#define PYCO_HD __host__ __device__ __forceinline__
#else
#define PYCO_HD inline
#endif

namespace pyco::cuda {

using std::pow;
using std::sqrt;

PYCO_HD double read_scalar(int64_t address, int32_t dtype) {
  return dtype == kF64 ? *reinterpret_cast<const double*>(address)
                       : static_cast<double>(*reinterpret_cast<const float*>(address));
}

PYCO_HD double learning_rate(double value, const LrSource& src) {
  return src.address ? read_scalar(src.address, src.dtype) : value;
}

// What a step that was applied (not skipped) leaves in a record's `step` field once every element is done
// (the finalize kernel's work): Adam's counter goes from t − 1 to t (`step_counters`); SGD's device init
// flag (kFlagMomentumInitFlag) becomes 1, so the next step finds its momentum buffer initialized.
PYCO_HD void finish_record(const TensorRecord& rec, bool step_counters) {
  if (!rec.step) return;
  if ((rec.codes >> 16) & kFlagMomentumInitFlag) {
    *reinterpret_cast<int32_t*>(rec.step) = 1;
  } else if (step_counters) {
    if (((rec.codes >> 8) & 0xff) == kF64) {
      *reinterpret_cast<double*>(rec.step) += 1.0;
    } else {
      *reinterpret_cast<float*>(rec.step) += 1.0f;
    }
  }
}

// SGD's momentum buffer is fresh (zeros, to become d) when the host flag says so, or the device flag is 0.
PYCO_HD bool momentum_is_fresh(const TensorRecord& rec) {
  const int64_t flags = rec.codes >> 16;
  if (flags & kFlagMomentumInitFlag) return *reinterpret_cast<const int32_t*>(rec.step) == 0;
  return (flags & kFlagFreshMomentum) != 0;
}

// torch.optim.SGD: d = ±g (+ wd·θ);  b = d on the first step, else μ·b + (1−τ)·d;  d = d + μ·b or b;  θ −= lr·d
// "First step": the first one applied, per momentum_is_fresh.
struct SgdRule {
  using Params = SgdParams;
  static constexpr bool kStepCounters = false;

  template <typename M>
  struct Consts {
    M lr, wd, mu, keep, take, sign;
    bool momentum, nesterov, weight_decay;
  };

  template <typename M>
  PYCO_HD static Consts<M> prepare(const Params& P, const TensorRecord& rec) {
    const SgdHyper& h = P.hyper;
    const bool fresh = momentum_is_fresh(rec);
    Consts<M> c;
    c.lr = static_cast<M>(learning_rate(h.lr, P.lr));
    c.wd = static_cast<M>(h.weight_decay);
    c.mu = static_cast<M>(h.momentum);
    c.keep = fresh ? M(0) : c.mu;  // a fresh buffer (zeros) becomes d exactly: 0·b + 1·d
    c.take = fresh ? M(1) : static_cast<M>(1.0 - h.dampening);
    c.sign = h.maximize ? M(-1) : M(1);
    c.momentum = h.momentum != 0.0;
    c.nesterov = h.nesterov;
    c.weight_decay = h.weight_decay != 0.0;
    return c;
  }

  template <typename M>
  PYCO_HD static void apply(const Consts<M>& c, M& p, M g, M (&s)[3]) {
    M d = c.sign * g;
    if (c.weight_decay) d = d + c.wd * p;
    if (c.momentum) {
      const M b = c.keep * s[0] + c.take * d;
      s[0] = b;
      d = c.nesterov ? d + c.mu * b : b;
    }
    p = p - c.lr * d;
  }
};

// torch.optim.Adam / AdamW: t += 1;  d = ±g (+ wd·θ, or θ ·= 1 − lr·wd when decoupled);  m += (1−β1)(d − m);
// v = β2·v + (1−β2)·d²;  v̂ = max(v̂, v) (amsgrad);  θ −= lr/(1−β1^t) · m / (√v̂ / √(1−β2^t) + ε)
struct AdamRule {
  using Params = AdamParams;
  static constexpr bool kStepCounters = true;
  enum Decay { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

  template <typename M>
  struct Consts {
    M sign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt;
    int decay_mode;
    bool amsgrad;
  };

  // The counter in memory holds t − 1: the launch's finalize kernel stores t once every element is done.
  template <typename M>
  PYCO_HD static Consts<M> prepare(const Params& P, const TensorRecord& rec) {
    const AdamHyper& h = P.hyper;
    const double lr = learning_rate(h.lr, P.lr);
    const double step = read_scalar(rec.step, static_cast<int32_t>((rec.codes >> 8) & 0xff)) + 1.0;
    Consts<M> c;
    c.sign = h.maximize ? M(-1) : M(1);
    c.wd = static_cast<M>(h.weight_decay);
    c.decay = static_cast<M>(1.0 - lr * h.weight_decay);
    c.one_minus_beta1 = static_cast<M>(1.0 - h.beta1);
    c.beta2 = static_cast<M>(h.beta2);
    c.one_minus_beta2 = static_cast<M>(1.0 - h.beta2);
    c.eps = static_cast<M>(h.eps);
    c.step_size = static_cast<M>(lr / (1.0 - pow(h.beta1, step)));
    c.bc2_sqrt = static_cast<M>(sqrt(1.0 - pow(h.beta2, step)));
    c.decay_mode = h.weight_decay == 0.0 ? kNoDecay : h.decoupled_weight_decay ? kDecoupled : kL2;
    c.amsgrad = h.amsgrad;
    return c;
  }

  template <typename M>
  PYCO_HD static void apply(const Consts<M>& c, M& p, M g, M (&s)[3]) {
    M d = c.sign * g;
    if (c.decay_mode == kL2) d = d + c.wd * p;
    M p_new = c.decay_mode == kDecoupled ? p * c.decay : p;
    const M m = s[0] + c.one_minus_beta1 * (d - s[0]);  // torch's lerp(m, d, 1 − β1)
    M v = c.beta2 * s[1] + c.one_minus_beta2 * d * d;
    s[0] = m;
    s[1] = v;
    if (c.amsgrad) {
      // torch.maximum: a NaN on either side propagates
      const M old = s[2];
      v = (v != v || old < v) ? v : old;
      s[2] = v;
    }
    const M denom = sqrt(v) / c.bc2_sqrt + c.eps;
    p = p_new - c.step_size * (m / denom);
  }
};

}  // namespace pyco::cuda
