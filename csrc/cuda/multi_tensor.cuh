// The CUDA multi-tensor launcher: knows no optimizer. One thread block per chunk of kChunkElems elements of
// one tensor (the chunk table is the plan's, see launch.h); each block updates its chunk with a
// rule's functor (rules.cuh) through 16-byte loads where every buffer is aligned, and writes its chunk's
// statistics to a scratch row. A second small kernel (finalize_kernel, support.cu) sums those rows per
// statistics block in chunk order and advances step counters. No float atomics anywhere, and the work of
// every thread is fixed by the plan alone: identical inputs give bitwise-identical results.
#pragma once

#include <cuda_runtime.h>

#include "element.cuh"
#include "runtime.h"

namespace pyco::cuda {

// ---- host helpers ----

void check_launch(const Launch& L, const char* rule, bool needs_params = true);  // sizes, addresses (support.cu)
void launch_finalize(const Launch& L, bool step_counters);

// ---- device helpers ----

struct PlanView {
  const TensorRecord* recs;
  const int64_t* chunk_starts;   // [num_records + 1]
  const int64_t* block_starts;   // [num_blocks + 1]
  const int64_t* chunk_records;  // [num_chunks]
};

__device__ __forceinline__ PlanView plan_of(const Launch& L) {
  const auto* recs = reinterpret_cast<const TensorRecord*>(L.plan);
  const auto* chunk_starts = reinterpret_cast<const int64_t*>(recs + L.num_records);
  const int64_t* block_starts = chunk_starts + L.num_records + 1;
  return {recs, chunk_starts, block_starts, block_starts + L.num_blocks + 1};
}

// Chunk c of the plan: its record and its elements [begin, end) of that record.
struct ChunkView {
  TensorRecord rec;
  int64_t begin, end;
};

__device__ __forceinline__ ChunkView chunk_of(const PlanView& plan, int64_t c) {
  const int64_t r = plan.chunk_records[c];
  ChunkView v{plan.recs[r], (c - plan.chunk_starts[r]) * kChunkElems, 0};
  v.end = v.begin + kChunkElems < v.rec.numel ? v.begin + kChunkElems : v.rec.numel;
  return v;
}

// GradScaler's found_inf (or the non-finite check's flag): nonzero means this launch changes nothing.
__device__ __forceinline__ bool launch_skipped(const Launch& L) {
  return L.found_inf && *reinterpret_cast<const float*>(L.found_inf) != 0.0f;
}

// Sums v over the thread block in a fixed tree (warp shuffles, then one warp); the result is in thread 0.
// Every thread of the block must call it.
__device__ __forceinline__ void block_sum(double (&v)[kNumStats]) {
  __shared__ double warp_sums[kThreads / 32][kNumStats];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  if (lane == 0) {
    for (int k = 0; k < kNumStats; ++k) warp_sums[warp][k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) {
      v[k] = lane < kThreads / 32 ? warp_sums[lane][k] : 0.0;
      for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
  }
  __syncthreads();  // warp_sums is free again
}

// N consecutive elements, loaded and stored as one access (16 bytes for the vector path).
template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// Elements per 16-byte vector access: 4 float32, 2 float64, 8 float16/bfloat16.
template <typename S>
constexpr int kVec = 16 / static_cast<int>(sizeof(S));

template <typename S, int N>
__device__ __forceinline__ bool aligned(const TensorRecord& r) {
  constexpr int64_t kBytes = sizeof(S) * N;
  return ((r.param | r.grad | r.state0 | r.state1 | r.state2) & (kBytes - 1)) == 0;
}

// ---- the update ----

// Per update kernel: thread blocks per SM that its __launch_bounds__ asks for (so at most 65536 / (kThreads ·
// kBlocks) registers per thread: 40 for 6, 64 for 4, 80 for 3) and how many iterations of update_span's pack
// loop the compiler may unroll (more loads in flight, more registers). Chosen as the most blocks for which
// `nvcc -Xptxas -v` (CUDA 13.0, sm_90) reports no spills, in the kernel or the division subroutines it calls;
// CMake builds with --warn-on-spills to show a regression.
template <typename Rule, typename S> struct Occupancy {
  static constexpr int kBlocks = 3;
  static constexpr int kUnroll = 1;
};
template <typename S> struct Occupancy<AdamRule, S> {
  static constexpr int kBlocks = sizeof(S) == 4 ? 4 : 3;  // float32: 56 registers; the others 72-80
  static constexpr int kUnroll = 2;
};
template <> struct Occupancy<SgdRule, float> {
  static constexpr int kBlocks = 6;
  static constexpr int kUnroll = 1;
};
template <> struct Occupancy<SgdRule, double> {
  static constexpr int kBlocks = 4;
  static constexpr int kUnroll = 1;
};
template <> struct Occupancy<SgdRule, __nv_bfloat16> {
  static constexpr int kBlocks = 4;
  static constexpr int kUnroll = 1;
};

// Elements [begin, end) of one tensor, N at a time ((end − begin) % N == 0), thread t taking packs t,
// t + kThreads, ...: the element-to-thread assignment, and so every sum, is fixed.
template <typename Rule, typename S, int N, typename M>
__device__ __forceinline__ void update_span(const TensorRecord& r, const typename Rule::template Consts<M>& c,
                                            const Unscale<M>& unscale, int64_t begin, int64_t end, bool with_stats,
                                            Sums<M>& sums) {
  using P = Pack<S, N>;
  S* __restrict__ param = reinterpret_cast<S*>(r.param);
  S* __restrict__ grad = reinterpret_cast<S*>(r.grad);
  S* __restrict__ state[3] = {reinterpret_cast<S*>(r.state0), reinterpret_cast<S*>(r.state1),
                              reinterpret_cast<S*>(r.state2)};
  const bool has[3] = {r.state0 != 0, r.state1 != 0, r.state2 != 0};
#pragma unroll(Occupancy<Rule, S>::kUnroll)
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * N; i < end; i += static_cast<int64_t>(kThreads) * N) {
    P p = *reinterpret_cast<const P*>(param + i);
    P g = *reinterpret_cast<const P*>(grad + i);
    P s[3] = {};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (has[k]) s[k] = *reinterpret_cast<const P*>(state[k] + i);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      S sj[3] = {s[0].v[j], s[1].v[j], s[2].v[j]};
      update_element<Rule, S>(c, unscale, p.v[j], g.v[j], sj, has, with_stats, sums);
#pragma unroll
      for (int k = 0; k < 3; ++k) s[k].v[j] = sj[k];
    }
    *reinterpret_cast<P*>(param + i) = p;
    if (unscale.active) *reinterpret_cast<P*>(grad + i) = g;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (has[k]) *reinterpret_cast<P*>(state[k] + i) = s[k];
    }
  }
}

