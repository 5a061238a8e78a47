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

// The storage bits of one slot, packed as memory holds them: 4 registers whatever the dtype, so kernels
// keep several slots in flight cheaply and convert to float only where they compute. Element indices
// are compile-time constants once loops are unrolled, so the component selects vanish.
template <Dt D>
struct Slot {
  uint4 w;

  __device__ __forceinline__ unsigned& word(int k) { return k == 0 ? w.x : (k == 1 ? w.y : (k == 2 ? w.z : w.w)); }
  __device__ __forceinline__ unsigned word(int k) const { return k == 0 ? w.x : (k == 1 ? w.y : (k == 2 ? w.z : w.w)); }

  __device__ __forceinline__ Storage<D> bits(int j) const {
    if constexpr (D == Dt::kF32)
      return __uint_as_float(word(j));
    else
      return (uint16_t)(j & 1 ? word(j / 2) >> 16 : word(j / 2) & 0xffffu);
  }
  __device__ __forceinline__ void set_bits(int j, Storage<D> v) {
    if constexpr (D == Dt::kF32) {
      word(j) = __float_as_uint(v);
    } else {
      unsigned& x = word(j / 2);
      x = j & 1 ? (x & 0xffffu) | ((unsigned)v << 16) : (x & 0xffff0000u) | (unsigned)v;
    }
  }
  __device__ __forceinline__ float get(int j) const { return to_float<D>(bits(j)); }
  __device__ __forceinline__ void set(int j, float f) { set_bits(j, from_float<D>(f)); }
};

// One 128-bit load; p must be 16-byte aligned.
template <Dt D>
__device__ __forceinline__ Slot<D> load_aligned(const Storage<D>* p) {
  return Slot<D>{__ldg(reinterpret_cast<const uint4*>(p))};
}

// `count` elements at p (missing ones read as zero bits).
template <Dt D>
__device__ __forceinline__ Slot<D> load_slot(const Storage<D>* p, int count) {
  constexpr int V = slot_width<D>();
  if (count == V && aligned_to(p, 16)) return load_aligned<D>(p);
  Slot<D> s{make_uint4(0u, 0u, 0u, 0u)};
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < count) s.set_bits(j, p[j]);
  return s;
}

template <Dt D>
__device__ __forceinline__ void store_slot(Storage<D>* p, const Slot<D>& s, int count) {
  constexpr int V = slot_width<D>();
  if (count == V && aligned_to(p, 16)) {
    *reinterpret_cast<uint4*>(p) = s.w;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < count) p[j] = s.bits(j);
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
