// Standalone tests of the CPU kernels (csrc/cpu) against plain reference loops written here: no test
// framework, no torch. Each test prints its name, PASS/FAIL and its worst mismatch, given as a fraction of
// the allowed error (<= 1 passes); main returns the number of failed tests.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "tests/check.h"

using namespace pyco;
using pyco::test::report;

namespace {

std::mt19937_64 g_rng(0x5eedULL);
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- buffers, tensors, reference state ----

int64_t elem_size(int32_t dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// A flat buffer of one storage type, read as double and written rounded to the storage type.
struct Buf {
  int32_t dt = kF64;
  int64_t n = 0;
  std::vector<uint64_t> mem;  // empty: the buffer is absent (address 0)
  Buf() = default;
  Buf(int32_t d, int64_t count) : dt(d), n(count), mem(static_cast<size_t>((count * elem_size(d) + 7) / 8 + 1)) {}
  int64_t addr() const { return mem.empty() ? 0 : reinterpret_cast<int64_t>(mem.data()); }
  double get(int64_t i) const {
    const char* at = reinterpret_cast<const char*>(mem.data()) + i * elem_size(dt);
    if (dt == kF64) { double x; std::memcpy(&x, at, 8); return x; }
    if (dt == kF32) { float x; std::memcpy(&x, at, 4); return x; }
    uint16_t h;
    std::memcpy(&h, at, 2);
    return dt == kF16 ? f16_to_float(h) : bf16_to_float(h);
  }
  void set(int64_t i, double v) {
    char* at = reinterpret_cast<char*>(mem.data()) + i * elem_size(dt);
    if (dt == kF64) { std::memcpy(at, &v, 8); return; }
    const float f = static_cast<float>(v);
    if (dt == kF32) { std::memcpy(at, &f, 4); return; }
    const uint16_t h = dt == kF16 ? float_to_f16(f) : float_to_bf16(f);
    std::memcpy(at, &h, 2);
  }
  std::vector<double> values() const {
    std::vector<double> v(mem.empty() ? 0 : static_cast<size_t>(n));
    for (size_t i = 0; i < v.size(); ++i) v[i] = get(static_cast<int64_t>(i));
    return v;
  }
};

template <typename Dist>
Buf random_buf(int32_t dt, int64_t n, Dist dist) {
  Buf b(dt, n);
  for (int64_t i = 0; i < n; ++i) b.set(i, dist(g_rng));
  return b;
}

// One tensor of a table: its buffers, its step counter and the other fields of its record.
struct Slot {
  Buf p, g, s0, s1, s2;
  double step64 = 0;
  float step32 = 0;
  int32_t step_dt = kF32;
  int32_t flags = 0;
  int64_t group = 0, block = 0;

  double step() const { return step_dt == kF64 ? step64 : step32; }
  TensorRecord record() {
    TensorRecord r{};
    r.param = p.addr(), r.grad = g.addr(), r.state0 = s0.addr(), r.state1 = s1.addr(), r.state2 = s2.addr();
    r.step = step_dt == kF64 ? reinterpret_cast<int64_t>(&step64) : reinterpret_cast<int64_t>(&step32);
    r.numel = p.n;
    r.codes = p.dt | (step_dt << 8) | (int64_t{flags} << 16);
    r.group = group, r.block = block;
    return r;
  }
  bool same_bytes(const Slot& o) const {
    return p.mem == o.p.mem && g.mem == o.g.mem && s0.mem == o.s0.mem && s1.mem == o.s1.mem &&
           s2.mem == o.s2.mem && step() == o.step();
  }
};

int num_states(const SgdHyper& h) { return h.momentum != 0.0 ? 1 : 0; }
int num_states(const AdamHyper& h) { return h.amsgrad ? 3 : 2; }

struct Spec {
  int32_t dt;
  int64_t n;
  int64_t group = 0, block = 0;
};

template <typename H>
std::vector<Slot> make_table(const std::vector<Spec>& specs, const std::vector<H>& hypers) {
  std::vector<Slot> slots;
  for (const Spec& sp : specs) {
    Slot s;
    const int states = num_states(hypers[sp.group]);
    using Normal = std::normal_distribution<double>;
    using Uniform = std::uniform_real_distribution<double>;
    s.p = random_buf(sp.dt, sp.n, Normal(0.0, 1.0));
    s.g = random_buf(sp.dt, sp.n, Normal(0.0, 1.0));
    if (states >= 1) s.s0 = random_buf(sp.dt, sp.n, Normal(0.0, 0.1));  // momentum buffer / exp_avg
    if (states >= 2) s.s1 = random_buf(sp.dt, sp.n, Uniform(0.0, 0.01));  // exp_avg_sq
    if (states >= 3) s.s2 = random_buf(sp.dt, sp.n, Uniform(0.0, 0.01));  // max_exp_avg_sq
    s.step_dt = (g_rng() & 1) ? kF64 : kF32;
    s.step64 = s.step32 = static_cast<float>(g_rng() % 4);  // Adam counters start at 0..3
    s.group = sp.group, s.block = sp.block;
    slots.push_back(s);
  }
  return slots;
}

std::vector<TensorRecord> records(std::vector<Slot>& slots) {
  std::vector<TensorRecord> r;
  for (Slot& s : slots) r.push_back(s.record());
  return r;
}

void call(const std::vector<TensorRecord>& r, const std::vector<SgdHyper>& h, const LaunchOptions& opt) {
  cpu::sgd_step(r.data(), static_cast<int64_t>(r.size()), h.data(), static_cast<int64_t>(h.size()), opt);
}
void call(const std::vector<TensorRecord>& r, const std::vector<AdamHyper>& h, const LaunchOptions& opt) {
  cpu::adam_step(r.data(), static_cast<int64_t>(r.size()), h.data(), static_cast<int64_t>(h.size()), opt);
}

// The reference: a tensor's values in double, updated by the formulas of kernels.h.
struct Ref {
  std::vector<double> p, g, s0, s1, s2;
  double step = 0;
};

Ref snapshot(const Slot& s) { return {s.p.values(), s.g.values(), s.s0.values(), s.s1.values(), s.s2.values(), s.step()}; }

// d = ±g (+ wd·θ);  b = d (fresh) or μ·b + (1−τ)·d;  d = d + μ·b (nesterov) or b;  θ −= lr·d
void ref_step(Ref& r, const SgdHyper& h, bool fresh, const LaunchOptions& opt) {
  for (size_t i = 0; i < r.p.size(); ++i) {
    const double g = r.g[i] / opt.grad_scale;
    if (opt.grad_scale != 1.0) r.g[i] = g;
    double d = h.maximize ? -g : g;
    if (h.weight_decay != 0.0) d += h.weight_decay * r.p[i];
    if (h.momentum != 0.0) {
      r.s0[i] = fresh ? d : h.momentum * r.s0[i] + (1.0 - h.dampening) * d;
      d = h.nesterov ? d + h.momentum * r.s0[i] : r.s0[i];
    }
    r.p[i] -= h.lr * d;
  }
}

// t += 1;  d = ±g (+ wd·θ, or θ ·= 1 − lr·wd);  m += (1−β1)(d − m);  v = β2·v + (1−β2)·d²;  v̂ = max(v̂, v);
// θ −= lr/(1−β1^t) · m / (√v̂ / √(1−β2^t) + ε)
void ref_step(Ref& r, const AdamHyper& h, bool /*fresh*/, const LaunchOptions& opt) {
  const double t = r.step += 1.0;
  const double step_size = h.lr / (1.0 - std::pow(h.beta1, t)), bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, t));
  for (size_t i = 0; i < r.p.size(); ++i) {
    const double g = r.g[i] / opt.grad_scale;
    if (opt.grad_scale != 1.0) r.g[i] = g;
    double d = h.maximize ? -g : g, p = r.p[i];
    if (h.weight_decay != 0.0) {
      if (h.decoupled_weight_decay) p *= 1.0 - h.lr * h.weight_decay;
      else d += h.weight_decay * p;
    }
    double &m = r.s0[i], &v = r.s1[i];
    m += (1.0 - h.beta1) * (d - m);
    v = h.beta2 * v + (1.0 - h.beta2) * d * d;
    const double vhat = h.amsgrad ? (r.s2[i] = std::max(r.s2[i], v)) : v;
    r.p[i] = p - step_size * (m / (std::sqrt(vhat) / bc2_sqrt + h.eps));
  }
}

