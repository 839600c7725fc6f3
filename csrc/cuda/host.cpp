// Host side of the CUDA kernels: the plan (chunk table) of a tensor table, uploads through a bounded pool of
// pinned staging buffers that does not make the host wait for the device, and the driver/device check.
#include <cctype>
#include <climits>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "launch.h"
#include "runtime.h"
#include "staging.h"

namespace pyco::cuda {

namespace {

// Lets this thread call APIs that stream capture would otherwise reject (allocating pinned memory, querying
// events), as torch does for its own allocators; none of these calls is part of any captured work.
class RelaxedCapture {
 public:
  RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

struct CudaStaging {
  using Event = cudaEvent_t;
  void* allocate(size_t n) {
    void* p = nullptr;
    check_cuda(cudaHostAlloc(&p, n, cudaHostAllocDefault), "cudaHostAlloc");
    return p;
  }
  void free(void* p) { check_cuda(cudaFreeHost(p), "cudaFreeHost"); }
  Event create_event() {
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    return e;
  }
  void destroy_event(Event e) { check_cuda(cudaEventDestroy(e), "cudaEventDestroy"); }
  bool done(Event e) {
    const cudaError_t err = cudaEventQuery(e);
    if (err == cudaErrorNotReady) {
      cudaGetLastError();  // not an error: clear it
      return false;
    }
    check_cuda(err, "cudaEventQuery");
    return true;
  }
  void wait(Event e) { check_cuda(cudaEventSynchronize(e), "cudaEventSynchronize"); }
};

constexpr size_t kStagingBuffers = 32;
constexpr size_t kStagingBytes = size_t{64} << 20;

std::mutex g_staging_mutex;
StagingPool<CudaStaging>& staging_pool() {
  static StagingPool<CudaStaging> pool(CudaStaging{}, kStagingBuffers, kStagingBytes);
  return pool;
}

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
    const int32_t flags = record_flags(t);
    if (flags & kFlagMomentumInitFlag) {
      if (needs_step) fail(r, "a momentum init flag in a rule with step counters");
      if (flags & kFlagFreshMomentum) fail(r, "both the host and the device momentum init flags are set");
      if (!t.step) fail(r, "momentum init flag without its address (the step field)");
      if (t.step % 4 != 0) fail(r, "momentum init flag address is not 4-byte aligned");
      mask |= kPlanInitFlags;
    } else if (needs_step && (!t.step || (record_step_dtype(t) != kF32 && record_step_dtype(t) != kF64))) {
      fail(r, "missing float32/float64 step counter");
    }
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
  RelaxedCapture relaxed;
  auto* buffer = staging_pool().acquire(device, n, capturing);
  std::memcpy(buffer->host, host_src, n);
  check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(device_dst), buffer->host, n, cudaMemcpyHostToDevice, s),
             "cudaMemcpyAsync");
  if (!capturing) check_cuda(cudaEventRecord(buffer->done, s), "cudaEventRecord");
}

StagingCounters staging_counters() {
  std::lock_guard<std::mutex> lock(g_staging_mutex);
  const auto& pool = staging_pool();
  const auto c = pool.counters();
  StagingCounters out;
  out.buffers = c.buffers, out.bytes = c.bytes, out.captured = c.captured, out.captured_bytes = c.captured_bytes;
  out.allocations = c.allocations, out.frees = c.frees, out.waits = c.waits;
  out.max_buffers = static_cast<int64_t>(pool.max_buffers());
  out.max_bytes = static_cast<int64_t>(pool.max_bytes());
  return out;
}

