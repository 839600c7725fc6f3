// Segmented block dot products: the probe's last step from k Hessian-vector products to the k×k matrix
// C (pyco/probe/cross_terms.py). Work units are (row, fixed chunk of one block); each unit's sum is taken
// over fixed lanes in float64 and the units of a block are added in chunk order, so the result does not
// depend on the thread count or on the instruction set.
#include <vector>

#include "isa.h"
#include "multi_tensor.h"

namespace pyco::cpu::PYCO_ISA {

namespace {

// Σ a[n]·b[n] with every product and sum in float64 (a float32 product is exact in float64), in
// kLanes independent chains (lane = n mod kLanes) that vectorize without reassociating an addition.
template <typename S>
double dot_f64(const S* __restrict a, const S* __restrict b, int64_t n) {
  constexpr int kLanes = 16;
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(a[j + l]) * static_cast<double>(b[j + l]);
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

struct Piece {
  int64_t block;
  int64_t begin;
  int64_t end;
};

void check_block_dot(const void* rows, const void* delta, int32_t dtype, int64_t num_rows, const int64_t* offsets,
                     int64_t num_blocks, const double* out) {
  auto fail = [](const std::string& what) { throw KernelError("block_dot: " + what); };
  if (dtype != kF32 && dtype != kF64) fail(std::string("dtype must be float32 or float64, got ") + dtype_name(dtype));
  if (num_rows < 0 || num_blocks < 0) fail("negative number of rows or blocks");
  if (!offsets) fail("missing block offsets");
  if (offsets[0] != 0) fail("offsets[0] must be 0, got " + std::to_string(offsets[0]));
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (offsets[i + 1] < offsets[i])
      fail("offsets must not decrease: offsets[" + std::to_string(i + 1) + "] = " + std::to_string(offsets[i + 1]) +
           " < offsets[" + std::to_string(i) + "] = " + std::to_string(offsets[i]));
  }
  if (num_rows * num_blocks > 0 && !out) fail("missing output address");
  if (num_rows > 0 && offsets[num_blocks] > 0 && (!rows || !delta)) fail("missing rows or delta address");
}

}  // namespace

void block_dot(const void* rows, const void* delta, int32_t dtype, int64_t num_rows, const int64_t* offsets,
               int64_t num_blocks, double* out, int num_threads) {
  check_block_dot(rows, delta, dtype, num_rows, offsets, num_blocks, out);
  const int64_t n = offsets[num_blocks];
  std::vector<Piece> pieces;
  for (int64_t i = 0; i < num_blocks; ++i) {
    for (int64_t b = offsets[i]; b < offsets[i + 1]; b += kChunkElems)
      pieces.push_back({i, b, std::min(offsets[i + 1], b + kChunkElems)});
  }
  const int64_t per_row = static_cast<int64_t>(pieces.size());
  std::vector<double> partial(num_rows * per_row);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), 1 + num_rows * n / kElemsPerThread));
  auto run = [&](auto* hv, const auto* d) {
    parallel_over(num_rows * per_row, threads, [&](int64_t u) {
      const int64_t j = u / per_row;
      const Piece& p = pieces[u % per_row];
      partial[u] = dot_f64(d + p.begin, hv + j * n + p.begin, p.end - p.begin);
    });
  };
  if (dtype == kF64) {
    run(static_cast<const double*>(rows), static_cast<const double*>(delta));
  } else {
    run(static_cast<const float*>(rows), static_cast<const float*>(delta));
  }
  std::fill(out, out + num_rows * num_blocks, 0.0);
  for (int64_t j = 0; j < num_rows; ++j) {
    for (int64_t c = 0; c < per_row; ++c) out[j * num_blocks + pieces[c].block] += partial[j * per_row + c];
  }
}

}  // namespace pyco::cpu::PYCO_ISA
