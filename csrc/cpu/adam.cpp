// Adam / AdamW (torch.optim semantics): step counters and bias corrections per tensor, then one pass.
#include <cmath>

#include "isa.h"
#include "dispatch.h"
#include "multi_tensor.h"

namespace pyco::cpu::PYCO_ISA {
namespace {

// Per-tensor scalars that depend on that tensor's own step count (tensors of one group may differ).
struct BiasCorrection {
  double step_size;     // lr / (1 − β1^t)
  double bc2_sqrt;      // √(1 − β2^t)
};

enum Decay { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

// Every switch is a template parameter, so that each compiled loop is branch-free and vectorizes.
template <typename S, bool kStats, bool kAmsgrad, bool kUnscale, int kDecay>
void adam_chunk(const TensorRecord& t, int64_t begin, int64_t end, double* partial, const AdamHyper& h,
                const BiasCorrection& bc, const LaunchOptions& opt) {
  using M = typename Storage<S>::Math;
  using St = Storage<S>;
  S* __restrict param = reinterpret_cast<S*>(t.param);
  S* __restrict grad = reinterpret_cast<S*>(t.grad);
  S* __restrict exp_avg = reinterpret_cast<S*>(t.state0);
  S* __restrict exp_avg_sq = reinterpret_cast<S*>(t.state1);
  S* __restrict max_exp_avg_sq = reinterpret_cast<S*>(t.state2);
  const M inv_scale = static_cast<M>(1.0 / opt.grad_scale);
  const M sign = h.maximize ? M(-1) : M(1);
  const M wd = static_cast<M>(h.weight_decay);
  const M decay = static_cast<M>(1.0 - h.lr * h.weight_decay);
  const M one_minus_beta1 = static_cast<M>(1.0 - h.beta1);
  const M beta2 = static_cast<M>(h.beta2), one_minus_beta2 = static_cast<M>(1.0 - h.beta2);
  const M eps = static_cast<M>(h.eps);
  const M step_size = static_cast<M>(bc.step_size), bc2_sqrt = static_cast<M>(bc.bc2_sqrt);

  const auto elem = [=](int64_t i) {
    const M p = St::load(param, i);
    const M g = load_grad<kUnscale>(grad, i, inv_scale);
    M d = sign * g;
    if constexpr (kDecay == kL2) d = d + wd * p;
    M p_new = p;
    if constexpr (kDecay == kDecoupled) p_new = p * decay;
    M m = St::load(exp_avg, i);
    m = m + one_minus_beta1 * (d - m);  // torch's lerp(m, d, 1 − β1)
    M v = beta2 * St::load(exp_avg_sq, i) + one_minus_beta2 * d * d;
    St::store(exp_avg, i, m);
    St::store(exp_avg_sq, i, v);
    if constexpr (kAmsgrad) {
      // torch.maximum: a NaN on either side propagates (std::max would drop a NaN v)
      const M old = St::load(max_exp_avg_sq, i);
      const M vmax = (v != v || old < v) ? v : old;
      St::store(max_exp_avg_sq, i, vmax);
      v = vmax;
    }
    const M denom = std::sqrt(v) / bc2_sqrt + eps;
    p_new = p_new - step_size * (m / denom);
    St::store(param, i, p_new);
    return ElemStats<M>{g, as_stored<S>(p_new) - p, p};
  };
  if constexpr (kAmsgrad) {
    for_each_element<kStats, M>(begin, end, partial, elem, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq);
  } else {
    for_each_element<kStats, M>(begin, end, partial, elem, param, grad, exp_avg, exp_avg_sq);
  }
}

double increment_step(const TensorRecord& t) {
  if (record_step_dtype(t) == kF64) return *reinterpret_cast<double*>(t.step) += 1.0;
  return *reinterpret_cast<float*>(t.step) += 1.0f;
}

}  // namespace

void adam_step(const TensorRecord* recs, int64_t n, const AdamHyper* hypers, int64_t num_groups,
               const LaunchOptions& opt) {
  std::vector<RecordNeeds> needs(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) needs[g] = {true, true, hypers[g].amsgrad, true};
  check_records(recs, n, num_groups, opt, "adam", needs);
  // Serial pre-pass: each tensor's counter moves exactly once, whatever the chunking.
  std::vector<BiasCorrection> bc(n);
  for (int64_t r = 0; r < n; ++r) {
    const AdamHyper& h = hypers[recs[r].group];
    const double step = increment_step(recs[r]);
    bc[r] = {h.lr / (1.0 - std::pow(h.beta1, step)), std::sqrt(1.0 - std::pow(h.beta2, step))};
  }
  launch(recs, n, opt, [&](const TensorRecord& t, int64_t b, int64_t e, double* partial) {
    const AdamHyper& h = hypers[t.group];
    const BiasCorrection& c = bc[&t - recs];
    dispatch_dtype(record_dtype(t), [&](auto s) {
      using S = decltype(s);
      dispatch_bool(partial != nullptr, [&](auto stats) {
        dispatch_bool(h.amsgrad, [&](auto amsgrad) {
          dispatch_bool(opt.grad_scale != 1.0, [&](auto unscale) {
            if (h.weight_decay == 0.0) {
              adam_chunk<S, stats(), amsgrad(), unscale(), kNoDecay>(t, b, e, partial, h, c, opt);
            } else if (h.decoupled_weight_decay) {
              adam_chunk<S, stats(), amsgrad(), unscale(), kDecoupled>(t, b, e, partial, h, c, opt);
            } else {
              adam_chunk<S, stats(), amsgrad(), unscale(), kL2>(t, b, e, partial, h, c, opt);
            }
          });
        });
      });
    });
  });
}

}  // namespace pyco::cpu::PYCO_ISA
