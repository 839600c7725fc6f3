// The CPU multi-tensor launcher: splits a table of tensors into fixed-size chunks, runs a rule's
// per-chunk loop on a few threads, and reduces the per-block statistics in chunk order. Knows no
// optimizer. Because the chunking never depends on the thread count and partial sums are combined in a
// fixed order, results (statistics included) are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

#include "../common.h"
#include "thread_pool.h"

#if defined(__GNUC__) && !defined(__clang__)
#define PYCO_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define PYCO_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define PYCO_IVDEP
#endif

namespace pyco::cpu {

constexpr int64_t kChunkElems = int64_t{1} << 15;     // work unit and reduction unit
constexpr int64_t kElemsPerThread = int64_t{1} << 16;  // below this a thread costs more than it saves

struct Chunk {
  int64_t record;
  int64_t begin;
  int64_t end;
};

constexpr int kStatsBlock = 2048;  // elements buffered (in L1) between the update loop and the sums loop

// Lanes per statistic: lane l sums, in order, the products at offsets l, l + kLanes, l + 2·kLanes, ...
// of a block, in the arithmetic type M; the lanes are then added in float64 in lane order. Fixed lanes let
// the sums vectorize without reassociating additions, so every instruction set gives the same bits.
template <typename M>
constexpr int kLanes = 64 / sizeof(M);  // 16 floats (two AVX registers) or 8 doubles

// Σ a·b over n elements of an L1-resident block, in lanes.
template <typename M>
inline double lane_dot(const M* __restrict a, const M* __restrict b, int n) {
  constexpr int L = kLanes<M>;
  M acc[L] = {};
  int j = 0;
  for (; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += a[j] * b[j];
  double total = 0.0;
  for (int l = 0; l < L; ++l) total += acc[l];
  return total;
}

// The four statistics of one chunk, summed block by block into float64 totals in a fixed order:
// nothing depends on the thread that runs the chunk.
template <typename M>
struct ChunkStats {
  double total[kNumStats] = {};

  void add_block(const M* g, const M* u, const M* p, int n) {
    total[kGradSq] += lane_dot(g, g, n);
    total[kUpdateSq] += lane_dot(u, u, n);
    total[kGradDotUpdate] += lane_dot(g, u, n);
    total[kParamSq] += lane_dot(p, p, n);
  }
};

#if defined(__AVX2__)
// float with AVX2: the same four lane sums in one pass over the block (two registers of 8 lanes per
// statistic), the same operations in the same order as lane_dot: identical results, a third of the loads.
template <>
inline void ChunkStats<float>::add_block(const float* g, const float* u, const float* p, int n) {
  static_assert(kLanes<float> == 16, "two AVX registers per statistic");
  __m256 gg0 = _mm256_setzero_ps(), gg1 = gg0, uu0 = gg0, uu1 = gg0, gu0 = gg0, gu1 = gg0, pp0 = gg0, pp1 = gg0;
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 g0 = _mm256_loadu_ps(g + j), g1 = _mm256_loadu_ps(g + j + 8);
    const __m256 u0 = _mm256_loadu_ps(u + j), u1 = _mm256_loadu_ps(u + j + 8);
    const __m256 p0 = _mm256_loadu_ps(p + j), p1 = _mm256_loadu_ps(p + j + 8);
    gg0 = _mm256_add_ps(gg0, _mm256_mul_ps(g0, g0));
    gg1 = _mm256_add_ps(gg1, _mm256_mul_ps(g1, g1));
    uu0 = _mm256_add_ps(uu0, _mm256_mul_ps(u0, u0));
    uu1 = _mm256_add_ps(uu1, _mm256_mul_ps(u1, u1));
    gu0 = _mm256_add_ps(gu0, _mm256_mul_ps(g0, u0));
    gu1 = _mm256_add_ps(gu1, _mm256_mul_ps(g1, u1));
    pp0 = _mm256_add_ps(pp0, _mm256_mul_ps(p0, p0));
    pp1 = _mm256_add_ps(pp1, _mm256_mul_ps(p1, p1));
  }
  alignas(32) float acc[kNumStats][16];
  const __m256 lanes[kNumStats][2] = {{gg0, gg1}, {uu0, uu1}, {gu0, gu1}, {pp0, pp1}};
  for (int s = 0; s < kNumStats; ++s) {
    _mm256_store_ps(acc[s], lanes[s][0]);
    _mm256_store_ps(acc[s] + 8, lanes[s][1]);
  }
  for (int l = 0; j < n; ++j, ++l) {
    acc[kGradSq][l] += g[j] * g[j];
    acc[kUpdateSq][l] += u[j] * u[j];
    acc[kGradDotUpdate][l] += g[j] * u[j];
    acc[kParamSq][l] += p[j] * p[j];
  }
  for (int s = 0; s < kNumStats; ++s) {
    double block = 0.0;
    for (int l = 0; l < 16; ++l) block += acc[s][l];
    total[s] += block;
  }
}
#endif

// Runs `elem(i)` for every i in [begin, end); `elem` updates element i and returns {g, u, p} of type M.
// With kStats the chunk's statistics are written to partial[0..kNumStats). The update loop and the sums
// loop are kept apart (through small L1 buffers) so that each one vectorizes. `elem` is taken by value:
// a local closure cannot alias the tensors, so its constants stay in registers.
template <bool kStats, typename M, typename Elem>
inline void for_each_element(int64_t begin, int64_t end, double* partial, Elem elem) {
  // The buffers of one record never alias (distinct tensors), which the compiler cannot prove: ivdep.
  if constexpr (!kStats) {
    PYCO_IVDEP
    for (int64_t i = begin; i < end; ++i) elem(i);
  } else {
    ChunkStats<M> stats;
    alignas(64) M gb[kStatsBlock], ub[kStatsBlock], pb[kStatsBlock];  // 24 KiB (float), 48 KiB (double)
    for (int64_t s = begin; s < end; s += kStatsBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kStatsBlock, end - s));
      PYCO_IVDEP
      for (int j = 0; j < n; ++j) {
        const auto r = elem(s + j);
        gb[j] = r.g;
        ub[j] = r.u;
        pb[j] = r.p;
      }
      stats.add_block(gb, ub, pb, n);
    }
    for (int s = 0; s < kNumStats; ++s) partial[s] = stats.total[s];
  }
}

