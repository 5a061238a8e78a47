// The emulator's scheduler and runtime: every CUDA thread of a block is a fiber with its own stack on
// one OS thread; a pass resumes every runnable thread once, in the launch's thread order, and each
// runs until it finishes or reaches a rendezvous (a block barrier or a warp intrinsic). A rendezvous
// completes when its last participant arrives; when nothing can run and a block still has live
// threads, that is a deadlock, reported with every waiting thread's file:line.
//
// Settings, read at every launch (so tests can change them between calls):
//   QK_EMU_ORDER         forward | reverse | random      thread and block order (default forward)
//   QK_EMU_SEED          seed of the random order (default 0); the order is reshuffled every pass
//   QK_EMU_SM_COUNT      multiprocessors the emulated device reports (default 132, an H100 SXM)
//   QK_EMU_STRICT        1 (default): reading a lane outside the mask or an exited lane, a barrier that
//                        exited threads can no longer reach, or a mask naming lanes that do not exist
//                        is a fault; 0: such reads return the caller's own value
//   QK_EMU_FRESH_BLOCKS  1: run every block on a new OS thread, so static __shared__ memory starts
//                        zeroed (0, the default: it holds what the previous block left, as on a GPU)
//   QK_EMU_WORKERS       OS threads running blocks in parallel (default 1)
//   QK_EMU_STACK_KB      stack per emulated thread (default 256)
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "qk_emu/control.h"

#if !defined(__x86_64__) || defined(QK_EMU_USE_UCONTEXT)
#include <ucontext.h>
#define QK_EMU_UCONTEXT 1
#endif