// ---- comparisons ----

// Allowed error: ulps·ulp_S(want) + rtol·(|want| + 0.1·max|want|), S the storage type. The second term is
// relative, with a floor for values that are small only because of cancellation.
struct Tol {
  double ulps, rtol;
};
Tol tolerance(int32_t dt, double f64_rtol) { return dt == kF64 ? Tol{0, f64_rtol} : dt == kF32 ? Tol{0, 1e-6} : Tol{2, 1e-6}; }

double ulp(int32_t dt, double x) {
  const int mant = dt == kF64 ? 52 : dt == kF32 ? 23 : dt == kF16 ? 10 : 7;
  const int emin = dt == kF64 ? -1022 : dt == kF16 ? -14 : -126;
  int e = 0;
  std::frexp(x, &e);
  return std::ldexp(1.0, (x == 0.0 ? emin : std::max(e - 1, emin)) - mant);
}

double mismatch(const Buf& got, const std::vector<double>& want, Tol tol) {
  if (static_cast<int64_t>(want.size()) != (got.mem.empty() ? 0 : got.n)) return kInf;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double a = got.get(static_cast<int64_t>(i)), w = want[i];
    if (a == w || (std::isnan(a) && std::isnan(w))) continue;
    const double e = std::fabs(a - w) / (tol.ulps * ulp(got.dt, w) + tol.rtol * (std::fabs(w) + 0.1 * scale));
    worst = std::isnan(e) ? kInf : std::max(worst, e);
  }
  return worst;
}

