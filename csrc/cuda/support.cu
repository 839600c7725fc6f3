// The rule-independent kernels of a step: finalize (statistics per block in chunk order, step counters, SGD's
// device init flags) and the non-finite gradient check of nonfinite="skip".
#include <algorithm>
#include <climits>

#include "multi_tensor.cuh"

namespace pyco::cuda {

namespace {

constexpr int64_t kMaxGrid = 65535;  // grid-stride loops cover the rest

// Thread blocks b, b + gridDim.x, ...: statistics block b = Σ of its chunks' rows, summed by each thread in
// chunk order and then in block_sum's fixed tree. Threads r, r + stride, ...: record r's step field
// (finish_record: Adam's counter, SGD's init flag), `records` says whether any needs it.
__global__ void __launch_bounds__(kThreads) finalize_kernel(const Launch L, bool records, bool step_counters) {
  const bool skipped = launch_skipped(L);
  const PlanView plan = plan_of(L);
  if (records && !skipped) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < L.num_records; r += stride)
      finish_record(plan.recs[r], step_counters);
  }
  if (!L.stats) return;
  const auto* partials = reinterpret_cast<const double*>(L.partials);
  auto* stats = reinterpret_cast<double*>(L.stats);
  for (int64_t b = blockIdx.x; b < L.num_blocks; b += gridDim.x) {
    double v[kNumStats] = {};
    if (!skipped && partials) {
      for (int64_t c = plan.block_starts[b] + threadIdx.x; c < plan.block_starts[b + 1]; c += kThreads) {
        for (int k = 0; k < kNumStats; ++k) v[k] += partials[c * kNumStats + k];
      }
    }
    block_sum(v);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kNumStats; ++k) stats[b * kNumStats + k] = v[k];
    }
  }
}

template <typename S>
__device__ __forceinline__ bool has_nonfinite(const S* grad, int64_t begin, int64_t end, bool vector) {
  using St = Stored<S>;
  constexpr int N = kVec<S>;
  bool bad = false;
  int64_t scalar_from = begin;
  if (vector) {
    scalar_from = begin + (end - begin) / N * N;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * N; i < scalar_from; i += int64_t{kThreads} * N) {
      const Pack<S, N> g = *reinterpret_cast<const Pack<S, N>*>(grad + i);
      for (int j = 0; j < N; ++j) bad |= !isfinite(St::load(g.v[j]));
    }
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) bad |= !isfinite(St::load(grad[i]));
  return bad;
}

// One thread block per chunk; any block that finds an inf or NaN stores 1 (only ever that value: no race
// on the result). A block that sees the flag already set skips the scan, but every thread still reaches the
// barrier (threads of one block may read the flag before and after another block sets it).
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(const Launch L, float* flag) {
  bool bad = false;
  if (*flag == 0.0f) {
    const ChunkView ch = chunk_of(plan_of(L), blockIdx.x);
    const TensorRecord& r = ch.rec;
    const int64_t begin = ch.begin, end = ch.end;
    const bool vector = (r.grad & 15) == 0;
    switch (static_cast<int32_t>(r.codes & 0xff)) {
      case kF32: bad = has_nonfinite(reinterpret_cast<const float*>(r.grad), begin, end, vector); break;
      case kF64: bad = has_nonfinite(reinterpret_cast<const double*>(r.grad), begin, end, vector); break;
      case kF16: bad = has_nonfinite(reinterpret_cast<const __half*>(r.grad), begin, end, vector); break;
      case kBF16: bad = has_nonfinite(reinterpret_cast<const __nv_bfloat16*>(r.grad), begin, end, vector); break;
      default: break;
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1.0f;
}

}  // namespace

void check_launch(const Launch& L, const char* rule, bool needs_params) {
  auto fail = [&](const std::string& what) { throw KernelError(std::string(rule) + " (CUDA): " + what); };
  if (L.num_records < 0 || L.num_chunks < 0 || L.num_blocks < 0 || L.num_groups < 0) fail("negative size");
  if (L.num_chunks > INT_MAX) fail("more than 2^31 - 1 chunks of " + std::to_string(kChunkElems) + " elements");
  if (L.num_records > 0 && !L.plan) fail("missing plan address");
  if (L.num_chunks > 0 && L.num_records == 0) fail("chunks without records");
  if (needs_params && L.num_chunks > 0 && (!L.params || L.num_groups == 0)) fail("missing params");
  if (L.stats && L.num_chunks > 0 && !L.partials) fail("statistics need a partials buffer");
  if (!L.grad_scale && !(L.grad_scale_value > 0.0))
    fail("grad_scale must be > 0, got " + std::to_string(L.grad_scale_value));
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes{};
  return cudaFuncGetAttributes(&attributes, finalize_kernel);
}

void launch_finalize(const Launch& L, bool step_counters) {
  const bool records = step_counters || (L.dtypes & kPlanInitFlags);
  const int64_t for_steps = records ? (L.num_records + kThreads - 1) / kThreads : 0;
  const int64_t for_stats = L.stats ? L.num_blocks : 0;
  const int64_t grid = std::min(std::max(for_steps, for_stats), kMaxGrid);
  if (grid == 0) return;
  finalize_kernel<<<static_cast<unsigned>(grid), kThreads, 0, reinterpret_cast<cudaStream_t>(L.stream)>>>(
      L, records, step_counters);
  check_cuda(cudaGetLastError(), "launching the finalize kernel");
}

void flag_nonfinite(const Launch& L, int64_t flag) {
  check_launch(L, "nonfinite check", false);
  if (!flag) throw KernelError("nonfinite check (CUDA): missing flag address");
  if (L.num_chunks == 0) return;
  DeviceGuard guard(L.device);
  cudaGetLastError();  // an error left by an earlier call is not this launch's
  nonfinite_kernel<<<static_cast<unsigned>(L.num_chunks), kThreads, 0, reinterpret_cast<cudaStream_t>(L.stream)>>>(
      L, reinterpret_cast<float*>(flag));
  check_cuda(cudaGetLastError(), "launching the non-finite check");
}

}  // namespace pyco::cuda
