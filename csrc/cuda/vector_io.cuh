// Element access for the memory-bound CUDA kernels: a "slot" is the V elements one 16-byte vector
// holds (4 float32, 8 float16/bfloat16). A full slot at a 16-byte-aligned address moves as one
// 128-bit load or store; a slot cut short by the end of the data, or at an unaligned address (a view
// with a storage offset), moves element by element with the same values, so every layout is correct
// and the common one is fast.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace qkernels {
namespace cuda_io {

// Storage of the three input dtypes; 16-bit floats travel as raw bits and are converted explicitly
// (cvt.rn on the device: round to nearest even, the CPU kernels' rounding).
enum class Dt { kF32, kF16, kBF16 };

template <Dt D>
struct DtStorage {
  using type = uint16_t;
};
template <>
struct DtStorage<Dt::kF32> {
  using type = float;
};
template <Dt D>
using Storage = typename DtStorage<D>::type;

// Elements per 16-byte slot.
template <Dt D>
constexpr int slot_width() {
  return 16 / (int)sizeof(Storage<D>);
}

template <Dt D>
__device__ __forceinline__ float to_float(Storage<D> v) {
  if constexpr (D == Dt::kF32)
    return v;
  else if constexpr (D == Dt::kF16)
    return __half2float(__ushort_as_half(v));
  else
    return __uint_as_float((unsigned)v << 16);  // exact
}

template <Dt D>
__device__ __forceinline__ Storage<D> from_float(float f) {
  if constexpr (D == Dt::kF32)
    return f;
  else if constexpr (D == Dt::kF16)
    return __half_as_ushort(__float2half_rn(f));
  else
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Whether `p` may be accessed as one `bytes`-wide vector.
__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return ((uintptr_t)p & (uintptr_t)(bytes - 1)) == 0;
}

// A slot of up to V floats: `count` of them valid (the rest read as 0).
template <int V>
struct Floats {
  float v[V];
};

// One 128-bit load; p must be 16-byte aligned.
template <Dt D>
__device__ __forceinline__ Floats<slot_width<D>()> load_aligned(const Storage<D>* p) {
  constexpr int V = slot_width<D>();
  Floats<V> f;
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if constexpr (D == Dt::kF32)
      f.v[j] = __uint_as_float(w[j]);
    else
      f.v[j] = to_float<D>((uint16_t)(j & 1 ? w[j / 2] >> 16 : w[j / 2] & 0xffffu));
  }
  return f;
}

template <Dt D>
__device__ __forceinline__ Floats<slot_width<D>()> load_slot(const Storage<D>* p, int count) {
  constexpr int V = slot_width<D>();
  Floats<V> f;
  if (count == V && aligned_to(p, 16)) {
    f = load_aligned<D>(p);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) f.v[j] = j < count ? to_float<D>(p[j]) : 0.f;
  }
  return f;
}

template <Dt D>
__device__ __forceinline__ void store_slot(Storage<D>* p, const Floats<slot_width<D>()>& f, int count) {
  constexpr int V = slot_width<D>();
  if (count == V && aligned_to(p, 16)) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (D == Dt::kF32)
        w[k] = __float_as_uint(f.v[k]);
      else
        w[k] = (unsigned)from_float<D>(f.v[2 * k]) | ((unsigned)from_float<D>(f.v[2 * k + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < count) p[j] = from_float<D>(f.v[j]);
  }
}

// A slot's raw elements (bits passed through unchanged, e.g. a gradient that is kept or zeroed).
template <Dt D>
struct Raw {
  Storage<D> v[slot_width<D>()];
};

template <Dt D>
__device__ __forceinline__ Raw<D> load_raw(const Storage<D>* p, int count) {
  constexpr int V = slot_width<D>();
  Raw<D> r;
  if (count == V && aligned_to(p, 16)) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (D == Dt::kF32)
        r.v[j] = __uint_as_float(w[j]);
      else
        r.v[j] = (uint16_t)(j & 1 ? w[j / 2] >> 16 : w[j / 2] & 0xffffu);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = j < count ? p[j] : Storage<D>(0);
  }
  return r;
}

template <Dt D>
__device__ __forceinline__ void store_raw(Storage<D>* p, const Raw<D>& r, int count) {
  constexpr int V = slot_width<D>();
  if (count == V && aligned_to(p, 16)) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (D == Dt::kF32)
        w[k] = __float_as_uint(r.v[k]);
      else
        w[k] = (unsigned)r.v[2 * k] | ((unsigned)r.v[2 * k + 1] << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < count) p[j] = r.v[j];
  }
}

// Integer codes of a slot (V int8 or int16 values: 4 to 16 bytes) as one store when aligned.
template <typename Code, int V>
__device__ __forceinline__ void store_codes(Code* p, const int (&c)[V], int count) {
  constexpr int kBytes = V * (int)sizeof(Code);
  if (count == V && aligned_to(p, kBytes)) {
    constexpr int kPerWord = 4 / (int)sizeof(Code);
    unsigned w[kBytes / 4];
#pragma unroll
    for (int k = 0; k < kBytes / 4; ++k) {
      unsigned word = 0;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j)
        word |= ((unsigned)c[k * kPerWord + j] & (sizeof(Code) == 1 ? 0xffu : 0xffffu)) << (8 * (int)sizeof(Code) * j);
      w[k] = word;
    }
    if constexpr (kBytes == 16)
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    else if constexpr (kBytes == 8)
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    else
      *reinterpret_cast<unsigned*>(p) = w[0];
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < count) p[j] = (Code)c[j];
  }
}

}  // namespace cuda_io
}  // namespace qkernels