double compare(const Slot& s, const Ref& r, Tol tol) {
  const double w = std::max({mismatch(s.p, r.p, tol), mismatch(s.g, r.g, tol), mismatch(s.s0, r.s0, tol),
                             mismatch(s.s1, r.s1, tol), mismatch(s.s2, r.s2, tol)});
  return s.step() == r.step ? w : kInf;
}

// Σg² (g unscaled), Σu² (u = θ_after − θ_before as stored), Σg·u, Σθ² (before), per block, in long double.
std::vector<long double> stats_reference(const std::vector<Ref>& before, const std::vector<Slot>& after,
                                         int64_t blocks, double grad_scale) {
  std::vector<long double> s(static_cast<size_t>(blocks * kNumStats), 0.0L);
  for (size_t k = 0; k < after.size(); ++k) {
    long double* b = &s[static_cast<size_t>(after[k].block * kNumStats)];
    for (size_t i = 0; i < before[k].p.size(); ++i) {
      const long double g = before[k].g[i] / static_cast<long double>(grad_scale), p = before[k].p[i];
      const long double u = after[k].p.get(static_cast<int64_t>(i)) - p;
      b[kGradSq] += g * g, b[kUpdateSq] += u * u, b[kGradDotUpdate] += g * u, b[kParamSq] += p * p;
    }
  }
  return s;
}

// Worst relative error of the statistics as a fraction of rtol[block]; Σg·u is measured against √(Σg²·Σu²).
double stats_error(const std::vector<double>& got, const std::vector<long double>& want,
                   const std::vector<double>& rtol) {
  double worst = 0;
  for (size_t b = 0; b < want.size(); b += kNumStats) {
    for (int f = 0; f < kNumStats; ++f) {
      const long double w = want[b + f];
      const long double den = f == kGradDotUpdate ? std::sqrt(want[b + kGradSq] * want[b + kUpdateSq]) : std::fabs(w);
      const long double err = std::fabs(got[b + f] - w);
      const double e = static_cast<double>(err == 0 ? 0.0L : den > 0 ? err / den : kInf) / rtol[b / kNumStats];
      worst = std::isnan(e) ? kInf : std::max(worst, e);
    }
  }
  return worst;
}

