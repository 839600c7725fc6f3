// Finite-gradient check over a tensor table: the pre-pass of the "skip" non-finite policy.
#include <atomic>

#include "isa.h"
#include "multi_tensor.h"

namespace pyco::cpu::PYCO_ISA {

bool grads_all_finite(const TensorRecord* recs, int64_t n, int num_threads) {
  LaunchOptions opt;
  opt.num_threads = num_threads;
  std::atomic<bool> finite{true};
  launch(recs, n, opt, [&](const TensorRecord& t, int64_t b, int64_t e, double*) {
    dispatch_dtype(record_dtype(t), [&](auto s) {
      using S = decltype(s);
      using M = typename Storage<S>::Math;
      const S* grad = reinterpret_cast<const S*>(t.grad);
      M probe = 0;  // x·0 is 0 for finite x and NaN for inf/NaN; the sum is NaN iff any is
      for (int64_t i = b; i < e; ++i) probe += Storage<S>::load(grad, i) * M(0);
      if (probe != 0) finite.store(false, std::memory_order_relaxed);
    });
  });
  return finite.load();
}

}  // namespace pyco::cpu::PYCO_ISA
