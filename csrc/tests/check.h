// The C++ tests' shared harness (no test framework): each check prints its name and PASS/FAIL, numeric
// checks their worst mismatch as a fraction of the allowed error (<= 1 passes); `finish` prints the count
// of failures and gives main's exit status.
#pragma once

#include <cstdio>
#include <random>
#include <string>

namespace pyco::test {

inline int g_failed = 0;

inline void report(const std::string& name, bool ok) {
  std::printf("%-78s %s\n", name.c_str(), ok ? "PASS" : "FAIL");
  std::fflush(stdout);
  if (!ok) ++g_failed;
}

// For numeric checks: `worst` is the largest error as a fraction of the allowed one.
inline void report(const std::string& name, double worst) {
  char buf[32];
  std::snprintf(buf, sizeof buf, " (worst %.2g of tol)", worst);
  report(name + buf, worst <= 1.0);
}

inline int finish() {
  std::printf("%s: %d test(s) failed\n", g_failed ? "FAILED" : "OK", g_failed);
  return g_failed ? 1 : 0;
}

}  // namespace pyco::test