std::pair<int64_t, int64_t> set_staging_limits(int64_t max_buffers, int64_t max_bytes) {
  if (max_buffers < 1 || max_bytes < 1) throw KernelError("staging limits must be >= 1");
  std::lock_guard<std::mutex> lock(g_staging_mutex);
  auto& pool = staging_pool();
  const std::pair<int64_t, int64_t> previous{static_cast<int64_t>(pool.max_buffers()),
                                             static_cast<int64_t>(pool.max_bytes())};
  pool.set_limits(static_cast<size_t>(max_buffers), static_cast<size_t>(max_bytes));
  return previous;
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

// ---- the driver/device check ----

int minimum_driver(int cuda_major) {
  switch (cuda_major) {
    case 11: return 450;
    case 12: return 525;
    case 13: return 580;
    default: return 0;
  }
}

namespace {

std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The first token of the form digits.digits[...] in the first line of /proc/driver/nvidia/version
// ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  ..."), "" when there is none.
std::string kernel_module_version() {
  std::ifstream in("/proc/driver/nvidia/version");
  std::string line, token;
  if (!std::getline(in, line)) return "";
  line += ' ';
  for (char ch : line) {
    if (!std::isspace(static_cast<unsigned char>(ch))) {
      token += ch;
      continue;
    }
    const bool numeric = !token.empty() && std::isdigit(static_cast<unsigned char>(token[0])) &&
                         token.find('.') != std::string::npos &&
                         token.find_first_not_of("0123456789.") == std::string::npos;
    if (numeric) return token;
    token.clear();
  }
  return "";
}

}  // namespace

std::string driver_problem(const DriverFacts& f, int device) {
  const int major = f.runtime_version / 1000;
  const int need = minimum_driver(major);
  const std::string built = "pyco's CUDA kernels were built with CUDA " + cuda_version_text(f.runtime_version) +
                            " and need " + (need ? "driver >= " + std::to_string(need)
                                                 : "a driver for CUDA " + std::to_string(major) + ".0 or newer");
  if (f.driver_version <= 0)
    return "pyco CUDA: no NVIDIA driver was found (cudaDriverGetVersion reports none); " + built +
           ": install the NVIDIA driver, or use torch.optim";
  const std::string driver = f.kernel_module.empty()
                                 ? "one for CUDA " + cuda_version_text(f.driver_version)
                                 : f.kernel_module + " (for CUDA " + cuda_version_text(f.driver_version) + ")";
  if (f.driver_version / 1000 < major)
    return "pyco CUDA: the NVIDIA driver is " + driver + "; " + built +
           ": update the driver, or rebuild pyco against the CUDA toolkit your driver supports "
           "(`CUDACXX=/path/to/that/nvcc pip install .`), or use torch.optim";
  if (f.device_count <= 0)
    return "pyco CUDA: the NVIDIA driver (" + driver + ") reports no CUDA device" +
           (f.count_error.empty() ? "" : " (cudaGetDeviceCount: " + f.count_error + ")") +
           "; check `nvidia-smi` and CUDA_VISIBLE_DEVICES";
  if (device < 0 || device >= f.device_count)
    return "pyco CUDA: CUDA device " + std::to_string(device) + " does not exist: the runtime sees " +
           std::to_string(f.device_count) + " device(s)";
  return "";
}

DriverFacts driver_facts() {
  DriverFacts f;
  if (cudaDriverGetVersion(&f.driver_version) != cudaSuccess) f.driver_version = 0;
  if (cudaRuntimeGetVersion(&f.runtime_version) != cudaSuccess) f.runtime_version = CUDART_VERSION;
  const cudaError_t err = cudaGetDeviceCount(&f.device_count);
  if (err != cudaSuccess) {
    f.device_count = 0;
    f.count_error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  cudaGetLastError();  // the answers are facts, not errors of a later call
  f.kernel_module = kernel_module_version();
  return f;
}

void check_device(int device, const std::string& architectures) {
  const std::string problem = driver_problem(driver_facts(), device);
  if (!problem.empty()) throw CudaError(problem);
  DeviceGuard guard(device);
  const cudaError_t image = kernel_image_status();
  if (image == cudaSuccess) return;
  cudaGetLastError();
  cudaDeviceProp prop{};
  std::string what = "device " + std::to_string(device), cc = "XY";
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    cc = std::to_string(prop.major) + std::to_string(prop.minor);
    what += std::string(" (") + prop.name + ", compute capability " + std::to_string(prop.major) + "." +
            std::to_string(prop.minor) + ")";
  }
  cudaGetLastError();
  throw CudaError("pyco CUDA: " + what + " cannot run pyco's kernels, built for CUDA architectures " +
                  architectures + ": " + cudaGetErrorName(image) + " (" + cudaGetErrorString(image) +
                  "); rebuild pyco for this GPU (`CUDAARCHS=" + cc + " pip install .`), or use torch.optim");
}

}  // namespace pyco::cuda
