// The threads inside our ops: a small pool that the calling thread joins (qmm.cpp, attend.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <sched.h>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mixtral_kernels {

// A fixed set of workers that the caller joins: run(n, f) calls f(0..n-1) on n threads and returns
// when all are done. A second caller at once (another MLX stream) runs its work on its own thread.
// Between jobs a worker spins for SPIN before it sleeps: the projections of a decode step come tens
// of microseconds apart, and waking a sleeping thread costs about that much (a futex, and on a VM an
// interrupt to an idle vCPU): measured 50 us per projection of 512 x 1024 before, more than its work.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int size = 1;

  void run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (n <= 1 || !busy.owns_lock()) {
      for (int i = 0; i < n; ++i)
        f(i);
      return;
    }
    grow(n - 1);
    job_ = &f;
    active_ = n - 1;
    pending_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(m_); // a worker going to sleep sees the new job, or is woken
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    f(0);
    // Waiting for the others: a worker the OS paused may be waiting for this core, so give it up now
    // and then rather than spin through the worker's time slice.
    for (int i = 1; pending_.load(std::memory_order_acquire) != 0; ++i)
      i % 1024 ? pause() : std::this_thread::yield();
    job_ = nullptr;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_)
      t.join();
  }

 private:
  static constexpr auto SPIN = std::chrono::microseconds(200);

  Pool() {
    cpu_set_t set;
    size = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    size = std::max(1, std::min(size, 64));
  }

  static inline void pause() {
#if defined(__AVX2__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
  }

  void grow(int n) {
    while ((int)workers_.size() < n) {
      int id = workers_.size() + 1;
      workers_.emplace_back([this, id] { work(id); });
    }
  }

  // The next job's generation, spinning for SPIN, then asleep until one comes.
  long next(long seen) {
    auto until = std::chrono::steady_clock::now() + SPIN;
    for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
      pause();
      if (i % 256 != 255)
        continue;
      if (std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      } else {
        std::this_thread::yield(); // a thread that waits for a core (Python building the next step) gets it
      }
    }
    return generation_.load(std::memory_order_acquire);
  }

  void work(int id) {
    long seen = 0;
    while (true) {
      seen = next(seen);
      if (stop_)
        return;
      if (id > active_)
        continue;
      (*job_)(id);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_, busy_;
  std::condition_variable wake_;
  const std::function<void(int)>* volatile job_ = nullptr;
  std::atomic<long> generation_{0};
  std::atomic<int> pending_{0};
  volatile int active_ = 0;
  volatile bool stop_ = false;
};

} // namespace mixtral_kernels