namespace qk_emu {

thread_local const ThreadIds* tls_ids = nullptr;

namespace {

// --- settings ---------------------------------------------------------------------------------------

enum class Order { kForward, kReverse, kRandom };

struct Config {
  Order order = Order::kForward;
  uint64_t seed = 0;
  int sm_count = 132;
  bool strict = true;
  bool fresh_blocks = false;
  int workers = 1;
  size_t stack_bytes = 256 * 1024;
};

long env_long(const char* name, long fallback, long lo, long hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  char* end = nullptr;
  const long r = std::strtol(v, &end, 10);
  if (*end != 0 || r < lo || r > hi)
    throw std::invalid_argument(std::string("qk_emu: ") + name + "=" + v + " is not an integer in [" +
                                std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return r;
}

Config read_config() {
  Config c;
  const char* order = std::getenv("QK_EMU_ORDER");
  if (order != nullptr && *order != 0) {
    const std::string o(order);
    if (o == "forward")
      c.order = Order::kForward;
    else if (o == "reverse")
      c.order = Order::kReverse;
    else if (o == "random")
      c.order = Order::kRandom;
    else
      throw std::invalid_argument("qk_emu: QK_EMU_ORDER must be forward, reverse or random, got " + o);
  }
  c.seed = (uint64_t)env_long("QK_EMU_SEED", 0, 0, 0x7fffffffffffffffL);
  c.sm_count = (int)env_long("QK_EMU_SM_COUNT", 132, 1, 1024);
  c.strict = env_long("QK_EMU_STRICT", 1, 0, 1) != 0;
  c.fresh_blocks = env_long("QK_EMU_FRESH_BLOCKS", 0, 0, 1) != 0;
  c.workers = (int)env_long("QK_EMU_WORKERS", 1, 1, 64);
  c.stack_bytes = (size_t)env_long("QK_EMU_STACK_KB", 256, 16, 1 << 16) * 1024;
  return c;
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

// --- the CUDA error state (per host thread, as in the runtime) ----------------------------------------

thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local std::string tls_last_detail;

void set_error(cudaError_t e, std::string detail) {
  tls_last_error = e;
  tls_last_detail = std::move(detail);
}

// --- statistics and the launch log (read by tests through control.h) -----------------------------------

std::mutex stats_mutex;
EmuStats stats;
std::vector<LaunchRecord> launch_log;
constexpr size_t kLaunchLogSize = 256;

// --- fibers ---------------------------------------------------------------------------------------------

#if defined(QK_EMU_UCONTEXT)
struct Context {
  ucontext_t uc;
};
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#else
// x86-64 System V: save the callee-saved registers on the current stack, swap stack pointers, restore.
extern "C" void qk_emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl qk_emu_switch_stack
  .hidden qk_emu_switch_stack
  .type qk_emu_switch_stack, @function
qk_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size qk_emu_switch_stack, .-qk_emu_switch_stack
)");
struct Context {
  void* sp = nullptr;
};
void context_switch(Context& from, Context& to) { qk_emu_switch_stack(&from.sp, to.sp); }
// A new fiber's stack holds six zeroed registers and `entry` as the return address, so the first
// switch to it "returns" into entry with the stack aligned as after a call.
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // entry's own return address: it never returns
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  c.sp = sp;
}
#endif

// An mmap'ed stack with a guard page below it, so an overflow faults instead of corrupting memory.
class Stack {
 public:
  explicit Stack(size_t bytes) : bytes_(bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    map_bytes_ = bytes + page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("qk_emu: cannot map a thread stack");
    mprotect(p, page, PROT_NONE);
    base_ = static_cast<char*>(p);
    page_ = page;
  }
  ~Stack() {
    if (base_) munmap(base_, map_bytes_);
  }
  Stack(Stack&& o) noexcept : base_(o.base_), bytes_(o.bytes_), map_bytes_(o.map_bytes_), page_(o.page_) {
    o.base_ = nullptr;
  }
  Stack(const Stack&) = delete;
  char* bottom() const { return base_ + page_; }
  size_t bytes() const { return bytes_; }

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0, map_bytes_ = 0, page_ = 0;
};

// --- blocks and their threads ---------------------------------------------------------------------------

enum class Status : uint8_t { kRunnable, kAtBarrier, kAtWarp, kDone };

struct EmuThread {
  ThreadIds ids;
  int linear = 0, warp = 0, lane = 0;
  Status status = Status::kRunnable;
  Context ctx;
  Site site{"", 0};  // where it waits
  int bar_kind = 0, bar_pred = 0;
  WarpRequest req{};
  uint64_t result = 0;
};

struct Run {
  LaunchSpec spec;
  Config cfg;
  void (*thread_main)(void*);
  void* closure;
};

struct Block {
  std::vector<EmuThread> threads;
  std::vector<int> order;
  int live = 0, at_barrier = 0, exited = 0;
  int bar_result = 0;
  std::vector<unsigned> warp_waiting, warp_done;  // per warp: lanes at a warp rendezvous / exited
  std::string fault;
  std::mt19937_64 rng;
};

struct Worker {
  Context scheduler;
  Block block;
  std::vector<Stack> stacks;
  std::vector<unsigned char> dynamic_shared;
  unsigned char* dynamic_base = nullptr;
  EmuThread* current = nullptr;
  const Run* run = nullptr;
  uint64_t switches = 0;
  long long clock = 0;
};

Worker& this_worker() {
  static thread_local Worker worker;
  return worker;
}

Worker& device_worker(const char* what) {
  Worker& w = this_worker();
  if (w.current == nullptr) outside_kernel(what);
  return w;
}

std::string thread_name(const EmuThread& t) {
  return format("thread (%u,%u,%u)", t.ids.thread_idx.x, t.ids.thread_idx.y, t.ids.thread_idx.z);
}

const char* warp_kind_name(int kind) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp",
                                "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_and_sync",
                                "__reduce_or_sync", "__reduce_xor_sync", "__match_any_sync", "__match_all_sync"};
  return kind >= 0 && kind < (int)(sizeof names / sizeof names[0]) ? names[kind] : "a warp intrinsic";
}

const char* barrier_kind_name(int kind) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
  return names[kind & 3];
}

// Marks the block faulted. The calling fiber must suspend right after; it is never resumed.
void set_fault(Worker& w, std::string message) {
  if (w.block.fault.empty()) w.block.fault = std::move(message);
}

void suspend(Worker& w) {
  EmuThread& me = *w.current;
  context_switch(me.ctx, w.scheduler);
}