// Runs `steps` steps (the first with the fresh-momentum flag) through the kernel and, from the same stored
// inputs, through the reference. Returns the worst mismatch; with blocks > 0 the worst statistics mismatch
// goes to *stats_worst: relative 1e-12 for blocks of f64 tensors, 1e-6 for the others (their sums may be
// partly accumulated in float32).
template <typename H>
double run_checked(std::vector<Slot>& slots, const std::vector<H>& hypers, int steps, double f64_rtol,
                   LaunchOptions opt = {}, int64_t blocks = 0, double* stats_worst = nullptr) {
  std::vector<double> stats(static_cast<size_t>(blocks * kNumStats));
  if (blocks > 0) opt.stats = stats.data(), opt.num_blocks = blocks;
  std::vector<double> stats_rtol(static_cast<size_t>(blocks), 1e-12);
  for (const Slot& s : slots)
    if (blocks > 0 && s.p.dt != kF64) stats_rtol[static_cast<size_t>(s.block)] = 1e-6;
  double worst = 0;
  for (int k = 0; k < steps; ++k) {
    std::vector<Ref> refs;
    for (Slot& s : slots) s.flags = k == 0 ? kFlagFreshMomentum : 0, refs.push_back(snapshot(s));
    const std::vector<Ref> before = refs;
    std::fill(stats.begin(), stats.end(), std::nan(""));
    call(records(slots), hypers, opt);
    for (size_t i = 0; i < slots.size(); ++i) {
      ref_step(refs[i], hypers[slots[i].group], k == 0, opt);
      worst = std::max(worst, compare(slots[i], refs[i], tolerance(slots[i].p.dt, f64_rtol)));
    }
    if (blocks > 0)
      *stats_worst = std::max(*stats_worst, stats_error(stats, stats_reference(before, slots, blocks, opt.grad_scale), stats_rtol));
  }
  return worst;
}

// ---- the tests ----

void test_sgd_f64() {
  double worst = 0;
  int combos = 0;
  for (double mu : {0.0, 0.9})
    for (bool nesterov : {false, true})
      for (double damp : {0.0, 0.3})
        for (double wd : {0.0, 0.01})
          for (bool maximize : {false, true}) {
            if (nesterov && (mu == 0.0 || damp != 0.0)) continue;
            const std::vector<SgdHyper> h{{0.05, mu, damp, wd, nesterov, maximize}};
            std::vector<Slot> slots = make_table<SgdHyper>({{kF64, 1000}}, h);
            worst = std::max(worst, run_checked(slots, h, 4, 1e-14));
            ++combos;
          }
  report("sgd f64: " + std::to_string(combos) + " option combos x 4 steps (rel 1e-14)", worst);
}

void test_adam_f64() {
  double worst = 0;
  int combos = 0;
  for (bool amsgrad : {false, true})
    for (double wd : {0.0, 0.1})
      for (bool decoupled : {false, true})
        for (bool maximize : {false, true}) {
          const std::vector<AdamHyper> h{{0.01, 0.9, 0.999, 1e-8, wd, amsgrad, maximize, decoupled}};
          std::vector<Slot> slots = make_table<AdamHyper>({{kF64, 1000}}, h);
          slots[0].step_dt = combos % 2 ? kF64 : kF32;
          worst = std::max(worst, run_checked(slots, h, 5, 1e-13));
          ++combos;
        }
  report("adam f64: " + std::to_string(combos) + " option combos x 5 steps, f32/f64 counters (rel 1e-13)", worst);
}

