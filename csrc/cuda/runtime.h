// CUDA runtime helpers of the host code (plain C++: included by host.cpp and by the .cu launchers).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../common.h"

namespace pyco::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw KernelError(std::string("pyco CUDA: ") + what + ": " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
}

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