void resume(Worker& w, EmuThread& t) {
  w.current = &t;
  tls_ids = &t.ids;
  ++w.switches;
  context_switch(w.scheduler, t.ctx);
  tls_ids = nullptr;
  w.current = nullptr;
}

// "threads 0-31, 64 wait at __syncthreads (fake_quant.cu:52)" for every distinct wait of the block.
std::string describe_waits(const Block& b) {
  std::map<std::string, std::vector<int>> groups;
  for (const EmuThread& t : b.threads) {
    std::string where;
    if (t.status == Status::kAtBarrier)
      where = format("%s (%s:%d)", barrier_kind_name(t.bar_kind), base_name(t.site.file), t.site.line);
    else if (t.status == Status::kAtWarp)
      where = format("%s with mask 0x%08x (%s:%d)", warp_kind_name(t.req.kind), t.req.mask, base_name(t.site.file),
                     t.site.line);
    else
      continue;
    groups[where].push_back(t.linear);
  }
  std::string out;
  for (const auto& g : groups) {
    std::string ids;
    const std::vector<int>& v = g.second;
    for (size_t i = 0; i < v.size();) {
      size_t j = i;
      while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
      if (!ids.empty()) ids += ",";
      ids += j == i ? std::to_string(v[i]) : std::to_string(v[i]) + "-" + std::to_string(v[j]);
      i = j + 1;
    }
    out += format("; threads %s wait at %s", ids.c_str(), g.first.c_str());
  }
  return out;
}

// Completes the block barrier when every live thread waits at one; checks that it is one barrier.
void try_release_barrier(Worker& w) {
  Block& b = w.block;
  if (b.at_barrier == 0 || b.at_barrier < b.live) return;
  const EmuThread* first = nullptr;
  int count = 0, all = 1, any = 0;
  for (const EmuThread& t : b.threads) {
    if (t.status != Status::kAtBarrier) continue;
    if (first == nullptr) {
      first = &t;
    } else if (t.site.line != first->site.line || std::strcmp(t.site.file, first->site.file) != 0 ||
               t.bar_kind != first->bar_kind) {
      set_fault(w, "deadlock: the threads of the block wait at different barriers" + describe_waits(b));
      return;
    }
    count += t.bar_pred;
    all &= t.bar_pred;
    any |= t.bar_pred;
  }
  if (w.run->cfg.strict && b.exited > 0) {
    set_fault(w, format("%d threads exited while the others wait at %s (%s:%d), which the whole block must reach "
                        "(strict mode)",
                        b.exited, barrier_kind_name(first->bar_kind), base_name(first->site.file), first->site.line));
    return;
  }
  const int kind = first->bar_kind;
  b.bar_result = kind == kBarCount ? count : (kind == kBarAnd ? all : (kind == kBarOr ? any : 0));
  for (EmuThread& t : b.threads)
    if (t.status == Status::kAtBarrier) t.status = Status::kRunnable;
  b.at_barrier = 0;
}

// The source lane of a shuffle, from the PTX ISA's shfl.sync semantics; -1 means "keep your own value".
int shuffle_source(int kind, int lane, int b, int width) {
  const int seg = (32 - width) & 31;  // c[12:8] as CUDA's __shfl_*_sync headers set it
  const int clamp = kind == kShflUp ? 0 : 31;
  const int bval = b & 31;
  const int min_lane = lane & seg, max_lane = min_lane | (clamp & ~seg);
  int j = lane;
  bool in_range = true;
  switch (kind) {
    case kShflUp:
      j = lane - bval;
      in_range = j >= max_lane;
      break;
    case kShflDown:
      j = lane + bval;
      in_range = j <= max_lane;
      break;
    case kShflXor:
      j = lane ^ bval;
      in_range = j <= max_lane;
      break;
    default:
      j = min_lane | (bval & ~seg);
      in_range = j <= max_lane;
  }
  return in_range ? j : -1;
}

bool values_equal(const WarpRequest& a, const WarpRequest& b) {
  const uint64_t m = a.size >= 8 ? ~0ull : ((1ull << (8 * a.size)) - 1);
  return (a.value & m) == (b.value & m);
}

