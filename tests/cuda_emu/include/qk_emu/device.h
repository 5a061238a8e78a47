// Device-side CUDA for the emulator: the thread/block coordinates, barriers, warp intrinsics, atomics
// and the integer/float intrinsics our kernels use. Barriers and warp intrinsics are rendezvous points
// implemented by the scheduler in src/runtime.cpp (each CUDA thread is a fiber; a warp intrinsic
// completes when every lane named in its mask has arrived).
#pragma once
#include <math.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <type_traits>

#include "half.h"
#include "types.h"

constexpr int warpSize = 32;

namespace qk_emu {

struct Site {
  const char* file;
  int line;
};

struct ThreadIds {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The coordinates of the CUDA thread running on this OS thread (nullptr outside a kernel).
extern thread_local const ThreadIds* tls_ids;
[[noreturn]] void outside_kernel(const char* what);
inline const ThreadIds& ids() {
  const ThreadIds* p = tls_ids;
  if (p == nullptr) outside_kernel("threadIdx/blockIdx/blockDim/gridDim");
  return *p;
}

enum BarrierKind : int { kBarSync = 0, kBarCount = 1, kBarAnd = 2, kBarOr = 3 };
int block_barrier(Site site, int kind, int predicate);

enum WarpKind : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kReduceAdd, kReduceMin, kReduceMax, kReduceAnd, kReduceOr, kReduceXor, kMatchAny, kMatchAll
};
struct WarpRequest {
  int kind;
  unsigned mask;
  uint64_t value;  // the lane's operand, raw bits
  int arg;         // source lane, delta or lane mask (shuffles)
  int width;       // shuffles
  int size;        // operand bytes
  bool is_signed;  // reductions
  Site site;
};
uint64_t warp_collective(const WarpRequest& request);
unsigned active_mask();
void* dynamic_shared_memory();
[[noreturn]] void device_trap(Site site, const char* what);
long long device_clock();

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "qk_emu: warp operands are up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
T shuffle(Site s, int kind, unsigned mask, T var, int arg, int width) {
  return from_bits<T>(warp_collective(WarpRequest{kind, mask, to_bits(var), arg, width, (int)sizeof(T), false, s}));
}
template <class T>
T shfl_idx(Site s, unsigned mask, T var, int src_lane, int width = warpSize) {
  return shuffle(s, kShflIdx, mask, var, src_lane, width);
}
template <class T>
T shfl_up(Site s, unsigned mask, T var, unsigned delta, int width = warpSize) {
  return shuffle(s, kShflUp, mask, var, (int)delta, width);
}
template <class T>
T shfl_down(Site s, unsigned mask, T var, unsigned delta, int width = warpSize) {
  return shuffle(s, kShflDown, mask, var, (int)delta, width);
}
template <class T>
T shfl_xor(Site s, unsigned mask, T var, int lane_mask, int width = warpSize) {
  return shuffle(s, kShflXor, mask, var, lane_mask, width);
}
inline unsigned vote(Site s, int kind, unsigned mask, int predicate) {
  return (unsigned)warp_collective(WarpRequest{kind, mask, (uint64_t)(predicate != 0), 0, warpSize, 4, false, s});
}
inline void syncwarp(Site s, unsigned mask = 0xffffffffu) {
  warp_collective(WarpRequest{kSyncWarp, mask, 0, 0, warpSize, 4, false, s});
}
template <class T>
T reduce(Site s, int kind, unsigned mask, T v) {
  static_assert(sizeof(T) == 4 && std::is_integral<T>::value, "qk_emu: __reduce_*_sync takes 32-bit integers");
  return from_bits<T>(warp_collective(WarpRequest{kind, mask, to_bits(v), 0, warpSize, 4, std::is_signed<T>::value, s}));
}
template <class T>
unsigned match_any(Site s, unsigned mask, T v) {
  return (unsigned)warp_collective(WarpRequest{kMatchAny, mask, to_bits(v), 0, warpSize, (int)sizeof(T), false, s});
}
template <class T>
unsigned match_all(Site s, unsigned mask, T v, int* pred) {
  const unsigned r =
      (unsigned)warp_collective(WarpRequest{kMatchAll, mask, to_bits(v), 0, warpSize, (int)sizeof(T), false, s});
  *pred = r != 0;
  return r;
}

template <class T>
T atomic_cas_loop_float(T* address, T val, int op) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* p = reinterpret_cast<Bits*>(address);
  Bits old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  for (;;) {
    const T cur = from_bits<T>(old);
    const T next = op == 0 ? (T)(cur + val) : val;
    Bits want;
    std::memcpy(&want, &next, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return cur;
  }
}

template <class T>
T atomic_minmax(T* address, T val, bool is_max) {
  T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  for (;;) {
    const T next = is_max ? (old < val ? val : old) : (val < old ? val : old);
    if (__atomic_compare_exchange_n(address, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}

// float -> integer conversions saturate and send NaN to 0, as cvt.*.s32.f32 does on the device
template <class I>
I float_to_int_sat(float rounded) {
  if (rounded != rounded) return 0;
  if (rounded >= (float)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
  if (rounded <= (float)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
  return (I)rounded;
}

// Keeps a product from being contracted into a following add: the __fmul_rn family must round alone.
inline float rounded(float v) {
  asm volatile("" : "+x"(v));
  return v;
}

}  // namespace qk_emu

#define QK_EMU_SITE (::qk_emu::Site{__FILE__, __LINE__})

#define threadIdx (::qk_emu::ids().thread_idx)
#define blockIdx (::qk_emu::ids().block_idx)
#define blockDim (::qk_emu::ids().block_dim)
#define gridDim (::qk_emu::ids().grid_dim)

#define __syncthreads() ((void)::qk_emu::block_barrier(QK_EMU_SITE, ::qk_emu::kBarSync, 0))
#define __syncthreads_count(p) ::qk_emu::block_barrier(QK_EMU_SITE, ::qk_emu::kBarCount, (p) ? 1 : 0)
#define __syncthreads_and(p) ::qk_emu::block_barrier(QK_EMU_SITE, ::qk_emu::kBarAnd, (p) ? 1 : 0)
#define __syncthreads_or(p) ::qk_emu::block_barrier(QK_EMU_SITE, ::qk_emu::kBarOr, (p) ? 1 : 0)
#define __syncwarp(...) ::qk_emu::syncwarp(QK_EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::qk_emu::shfl_idx(QK_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::qk_emu::shfl_up(QK_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::qk_emu::shfl_down(QK_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::qk_emu::shfl_xor(QK_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, p) ::qk_emu::vote(QK_EMU_SITE, ::qk_emu::kBallot, (mask), (p) ? 1 : 0)
#define __any_sync(mask, p) ((int)::qk_emu::vote(QK_EMU_SITE, ::qk_emu::kAny, (mask), (p) ? 1 : 0))
#define __all_sync(mask, p) ((int)::qk_emu::vote(QK_EMU_SITE, ::qk_emu::kAll, (mask), (p) ? 1 : 0))
#define __activemask() ::qk_emu::active_mask()
#define __reduce_add_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceAdd, (mask), (v))
#define __reduce_min_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceMin, (mask), (v))
#define __reduce_max_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceMax, (mask), (v))
#define __reduce_and_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceAnd, (mask), (v))
#define __reduce_or_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceOr, (mask), (v))
#define __reduce_xor_sync(mask, v) ::qk_emu::reduce(QK_EMU_SITE, ::qk_emu::kReduceXor, (mask), (v))
#define __match_any_sync(mask, v) ::qk_emu::match_any(QK_EMU_SITE, (mask), (v))
#define __match_all_sync(mask, v, pred) ::qk_emu::match_all(QK_EMU_SITE, (mask), (v), (pred))
#define __trap() ::qk_emu::device_trap(QK_EMU_SITE, "__trap()")
#define __brkpt() ::qk_emu::device_trap(QK_EMU_SITE, "__brkpt()")

// --- memory fences, cache hints, clocks -------------------------------------------------------------
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline long long clock64() { return ::qk_emu::device_clock(); }
inline void __nanosleep(unsigned) {}

// --- atomics ------------------------------------------------------------------------------------------
#define QK_EMU_ATOMIC_INT(T)                                                                       \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }           \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }           \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }         \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }           \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }             \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }           \
  inline T atomicMax(T* a, T v) { return ::qk_emu::atomic_minmax(a, v, true); }                  \
  inline T atomicMin(T* a, T v) { return ::qk_emu::atomic_minmax(a, v, false); }                 \
  inline T atomicCAS(T* a, T compare, T v) {                                                     \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
    return compare;                                                                              \
  }
QK_EMU_ATOMIC_INT(int)
QK_EMU_ATOMIC_INT(unsigned int)
QK_EMU_ATOMIC_INT(unsigned long long)
QK_EMU_ATOMIC_INT(long long)
#undef QK_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline float atomicAdd(float* a, float v) { return ::qk_emu::atomic_cas_loop_float(a, v, 0); }
inline double atomicAdd(double* a, double v) { return ::qk_emu::atomic_cas_loop_float(a, v, 0); }
inline float atomicExch(float* a, float v) { return ::qk_emu::atomic_cas_loop_float(a, v, 1); }
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(a, &old, old >= limit ? 0u : old + 1u, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(a, &old, (old == 0u || old > limit) ? limit : old - 1u, false,
                                      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicExch_block atomicExch
#define atomicCAS_block atomicCAS

// --- bit casts, integer intrinsics --------------------------------------------------------------------
inline unsigned __float_as_uint(float f) { return ::qk_emu::from_bits<unsigned>(::qk_emu::to_bits(f)); }
inline int __float_as_int(float f) { return ::qk_emu::from_bits<int>(::qk_emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::qk_emu::from_bits<float>(u); }
inline float __int_as_float(int i) { return ::qk_emu::from_bits<float>((uint32_t)i); }
inline long long __double_as_longlong(double d) { return ::qk_emu::from_bits<long long>(::qk_emu::to_bits(d)); }
inline double __longlong_as_double(long long l) { return ::qk_emu::from_bits<double>((uint64_t)l); }

// Sum of the four signed (or unsigned) byte products, plus c, wrapping like the hardware.
inline int __dp4a(int a, int b, int c) {
  int32_t s = c;
  for (int i = 0; i < 4; ++i) s = (int32_t)((uint32_t)s + (uint32_t)((int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i))));
  return s;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  uint32_t s = c;
  for (int i = 0; i < 4; ++i) s += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return s;
}
inline int __dp4a(char4 a, char4 b, int c) {
  return __dp4a(::qk_emu::from_bits<int>(::qk_emu::to_bits(a)), ::qk_emu::from_bits<int>(::qk_emu::to_bits(b)), c);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = ((uint64_t)hi << 32) | lo;
  return (unsigned)((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = ((uint64_t)hi << 32) | lo;
  return (unsigned)(v >> (shift & 31u));
}
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// --- float intrinsics ----------------------------------------------------------------------------------
// The _rn forms round once each (never contracted with a neighbour). The approximate intrinsics
// (__fdividef, __expf, ...) are exact here: kernels that must match the CPU bit for bit avoid them.
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return ::qk_emu::rounded(a * b); }
inline float __fadd_rn(float a, float b) { return ::qk_emu::rounded(a + b); }
inline float __fsub_rn(float a, float b) { return ::qk_emu::rounded(a - b); }
inline float __fdiv_rn(float a, float b) { return ::qk_emu::rounded(a / b); }
inline float __frcp_rn(float a) { return ::qk_emu::rounded(1.f / a); }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }
inline int __float2int_rn(float x) { return ::qk_emu::float_to_int_sat<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return ::qk_emu::float_to_int_sat<int>(truncf(x)); }
inline int __float2int_rd(float x) { return ::qk_emu::float_to_int_sat<int>(floorf(x)); }
inline int __float2int_ru(float x) { return ::qk_emu::float_to_int_sat<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return ::qk_emu::float_to_int_sat<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return ::qk_emu::float_to_int_sat<unsigned>(truncf(x)); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }

// CUDA's max/min overloads: integers in their common type, floats as fmax/fmin (NaN loses).
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value)
    return std::fmax((C)a, (C)b);
  else
    return (C)a < (C)b ? (C)b : (C)a;
}
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value)
    return std::fmin((C)a, (C)b);
  else
    return (C)b < (C)a ? (C)b : (C)a;
}
