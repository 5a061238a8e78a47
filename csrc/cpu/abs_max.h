// max |x| over finite values as the bits of a non-negative float (they order like the values, and an
// integer max always vectorises): the abs_max / fake-quant reductions, and the abs max int8 kernels gather
// while they write float outputs (the batch scale the next layer of a dynamic int8 model quantizes with).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "cpu/simd.h"
#include "quant_math.h"

namespace qkernels {

// Bits of finite_abs(x) (|x| for finite x, else 0).
template <typename T>
QK_INLINE uint32_t abs_bits(T v) {
  float f = finite_abs(to_float(v));
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

QK_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
QK_INLINE uint32_t abs_max_bits_body(const T* x, int64_t n) {
  uint32_t m = 0;
  // GCC 12 does not if-convert this reduction on its own; the pragma makes it vectorise.
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t a = abs_bits(x[i]);
    m = a > m ? a : m;
  }
  return m;
}
QK_DEFINE_ISA_DISPATCH(abs_max_bits, abs_max_bits_body)

// Bits of max finite |p[j * stride]| for j < n (0 for n == 0).
inline uint32_t finite_abs_max_bits(const float* p, int64_t n, int64_t stride = 1) {
  if (stride == 1) return abs_max_bits<float>(p, n);
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, abs_bits(p[j * stride]));
  return m;
}

// Maxima (abs_bits) merged from several threads.
struct AbsMaxSink {
  std::atomic<uint32_t> bits{0};
  void merge(uint32_t v) {
    uint32_t cur = bits.load(std::memory_order_relaxed);
    while (v > cur && !bits.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
  }
  float value() const { return bits_to_float(bits.load()); }
};

}  // namespace qkernels