// Completes the rendezvous that lane `l` of warp `warp` waits at, if every non-exited lane named in its
// mask has arrived (the PTX rule). Returns whether it completed (or faulted).
bool try_complete_warp_op(Worker& w, int warp, int l) {
  Block& b = w.block;
  const bool strict = w.run->cfg.strict;
  const int base = warp * 32, n = std::min<int>(32, (int)b.threads.size() - base);
  EmuThread& lead = b.threads[base + l];
  const unsigned mask = lead.req.mask;
  const unsigned waiting = b.warp_waiting[warp], done = b.warp_done[warp];
  if (mask & ~(waiting | done)) return false;  // some lane is still running or waits at a block barrier
  const unsigned group = mask & waiting;
  // every lane of the group must agree on the mask and the intrinsic
  for (int k = 0; k < n; ++k) {
    if (!(group & (1u << k))) continue;
    const EmuThread& t = b.threads[base + k];
    if (t.req.mask != mask) {
      set_fault(w, format("warp %d: lanes %d and %d call %s / %s with different masks 0x%08x and 0x%08x", warp, l, k,
                          warp_kind_name(lead.req.kind), warp_kind_name(t.req.kind), mask, t.req.mask) +
                       describe_waits(b));
      return true;
    }
    if (t.req.kind != lead.req.kind || (strict && lead.req.kind != kSyncWarp &&
                                        (t.site.line != lead.site.line || std::strcmp(t.site.file, lead.site.file)))) {
      set_fault(w, format("warp %d: the lanes of mask 0x%08x meet at different warp intrinsics", warp, mask) +
                       describe_waits(b));
      return true;
    }
  }
  const int kind = lead.req.kind;
  // group-wide values, computed once
  uint32_t sum = 0, all_and = 0xffffffffu, all_or = 0, all_xor = 0, lo = 0, hi = 0;
  unsigned ballot = 0;
  bool first = true, all_equal = true;
  for (int k = 0; k < n; ++k) {
    if (!(group & (1u << k))) continue;
    const WarpRequest& r = b.threads[base + k].req;
    const uint32_t v = (uint32_t)r.value;
    if (r.value) ballot |= 1u << k;
    sum += v, all_and &= v, all_or |= v, all_xor ^= v;
    if (first) {
      lo = hi = v;
      first = false;
    } else if (r.is_signed) {
      lo = (int32_t)v < (int32_t)lo ? v : lo;
      hi = (int32_t)v > (int32_t)hi ? v : hi;
    } else {
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    if (!values_equal(r, lead.req)) all_equal = false;
  }
  for (int k = 0; k < n; ++k) {
    if (!(group & (1u << k))) continue;
    EmuThread& t = b.threads[base + k];
    const WarpRequest& r = t.req;
    uint64_t result = 0;
    switch (kind) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor: {
        if (r.width < 1 || r.width > 32 || (r.width & (r.width - 1))) {
          set_fault(w, format("warp %d lane %d: %s width %d is not a power of two in [1, 32] (%s:%d)", warp, k,
                              warp_kind_name(kind), r.width, base_name(t.site.file), t.site.line));
          return true;
        }
        const int src = shuffle_source(kind, k, r.arg, r.width);
        if (src < 0 || src == k) {
          result = r.value;
        } else if (group & (1u << src)) {
          result = b.threads[base + src].req.value;
        } else if (strict) {
          set_fault(w, format("warp %d lane %d: %s reads lane %d, which is not an active lane of mask 0x%08x "
                              "(%s:%d; strict mode)",
                              warp, k, warp_kind_name(kind), src, mask, base_name(t.site.file), t.site.line));
          return true;
        } else {
          result = r.value;
        }
        break;
      }
      case kBallot: result = ballot; break;
      case kAny: result = ballot != 0; break;
      case kAll: result = ballot == group; break;
      case kSyncWarp: break;
      case kReduceAdd: result = sum; break;
      case kReduceMin: result = lo; break;
      case kReduceMax: result = hi; break;
      case kReduceAnd: result = all_and; break;
      case kReduceOr: result = all_or; break;
      case kReduceXor: result = all_xor; break;
      case kMatchAny: {
        unsigned same = 0;
        for (int q = 0; q < n; ++q)
          if ((group & (1u << q)) && values_equal(b.threads[base + q].req, r)) same |= 1u << q;
        result = same;
        break;
      }
      case kMatchAll: result = all_equal ? group : 0u; break;
      default:
        set_fault(w, format("unknown warp intrinsic %d", kind));
        return true;
    }
    t.result = result;
  }
  for (int k = 0; k < n; ++k)
    if (group & (1u << k)) b.threads[base + k].status = Status::kRunnable;
  b.warp_waiting[warp] &= ~group;
  return true;
}

