#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyco::cpu {
namespace {

class Pool {
 public:
  // Runs one job on `helpers` workers plus the caller. Returns false (nothing run) if busy.
  bool run(int64_t count, int helpers, void (*fn)(void*, int64_t), void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      count_ = count;
      next_.store(0);
      wanted_ = helpers;
      active_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return active_ == 0; });
    return true;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void work() {
    for (int64_t c = next_.fetch_add(1); c < count_; c = next_.fetch_add(1)) fn_(ctx_, c);
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (id >= wanted_) continue;  // this job asked for fewer helpers
      }
      work();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::mutex busy_;   // one job at a time
  std::mutex mutex_;  // guards the job description and the counters below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  int wanted_ = 0, active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool* g_pool = nullptr;
std::once_flag g_atfork;

Pool& pool() {
  std::call_once(g_atfork, [] {
    // A forked child has none of the parent's workers (and maybe a locked mutex): it gets a new pool.
    // The old one is leaked on purpose; destroying it would join threads that do not exist.
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
  });
  if (!g_pool) g_pool = new Pool();  // never destroyed: workers may outlive static destruction order
  return *g_pool;
}

}  // namespace

void run_parallel(int64_t count, int threads, void (*fn)(void*, int64_t), void* ctx) {
  const int helpers = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(threads, count) - 1));
  if (helpers == 0 || !pool().run(count, helpers, fn, ctx)) {
    for (int64_t c = 0; c < count; ++c) fn(ctx, c);
  }
}

}  // namespace pyco::cpu
