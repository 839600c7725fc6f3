// One element of a multi-tensor update, as the CUDA launcher runs it: load (storage -> arithmetic type),
// unscale the gradient (GradScaler), apply the rule, round to storage once, and the element's share of the
// statistics. __host__ __device__, so the host test runs exactly this code against the CPU kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rules.cuh"

namespace pyco::cuda {

// Storage type S <-> arithmetic type: float64 for double, float32 for everything else (round to nearest even).
template <typename S> struct Stored;
template <> struct Stored<float> {
  using Math = float;
  PYCO_HD static float load(float x) { return x; }
  PYCO_HD static float store(float x) { return x; }
};
template <> struct Stored<double> {
  using Math = double;
  PYCO_HD static double load(double x) { return x; }
  PYCO_HD static double store(double x) { return x; }
};
template <> struct Stored<__half> {
  using Math = float;
  PYCO_HD static float load(__half x) { return __half2float(x); }
  PYCO_HD static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Stored<__nv_bfloat16> {
  using Math = float;
  PYCO_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  PYCO_HD static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// GradScaler: gradients are multiplied by 1/scale (exact for its powers of two) and written back unscaled.
template <typename M>
struct Unscale {
  bool active;
  M inverse;
};

template <typename M>
PYCO_HD Unscale<M> make_unscale(double scale) {
  return {scale != 1.0, static_cast<M>(1.0 / scale)};
}

// Running sums of one thread: Σg², Σu², Σg·u, Σθ² in the arithmetic type (a few hundred elements each).
template <typename M>
struct Sums {
  M v[kNumStats] = {};
  PYCO_HD void add(M g, M u, M p) {
    v[kGradSq] += g * g;
    v[kUpdateSq] += u * u;
    v[kGradDotUpdate] += g * u;
    v[kParamSq] += p * p;
  }
};

// Updates one element in registers. `has[k]`: state slot k exists (its buffer address is not 0).
template <typename Rule, typename S, typename M = typename Stored<S>::Math>
PYCO_HD void update_element(const typename Rule::template Consts<M>& c, const Unscale<M>& unscale, S& param,
                            S& grad, S (&state)[3], const bool (&has)[3], bool with_stats, Sums<M>& sums) {
  using St = Stored<S>;
  const M p = St::load(param);
  M g = St::load(grad);
  if (unscale.active) {
    g = g * unscale.inverse;
    grad = St::store(g);
  }
  M s[3];
  for (int k = 0; k < 3; ++k) s[k] = has[k] ? St::load(state[k]) : M(0);
  M p_new = p;
  Rule::apply(c, p_new, g, s);
  param = St::store(p_new);
  for (int k = 0; k < 3; ++k) {
    if (has[k]) state[k] = St::store(s[k]);
  }
  if (with_stats) sums.add(g, St::load(param) - p, p);  // u as stored
}

}  // namespace pyco::cuda
