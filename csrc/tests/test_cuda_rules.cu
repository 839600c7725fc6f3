// Host-only test of the CUDA kernels' arithmetic (no GPU needed): the rules (cuda/rules.cuh) and the element
// pipeline (cuda/element.cuh) that the kernels run, executed here on the host over whole tensors, must give
// the CPU kernels' results bitwise (parameters, unscaled gradients, state, step counters) and their
// statistics to rounding. Also checks the plan (chunk table), the storage conversions, SGD's device init flag
// and the bounded pool of pinned staging buffers (with a fake device). Prints one line per test; main returns
// the number of failures.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/element.cuh"
#include "cuda/staging.h"
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
  finish_record(r, Rule::kStepCounters);  // the finalize kernel's work
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
// init_flag >= 0: the emulated record carries SGD's device init flag (kFlagMomentumInitFlag, an int32 of that
// value) and the CPU record the host flag it stands for (fresh iff 0); afterwards the flag must be 1.
template <typename Rule, typename Hyper>
void check_rule(const std::string& name, const Hyper& hyper, int states, int32_t dt, double grad_scale, int32_t flags,
                const LrSource& lr, void (*cpu_step)(const TensorRecord*, int64_t, const Hyper*, int64_t,
                                                     const LaunchOptions&), int32_t init_flag = -1) {
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
  const int32_t cpu_flags = init_flag < 0 ? flags : init_flag == 0 ? kFlagFreshMomentum : 0;
  const TensorRecord rc = cpu.record(n, dt, cpu_flags);
  cpu_step(&rc, 1, &cpu_hyper, 1, opt);
  typename Rule::Params params{hyper, lr};
  double emulated[4] = {};
  int32_t device_flag = init_flag;
  TensorRecord rg = gpu.record(n, dt, init_flag < 0 ? flags : kFlagMomentumInitFlag);
  if (init_flag >= 0) rg.step = reinterpret_cast<int64_t>(&device_flag);
  emulate_dtype<Rule>(dt, rg, params, grad_scale, emulated);
  const bool same = cpu == gpu && (init_flag < 0 || device_flag == 1);
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
  const SgdHyper damped{0.05, 0.9, 0.5, 0.01, false, false};
  for (int32_t dt : dtypes) {
    check_rule<SgdRule>("sgd device init flag 0 (fresh)", damped, 1, dt, 1.0, 0, {}, &cpu::sgd_step, 0);
    check_rule<SgdRule>("sgd device init flag 1", damped, 1, dt, 1.0, 0, {}, &cpu::sgd_step, 1);
  }
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

// SGD's device init flag in the plan: accepted (and announced in the dtype mask) only with its address and
// only for rules without step counters; never together with the host flag.
void test_plan_init_flags() {
  int32_t flag = 0;
  TensorRecord r{};
  r.param = r.grad = 64;
  r.numel = 5;
  r.step = reinterpret_cast<int64_t>(&flag);
  r.codes = kF32 | (int64_t{kFlagMomentumInitFlag} << 16);
  int64_t num_chunks = 0, dtypes = 0;
  make_plan(&r, 1, 1, 1, false, num_chunks, dtypes);
  report("plan: a device init flag sets kPlanInitFlags in the dtype mask",
         dtypes == ((int64_t{1} << kF32) | kPlanInitFlags));
  TensorRecord plain = r;
  plain.codes = kF32;
  make_plan(&plain, 1, 1, 1, false, num_chunks, dtypes);
  report("plan: no init flag, no kPlanInitFlags", dtypes == (int64_t{1} << kF32));
  auto rejected = [&](TensorRecord bad, bool needs_step) {
    try {
      make_plan(&bad, 1, 1, 1, needs_step, num_chunks, dtypes);
    } catch (const KernelError&) {
      return true;
    }
    return false;
  };
  TensorRecord no_address = r, both = r, unaligned = r;
  no_address.step = 0;
  both.codes |= int64_t{kFlagFreshMomentum} << 16;
  unaligned.step += 2;
  report("plan: an init flag without its address, with the host flag, unaligned, or with step counters is "
         "rejected", rejected(no_address, false) && rejected(both, false) && rejected(unaligned, false) &&
                         rejected(r, true));
  // finish_record: the flag becomes 1; Adam's counters advance only with step_counters
  flag = 0;
  finish_record(r, false);
  float counter = 4.0f;
  TensorRecord adam{};
  adam.step = reinterpret_cast<int64_t>(&counter);
  adam.codes = kF32 | (kF32 << 8);
  finish_record(adam, false);
  const bool untouched = counter == 4.0f;
  finish_record(adam, true);
  report("finish_record: init flag set to 1, step counters advanced only for rules that have them",
         flag == 1 && untouched && counter == 5.0f);
}

// A fake device for the staging pool: event e completes at "time" due[e] (0: never recorded, done); the test
// advances `now` by one per upload, and waiting for an event completes that copy now. Allocations are
// tracked so that frees can be checked.
struct FakeStaging {
  using Event = int;
  std::vector<int64_t> due{0};
  int64_t now = 0;
  std::set<uintptr_t> live;
  uintptr_t next = 4096;
  bool bad_free = false;
  void* allocate(size_t n) {
    const uintptr_t p = next;
    next += n;
    live.insert(p);
    return reinterpret_cast<void*>(p);
  }
  void free(void* p) { bad_free |= live.erase(reinterpret_cast<uintptr_t>(p)) != 1; }
  Event create_event() {
    due.push_back(0);
    return static_cast<int>(due.size()) - 1;
  }
  void destroy_event(Event e) { due[e] = -1; }
  bool done(Event e) { return due[e] <= now; }
  void wait(Event e) { due[e] = std::min(due[e], now); }
};

using FakePool = StagingPool<FakeStaging>;

// One upload as host.cpp does it: acquire, then the copy's event, due `latency` uploads later.
FakePool::Buffer* fake_upload(FakePool& pool, size_t n, int64_t latency, bool capturing = false, int device = 0) {
  FakePool::Buffer* b = pool.acquire(device, n, capturing);
  FakeStaging& dev = pool.backend();
  if (!capturing) dev.due[b->done] = dev.now + latency;
  dev.now += 1;
  return b;
}

void test_staging_pool() {
  const size_t sizes[] = {56, 64, 200 * 1024, 3 << 20, 4000, 56};
  {  // a device a few uploads behind, sizes changing every upload (params and plans of varying length)
    FakePool pool(FakeStaging{}, 32, size_t{64} << 20);
    bool bounded = true, fits = true;
    for (int i = 0; i < 1000; ++i) {
      const size_t n = sizes[i % 6] + static_cast<size_t>(i % 7) * 8;
      fits &= fake_upload(pool, n, 5)->size >= n;
      const auto c = pool.counters();
      bounded &= c.buffers <= 32 && c.bytes <= (int64_t{64} << 20);
    }
    const auto c = pool.counters();
    report("staging: 1000 changing uploads, device 5 behind: buffers fit, pool bounded, no waits",
           bounded && fits && c.waits == 0 && c.allocations <= 32 &&
               c.buffers == static_cast<int64_t>(pool.backend().live.size()) && !pool.backend().bad_free);
  }
  {  // a device that never catches up by itself: the pool waits for the oldest copy instead of growing
    FakePool pool(FakeStaging{}, 8, size_t{64} << 20);
    bool bounded = true;
    for (int i = 0; i < 1000; ++i) {
      fake_upload(pool, 64 + i % 13, 1000000);
      bounded &= pool.counters().buffers <= 8;
    }
    const auto c = pool.counters();
    report("staging: 1000 uploads, device stalled: at most 8 buffers, the host waits for the oldest copy",
           bounded && c.buffers == 8 && c.waits == 1000 - 8 && c.allocations == 8 && c.frees == 0);
  }
  {  // the byte limit: idle buffers are freed (least recently used first); one oversize upload stands alone
    FakePool pool(FakeStaging{}, 32, size_t{1} << 20);
    FakePool::Buffer* a = fake_upload(pool, 300 * 1024, 5);  // 512 KiB
    fake_upload(pool, 300 * 1024, 5);                         // a is still in flight: a second one
    bool two = pool.counters().buffers == 2 && pool.counters().bytes == (int64_t{1} << 20);
    FakePool::Buffer* big = fake_upload(pool, 3 << 20, 1);  // 4 MiB: waits for both, frees them
    const auto c = pool.counters();
    const bool alone = c.buffers == 1 && big->size == (size_t{4} << 20) && c.frees == 2 && c.waits == 2;
    fake_upload(pool, 100, 1);  // 4 KiB would exceed 1 MiB next to the 4 MiB buffer, which is idle: freed
    const auto d = pool.counters();
    report("staging: byte limit frees idle buffers; an upload larger than the limit gets a buffer alone",
           a != nullptr && two && alone && d.buffers == 1 && d.bytes == 4096 && !pool.backend().bad_free);
  }
  {  // smallest idle fit; buffers of another device are not used
    FakePool pool(FakeStaging{}, 32, size_t{64} << 20);
    FakePool::Buffer* small = fake_upload(pool, 100, 1);
    FakePool::Buffer* large = fake_upload(pool, 1 << 20, 1);
    pool.backend().now += 10;
    FakePool::Buffer* again = fake_upload(pool, 200, 1);
    FakePool::Buffer* other = fake_upload(pool, 200, 1, false, 1);
    report("staging: the smallest idle buffer that fits is reused; devices keep their own",
           again == small && again != large && other != small && other != large &&
               pool.counters().allocations == 3);
  }
  {  // buffers of a captured graph leave the pool for good
    FakePool pool(FakeStaging{}, 4, size_t{64} << 20);
    FakePool::Buffer* kept = fake_upload(pool, 100, 0, true);
    bool never = true;
    for (int i = 0; i < 50; ++i) never &= fake_upload(pool, 100, 0) != kept;
    const auto c = pool.counters();
    report("staging: a buffer filled during capture is never reused or freed (counted apart)",
           never && c.captured == 1 && c.captured_bytes == 4096 && c.buffers == 1 &&
               pool.backend().live.count(reinterpret_cast<uintptr_t>(kept->host)) == 1);
  }
  {  // lowering the limits frees idle buffers beyond them at the next upload
    FakePool pool(FakeStaging{}, 32, size_t{64} << 20);
    for (int i = 0; i < 10; ++i) fake_upload(pool, 100, 20);  // ten in flight
    pool.backend().now += 100;
    pool.set_limits(2, size_t{64} << 20);
    fake_upload(pool, 100, 1);
    const auto c = pool.counters();
    report("staging: lowered limits take effect at the next upload", c.buffers == 2 && c.frees == 8);
  }
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
  test_plan_init_flags();
  test_staging_pool();
  test_amsgrad_nan_propagates();
  test_rules();
  return pyco::test::finish();
}
