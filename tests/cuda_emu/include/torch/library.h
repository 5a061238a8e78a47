// Emulator stand-in for torch/library.h: the real header, then TORCH_LIBRARY_IMPL(<ns>, CUDA, m) in
// the CUDA sources registers the kernels as the CPU kernels of the twin library QK_EMU_LIB
// (qkernels_emu by default), whose schemas are copied from the real library at load time.
#pragma once
#include_next <torch/library.h>

#ifndef QK_EMU_LIB
#define QK_EMU_LIB qkernels_emu
#endif
#define QK_EMU_LIBRARY_IMPL(lib, m) _TORCH_LIBRARY_IMPL(lib, CPU, m, C10_UID)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) QK_EMU_LIBRARY_IMPL(QK_EMU_LIB, m)
