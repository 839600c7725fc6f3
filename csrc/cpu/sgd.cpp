// SGD with momentum: one functor-like loop per (dtype, options), driven by the generic launcher.
#include "isa.h"
#include "dispatch.h"
#include "multi_tensor.h"

namespace pyco::cpu::PYCO_ISA {
namespace {

// Every switch is a template parameter, so that each compiled loop is branch-free and vectorizes.
template <typename S, bool kStats, bool kMomentum, bool kUnscale, bool kNesterov, bool kWeightDecay>
void sgd_chunk(const TensorRecord& t, int64_t begin, int64_t end, double* partial, const SgdHyper& h,
               const LaunchOptions& opt) {
  using M = typename Storage<S>::Math;
  using St = Storage<S>;
  S* __restrict param = reinterpret_cast<S*>(t.param);
  S* __restrict grad = reinterpret_cast<S*>(t.grad);
  S* __restrict buf = reinterpret_cast<S*>(t.state0);
  const bool fresh = record_flags(t) & kFlagFreshMomentum;
  const M inv_scale = static_cast<M>(1.0 / opt.grad_scale);
  const M sign = h.maximize ? M(-1) : M(1);
  const M lr = static_cast<M>(h.lr), wd = static_cast<M>(h.weight_decay), mu = static_cast<M>(h.momentum);
  // A fresh buffer (zeros) becomes d exactly: 0·b + 1·d.
  const M keep = fresh ? M(0) : mu;
  const M take = fresh ? M(1) : static_cast<M>(1.0 - h.dampening);

  const auto elem = [=](int64_t i) {
    const M p = St::load(param, i);
    const M g = load_grad<kUnscale>(grad, i, inv_scale);
    M d = sign * g;
    if constexpr (kWeightDecay) d = d + wd * p;
    if constexpr (kMomentum) {
      const M b = keep * St::load(buf, i) + take * d;
      St::store(buf, i, b);
      if constexpr (kNesterov) {
        d = d + mu * b;
      } else {
        d = b;
      }
    }
    const M p_new = p - lr * d;
    St::store(param, i, p_new);
    return ElemStats<M>{g, as_stored<S>(p_new) - p, p};
  };
  if constexpr (kMomentum) {
    for_each_element<kStats, M>(begin, end, partial, elem, param, grad, buf);
  } else {
    for_each_element<kStats, M>(begin, end, partial, elem, param, grad);
  }
}

}  // namespace

void sgd_step(const TensorRecord* recs, int64_t n, const SgdHyper* hypers, int64_t num_groups,
              const LaunchOptions& opt) {
  std::vector<RecordNeeds> needs(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) needs[g].state0 = hypers[g].momentum != 0.0;
  check_records(recs, n, num_groups, opt, "sgd", needs);
  launch(recs, n, opt, [&](const TensorRecord& t, int64_t b, int64_t e, double* partial) {
    const SgdHyper& h = hypers[t.group];
    dispatch_dtype(record_dtype(t), [&](auto s) {
      using S = decltype(s);
      dispatch_bool(partial != nullptr, [&](auto stats) {
        dispatch_bool(h.momentum != 0.0, [&](auto momentum) {
          dispatch_bool(opt.grad_scale != 1.0, [&](auto unscale) {
            dispatch_bool(h.nesterov, [&](auto nesterov) {
              dispatch_bool(h.weight_decay != 0.0, [&](auto wd) {
                sgd_chunk<S, stats(), momentum(), unscale(), nesterov(), wd()>(t, b, e, partial, h, opt);
              });
            });
          });
        });
      });
    });
  });
}

}  // namespace pyco::cpu::PYCO_ISA