const std::vector<SgdHyper> kSgdGroups{{0.05, 0.9, 0.0, 0.01, true, false}, {0.1, 0.9, 0.3, 0.0, false, true},
                                       {0.2, 0.0, 0.0, 0.02, false, false}};
const std::vector<AdamHyper> kAdamGroups{{0.01, 0.9, 0.999, 1e-8, 0.1, true, false, true},
                                         {0.003, 0.8, 0.99, 1e-6, 0.01, false, true, false},
                                         {0.02, 0.95, 0.9999, 1e-8, 0.0, false, false, false}};

void test_low_precision() {
  for (int32_t dt : {kF32, kF16, kBF16}) {
    const std::vector<Spec> specs{{dt, 5000, 0}, {dt, 3001, 1}, {dt, 2000, 2}};
    std::vector<Slot> a = make_table(specs, kSgdGroups), b = make_table(specs, kAdamGroups);
    const double worst = std::max(run_checked(a, kSgdGroups, 2, 0), run_checked(b, kAdamGroups, 2, 0));
    report(std::string("sgd+adam ") + dtype_name(dt) + " vs f64 reference from the stored inputs", worst);
  }
}

void test_sizes_and_tables() {
  const int64_t sizes[] = {0, 1, 3, 4097, 278011};
  double worst = 0;
  std::vector<Spec> all;
  for (int64_t n : sizes) {
    all.push_back({kF64, n, static_cast<int64_t>(all.size() % 3)});
    std::vector<Slot> a = make_table<SgdHyper>({{kF64, n}}, kSgdGroups), b = make_table<AdamHyper>({{kF64, n}}, kAdamGroups);
    worst = std::max({worst, run_checked(a, kSgdGroups, 2, 1e-14), run_checked(b, kAdamGroups, 2, 1e-13)});
  }
  std::vector<Slot> a = make_table(all, kSgdGroups), b = make_table(all, kAdamGroups);
  worst = std::max({worst, run_checked(a, kSgdGroups, 2, 1e-14), run_checked(b, kAdamGroups, 2, 1e-13)});
  report("sizes 0, 1, 3, 4097, 278011: alone and in one table (f64)", worst);

  // Many tensors, three groups, five blocks (block 5 of 6 left empty), with statistics.
  std::vector<Spec> many;
  for (int i = 0; i < 60; ++i) many.push_back({kF64, static_cast<int64_t>(g_rng() % 3000), i % 3, i % 5});
  many.push_back({kF64, 70001, 1, 2});
  double stats_worst = 0;
  a = make_table(many, kSgdGroups), b = make_table(many, kAdamGroups);
  worst = std::max(run_checked(a, kSgdGroups, 3, 1e-14, {}, 6, &stats_worst),
                   run_checked(b, kAdamGroups, 3, 1e-13, {}, 6, &stats_worst));
  report("61 f64 tensors, 3 groups, 6 blocks", worst);
  report("statistics of that table (f64, rel 1e-12)", stats_worst);

  // All four dtypes in one call, with statistics.
  std::vector<Spec> mixed;
  for (int i = 0; i < 16; ++i) mixed.push_back({i % 4, 1 + static_cast<int64_t>(g_rng() % 40000), i % 3, i % 4});
  mixed.push_back({kF64, 5000, 0, 4}), mixed.push_back({kBF16, 5000, 1, 4});
  stats_worst = 0;
  a = make_table(mixed, kSgdGroups), b = make_table(mixed, kAdamGroups);
  worst = std::max(run_checked(a, kSgdGroups, 2, 1e-14, {}, 5, &stats_worst),
                   run_checked(b, kAdamGroups, 2, 1e-13, {}, 5, &stats_worst));
  report("mixed f32/f64/f16/bf16 table in one call", worst);
  report("statistics of that table (f64 blocks rel 1e-12, others 1e-6)", stats_worst);
}

