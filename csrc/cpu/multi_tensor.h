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

// Per-block statistics, summed in the update loop itself. Lane l of a statistic sums, in order, the products
// at offsets l, l + kLanes, l + 2·kLanes, ... of a block of kStatsBlock elements, in the arithmetic type M;
// at the end of the block the lanes are added in float64 in lane order, and the block into the chunk's
// total. Fixed lanes let the sums vectorize (the lanes live in registers) without reassociating additions,
// so every instruction set gives the same bits.
constexpr int kStatsBlock = 2048;

template <typename M>
constexpr int kLanes = 64 / sizeof(M);  // 16 floats (two AVX registers) or 8 doubles

// What a rule's element function returns for the statistics: the gradient g, the update as stored u and
// the parameter before the step p, in the arithmetic type M.
template <typename M>
struct ElemStats {
  M g, u, p;
};

template <typename M>
struct LaneSums {
  M gg[kLanes<M>] = {}, uu[kLanes<M>] = {}, gu[kLanes<M>] = {}, pp[kLanes<M>] = {};

  void add(int l, const ElemStats<M>& r) {
    gg[l] += r.g * r.g;
    uu[l] += r.u * r.u;
    gu[l] += r.g * r.u;
    pp[l] += r.p * r.p;
  }

  void add_to(double* total) const {
    const M* lanes[kNumStats] = {gg, uu, gu, pp};  // the order of kGradSq, kUpdateSq, kGradDotUpdate, kParamSq
    for (int k = 0; k < kNumStats; ++k) {
      double block = 0.0;
      for (int l = 0; l < kLanes<M>; ++l) block += lanes[k][l];
      total[k] += block;
    }
  }
};

// Software prefetch distance. The hardware prefetchers stop at every 4 KiB page, and an update loop has
// four to seven streams; asking for each stream's line kPrefetchBytes ahead keeps enough loads in flight
// for one core to approach the memory bandwidth (measured on a 2-core Xeon: −10% time for the SGD loop,
// −20% with statistics). The address is computed as an integer and a prefetch never faults, so reaching
// past a tensor's end is harmless.
constexpr int64_t kPrefetchBytes = 2048;

#if defined(__GNUC__) || defined(__clang__)
#define PYCO_PREFETCH(address) __builtin_prefetch(reinterpret_cast<const void*>(address))
#else
#define PYCO_PREFETCH(address) ((void)(address))
#endif

// Runs `elem(i)` for every i in [begin, end); `elem` updates element i and returns {g, u, p} of type M.
// `streams` are the tensors elem reads (and writes): each one's line kPrefetchBytes ahead is prefetched
// once per group of kLanes elements. With kStats the chunk's statistics are written to
// partial[0..kNumStats), summed in the same pass: the inner loop over one group of lanes vectorizes with
// the lane sums held in registers. `elem` is taken by value: a local closure cannot alias the tensors, so
// its constants stay in registers. (The prefetches are written out here, not in a helper function: GCC
// deems a function that only prefetches free of effects and drops calls to it.)
template <bool kStats, typename M, typename Elem, typename... T>
inline void for_each_element(int64_t begin, int64_t end, double* partial, Elem elem, const T*... streams) {
  constexpr int L = kLanes<M>;
  // The buffers of one record never alias (distinct tensors), which the compiler cannot prove: ivdep.
  if constexpr (!kStats) {
    int64_t i = begin;
    for (; i + L <= end; i += L) {
      (PYCO_PREFETCH(reinterpret_cast<uintptr_t>(streams + i) + kPrefetchBytes), ...);
      PYCO_IVDEP
      for (int l = 0; l < L; ++l) elem(i + l);
    }
    for (; i < end; ++i) elem(i);
  } else {
    double total[kNumStats] = {};
    for (int64_t s = begin; s < end; s += kStatsBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kStatsBlock, end - s));
      LaneSums<M> sums;
      int j = 0;
      for (; j + L <= n; j += L) {
        (PYCO_PREFETCH(reinterpret_cast<uintptr_t>(streams + s + j) + kPrefetchBytes), ...);
        PYCO_IVDEP
        for (int l = 0; l < L; ++l) sums.add(l, elem(s + j + l));
      }
      for (int l = 0; j < n; ++j, ++l) sums.add(l, elem(s + j));
      sums.add_to(total);
    }
    for (int k = 0; k < kNumStats; ++k) partial[k] = total[k];
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
  // Small tensors make small chunks: a thread takes consecutive chunks of about kChunkElems elements in
  // all, so that a table of thousands of tiny tensors costs no more hand-offs than one large tensor. The
  // chunks (and so the statistics' partial sums) stay the same.
  std::vector<int64_t> task_begin;
  int64_t filled = kChunkElems;
  for (int64_t c = 0; c < count; ++c) {
    if (filled >= kChunkElems) {
      task_begin.push_back(c);
      filled = 0;
    }
    filled += chunks[c].end - chunks[c].begin;
  }
  task_begin.push_back(count);
  parallel_over(static_cast<int64_t>(task_begin.size()) - 1, threads, [&](int64_t task) {
    for (int64_t c = task_begin[task]; c < task_begin[task + 1]; ++c) {
      const Chunk& ch = chunks[c];
      chunk_fn(recs[ch.record], ch.begin, ch.end, opt.stats ? &partials[c * kNumStats] : nullptr);
    }
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
