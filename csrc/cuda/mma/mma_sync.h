// Warp-level int8 matrix multiply-accumulate: D = A * B + C on one m16n8k32 tile (mma_m16n8k32), and on a
// warp tile of MI x NI such tiles sharing their A and B fragments (mma_tile). Integer sums wrap modulo
// 2^32 like the instruction without .satfinite, so the order of the additions never matters.
//
// Twin: each lane gathers, with 64-bit shuffles, the two rows of A (g, g + 8) and the two columns of B
// (2t, 2t + 1) that its accumulators need, from the lanes that hold them in the ISA's layout
// (fragments.h), and adds their dot products with __dp4a. The tile version gathers every row and column
// once for all MI x NI products (8 (MI + NI) shuffles instead of 16 MI NI).
#pragma once

#include "fragments.h"

namespace qkernels {
namespace mma {

namespace twin {

QK_DEVICE unsigned long long pack2(uint32_t lo, uint32_t hi) { return ((unsigned long long)hi << 32) | lo; }

// The 32 bytes of row `g` (`hi` = false) or row g + 8 of an A fragment, as 8 words of 4 consecutive k.
QK_DEVICE void gather_a_rows(const FragA& a, uint32_t (&row)[8], uint32_t (&row8)[8]) {
  const int g = lane_id() / 4;
  const unsigned long long mine = pack2(a.x[0], a.x[2]), mine8 = pack2(a.x[1], a.x[3]);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    // lane 4g + t holds k 4t..4t+3 (register 0 / 1) and 16+4t.. (register 2 / 3) of rows g / g + 8
    const unsigned long long v = __shfl_sync(kFullWarp, mine, 4 * g + t);
    const unsigned long long v8 = __shfl_sync(kFullWarp, mine8, 4 * g + t);
    row[t] = (uint32_t)v, row[4 + t] = (uint32_t)(v >> 32);
    row8[t] = (uint32_t)v8, row8[4 + t] = (uint32_t)(v8 >> 32);
  }
}

// The 32 bytes of columns 2t and 2t + 1 of a B fragment, as 8 words of 4 consecutive k each.
QK_DEVICE void gather_b_cols(const FragB& b, uint32_t (&col0)[8], uint32_t (&col1)[8]) {
  const int t = lane_id() % 4;
  const unsigned long long mine = pack2(b.x[0], b.x[1]);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    // column n is held by lanes 4n + s: k 4s..4s+3 in register 0, 16+4s.. in register 1
    const unsigned long long v0 = __shfl_sync(kFullWarp, mine, 4 * (2 * t) + s);
    const unsigned long long v1 = __shfl_sync(kFullWarp, mine, 4 * (2 * t + 1) + s);
    col0[s] = (uint32_t)v0, col0[4 + s] = (uint32_t)(v0 >> 32);
    col1[s] = (uint32_t)v1, col1[4 + s] = (uint32_t)(v1 >> 32);
  }
}

QK_DEVICE int32_t dot32(const uint32_t (&a)[8], const uint32_t (&b)[8], int32_t c) {
#pragma unroll
  for (int w = 0; w < 8; ++w) c = __dp4a((int)a[w], (int)b[w], c);
  return c;
}

template <int MI, int NI>
QK_DEVICE void mma_tile(FragC (&acc)[MI][NI], const FragA (&a)[MI], const FragB (&b)[NI]) {
  uint32_t rows[MI][2][8];
#pragma unroll
  for (int i = 0; i < MI; ++i) gather_a_rows(a[i], rows[i][0], rows[i][1]);
#pragma unroll
  for (int j = 0; j < NI; ++j) {
    uint32_t cols[2][8];
    gather_b_cols(b[j], cols[0], cols[1]);
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j].x[e] = dot32(rows[i][e >> 1], cols[e & 1], acc[i][j].x[e]);
  }
}

}  // namespace twin

// d = a * b + c on one m16n8k32 tile.
template <class Arch>
QK_DEVICE void mma_m16n8k32(FragC& d, const FragA& a, const FragB& b, const FragC& c) {
#if defined(__CUDA_ARCH__)
  if constexpr (uses_ptx<Arch>()) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=r"(d.x[0]), "=r"(d.x[1]), "=r"(d.x[2]), "=r"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "r"(c.x[0]), "r"(c.x[1]),
          "r"(c.x[2]), "r"(c.x[3]));
    return;
  }
#endif
  FragC acc[1][1] = {{c}};
  const FragA as[1] = {a};
  const FragB bs[1] = {b};
  twin::mma_tile<1, 1>(acc, as, bs);
  d = acc[0][0];
}

// acc[i][j] += a[i] * b[j] for a warp tile of (16 MI) x (8 NI) outputs.
template <class Arch, int MI, int NI>
QK_DEVICE void mma_tile(FragC (&acc)[MI][NI], const FragA (&a)[MI], const FragB (&b)[NI]) {
  if constexpr (uses_ptx<Arch>()) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j) mma_m16n8k32<Arch>(acc[i][j], a[i], b[j], acc[i][j]);
  } else {
    twin::mma_tile<MI, NI>(acc, a, b);
  }
}

}  // namespace mma
}  // namespace qkernels
