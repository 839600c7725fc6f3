// The CPU multi-tensor launcher: splits a table of tensors into fixed-size chunks, runs a rule's
// per-chunk loop on a few threads, and reduces the per-block statistics in chunk order. Knows no
// optimizer. Because the chunking never depends on the thread count and partial sums are combined in a
// fixed order, results (statistics included) are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <type_traits>
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

// Σ a·b over n elements of an L1-resident block: fixed lanes (lane = offset mod kLanes) in the arithmetic
// type M, so the loop vectorizes without reassociating additions (4 independent AVX chains); the lanes
// are then added in float64.
template <typename M>
inline double lane_dot(const M* __restrict a, const M* __restrict b, int n) {
  constexpr int kLanes = 128 / sizeof(M);  // 32 floats or 16 doubles
  M acc[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += a[j] * b[j];
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
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