template <typename H>
bool deterministic(const std::vector<H>& hypers) {
  const std::vector<Spec> specs{{kF64, 278011, 0, 0}, {kF32, 200003, 1, 1}, {kBF16, 150001, 2, 2},
                                {kF16, 70001, 1, 1},  {kF64, 3, 0, 0}};
  const std::vector<Slot> base = make_table(specs, hypers);
  std::vector<Slot> first;
  std::vector<double> first_stats;
  bool ok = true;
  for (int threads : {1, 2, 3, 8}) {
    std::vector<Slot> slots = base;
    std::vector<double> stats(3 * kNumStats);
    LaunchOptions opt;
    opt.num_threads = threads, opt.stats = stats.data(), opt.num_blocks = 3;
    for (int k = 0; k < 2; ++k) call(records(slots), hypers, opt);
    if (threads == 1) {
      first = slots, first_stats = stats;
      continue;
    }
    for (size_t i = 0; i < slots.size(); ++i) ok = ok && slots[i].same_bytes(first[i]);
    ok = ok && std::memcmp(stats.data(), first_stats.data(), stats.size() * sizeof(double)) == 0;
  }
  return ok;
}

void test_determinism() {
  report("sgd: 1, 2, 3, 8 threads bitwise identical (params, state, stats)", deterministic(kSgdGroups));
  report("adam: 1, 2, 3, 8 threads bitwise identical (params, state, stats)", deterministic(kAdamGroups));
}

template <typename H>
bool scale_matches(const std::vector<H>& hypers, int32_t dt) {
  std::vector<Slot> plain = make_table<H>({{dt, 40000, 0, 0}, {dt, 7, 1, 1}, {dt, 33000, 2, 0}}, hypers);
  std::vector<Slot> scaled = plain;
  for (Slot& s : scaled)
    for (int64_t i = 0; i < s.g.n; ++i) s.g.set(i, 4.0 * s.g.get(i));  // exact
  std::vector<double> st_plain(2 * kNumStats), st_scaled(2 * kNumStats);
  LaunchOptions opt;
  opt.num_blocks = 2, opt.stats = st_plain.data();
  call(records(plain), hypers, opt);
  opt.stats = st_scaled.data(), opt.grad_scale = 4.0;
  call(records(scaled), hypers, opt);
  bool ok = st_plain == st_scaled;
  for (size_t i = 0; i < plain.size(); ++i) ok = ok && plain[i].same_bytes(scaled[i]);  // grads included
  return ok;
}

void test_grad_scale() {
  for (int32_t dt : {kF64, kF32, kF16, kBF16})
    report(std::string("grad_scale=4 == unscaled run, grad holds g/4: ") + dtype_name(dt),
           scale_matches(kSgdGroups, dt) && scale_matches(kAdamGroups, dt));
}

void test_grads_all_finite() {
  const double bad_values[] = {kInf, -kInf, std::nan("")};
  for (int32_t dt : {kF32, kBF16}) {
    std::vector<Slot> slots = make_table<SgdHyper>({{dt, 278011}, {dt, 5}}, kSgdGroups);
    const std::vector<TensorRecord> recs = records(slots);
    bool ok = cpu::grads_all_finite(recs.data(), 2, 1) && cpu::grads_all_finite(recs.data(), 2, 4);
    const int64_t n = slots[0].g.n;
    const std::pair<int, int64_t> places[] = {{0, 0}, {0, 32767}, {0, 32768}, {0, n / 2}, {0, n - 1}, {1, 4}};
    for (auto [t, pos] : places) {
      for (double bad : bad_values) {
        Buf& g = slots[t].g;
        const double keep = g.get(pos);
        g.set(pos, bad);
        ok = ok && !cpu::grads_all_finite(recs.data(), 2, 1) && !cpu::grads_all_finite(recs.data(), 2, 4);
        g.set(pos, keep);
      }
    }
    ok = ok && cpu::grads_all_finite(recs.data(), 2, 3);
    report(std::string("grads_all_finite ") + dtype_name(dt) + ": inf/-inf/NaN at first/chunk edge/middle/last",
           ok);
  }
}