// After a lane exits, rendezvous that only waited for it may complete.
void retry_warp_ops(Worker& w, int warp) {
  Block& b = w.block;
  bool progress = true;
  while (progress && b.fault.empty()) {
    progress = false;
    const unsigned waiting = b.warp_waiting[warp];
    for (int l = 0; l < 32; ++l)
      if ((waiting & (1u << l)) && try_complete_warp_op(w, warp, l)) {
        progress = true;
        break;
      }
  }
}

void thread_exit(Worker& w, EmuThread& t) {
  Block& b = w.block;
  t.status = Status::kDone;
  --b.live;
  ++b.exited;
  b.warp_done[t.warp] |= 1u << t.lane;
  try_release_barrier(w);
  retry_warp_ops(w, t.warp);
}

void fiber_main() {
  Worker& w = this_worker();
  EmuThread& t = *w.current;
  try {
    w.run->thread_main(w.run->closure);
  } catch (const std::exception& e) {
    set_fault(w, thread_name(t) + " threw: " + e.what());
  } catch (...) {
    set_fault(w, thread_name(t) + " threw a non-standard exception");
  }
  thread_exit(w, t);
  suspend(w);
  std::abort();  // a finished thread is never resumed
}

void run_block(Worker& w, const Run& run, uint3 block_idx, uint64_t block_linear) {
  const dim3 bd = run.spec.block;
  const int nthreads = (int)(bd.x * bd.y * bd.z);
  Block& b = w.block;
  if (!w.stacks.empty() && w.stacks.front().bytes() != run.cfg.stack_bytes) w.stacks.clear();
  while ((int)w.stacks.size() < nthreads) w.stacks.emplace_back(run.cfg.stack_bytes);
  // dynamic shared memory: 128-byte aligned, and filled with 0xff so reads before writes show up
  w.dynamic_shared.resize(run.spec.shared_bytes + 128);
  w.dynamic_base =
      reinterpret_cast<unsigned char*>(((uintptr_t)w.dynamic_shared.data() + 127) & ~(uintptr_t)127);
  std::memset(w.dynamic_base, 0xff, run.spec.shared_bytes);

  b.threads.assign(nthreads, EmuThread());
  for (int t = 0; t < nthreads; ++t) {
    EmuThread& th = b.threads[t];
    th.linear = t;
    th.warp = t / 32;
    th.lane = t % 32;
    th.ids.thread_idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    th.ids.block_idx = block_idx;
    th.ids.block_dim = bd;
    th.ids.grid_dim = run.spec.grid;
    context_init(th.ctx, w.stacks[t].bottom(), w.stacks[t].bytes(), &fiber_main);
  }
  b.order.resize(nthreads);
  for (int t = 0; t < nthreads; ++t) b.order[t] = run.cfg.order == Order::kReverse ? nthreads - 1 - t : t;
  b.rng.seed(run.cfg.seed * 0x9e3779b97f4a7c15ull + block_linear);
  b.live = nthreads;
  b.at_barrier = b.exited = b.bar_result = 0;
  b.warp_waiting.assign((nthreads + 31) / 32, 0u);
  b.warp_done.assign((nthreads + 31) / 32, 0u);
  b.fault.clear();
  w.run = &run;
  while (b.live > 0 && b.fault.empty()) {
    if (run.cfg.order == Order::kRandom) std::shuffle(b.order.begin(), b.order.end(), b.rng);
    bool ran = false;
    for (int t : b.order) {
      EmuThread& th = b.threads[t];
      if (th.status != Status::kRunnable) continue;
      resume(w, th);
      ran = true;
      if (!b.fault.empty()) break;
    }
    if (!ran && b.fault.empty()) b.fault = "deadlock: no thread can run" + describe_waits(b);
  }
  w.run = nullptr;
}

