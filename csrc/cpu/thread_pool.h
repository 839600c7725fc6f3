// A persistent pool of worker threads for the CPU kernels: starting threads at every launch costs a
// few hundred microseconds, which order wrappers that launch once per block would pay k times a step.
// Compiled once (not per instruction set); the kernels reach it through run_parallel.
#pragma once

#include <cstdint>

namespace pyco::cpu {

// Calls fn(ctx, c) for every c in [0, count) on up to `threads` threads, the caller's included, and
// returns when all calls are done. Work is handed out by an atomic counter, so which thread runs which c
// is unspecified: callers make each c's result independent of that. Safe to call from several threads
// (a caller that finds the pool busy runs its work itself) and after fork() (the child starts a new pool).
void run_parallel(int64_t count, int threads, void (*fn)(void*, int64_t), void* ctx);

}  // namespace pyco::cpu