// The bandwidth probe: a += b exactly (one float addition per element), every size and thread count.
void test_stream_add() {
  bool ok = true;
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{15}, int64_t{17}, int64_t{4097}, int64_t{278011}}) {
    for (int threads : {1, 3}) {
      std::normal_distribution<float> normal;
      std::vector<float> a(n), b(n);
      for (int64_t i = 0; i < n; ++i) a[i] = normal(g_rng), b[i] = normal(g_rng);
      std::vector<float> expected(n);
      for (int64_t i = 0; i < n; ++i) expected[i] = a[i] + b[i];
      cpu::stream_add(a.data(), b.data(), n, threads);
      ok = ok && std::memcmp(a.data(), expected.data(), n * sizeof(float)) == 0;
    }
  }
  bool threw = false;
  try {
    cpu::stream_add(nullptr, nullptr, -1, 1);
  } catch (const KernelError&) {
    threw = true;
  }
  report("stream_add: a += b bitwise, sizes 0..278011, 1 and 3 threads; negative length rejected", ok && threw);
}

using Breaker = void (*)(TensorRecord&);

// Breaks the second record of a valid two-tensor table: the call must throw KernelError and change nothing.
template <typename H>
bool rejects(const std::vector<H>& hypers, Breaker brk) {
  std::vector<Slot> slots = make_table<H>({{kF64, 100}, {kF64, 100}}, hypers);
  const std::vector<Slot> copy = slots;
  std::vector<TensorRecord> recs = records(slots);
  brk(recs[1]);
  std::vector<double> stats(2 * kNumStats);
  LaunchOptions opt;
  opt.stats = stats.data(), opt.num_blocks = 2;
  bool threw = false;
  try {
    call(recs, hypers, opt);
  } catch (const KernelError&) {
    threw = true;
  } catch (...) {
  }
  bool untouched = true;
  for (size_t i = 0; i < slots.size(); ++i) untouched = untouched && slots[i].same_bytes(copy[i]);
  return threw && untouched;
}

void test_errors() {
  const std::vector<SgdHyper> sgd{{0.1, 0.9}};
  const std::vector<AdamHyper> adam{{0.01, 0.9, 0.999, 1e-8, 0.0, true}};
  const struct {
    const char* what;
    Breaker brk;
  } cases[] = {
      {"negative numel", [](TensorRecord& r) { r.numel = -1; }},
      {"group out of range", [](TensorRecord& r) { r.group = 1; }},
      {"negative group", [](TensorRecord& r) { r.group = -1; }},
      {"block out of range", [](TensorRecord& r) { r.block = 2; }},
      {"unsupported dtype", [](TensorRecord& r) { r.codes = (r.codes & ~int64_t{0xff}) | 7; }},
      {"missing parameter", [](TensorRecord& r) { r.param = 0; }},
      {"missing state0 (momentum buffer / exp_avg)", [](TensorRecord& r) { r.state0 = 0; }},
  };
  for (const auto& c : cases)
    report(std::string("KernelError, nothing written: ") + c.what, rejects(sgd, c.brk) && rejects(adam, c.brk));
  report("KernelError, nothing written: adam missing exp_avg_sq", rejects(adam, [](TensorRecord& r) { r.state1 = 0; }));
  report("KernelError, nothing written: amsgrad missing max_exp_avg_sq",
         rejects(adam, [](TensorRecord& r) { r.state2 = 0; }));
  report("KernelError, nothing written: adam missing step counter", rejects(adam, [](TensorRecord& r) { r.step = 0; }));
}

