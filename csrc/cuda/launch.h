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
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../common.h"

namespace pyco::cuda {

// A failure of the CUDA runtime or driver (Python: RuntimeError). Invalid arguments, caught before the
// device is touched, stay KernelError (ValueError).
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int64_t kChunkElems = int64_t{1} << 15;  // elements per thread block: the work and reduction unit
constexpr int kThreads = 256;                       // threads per thread block

// Where a learning rate comes from: the host value in the hyper struct, or (address != 0) a float32/float64
// scalar in device memory, read by the kernel at every launch (tensor lr; what capturable graphs replay).
struct LrSource {
  int64_t address = 0;
  int32_t dtype = kF32;
};

// Bit of Launch::dtypes (above the storage-type bits) that make_plan sets when a record carries a device
// init flag (kFlagMomentumInitFlag): the finalize kernel then visits the records to set those flags.
constexpr int64_t kPlanInitFlags = int64_t{1} << 16;

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
  int64_t dtypes = 0;          // bit d set: the plan has records of dtype code d (one update kernel each);
                               // kPlanInitFlags: some records carry a device init flag
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
// record has a float32/float64 step counter; a record with kFlagMomentumInitFlag has its flag's address in
// `step`, only where the rule has no step counters). Returns int64 words; sets num_chunks and dtypes (the
// mask of Launch::dtypes).
std::vector<int64_t> make_plan(const TensorRecord* recs, int64_t n, int64_t num_groups, int64_t num_blocks,
                               bool needs_step, int64_t& num_chunks, int64_t& dtypes);

// Copies n host bytes to device memory on `stream` through a pinned staging buffer (a bounded pool, see
// staging.h), without waiting for the device unless more than the pool's limit of uploads are in flight.
// A buffer used while the stream is being captured is never reused (the graph reads it at replay).
void upload(int64_t device_dst, const void* host_src, size_t n, int device, int64_t stream);

struct StagingCounters {
  int64_t buffers = 0, bytes = 0;           // pinned buffers held for reuse, and their bytes
  int64_t captured = 0, captured_bytes = 0;  // buffers read by captured graphs (kept for good)
  int64_t allocations = 0, frees = 0;       // cudaHostAlloc / cudaFreeHost calls so far
  int64_t waits = 0;                        // uploads that waited for the device (pool full, all in flight)
  int64_t max_buffers = 0, max_bytes = 0;   // the limits
};
StagingCounters staging_counters();
// Sets the pool's limits (buffers >= 1, bytes >= 1) and returns the previous ones; idle buffers above the new
// limits are freed at the next upload.
std::pair<int64_t, int64_t> set_staging_limits(int64_t max_buffers, int64_t max_bytes);

bool stream_is_capturing(int device, int64_t stream);
int device_count();  // 0 when there is no driver or no device

// ---- can this process run the kernels on a device? ----

// What the checks below read from the CUDA runtime and the system.
struct DriverFacts {
  int driver_version = 0;    // cudaDriverGetVersion: newest CUDA the driver supports (1000 major + 10 minor); 0: none
  int runtime_version = 0;   // cudaRuntimeGetVersion: the CUDA runtime linked into pyco._C_cuda (same encoding)
  int device_count = 0;      // cudaGetDeviceCount (0 when it failed)
  std::string count_error;   // its error (name and text) when it failed
  std::string kernel_module; // the NVIDIA kernel module's version (/proc/driver/nvidia/version), "" if unknown
};

// The oldest NVIDIA driver (branch number, e.g. 580) that runs CUDA runtimes of major version `cuda_major`
// (minor-version compatibility); 0 where unknown.
int minimum_driver(int cuda_major);

// "" when `device` can be used, else the message of the RuntimeError: what is wrong and what to install.
// Pure: tested with made-up facts.
std::string driver_problem(const DriverFacts& facts, int device);

DriverFacts driver_facts();
// Throws CudaError when the driver is missing or too old for this build, `device` does not exist, or this
// build (for `architectures`, CMAKE_CUDA_ARCHITECTURES) has no kernel image the device can run.
void check_device(int device, const std::string& architectures);

// ---- the kernels (asynchronous on L.stream; an invalid Launch throws KernelError, a CUDA failure CudaError) ----

void sgd_step(const Launch& L);
void adam_step(const Launch& L);

// Sets *flag (float32, device) to 1 when any gradient of the plan is inf or NaN; leaves it otherwise.
void flag_nonfinite(const Launch& L, int64_t flag);

}  // namespace pyco::cuda