std::string fault_message(const Run& run, uint3 block, const std::string& fault) {
  return format("qk_emu: kernel %s launched at %s:%d, block (%u,%u,%u): ", run.spec.kernel, base_name(run.spec.file),
                run.spec.line, block.x, block.y, block.z) +
         fault;
}

// The checks a real launch makes before running anything; the error codes are the runtime's.
cudaError_t check_launch(const LaunchSpec& s, size_t dynamic_limit, std::string* why) {
  const dim3 g = s.grid, b = s.block;
  const uint64_t threads = (uint64_t)b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
    *why = format("grid (%u,%u,%u) or block (%u,%u,%u) has a zero dimension", g.x, g.y, g.z, b.x, b.y, b.z);
    return cudaErrorInvalidConfiguration;
  }
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) {
    *why = format("block (%u,%u,%u) has %llu threads; at most 1024 (and x, y <= 1024, z <= 64)", b.x, b.y, b.z,
                  (unsigned long long)threads);
    return cudaErrorInvalidConfiguration;
  }
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    *why = format("grid (%u,%u,%u) exceeds (2^31-1, 65535, 65535)", g.x, g.y, g.z);
    return cudaErrorInvalidConfiguration;
  }
  if (s.shared_bytes > dynamic_limit) {
    *why = format("%zu bytes of dynamic shared memory requested; the limit for this kernel is %zu", s.shared_bytes,
                  dynamic_limit);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr int kMaxDynamicShared = 227 * 1024;  // H100/H200 opt-in limit per block

std::mutex attr_mutex;
std::map<const void*, int> dynamic_shared_limit;

size_t kernel_dynamic_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(attr_mutex);
  auto it = dynamic_shared_limit.find(kernel);
  return it == dynamic_shared_limit.end() ? kDefaultDynamicShared : (size_t)it->second;
}

// Devices are told apart by their SM count, so a cache keyed by device index (as in a real extension)
// never serves one QK_EMU_SM_COUNT's properties to another: cudaGetDevice returns the index of the
// current SM count in the order first seen.
std::mutex device_mutex;
std::vector<int> device_sm_counts;

int device_for_sm_count(int sms) {
  std::lock_guard<std::mutex> lock(device_mutex);
  for (size_t i = 0; i < device_sm_counts.size(); ++i)
    if (device_sm_counts[i] == sms) return (int)i;
  device_sm_counts.push_back(sms);
  return (int)device_sm_counts.size() - 1;
}

int current_sm_count() { return (int)env_long("QK_EMU_SM_COUNT", 132, 1, 1024); }

// -1 for an index never returned by cudaGetDevice.
int sm_count_of_device(int device) {
  std::lock_guard<std::mutex> lock(device_mutex);
  if (device_sm_counts.empty()) device_sm_counts.push_back(current_sm_count());
  return device >= 0 && device < (int)device_sm_counts.size() ? device_sm_counts[device] : -1;
}

}  // namespace

// --- device-side entry points (device.h) ------------------------------------------------------------------

void outside_kernel(const char* what) {
  throw std::logic_error(std::string("qk_emu: ") + what + " used outside a kernel");
}

int block_barrier(Site site, int kind, int predicate) {
  Worker& w = device_worker("__syncthreads");
  EmuThread& me = *w.current;
  me.status = Status::kAtBarrier;
  me.site = site;
  me.bar_kind = kind;
  me.bar_pred = predicate != 0;
  ++w.block.at_barrier;
  try_release_barrier(w);
  suspend(w);
  return w.block.bar_result;
}

