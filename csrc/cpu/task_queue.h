// Work split for the CPU kernels: tasks handed out in order, one at a time, to whichever thread asks next.
//
// at::parallel_for gives each thread one fixed share. On these small machines one core is often slower than
// the other for a while (a neighbour's load, the interpreter's own thread), and a fixed split then leaves
// the faster core spinning at the end of every parallel region: 13% of the samples of a batch-8 stem conv
// were OpenMP barrier waits. Taking tasks from a shared counter lets the faster core do more of them.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace qkernels {

class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}

  // How many threads to start: no more than there are tasks.
  int64_t workers() const { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_)); }

  // The next task, or false when all are taken.
  bool next(int64_t& t) {
    t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < n_;
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> next_{0};
};

// f() on each of queue.workers() threads (each then takes tasks with queue.next until none is left).
template <class F>
void run_workers(TaskQueue& queue, const F& f) {
  at::parallel_for(0, queue.workers(), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) f();
  });
}

}  // namespace qkernels