inline std::vector<Chunk> make_chunks(const TensorRecord* recs, int64_t n) {
  std::vector<Chunk> chunks;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < recs[r].numel; b += kChunkElems) {
      chunks.push_back({r, b, std::min(recs[r].numel, b + kChunkElems)});
    }
  }
  return chunks;
}

// Calls work(c) for every index c in [0, count) on up to num_threads threads (the caller's included),
// through the persistent pool of thread_pool.cpp.
template <typename Work>
void parallel_over(int64_t count, int num_threads, Work&& work) {
  using W = std::remove_reference_t<Work>;
  run_parallel(count, num_threads, [](void* ctx, int64_t c) { (*static_cast<W*>(ctx))(c); },
               const_cast<void*>(static_cast<const void*>(&work)));
}

// Checks a table before a launch: every address present, sizes non-negative, codes and indices in range.
// `needs` lists which state slots the rule reads (param and grad are always needed).
struct RecordNeeds {
  bool state0 = false, state1 = false, state2 = false, step = false;
};

inline void check_records(const TensorRecord* recs, int64_t n, int64_t num_groups, const LaunchOptions& opt,
                          const char* rule, const std::vector<RecordNeeds>& needs_per_group) {
  auto fail = [&](int64_t r, const std::string& what) {
    throw KernelError(std::string(rule) + ": tensor " + std::to_string(r) + ": " + what);
  };
  for (int64_t r = 0; r < n; ++r) {
    const TensorRecord& t = recs[r];
    if (t.numel < 0) fail(r, "negative numel " + std::to_string(t.numel));
    if (t.group < 0 || t.group >= num_groups) fail(r, "group index " + std::to_string(t.group) + " out of range");
    if (opt.stats && (t.block < 0 || t.block >= opt.num_blocks))
      fail(r, "block index " + std::to_string(t.block) + " out of range [0, " + std::to_string(opt.num_blocks) + ")");
    const int32_t d = record_dtype(t);
    if (d < kF32 || d > kBF16) fail(r, "unsupported dtype code " + std::to_string(d));
    const RecordNeeds& need = needs_per_group[t.group];
    if (need.step && record_step_dtype(t) != kF32 && record_step_dtype(t) != kF64)
      fail(r, "step counter must be float32 or float64");
    if (t.numel == 0) continue;
    if (!t.param || !t.grad) fail(r, "missing parameter or gradient address");
    if ((need.state0 && !t.state0) || (need.state1 && !t.state1) || (need.state2 && !t.state2))
      fail(r, "missing optimizer state address");
    if (need.step && !t.step) fail(r, "missing step counter address");
  }
  if (opt.stats && opt.num_blocks < 0) throw KernelError(std::string(rule) + ": negative num_blocks");
}

// The launcher: chunk_fn(record, begin, end, partial_or_null) updates one chunk. Statistics, when asked
// for, are reduced per block in chunk order.
template <typename ChunkFn>
void launch(const TensorRecord* recs, int64_t n, const LaunchOptions& opt, ChunkFn&& chunk_fn) {
  const std::vector<Chunk> chunks = make_chunks(recs, n);
  const int64_t count = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(opt.stats ? count * kNumStats : 0);
  int64_t total = 0;
  for (int64_t r = 0; r < n; ++r) total += recs[r].numel;
  const int threads = static_cast<int>(std::min<int64_t>(opt.num_threads, 1 + total / kElemsPerThread));
  parallel_over(count, threads, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    chunk_fn(recs[ch.record], ch.begin, ch.end, opt.stats ? &partials[c * kNumStats] : nullptr);
  });
  if (opt.stats) {
    std::fill(opt.stats, opt.stats + opt.num_blocks * kNumStats, 0.0);
    for (int64_t c = 0; c < count; ++c) {
      double* dst = opt.stats + recs[chunks[c].record].block * kNumStats;
      for (int s = 0; s < kNumStats; ++s) dst[s] += partials[c * kNumStats + s];
    }
  }
}

}  // namespace pyco::cpu
