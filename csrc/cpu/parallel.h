// A team of threads that runs one function to the end, with a barrier the function calls between
// the phases of a time step. The LSTM recurrences need a barrier per step (every row's new h is
// read by every tile of the next step): one team per call and a spinning barrier cost about a
// microsecond a step, where a pool handing out one task per step costs tens.
//
// The team is OpenMP's where the module is built with it: the module then shares PyTorch's
// libgomp (same soname, loaded first by `import torch`) and so its worker threads. A team of our
// own threads would fight those workers for the cores while they spin after each PyTorch op
// (libgomp's default wait policy): measured 1.5x slower end to end on 2 cores.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mtlfast {
namespace cpu {

class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}

  void wait() {
    if (parties_ == 1) return;
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    // Spin briefly, then yield: with more threads than free cores a pure spin would starve the
    // thread everyone is waiting for.
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int parties_;
  std::atomic<int> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// Runs body(thread_index, team_size, barrier) on up to `threads` threads (the caller is thread 0)
// and joins them; team_size is the number actually running.
inline void run_team(int threads, const std::function<void(int, int, SpinBarrier&)>& body) {
  if (threads < 1) threads = 1;
#ifdef _OPENMP
  if (threads > 1) {
    // OpenMP may give fewer threads than asked for (nested regions, limits): size the barrier by
    // the team actually running.
    SpinBarrier* shared = nullptr;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      shared = new SpinBarrier(omp_get_num_threads());
      // the single's implicit barrier publishes `shared`
      body(omp_get_thread_num(), omp_get_num_threads(), *shared);
    }
    delete shared;
    return;
  }
#endif
  SpinBarrier barrier(threads);
  std::vector<std::thread> team;
  team.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) team.emplace_back([&body, &barrier, t, threads] { body(t, threads, barrier); });
  body(0, threads, barrier);
  for (auto& thread : team) thread.join();
}

// Never more threads than work items, and at least one.
inline int team_size(int threads, int64_t items) {
  return static_cast<int>(items < threads ? (items > 1 ? items : 1) : threads);
}

// [begin, end) of `items` for thread `t` of `threads`, contiguous and balanced to within one.
inline void split(int64_t items, int t, int threads, int64_t* begin, int64_t* end) {
  *begin = items * t / threads;
  *end = items * (t + 1) / threads;
}

}  // namespace cpu
}  // namespace mtlfast