template <typename Rule, typename S>
__device__ __forceinline__ void update_chunk(const TensorRecord& r, const typename Rule::Params& params,
                                             double grad_scale, int64_t begin, int64_t end, double* partial) {
  using M = typename Stored<S>::Math;
  constexpr int N = kVec<S>;
  const auto c = Rule::template prepare<M>(params, r);
  const Unscale<M> unscale = make_unscale<M>(grad_scale);
  const bool with_stats = partial != nullptr;
  Sums<M> sums;
  int64_t scalar_from = begin;
  if (aligned<S, N>(r)) {  // chunk starts are multiples of kChunkElems: only the tensor's tail is left over
    scalar_from = begin + (end - begin) / N * N;
    update_span<Rule, S, N>(r, c, unscale, begin, scalar_from, with_stats, sums);
  }
  update_span<Rule, S, 1>(r, c, unscale, scalar_from, end, with_stats, sums);
  if (with_stats) {
    double v[kNumStats];
    for (int k = 0; k < kNumStats; ++k) v[k] = static_cast<double>(sums.v[k]);
    block_sum(v);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kNumStats; ++k) partial[k] = v[k];
    }
  }
}

// One thread block per chunk of the plan; blocks of chunks of another storage type return at once (one
// launch per storage type present, usually one: each kernel needs only its own type's registers).
template <typename Rule, typename S, int32_t kDtype>
__global__ void __launch_bounds__(kThreads, Occupancy<Rule, S>::kBlocks) update_kernel(const Launch L) {
  if (launch_skipped(L)) return;
  const int64_t chunk = blockIdx.x;
  const ChunkView ch = chunk_of(plan_of(L), chunk);
  if ((ch.rec.codes & 0xff) != kDtype) return;
  const auto& params = reinterpret_cast<const typename Rule::Params*>(L.params)[ch.rec.group];
  const double grad_scale =
      L.grad_scale ? static_cast<double>(*reinterpret_cast<const float*>(L.grad_scale)) : L.grad_scale_value;
  double* partial = L.partials ? reinterpret_cast<double*>(L.partials) + chunk * kNumStats : nullptr;
  update_chunk<Rule, S>(ch.rec, params, grad_scale, ch.begin, ch.end, partial);
}

template <typename Rule, typename S, int32_t kDtype>
void launch_update(const Launch& L) {
  if (!(L.dtypes & (int64_t{1} << kDtype))) return;
  update_kernel<Rule, S, kDtype>
      <<<static_cast<unsigned>(L.num_chunks), kThreads, 0, reinterpret_cast<cudaStream_t>(L.stream)>>>(L);
  check_cuda(cudaGetLastError(), "launching the update kernel");
}

// The whole step of one rule on one device: the update, then the finalize kernel. Asynchronous.
template <typename Rule>
void run(const Launch& L, const char* rule) {
  check_launch(L, rule);
  DeviceGuard guard(L.device);
  cudaGetLastError();  // an error left by an earlier call is not this launch's
  if (L.num_chunks > 0) {
    launch_update<Rule, float, kF32>(L);
    launch_update<Rule, double, kF64>(L);
    launch_update<Rule, __half, kF16>(L);
    launch_update<Rule, __nv_bfloat16, kBF16>(L);
  }
  launch_finalize(L, Rule::kStepCounters);
}

}  // namespace pyco::cuda
