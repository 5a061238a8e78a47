// Emulator stand-in for torch/library.h: the real header, then TORCH_LIBRARY_IMPL(<ns>, CUDA, m) in
// the CUDA sources registers the kernels as the CPU kernels of the twin library QK_EMU_LIB
// (qkernels_emu by default), whose schemas are copied from the real library at load time.
#pragma once
#include_next <torch/library.h>

#ifndef QK_EMU_LIB
#define QK_EMU_LIB qkernels_emu
#endif
// CUDA kernels become CPU kernels of the twin; other keys (Meta, CompositeExplicitAutograd, ...) keep theirs.
#define QK_EMU_LIBRARY_IMPL(lib, key, m) _TORCH_LIBRARY_IMPL(lib, key, m, C10_UID)
#define QK_EMU_KEY_CUDA CPU
#define QK_EMU_KEY_Meta Meta
#define QK_EMU_KEY_CompositeExplicitAutograd CompositeExplicitAutograd
#define QK_EMU_KEY_CompositeImplicitAutograd CompositeImplicitAutograd
#define QK_EMU_KEY_Autograd Autograd
#define QK_EMU_KEY_AutogradCUDA AutogradCPU
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) QK_EMU_LIBRARY_IMPL(QK_EMU_LIB, QK_EMU_KEY_##k, m)