uint64_t warp_collective(const WarpRequest& request) {
  Worker& w = device_worker(warp_kind_name(request.kind));
  EmuThread& me = *w.current;
  Block& b = w.block;
  me.req = request;
  me.site = request.site;
  const int n = std::min<int>(32, (int)b.threads.size() - me.warp * 32);
  const unsigned exists = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  if (!(request.mask & (1u << me.lane))) {
    if (w.run->cfg.strict) {
      set_fault(w, format("%s calls %s with mask 0x%08x, which does not include its own lane %d (%s:%d)",
                          thread_name(me).c_str(), warp_kind_name(request.kind), request.mask, me.lane,
                          base_name(request.site.file), request.site.line));
      suspend(w);
    }
    me.req.mask |= 1u << me.lane;
  }
  if (request.mask & ~exists) {
    if (w.run->cfg.strict) {
      set_fault(w, format("%s calls %s with mask 0x%08x, naming lanes that do not exist (the warp has %d lanes; "
                          "%s:%d; strict mode)",
                          thread_name(me).c_str(), warp_kind_name(request.kind), request.mask, n,
                          base_name(request.site.file), request.site.line));
      suspend(w);
    }
    me.req.mask &= exists;
  }
  me.status = Status::kAtWarp;
  b.warp_waiting[me.warp] |= 1u << me.lane;
  try_complete_warp_op(w, me.warp, me.lane);
  suspend(w);
  return me.result;
}

unsigned active_mask() {
  Worker& w = device_worker("__activemask");
  const EmuThread& me = *w.current;
  const Block& b = w.block;
  unsigned m = 0;
  const int base = me.warp * 32, n = std::min<int>(32, (int)b.threads.size() - base);
  for (int k = 0; k < n; ++k)
    if (b.threads[base + k].status != Status::kDone) m |= 1u << k;
  return m;
}

void* dynamic_shared_memory() { return device_worker("extern __shared__").dynamic_base; }

void device_trap(Site site, const char* what) {
  Worker& w = device_worker(what);
  set_fault(w, format("%s executed %s (%s:%d)", thread_name(*w.current).c_str(), what, base_name(site.file), site.line));
  suspend(w);
  std::abort();
}

long long device_clock() { return ++device_worker("clock64").clock; }

// --- launches ------------------------------------------------------------------------------------------

void run_grid(const LaunchSpec& spec, void (*thread_main)(void*), void* closure) {
  if (tls_ids != nullptr) throw std::logic_error("qk_emu: a kernel launched another kernel (dynamic parallelism is not emulated)");
  Run run{spec, read_config(), thread_main, closure};
  std::string why;
  const cudaError_t err = check_launch(spec, kernel_dynamic_limit(spec.address), &why);
  {
    std::lock_guard<std::mutex> lock(stats_mutex);
    LaunchRecord rec{spec.kernel, spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y, spec.block.z,
                     spec.shared_bytes, err};
    if (launch_log.size() >= kLaunchLogSize) launch_log.erase(launch_log.begin());
    launch_log.push_back(rec);
    ++stats.launches;
  }
  if (err != cudaSuccess) {
    set_error(err, format("kernel %s launched at %s:%d: %s", spec.kernel, base_name(spec.file), spec.line, why.c_str()));
    return;
  }
  const dim3 g = spec.grid;
  const uint64_t nblocks = (uint64_t)g.x * g.y * g.z;
  if (nblocks > (1ull << 26))
    throw std::runtime_error(format("qk_emu: kernel %s launched at %s:%d with %llu blocks: too many to emulate",
                                    spec.kernel, base_name(spec.file), spec.line, (unsigned long long)nblocks));
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = run.cfg.order == Order::kReverse ? nblocks - 1 - i : i;
  if (run.cfg.order == Order::kRandom) {
    std::mt19937_64 rng(run.cfg.seed ^ 0x5bd1e995u);
    std::shuffle(order.begin(), order.end(), rng);
  }
  auto block_of = [&](uint64_t i) { return uint3{(unsigned)(i % g.x), (unsigned)((i / g.x) % g.y), (unsigned)(i / ((uint64_t)g.x * g.y))}; };

  std::mutex fault_mutex;
  std::string first_fault;
  std::atomic<uint64_t> next{0};
  uint64_t switches = 0;
  auto work = [&]() {
    Worker& w = this_worker();
    const uint64_t before = w.switches;
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(fault_mutex);
        if (!first_fault.empty()) break;
      }
      const uint64_t i = next.fetch_add(1);
      if (i >= nblocks) break;
      const uint3 bid = block_of(order[i]);
      run_block(w, run, bid, order[i]);
      if (!w.block.fault.empty()) {
        std::lock_guard<std::mutex> lock(fault_mutex);
        if (first_fault.empty()) first_fault = fault_message(run, bid, w.block.fault);
      }
      if (run.cfg.fresh_blocks) break;
    }
    std::lock_guard<std::mutex> lock(fault_mutex);
    switches += w.switches - before;
  };
  if (run.cfg.fresh_blocks) {
    // a new OS thread per block: its thread_local (static __shared__) memory starts zeroed
    while (next.load() < nblocks) {
      std::thread t(work);
      t.join();
      std::lock_guard<std::mutex> lock(fault_mutex);
      if (!first_fault.empty()) break;
    }
  } else if (run.cfg.workers <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < run.cfg.workers; ++i) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  {
    std::lock_guard<std::mutex> lock(stats_mutex);
    stats.blocks += nblocks;
    stats.threads += nblocks * spec.block.x * spec.block.y * spec.block.z;
    stats.switches += switches;
  }
  if (!first_fault.empty()) throw std::runtime_error(first_fault);
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > kMaxDynamicShared) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(attr_mutex);
    dynamic_shared_limit[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return cudaErrorInvalidValue;
}

