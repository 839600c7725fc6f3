// Standalone tests of the probe's segmented dot products (cpu::block_dot) against a plain long-double loop
// written here: no test framework, no torch. Each test prints its name and PASS/FAIL (with its worst
// mismatch as a fraction of the allowed error); main returns the number of failed tests.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "tests/check.h"

using namespace pyco;
using pyco::test::report;

namespace {

std::mt19937_64 g_rng(0xb10cULL);

template <typename S>
std::vector<S> random_values(int64_t n) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<S> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<S>(dist(g_rng));
  return v;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  return off;
}

constexpr int32_t code_of(float) { return kF32; }
constexpr int32_t code_of(double) { return kF64; }

template <typename S>
std::vector<double> run(const std::vector<S>& rows, const std::vector<S>& delta, int64_t num_rows,
                        const std::vector<int64_t>& off, int threads) {
  const int64_t k = static_cast<int64_t>(off.size()) - 1;
  std::vector<double> out(static_cast<size_t>(num_rows * k), -1.0);
  cpu::block_dot(rows.data(), delta.data(), code_of(S{}), num_rows, off.data(), k, out.data(), threads);
  return out;
}

// Worst |kernel − exact| / (tol · Σ|products|) over every entry; the sums are exact up to float64
// rounding of each addition, so the allowance scales with the magnitudes added, not with the result.
template <typename S>
double worst_error(const std::vector<S>& rows, const std::vector<S>& delta, int64_t num_rows,
                   const std::vector<int64_t>& off, const std::vector<double>& out, double tol) {
  const int64_t k = static_cast<int64_t>(off.size()) - 1;
  const int64_t n = off.back();
  double worst = 0.0;
  for (int64_t j = 0; j < num_rows; ++j) {
    for (int64_t i = 0; i < k; ++i) {
      long double exact = 0.0L, magnitude = 0.0L;
      for (int64_t e = off[i]; e < off[i + 1]; ++e) {
        const long double prod = static_cast<long double>(delta[e]) * static_cast<long double>(rows[j * n + e]);
        exact += prod;
        magnitude += std::fabs(prod);
      }
      const double err = std::fabs(static_cast<double>(out[j * k + i] - exact));
      const double allowed = tol * static_cast<double>(magnitude) + 1e-300;
      worst = std::max(worst, err / allowed);
    }
  }
  return worst;
}

template <typename S>
void test_against_reference(const char* dtype, const std::vector<int64_t>& sizes, int64_t num_rows) {
  const std::vector<int64_t> off = offsets_of(sizes);
  const auto rows = random_values<S>(num_rows * off.back());
  const auto delta = random_values<S>(off.back());
  const auto out = run(rows, delta, num_rows, off, 2);
  std::string shape = "[";
  for (size_t i = 0; i < sizes.size() && i < 5; ++i) shape += (i ? "," : "") + std::to_string(sizes[i]);
  shape += sizes.size() > 5 ? ",...]" : "]";
  report(std::string(dtype) + ": " + std::to_string(num_rows) + " rows, " + std::to_string(sizes.size()) +
             " blocks " + shape + " vs long double (rel 1e-13)",
         worst_error(rows, delta, num_rows, off, out, 1e-13));
}

void test_values() {
  test_against_reference<double>("f64", {3, 5, 7}, 3);
  test_against_reference<float>("f32", {3, 5, 7}, 3);
  test_against_reference<double>("f64", {1, 0, 100000, 16, 33}, 5);  // an empty block, multi-chunk block
  test_against_reference<float>("f32", {70000, 1, 40000, 0}, 4);
  test_against_reference<double>("f64", std::vector<int64_t>(32, 517), 32);
  test_against_reference<float>("f32", {9}, 1);  // the rows mode: one row
}

// A closed form: delta = 1 and rows[j] = j + 1 everywhere give out[j, i] = (j + 1)·size_i, exactly.
void test_closed_form() {
  const std::vector<int64_t> sizes{4, 1, 65537};
  const std::vector<int64_t> off = offsets_of(sizes);
  const int64_t rows_n = 3;
  std::vector<float> rows(static_cast<size_t>(rows_n * off.back())), delta(static_cast<size_t>(off.back()), 1.0f);
  for (int64_t j = 0; j < rows_n; ++j)
    for (int64_t e = 0; e < off.back(); ++e) rows[j * off.back() + e] = static_cast<float>(j + 1);
  const auto out = run(rows, delta, rows_n, off, 3);
  bool ok = true;
  const int64_t k = static_cast<int64_t>(sizes.size());
  for (int64_t j = 0; j < rows_n; ++j)
    for (int64_t i = 0; i < k; ++i) ok &= out[j * k + i] == static_cast<double>((j + 1) * sizes[i]);
  report("f32: rows of constants give (j+1)*size exactly", ok);
}

// Same bits for 1, 2, 3 and 8 threads, for several rows and blocks that span many chunks.
void test_determinism() {
  const std::vector<int64_t> off = offsets_of({200000, 3, 150001, 77});
  const int64_t rows_n = 4;
  const auto rows = random_values<float>(rows_n * off.back());
  const auto delta = random_values<float>(off.back());
  const auto one = run(rows, delta, rows_n, off, 1);
  bool same = true;
  for (int t : {2, 3, 8}) {
    const auto other = run(rows, delta, rows_n, off, t);
    same &= std::memcmp(one.data(), other.data(), one.size() * sizeof(double)) == 0;
  }
  report("f32: 1, 2, 3, 8 threads bitwise identical", same);
}

void test_empty() {
  const std::vector<int64_t> off{0};
  std::vector<double> out;
  cpu::block_dot(nullptr, nullptr, kF64, 4, off.data(), 0, out.data(), 2);
  const std::vector<int64_t> zeros{0, 0, 0};
  std::vector<double> out2(2 * 2, -1.0);
  cpu::block_dot(nullptr, nullptr, kF32, 2, zeros.data(), 2, out2.data(), 2);
  report("no blocks; blocks of size 0 give zeros", out2 == std::vector<double>(4, 0.0));
}

bool throws(const char* needle, void (*call)()) {
  try {
    call();
  } catch (const KernelError& e) {
    return std::strstr(e.what(), needle) != nullptr;
  }
  return false;
}

void test_errors() {
  static const std::vector<int64_t> bad_start{1, 4}, decreasing{0, 4, 2};
  static std::vector<double> buf(16, 0.0), out(16, 0.0);
  report("error: float16 rejected", throws("float32 or float64", [] {
           cpu::block_dot(buf.data(), buf.data(), kF16, 1, decreasing.data(), 1, out.data(), 1);
         }));
  report("error: offsets[0] != 0", throws("offsets[0] must be 0", [] {
           cpu::block_dot(buf.data(), buf.data(), kF64, 1, bad_start.data(), 1, out.data(), 1);
         }));
  report("error: decreasing offsets", throws("must not decrease", [] {
           cpu::block_dot(buf.data(), buf.data(), kF64, 1, decreasing.data(), 2, out.data(), 1);
         }));
  report("error: missing addresses", throws("missing rows or delta", [] {
           cpu::block_dot(nullptr, buf.data(), kF64, 1, decreasing.data(), 1, out.data(), 1);
         }));
}

}  // namespace

int main() {
  std::printf("pyco block_dot, instruction set: %s\n", cpu::kernel_isa());
  test_values();
  test_closed_form();
  test_determinism();
  test_empty();
  test_errors();
  return pyco::test::finish();
}