void test_conversions() {
  bool ok = true;
  for (uint32_t u = 0; u < 65536; ++u) {
    const uint16_t b = static_cast<uint16_t>(u);
    const float h = f16_to_float(b), bf = bf16_to_float(b);
    const uint16_t h_back = float_to_f16(h), bf_back = float_to_bf16(bf);
    const auto h_nan = [](uint16_t x) { return (x & 0x7c00) == 0x7c00 && (x & 0x3ff) != 0; };
    const auto bf_nan = [](uint16_t x) { return (x & 0x7f80) == 0x7f80 && (x & 0x7f) != 0; };
    ok = ok && (h_nan(b) ? std::isnan(h) && h_nan(h_back) : !std::isnan(h) && h_back == b);
    ok = ok && (bf_nan(b) ? std::isnan(bf) && bf_nan(bf_back) : !std::isnan(bf) && bf_back == b);
  }
  report("f16/bf16 round trip of all 65536 bit patterns (NaN stays NaN)", ok);

  const float inf = std::numeric_limits<float>::infinity();
  const auto p2 = [](int e) { return std::ldexp(1.0f, e); };
  const struct {
    float x;
    uint16_t f16, bf16;
  } cases[] = {
      {1.0f, 0x3c00, 0x3f80},
      {1 + p2(-11), 0x3c00, 0x3f80},                  // f16 tie -> even
      {1 + 3 * p2(-11), 0x3c02, 0x3f80},              // f16 tie -> even (up)
      {1 + p2(-11) + p2(-20), 0x3c01, 0x3f80},        // f16 just above the tie
      {1 + p2(-8), 0x3c04, 0x3f80},                   // bf16 tie -> even
      {1 + 3 * p2(-8), 0x3c0c, 0x3f82},               // bf16 tie -> even (up)
      {1 + p2(-8) + p2(-20), 0x3c04, 0x3f81},         // bf16 just above the tie
      {4095.0f, 0x6c00, 0x4580},                      // f16 tie carries into the exponent
      {0.1f, 0x2e66, 0x3dcd},
      {-2.0f, 0xc000, 0xc000},
      {-0.0f, 0x8000, 0x8000},
      {65504.0f, 0x7bff, 0x4780},
      {65519.0f, 0x7bff, 0x4780},
      {65520.0f, 0x7c00, 0x4780},                     // f16 overflow threshold
      {-65520.0f, 0xfc00, 0xc780},
      {std::numeric_limits<float>::max(), 0x7c00, 0x7f80},
      {inf, 0x7c00, 0x7f80},
      {p2(-24), 0x0001, 0x3380},                      // smallest f16 subnormal
      {p2(-25), 0x0000, 0x3300},                      // tie with 0 -> 0
      {3 * p2(-26), 0x0001, 0x3340},
      {3 * p2(-25), 0x0002, 0x33c0},                  // subnormal tie -> even
      {p2(-14) - p2(-25), 0x0400, 0x3880},            // tie between largest subnormal and smallest normal
      {p2(-133), 0x0000, 0x0001},                     // smallest bf16 subnormal
  };
  ok = true;
  for (const auto& c : cases) {
    if (float_to_f16(c.x) != c.f16 || float_to_bf16(c.x) != c.bf16) {
      std::printf("  %.9g: f16 0x%04x (want 0x%04x), bf16 0x%04x (want 0x%04x)\n", static_cast<double>(c.x),
                  float_to_f16(c.x), c.f16, float_to_bf16(c.x), c.bf16);
      ok = false;
    }
  }
  const float nan = std::nanf("");
  ok = ok && std::isnan(f16_to_float(float_to_f16(nan))) && std::isnan(bf16_to_float(float_to_bf16(nan)));
  ok = ok && f16_to_float(0x0001) == p2(-24) && f16_to_float(0x7bff) == 65504.0f && f16_to_float(0x0400) == p2(-14);
  report("float -> f16/bf16 round to nearest even on hand-picked values", ok);
}

}  // namespace

int main() {
  std::printf("pyco CPU kernels, instruction set: %s\n", cpu::kernel_isa());
  test_sgd_f64();
  test_adam_f64();
  test_low_precision();
  test_sizes_and_tables();
  test_determinism();
  test_grad_scale();
  test_grads_all_finite();
  test_stream_add();
  test_errors();
  test_conversions();
  return pyco::test::finish();
}
