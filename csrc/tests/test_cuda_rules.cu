// Host-only test of the CUDA kernels' arithmetic (no GPU needed): the rules (cuda/rules.cuh) and the element
// pipeline (cuda/element.cuh) that the kernels run, executed here on the host over whole tensors, must give
// the CPU kernels' results bitwise (parameters, unscaled gradients, state, step counters) and their
// statistics to rounding. Also checks the plan (chunk table) and the storage conversions. Prints one line
// per test; main returns the number of failures.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/element.cuh"
#include "kernels.h"
#include "tests/check.h"

using namespace pyco;
using pyco::test::report;
using namespace pyco::cuda;

namespace {

std::mt19937_64 g_rng(0xc0daULL);

int64_t elem_size(int32_t dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// Raw bytes of one buffer; values written through the CPU conversions of common.h.
struct Buf {
  std::vector<uint64_t> mem;
  int32_t dt = kF32;
  Buf() = default;
  Buf(int32_t d, int64_t n, double scale, bool positive) : mem((n * elem_size(d) + 7) / 8 + 1), dt(d) {
    std::normal_distribution<double> normal(0.0, scale);
    for (int64_t i = 0; i < n; ++i) {
      const double x = positive ? std::fabs(normal(g_rng)) : normal(g_rng);
      char* at = reinterpret_cast<char*>(mem.data()) + i * elem_size(d);
      const float f = static_cast<float>(x);
      const uint16_t h = d == kF16 ? float_to_f16(f) : float_to_bf16(f);
      if (d == kF64) std::memcpy(at, &x, 8);
      else if (d == kF32) std::memcpy(at, &f, 4);
      else std::memcpy(at, &h, 2);
    }
  }
  int64_t addr() const { return mem.empty() ? 0 : reinterpret_cast<int64_t>(mem.data()); }
};

struct Tensor {
  Buf p, g, s[3];
  float step = 0;
  TensorRecord record(int64_t n, int32_t dt, int32_t flags) {
    TensorRecord r{};
    r.param = p.addr(), r.grad = g.addr(), r.state0 = s[0].addr(), r.state1 = s[1].addr(), r.state2 = s[2].addr();
    r.step = reinterpret_cast<int64_t>(&step);
    r.numel = n;
    r.codes = dt | (kF32 << 8) | (int64_t{flags} << 16);
    return r;
  }
  bool operator==(const Tensor& o) const {
    return p.mem == o.p.mem && g.mem == o.g.mem && s[0].mem == o.s[0].mem && s[1].mem == o.s[1].mem &&
           s[2].mem == o.s[2].mem && step == o.step;
  }
};

// What the CUDA launcher does to one record, element by element on the host; sums in float64.
template <typename Rule, typename S>
void emulate(const TensorRecord& r, const typename Rule::Params& params, double grad_scale, double (&stats)[4]) {
  using M = typename Stored<S>::Math;
  const auto c = Rule::template prepare<M>(params, r);
  const Unscale<M> unscale = make_unscale<M>(grad_scale);
  const bool has[3] = {r.state0 != 0, r.state1 != 0, r.state2 != 0};
  S* p = reinterpret_cast<S*>(r.param);
  S* g = reinterpret_cast<S*>(r.grad);
  S* st[3] = {reinterpret_cast<S*>(r.state0), reinterpret_cast<S*>(r.state1), reinterpret_cast<S*>(r.state2)};
  for (int64_t i = 0; i < r.numel; ++i) {
    S s[3] = {};
    for (int k = 0; k < 3; ++k) if (has[k]) s[k] = st[k][i];
    Sums<M> one;
    update_element<Rule, S>(c, unscale, p[i], g[i], s, has, true, one);
    for (int k = 0; k < 3; ++k) if (has[k]) st[k][i] = s[k];
    for (int k = 0; k < 4; ++k) stats[k] += static_cast<double>(one.v[k]);
  }
  if (Rule::kStepCounters) *reinterpret_cast<float*>(r.step) += 1.0f;  // the finalize kernel's work
}

template <typename Rule>
void emulate_dtype(int32_t dt, const TensorRecord& r, const typename Rule::Params& params, double scale,
                   double (&stats)[4]) {
  switch (dt) {
    case kF32: return emulate<Rule, float>(r, params, scale, stats);
    case kF64: return emulate<Rule, double>(r, params, scale, stats);
    case kF16: return emulate<Rule, __half>(r, params, scale, stats);
    default: return emulate<Rule, __nv_bfloat16>(r, params, scale, stats);
  }
}

bool stats_close(const double (&a)[4], const double* b, double rtol) {
  for (int k = 0; k < 4; ++k) {
    const double scale = k == kGradDotUpdate ? std::sqrt(std::fabs(a[0] * a[1])) : std::fabs(a[k]);
    if (!(std::fabs(a[k] - b[k]) <= rtol * scale + 1e-300)) {
      std::printf("    stat %d: emulated %.17g, CPU %.17g\n", k, a[k], b[k]);
      return false;
    }
  }
  return true;
}

// One tensor of n elements through both paths; `states` slots get buffers (v-like slots are positive).
template <typename Rule, typename Hyper>
void check_rule(const std::string& name, const Hyper& hyper, int states, int32_t dt, double grad_scale, int32_t flags,
                const LrSource& lr, void (*cpu_step)(const TensorRecord*, int64_t, const Hyper*, int64_t,
                                                     const LaunchOptions&)) {
  const int64_t n = 3 * 1024 + 7;
  Tensor cpu;
  cpu.p = Buf(dt, n, 1.0, false);
  cpu.g = Buf(dt, n, grad_scale, false);
  for (int k = 0; k < states; ++k) cpu.s[k] = Buf(dt, n, k == 0 ? 0.1 : 0.01, k > 0);
  cpu.step = 2;
  Tensor gpu = cpu;
  double cpu_stats[4] = {};
  LaunchOptions opt;
  opt.grad_scale = grad_scale;
  opt.stats = cpu_stats;
  opt.num_blocks = 1;
  Hyper cpu_hyper = hyper;
  if (lr.address) cpu_hyper.lr = read_scalar(lr.address, lr.dtype);  // what Python passes the CPU kernel
  const TensorRecord rc = cpu.record(n, dt, flags);
  cpu_step(&rc, 1, &cpu_hyper, 1, opt);
  typename Rule::Params params{hyper, lr};
  double emulated[4] = {};
  emulate_dtype<Rule>(dt, gpu.record(n, dt, flags), params, grad_scale, emulated);
  const bool same = cpu == gpu;
  report(name + " " + dtype_name(dt) + (grad_scale != 1.0 ? " scaled" : "") + ": bitwise", same);
  report(name + " " + dtype_name(dt) + (grad_scale != 1.0 ? " scaled" : "") + ": statistics",
         stats_close(emulated, cpu_stats, dt == kF64 ? 1e-12 : 1e-5));
}

void test_rules() {
  const int32_t dtypes[] = {kF32, kF64, kF16, kBF16};
  const double scales[] = {1.0, 1024.0};
  static float lr32 = 0.03f;
  static double lr64 = 0.02;
  struct SgdCase { const char* name; SgdHyper h; int32_t flags; LrSource lr; };
  const SgdCase sgd[] = {
      {"sgd plain", {0.1, 0.0, 0.0, 0.0, false, false}, 0, {}},
      {"sgd momentum dampening wd", {0.05, 0.9, 0.1, 0.01, false, false}, 0, {}},
      {"sgd momentum fresh buffer", {0.05, 0.9, 0.1, 0.0, false, false}, kFlagFreshMomentum, {}},
      {"sgd nesterov maximize", {0.05, 0.8, 0.0, 0.1, true, true}, 0, {}},
      {"sgd device lr (float32)", {0.0, 0.9, 0.0, 0.0, false, false}, 0, {reinterpret_cast<int64_t>(&lr32), kF32}},
  };
  for (const SgdCase& c : sgd)
    for (int32_t dt : dtypes)
      for (double s : scales)
        check_rule<SgdRule>(c.name, c.h, c.h.momentum != 0.0 ? 1 : 0, dt, s, c.flags, c.lr, &cpu::sgd_step);
  struct AdamCase { const char* name; AdamHyper h; LrSource lr; };
  const AdamCase adam[] = {
      {"adam", {1e-2, 0.9, 0.999, 1e-8, 0.0, false, false, false}, {}},
      {"adam amsgrad l2 maximize", {1e-2, 0.8, 0.99, 1e-6, 0.1, true, true, false}, {}},
      {"adamw decoupled", {5e-2, 0.9, 0.999, 1e-8, 0.01, false, false, true}, {}},
      {"adamw amsgrad beta1=0", {1e-3, 0.0, 0.9, 1e-3, 0.1, true, false, true}, {}},
      {"adamw device lr (float64)", {0.0, 0.9, 0.999, 1e-8, 0.01, false, false, true},
       {reinterpret_cast<int64_t>(&lr64), kF64}},
  };
  for (const AdamCase& c : adam)
    for (int32_t dt : dtypes)
      for (double s : scales)
        check_rule<AdamRule>(c.name, c.h, c.h.amsgrad ? 3 : 2, dt, s, 0, c.lr, &cpu::adam_step);
}

void test_amsgrad_nan_propagates() {
  AdamRule::Params params{{1e-2, 0.9, 0.999, 1e-8, 0.0, true, false, false}, {}};
  float step = 0;
  TensorRecord r{};
  r.step = reinterpret_cast<int64_t>(&step);
  r.codes = kF32 | (kF32 << 8);
  const auto c = AdamRule::prepare<float>(params, r);
  float p = 1.0f, s[3] = {0.0f, 0.0f, 1.0f};
  AdamRule::apply(c, p, std::nanf(""), s);
  report("adam amsgrad: a NaN v propagates into max_exp_avg_sq (torch.maximum)", std::isnan(s[2]));
}

// Records sorted by block (stable), chunk starts per record, block starts per block; empty records and blocks.
void test_plan() {
  const int64_t numels[] = {5, 0, kChunkElems * 2 + 1, kChunkElems, 0, 3};
  const int64_t blocks[] = {2, 0, 0, 2, 1, 0};
  std::vector<TensorRecord> recs;
  for (int i = 0; i < 6; ++i) {
    TensorRecord r{};
    r.param = r.grad = 64 * (i + 1);
    r.numel = numels[i];
    r.block = blocks[i];
    recs.push_back(r);
  }
  int64_t num_chunks = 0, dtypes = 0;
  recs[4].codes = kBF16;  // an empty bfloat16 tensor: no kernel for bfloat16
  recs[5].codes = kF64;
  const std::vector<int64_t> plan = make_plan(recs.data(), 6, 1, 4, false, num_chunks, dtypes);
  const auto* sorted = reinterpret_cast<const TensorRecord*>(plan.data());
  const int64_t* chunk_starts = plan.data() + 6 * kRecordFields;
  const int64_t* block_starts = chunk_starts + 7;
  const int64_t order[] = {1, 2, 5, 4, 0, 3};  // block 0: records 1, 2, 5; block 1: 4; block 2: 0, 3
  bool ok = num_chunks == 6 && plan.size() == 6 * 10 + 7 + 5 + 6 && dtypes == ((1 << kF32) | (1 << kF64));
  for (int i = 0; i < 6 && ok; ++i) ok = sorted[i].param == recs[order[i]].param;
  const int64_t want_chunks[] = {0, 0, 3, 4, 4, 5, 6};
  const int64_t want_blocks[] = {0, 4, 4, 6, 6};
  for (int i = 0; i < 7 && ok; ++i) ok = chunk_starts[i] == want_chunks[i];
  for (int i = 0; i < 5 && ok; ++i) ok = block_starts[i] == want_blocks[i];
  const int64_t want_records[] = {1, 1, 1, 2, 4, 5};  // sorted positions of the chunks' records
  for (int i = 0; i < 6 && ok; ++i) ok = block_starts[5 + i] == want_records[i];
  report("plan: stable sort by block, chunk starts and records, block starts, dtype mask (empty ones too)", ok);
  bool threw = false;
  try {
    recs[3].block = 4;
    make_plan(recs.data(), 6, 1, 4, false, num_chunks, dtypes);
  } catch (const KernelError&) {
    threw = true;
  }
  report("plan: a block index out of range is rejected", threw);
}

// The device storage conversions are the CPU's (round to nearest even), NaN payloads aside.
void test_conversions() {
  bool widen = true, narrow_h = true, narrow_b = true;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    __half h;
    __nv_bfloat16 bf;
    std::memcpy(&h, &b, 2);
    std::memcpy(&bf, &b, 2);
    const float a = Stored<__half>::load(h), c = f16_to_float(b);
    const float d = Stored<__nv_bfloat16>::load(bf), e = bf16_to_float(b);
    widen &= (std::isnan(a) && std::isnan(c)) || std::memcmp(&a, &c, 4) == 0;
    widen &= (std::isnan(d) && std::isnan(e)) || std::memcmp(&d, &e, 4) == 0;
  }
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = i < 1000 ? 0x387fe000u + i * 4 : any(g_rng);  // some f16 subnormal edges, then random
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const __half h = Stored<__half>::store(f);
    const __nv_bfloat16 bf = Stored<__nv_bfloat16>::store(f);
    uint16_t hb, bb;
    std::memcpy(&hb, &h, 2);
    std::memcpy(&bb, &bf, 2);
    narrow_h &= hb == float_to_f16(f);
    narrow_b &= bb == float_to_bf16(f);
  }
  report("storage: float16/bfloat16 -> float32 as common.h (all 65536 patterns)", widen);
  report("storage: float32 -> float16 as common.h (2M values)", narrow_h);
  report("storage: float32 -> bfloat16 as common.h (2M values)", narrow_b);
}

}  // namespace

int main() {
  test_conversions();
  test_plan();
  test_amsgrad_nan_propagates();
  test_rules();
  return pyco::test::finish();
}
