// The kernels pyco's Python side calls. Each call updates a whole table of tensors (any mix of dtypes and
// param groups) in one launch and, when opt.stats is set, writes the per-block statistics of the step.
#pragma once

#include "common.h"

namespace pyco::cpu {

// torch.optim.SGD's arithmetic (momentum, dampening, nesterov, weight_decay, maximize), per element:
//   d = ±g (+ wd·θ);  b = d on the first step, else μ·b + (1−τ)·d;  d = d + μ·b (nesterov) or b;  θ −= lr·d
void sgd_step(const TensorRecord* recs, int64_t n, const SgdHyper* hypers, int64_t num_groups,
              const LaunchOptions& opt);

// torch.optim.Adam / AdamW's arithmetic (amsgrad, weight_decay, decoupled_weight_decay, maximize):
//   t += 1;  d = ±g (+ wd·θ, or θ ·= 1 − lr·wd when decoupled);  m = m + (1−β1)(d − m);
//   v = β2·v + (1−β2)·d²;  v̂ = max(v̂, v) (amsgrad);  θ −= lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)
// The step counters (record.step) are incremented by the call, once per tensor.
void adam_step(const TensorRecord* recs, int64_t n, const AdamHyper* hypers, int64_t num_groups,
               const LaunchOptions& opt);

// True when every gradient of the table is finite (no inf, no NaN).
bool grads_all_finite(const TensorRecord* recs, int64_t n, int num_threads);

// The probe's segmented dot products (pyco/probe): for j < num_rows and i < num_blocks,
//   out[j·num_blocks + i] = Σ_{n in [offsets[i], offsets[i+1])} delta[n] · rows[j·N + n],  N = offsets[num_blocks].
// rows is [num_rows, N] and delta [N], both float32 or float64 (dtype); products and sums in float64 over
// fixed chunks added in a fixed order, so the result is bitwise the same for any thread count.
void block_dot(const void* rows, const void* delta, int32_t dtype, int64_t num_rows, const int64_t* offsets,
               int64_t num_blocks, double* out, int num_threads);

// a[i] += b[i] for i < n (float32), streamed like the update kernels: the benchmarks' bandwidth probe.
void stream_add(float* a, const float* b, int64_t n, int num_threads);

// The instruction set the kernels above run with on this processor ("avx2" or "baseline").
const char* kernel_isa();

}  // namespace pyco::cpu
