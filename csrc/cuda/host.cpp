// Host side of the CUDA kernels: the plan (chunk table) of a tensor table, and uploads through pinned
// staging buffers that never make the host wait for the device.
#include <climits>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "launch.h"
#include "runtime.h"

namespace pyco::cuda {

namespace {

// Lets this thread call APIs that stream capture would otherwise reject (allocating pinned memory), as
// torch does for its own allocators; the allocation is not part of any captured work.
class RelaxedCapture {
 public:
  RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

struct Staging {
  int device;
  void* host;
  size_t size;
  cudaEvent_t done;   // recorded after the copy that last read this buffer
  bool pinned_down;   // read by a captured graph: never reused
};

std::mutex g_staging_mutex;
std::vector<Staging> g_staging;  // process lifetime: pinned memory is freed by the driver at exit

}  // namespace

std::vector<int64_t> make_plan(const TensorRecord* recs, int64_t n, int64_t num_groups, int64_t num_blocks,
                               bool needs_step, int64_t& num_chunks, int64_t& dtypes) {
  auto fail = [](int64_t r, const std::string& what) {
    throw KernelError("CUDA plan: tensor " + std::to_string(r) + ": " + what);
  };
  if (num_blocks < 0) throw KernelError("CUDA plan: negative num_blocks");
  std::vector<int64_t> per_block(num_blocks + 1, 0);
  int64_t mask = 0;
  for (int64_t r = 0; r < n; ++r) {
    const TensorRecord& t = recs[r];
    if (t.numel < 0) fail(r, "negative numel " + std::to_string(t.numel));
    if (t.group < 0 || t.group >= num_groups) fail(r, "group index " + std::to_string(t.group) + " out of range");
    if (t.block < 0 || t.block >= num_blocks)
      fail(r, "block index " + std::to_string(t.block) + " out of range [0, " + std::to_string(num_blocks) + ")");
    const int32_t dtype = record_dtype(t);
    if (dtype < kF32 || dtype > kBF16) fail(r, "unsupported dtype code " + std::to_string(dtype));
    if (needs_step && (!t.step || (record_step_dtype(t) != kF32 && record_step_dtype(t) != kF64)))
      fail(r, "missing float32/float64 step counter");
    if (t.numel > 0 && (!t.param || !t.grad)) fail(r, "missing parameter or gradient address");
    ++per_block[t.block + 1];
    if (t.numel > 0) mask |= int64_t{1} << dtype;
  }
  // Records sorted by block, keeping table order within a block (a stable counting sort): each block's
  // chunks are then one contiguous range, summed in the same chunk order as the CPU kernels sum them.
  for (int64_t b = 0; b < num_blocks; ++b) per_block[b + 1] += per_block[b];
  std::vector<int64_t> order(n);
  std::vector<int64_t> next(per_block.begin(), per_block.end() - 1);
  for (int64_t r = 0; r < n; ++r) order[next[recs[r].block]++] = r;

  int64_t chunks = 0;
  for (int64_t r = 0; r < n; ++r) chunks += (recs[r].numel + kChunkElems - 1) / kChunkElems;
  if (chunks > INT_MAX) throw KernelError("CUDA plan: more than 2^31 - 1 chunks");
  std::vector<int64_t> plan(n * kRecordFields + (n + 1) + (num_blocks + 1) + chunks);
  auto* sorted = reinterpret_cast<TensorRecord*>(plan.data());
  int64_t* chunk_starts = plan.data() + n * kRecordFields;
  int64_t* block_starts = chunk_starts + n + 1;
  int64_t* chunk_records = block_starts + num_blocks + 1;
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    sorted[i] = recs[order[i]];
    chunk_starts[i] = c;
    for (int64_t end = c + (sorted[i].numel + kChunkElems - 1) / kChunkElems; c < end; ++c) chunk_records[c] = i;
  }
  chunk_starts[n] = c;
  for (int64_t b = 0; b <= num_blocks; ++b) block_starts[b] = chunk_starts[per_block[b]];
  num_chunks = chunks;
  dtypes = mask;
  return plan;
}

void upload(int64_t device_dst, const void* host_src, size_t n, int device, int64_t stream) {
  if (n == 0) return;
  if (!device_dst || !host_src) throw KernelError("CUDA upload: missing address");
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(s, &status), "cudaStreamIsCapturing");
  const bool capturing = status != cudaStreamCaptureStatusNone;

  std::lock_guard<std::mutex> lock(g_staging_mutex);
  Staging* buffer = nullptr;
  if (!capturing) {  // event queries are not allowed while capturing; a capture takes a fresh buffer
    for (Staging& b : g_staging) {
      if (b.device == device && !b.pinned_down && b.size >= n && cudaEventQuery(b.done) == cudaSuccess) {
        buffer = &b;
        break;
      }
    }
  }
  if (!buffer) {
    RelaxedCapture relaxed;
    size_t size = 4096;
    while (size < n) size *= 2;
    Staging fresh{device, nullptr, size, nullptr, false};
    check_cuda(cudaHostAlloc(&fresh.host, size, cudaHostAllocDefault), "cudaHostAlloc");
    check_cuda(cudaEventCreateWithFlags(&fresh.done, cudaEventDisableTiming), "cudaEventCreate");
    g_staging.push_back(fresh);
    buffer = &g_staging.back();
  }
  std::memcpy(buffer->host, host_src, n);
  check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(device_dst), buffer->host, n, cudaMemcpyHostToDevice, s),
        "cudaMemcpyAsync");
  if (capturing) {
    buffer->pinned_down = true;
  } else {
    check_cuda(cudaEventRecord(buffer->done, s), "cudaEventRecord");
  }
}

bool stream_is_capturing(int device, int64_t stream) {
  DeviceGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error: no driver or no device is an answer, not a failure
    return 0;
  }
  return count;
}

}  // namespace pyco::cuda
