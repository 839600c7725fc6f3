// CUDA runtime helpers of the host code (plain C++: included by host.cpp and by the .cu launchers).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "launch.h"

namespace pyco::cuda {

// Throws CudaError for a failed call. The runtime's last-error state is cleared first: a recoverable error
// (an invalid device ordinal, say) must not resurface in whatever CUDA call torch makes next.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw CudaError(std::string("pyco CUDA: ") + what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                  ")");
}

// cudaSuccess when the current device can run this build's kernels (loads one: a missing image for the
// device's architecture, or PTX newer than the driver, shows here). Defined in support.cu.
cudaError_t kernel_image_status();

// Makes `device` current for the calls of one scope and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace pyco::cuda
