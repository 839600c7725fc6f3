// The host-visible contract of pyco's CUDA kernels: plain C++ (no CUDA headers), so that the bindings are
// compiled by the C++ compiler and the Python side can build every buffer the kernels read.
//
// One step on one device reads two device buffers that Python uploads (and keeps while they do not change):
//   plan:   TensorRecord[num_records] (the table, sorted by block, stable), int64 chunk_starts[num_records + 1]
//           (first chunk of each record), int64 block_starts[num_blocks + 1] (first chunk of each block),
//           int64 chunk_records[num_chunks] (the record of each chunk), built on the host by make_plan();
//   params: the rule's per-group structs (SgdParams / AdamParams), built on the host by pack_params().
// Everything that changes from step to step and must not be copied (GradScaler's tensors, the statistics
// and their scratch) is passed by address in Launch, so a captured CUDA graph replays it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../common.h"

namespace pyco::cuda {

constexpr int64_t kChunkElems = int64_t{1} << 15;  // elements per thread block: the work and reduction unit
constexpr int kThreads = 256;                       // threads per thread block

// Where a learning rate comes from: the host value in the hyper struct, or (address != 0) a float32/float64
// scalar in device memory, read by the kernel at every launch (tensor lr; what capturable graphs replay).
struct LrSource {
  int64_t address = 0;
  int32_t dtype = kF32;
};

struct SgdParams {
  SgdHyper hyper;
  LrSource lr;
};

struct AdamParams {
  AdamHyper hyper;
  LrSource lr;
};

// One launch on one device. Addresses are device addresses (0: absent).
struct Launch {
  int64_t plan = 0;            // see above
  int64_t num_records = 0;
  int64_t num_chunks = 0;
  int64_t num_blocks = 0;
  int64_t dtypes = 0;          // bit d set: the plan has records of dtype code d (one update kernel each)
  int64_t params = 0;          // SgdParams[] / AdamParams[], indexed by TensorRecord::group
  int64_t num_groups = 0;
  int64_t grad_scale = 0;      // float32 scalar (GradScaler's scale); 0: use grad_scale_value
  double grad_scale_value = 1.0;
  int64_t found_inf = 0;       // float32 scalar; nonzero at run time: the launch changes nothing
  int64_t partials = 0;        // double[num_chunks][kNumStats] scratch; 0: no statistics
  int64_t stats = 0;           // double[num_blocks][kNumStats], overwritten
  int device = 0;
  int64_t stream = 0;          // cudaStream_t (torch.cuda.current_stream().cuda_stream)
};

// ---- host only: building and uploading the buffers ----

// The plan buffer of a table (validated: sizes, dtype codes, group and block indices; `needs_step`: every
// record has a float32/float64 step counter). Returns int64 words; sets num_chunks and dtypes (the mask of
// Launch::dtypes).
std::vector<int64_t> make_plan(const TensorRecord* recs, int64_t n, int64_t num_groups, int64_t num_blocks,
                               bool needs_step, int64_t& num_chunks, int64_t& dtypes);

// Copies n host bytes to device memory on `stream` through a pinned staging buffer, without waiting for the
// device. A buffer used while the stream is being captured is never reused (the graph reads it at replay).
void upload(int64_t device_dst, const void* host_src, size_t n, int device, int64_t stream);

bool stream_is_capturing(int device, int64_t stream);
int device_count();  // 0 when there is no driver or no device

// ---- the kernels (asynchronous on L.stream; errors in the launch itself throw KernelError) ----

void sgd_step(const Launch& L);
void adam_step(const Launch& L);

// Sets *flag (float32, device) to 1 when any gradient of the plan is inf or NaN; leaves it otherwise.
void flag_nonfinite(const Launch& L, int64_t flag);

}  // namespace pyco::cuda