cudaError_t occupancy_blocks_per_sm(int* blocks, const void*, int block_size, size_t dynamic_smem) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  int by_threads = 2048 / block_size;
  int by_smem = dynamic_smem == 0 ? 32 : (int)((228 * 1024) / (dynamic_smem + 1024));
  *blocks = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}

std::string last_error_detail() {
  return tls_last_detail.empty() ? std::string() : " [qk_emu: " + tls_last_detail + "]";
}

// --- control.h -----------------------------------------------------------------------------------------

EmuStats read_stats() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return stats;
}

std::vector<LaunchRecord> read_launch_log() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return launch_log;
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  stats = EmuStats();
  launch_log.clear();
}

}  // namespace qk_emu

// --- host runtime API (runtime_api.h) -----------------------------------------------------------------

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = qk_emu::tls_last_error;
  qk_emu::tls_last_error = cudaSuccess;
  if (e == cudaSuccess) qk_emu::tls_last_detail.clear();
  return e;
}

cudaError_t cudaPeekAtLastError() { return qk_emu::tls_last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = qk_emu::device_for_sm_count(qk_emu::current_sm_count());
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return qk_emu::sm_count_of_device(device) > 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (qk_emu::sm_count_of_device(device) < 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = qk_emu::sm_count_of_device(device); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimZ: *value = 64; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = qk_emu::kDefaultDynamicShared; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = qk_emu::kMaxDynamicShared; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; return cudaSuccess;
    case cudaDevAttrClockRate: *value = 1980000; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (qk_emu::sm_count_of_device(device) < 0) return cudaErrorInvalidDevice;
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "qk_emu (emulated sm_90, %d SMs)", qk_emu::sm_count_of_device(device));
  p->totalGlobalMem = (size_t)80 << 30;
  p->sharedMemPerBlock = qk_emu::kDefaultDynamicShared;
  p->sharedMemPerBlockOptin = qk_emu::kMaxDynamicShared;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = p->maxGridSize[2] = 65535;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = qk_emu::sm_count_of_device(device);
  p->l2CacheSize = 50 * 1024 * 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count && ptr == nullptr) return cudaErrorInvalidValue;
  if (count) std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t count) { return cudaMemsetAsync(ptr, value, count, nullptr); }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  if (count && (dst == nullptr || src == nullptr)) return cudaErrorInvalidValue;
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}
