// Register fragments of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 and where each of their bytes sits
// in the warp's matrices (PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8 multiplicands and .s32
// accumulators). With g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   A (16 x 32, row-major, 4 registers of 4 bytes): register r holds row g + 8 * (r & 1) and the 4
//     consecutive k at 4 t + 16 * (r >> 1); byte j of the register is k + j (low byte first).
//   B (32 x 8, "col": k-contiguous per column, 2 registers): register r holds column g and the 4
//     consecutive k at 4 t + 16 r.
//   C/D (16 x 8, 4 int32): element i is row g + 8 * (i >> 1), column 2 t + (i & 1).
// The functions below are that table; tests/cuda_emu/test_mma_fragments.py checks the twins against an
// independent Python model of it.
#pragma once

#include "arch.h"

namespace qkernels {
namespace mma {

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  int32_t x[4];
};

constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;

QK_DEVICE int frag_a_row(int lane, int reg) { return lane / 4 + 8 * (reg & 1); }
QK_DEVICE int frag_a_k(int lane, int reg) { return 4 * (lane % 4) + 16 * (reg >> 1); }  // of byte 0
QK_DEVICE int frag_b_col(int lane) { return lane / 4; }
QK_DEVICE int frag_b_k(int lane, int reg) { return 4 * (lane % 4) + 16 * reg; }  // of byte 0
QK_DEVICE int frag_c_row(int lane, int i) { return lane / 4 + 8 * (i >> 1); }
QK_DEVICE int frag_c_col(int lane, int i) { return 2 * (lane % 4) + (i & 1); }

}  // namespace mma
}  // namespace qkernels
