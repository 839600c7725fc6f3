// A bounded pool of pinned host buffers for asynchronous host-to-device copies. Plain C++ without CUDA: a
// backend supplies the allocations and the events, so the host test (csrc/tests/test_cuda_rules.cu) drives
// the pool with a fake device; host.cpp instantiates it with the CUDA runtime.
//
// An upload takes the smallest idle buffer of its device that fits (idle: the event recorded after the last
// copy from it has completed), else a new one (a power of two >= 4 KiB). The pool holds at most max_buffers
// buffers and max_bytes bytes: before allocating past a limit it frees its least recently used idle buffers
// and, when every buffer is still being copied from, waits for the oldest copy: the only case in which the
// host waits for the device (more than max_buffers uploads in flight). An upload larger than max_bytes gets
// a buffer of its own, alone in the pool. A buffer filled while a graph is being captured is read at every
// replay: it leaves the pool and is never reused or freed (no event can tell when the graph is gone).
//
// Not thread-safe: the caller holds a lock from acquire() until the event is recorded.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace pyco::cuda {

// Backend: using Event = ...; void* allocate(size_t); void free(void*); Event create_event();
// void destroy_event(Event); bool done(Event) (an event never recorded is done); void wait(Event) (done after).
template <typename Backend>
class StagingPool {
 public:
  using Event = typename Backend::Event;

  struct Buffer {
    int device = 0;
    void* host = nullptr;
    size_t size = 0;
    Event done{};
    uint64_t last_use = 0;  // sequence number of the upload that last used it
  };

  struct Counters {
    int64_t buffers = 0, bytes = 0, captured = 0, captured_bytes = 0, allocations = 0, frees = 0, waits = 0;
  };

  StagingPool(Backend backend, size_t max_buffers, size_t max_bytes)
      : backend_(std::move(backend)), max_buffers_(max_buffers), max_bytes_(max_bytes) {}
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;
  // Buffers are not freed on destruction: the pool lives as long as the process (pinned memory is returned
  // by the driver at exit, when the CUDA runtime may already be gone).
  ~StagingPool() = default;

  Backend& backend() { return backend_; }

  // A buffer of >= n bytes on `device` that no copy reads. The caller fills it, enqueues the copy and, unless
  // `capturing` (the copy is part of a graph being captured), records the buffer's event after it.
  Buffer* acquire(int device, size_t n, bool capturing) {
    ++sequence_;
    if (capturing) {  // no event queries or frees inside a capture; the buffer never returns to the pool
      captured_.push_back(allocate(device, n));
      Buffer* b = captured_.back().get();
      counters_.captured += 1;
      counters_.captured_bytes += static_cast<int64_t>(b->size);
      return b;
    }
    trim();
    const size_t size = rounded(n);
    for (;;) {
      if (Buffer* b = idle_fit(device, n)) {
        b->last_use = sequence_;
        return b;
      }
      if (pool_.empty() || (pool_.size() + 1 <= max_buffers_ && bytes_ + size <= max_bytes_)) break;
      if (Buffer* victim = least_recent(true)) {
        release(victim);
        continue;
      }
      backend_.wait(least_recent(false)->done);  // every buffer in flight: the oldest copy finishes first
      counters_.waits += 1;
    }
    pool_.push_back(allocate(device, n));
    Buffer* b = pool_.back().get();
    bytes_ += b->size;
    b->last_use = sequence_;
    return b;
  }

  void set_limits(size_t max_buffers, size_t max_bytes) {
    max_buffers_ = max_buffers;
    max_bytes_ = max_bytes;
  }
  size_t max_buffers() const { return max_buffers_; }
  size_t max_bytes() const { return max_bytes_; }

  Counters counters() const {
    Counters c = counters_;
    c.buffers = static_cast<int64_t>(pool_.size());
    c.bytes = static_cast<int64_t>(bytes_);
    return c;
  }

  static size_t rounded(size_t n) {
    size_t size = 4096;
    while (size < n) size *= 2;
    return size;
  }

 private:
  std::unique_ptr<Buffer> allocate(int device, size_t n) {
    auto b = std::make_unique<Buffer>();
    b->device = device;
    b->size = rounded(n);
    b->host = backend_.allocate(b->size);
    try {
      b->done = backend_.create_event();
    } catch (...) {
      backend_.free(b->host);
      throw;
    }
    counters_.allocations += 1;
    return b;
  }

  void release(Buffer* victim) {
    for (size_t i = 0; i < pool_.size(); ++i) {
      if (pool_[i].get() != victim) continue;
      bytes_ -= victim->size;
      std::unique_ptr<Buffer> gone = std::move(pool_[i]);
      pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
      counters_.frees += 1;
      backend_.destroy_event(gone->done);
      backend_.free(gone->host);
      return;
    }
  }

  // Idle buffers beyond the limits (after set_limits lowered them) are freed; busy ones stay until later.
  void trim() {
    while (pool_.size() > max_buffers_ || bytes_ > max_bytes_) {
      Buffer* victim = least_recent(true);
      if (!victim) return;
      release(victim);
    }
  }

  Buffer* idle_fit(int device, size_t n) {
    Buffer* best = nullptr;
    for (const auto& b : pool_) {
      if (b->device == device && b->size >= n && (!best || b->size < best->size) && backend_.done(b->done))
        best = b.get();
    }
    return best;
  }

  // The least recently used buffer: among the idle ones (`idle`), or among all.
  Buffer* least_recent(bool idle) {
    Buffer* oldest = nullptr;
    for (const auto& b : pool_) {
      if ((!oldest || b->last_use < oldest->last_use) && (!idle || backend_.done(b->done))) oldest = b.get();
    }
    return oldest;
  }

  Backend backend_;
  size_t max_buffers_, max_bytes_;
  size_t bytes_ = 0;
  uint64_t sequence_ = 0;
  std::vector<std::unique_ptr<Buffer>> pool_;
  std::vector<std::unique_ptr<Buffer>> captured_;
  Counters counters_;
};

}  // namespace pyco::cuda
