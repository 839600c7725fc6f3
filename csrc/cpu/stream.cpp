// The memory-bandwidth probe of the benchmarks: a += b over float32 arrays, streamed the way the update
// kernels stream their tensors (fixed chunks over the worker pool, each stream prefetched ahead), so that
// "fraction of bandwidth" compares an optimizer with the best this machine's memory gives the same loop.
#include "isa.h"
#include "multi_tensor.h"

namespace pyco::cpu::PYCO_ISA {

void stream_add(float* a, const float* b, int64_t n, int num_threads) {
  if (n < 0) throw KernelError("stream_add: negative length " + std::to_string(n));
  if (n > 0 && (!a || !b)) throw KernelError("stream_add: missing array address");
  const int64_t count = (n + kChunkElems - 1) / kChunkElems;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), 1 + n / kElemsPerThread));
  parallel_over(count, threads, [&](int64_t c) {
    float* __restrict x = a;
    const float* __restrict y = b;
    const auto elem = [=](int64_t i) {
      x[i] += y[i];
      return ElemStats<float>{};
    };
    for_each_element<false, float>(c * kChunkElems, std::min(n, (c + 1) * kChunkElems), nullptr, elem, x, y);
  });
}

}  // namespace pyco::cpu::PYCO_ISA
