"""On a GPU: the int8 conv/linear kernels built with the instructions (mma.sync, ldmatrix, cp.async as inline
PTX) and the 64x64 kernel built with their portable twins (QKERNELS_CUDA_INT8_KERNEL=mma64x64_twin, the code
the emulator verifies) against the CPU kernels, bit for bit, and the int32 accumulators against float64:
every CTA tile, split-K partition and the automatic choice. Skips without a GPU.

With QKERNELS_GPU_UNIT_BUILD=1 it also builds tests/cuda_emu/mma_kernels.cu with nvcc (one extension build,
about a minute) and compares each instruction with its twin on the hardware, piece by piece."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_ops_int8 import CONV_CASES

from .test_parity_int8 import LINEAR_TC_CASES, TC_CASES, _conv_inputs, _run_conv, _tc_epilogues

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

cpu = torch.ops.qkernels
KERNELS = ["auto", "mma128x128", "mma64x64", "mma16x128", "mma64x64_twin", "general"]
GPU_CASES = TC_CASES + [c for c in CONV_CASES if c[0].split()[0] in ("stem", "dw32", "pw", "extra", "head", "dw200")]


def _same(got, want, what):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.is_floating_point():
        assert torch.equal(torch.isnan(got), torch.isnan(want)), what
        got, want = got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32)
    mismatches = int((got != want).sum())
    assert mismatches == 0, "%s: %d of %d elements differ" % (what, mismatches, got.numel())


@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_cuda_conv_matches_the_cpu_on_every_kernel(monkeypatch, case):
    x, wt, _, _, geometry = _conv_inputs(case, seed=11)
    exact = F.conv2d(x.double(), wt.double(), None, *geometry)
    epilogues = _tc_epilogues(wt.shape[0], torch.Generator().manual_seed(1))
    wants = [_run_conv(cpu, x, wt, b, sc, geometry, out_dtype, act) for b, sc, out_dtype, act in epilogues]
    xd, wd = x.cuda(), wt.cuda()
    for kernel in KERNELS:
        monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", kernel)
        for splits in ("1", "3", "auto"):
            monkeypatch.setenv("QKERNELS_CUDA_INT8_SPLIT_K", splits)
            for (b, sc, out_dtype, act), want in zip(epilogues, wants):
                got = _run_conv(cpu, xd, wd, None if b is None else b.cuda(), sc.cuda(), geometry, out_dtype, act)
                _same(got, want, "%s %s split %s %s" % (case[0], kernel, splits, out_dtype))
                if out_dtype == torch.int32:
                    assert torch.equal(got.cpu().double(), exact)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_linear_matches_the_cpu_on_every_kernel(monkeypatch, kernel):
    monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", kernel)
    for shape, o in LINEAR_TC_CASES:
        gen = torch.Generator().manual_seed(o)
        x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (o, shape[-1]), dtype=torch.int8, generator=gen)
        for b, sc, out_dtype, act in _tc_epilogues(o, gen):
            want = cpu.linear_int8(x, w, b, sc, out_dtype, act)
            got = cpu.linear_int8(x.cuda(), w.cuda(), None if b is None else b.cuda(), sc.cuda(), out_dtype, act)
            _same(got, want, "linear %s %s %s" % (shape, o, kernel))


def test_cuda_int8_extremes_are_exact():
    x = torch.full((1, 256, 3, 3), -128, dtype=torch.int8)
    w = torch.full((64, 256, 3, 3), -128, dtype=torch.int8)
    for kernel in KERNELS:
        os.environ["QKERNELS_CUDA_INT8_KERNEL"] = kernel
        try:
            out = cpu.conv2d_int8(x.cuda(), w.cuda(), None, [1, 1], [1, 1], [1, 1], 1, torch.tensor(1.0).cuda(),
                                  torch.int32, "none")
        finally:
            del os.environ["QKERNELS_CUDA_INT8_KERNEL"]
        assert torch.equal(out.cpu().double(), F.conv2d(x.double(), w.double(), padding=1)), kernel


# --- piece by piece (optional: one nvcc build of mma_kernels.cu) ----------------------------------------------

@pytest.fixture(scope="module")
def gpu_ops():
    if os.environ.get("QKERNELS_GPU_UNIT_BUILD") != "1":
        pytest.skip("set QKERNELS_GPU_UNIT_BUILD=1 to build mma_kernels.cu with nvcc (about a minute)")
    from torch.utils import cpp_extension

    from .emu_build import BUILD_ROOT, CSRC, EMU_DIR

    build = BUILD_ROOT.parent / "mma_gpu"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="qk_gpu_mma", sources=[str(EMU_DIR / "mma_kernels.cu")], build_directory=str(build),
                       extra_include_paths=[str(CSRC), str(CSRC / "cuda")],
                       extra_cuda_cflags=["-O3", "-DQK_MMA_LIB=qk_gpu_mma"], is_python_module=False)
    return torch.ops.qk_gpu_mma


def test_each_instruction_equals_its_twin_on_the_gpu(gpu_ops):
    rng = np.random.default_rng(0)
    for mi, ni in ((1, 1), (2, 4), (3, 2)):
        a = torch.from_numpy(rng.integers(-2 ** 31, 2 ** 31, (mi, 32, 4)).astype(np.int32)).cuda()
        b = torch.from_numpy(rng.integers(-2 ** 31, 2 ** 31, (ni, 32, 2)).astype(np.int32)).cuda()
        c = torch.from_numpy(rng.integers(-2 ** 31, 2 ** 31, (mi, ni, 32, 4)).astype(np.int32)).cuda()
        assert torch.equal(gpu_ops.mma(a, b, c, 0), gpu_ops.mma(a, b, c, 1)), (mi, ni)
    image = torch.from_numpy(rng.integers(0, 256, 1024).astype(np.uint8)).cuda()
    rows = torch.from_numpy((rng.permutation(64)[:32] * 16).astype(np.int32)).cuda()
    assert torch.equal(gpu_ops.ldmatrix(image, rows, 0), gpu_ops.ldmatrix(image, rows, 1))
    src = torch.from_numpy(rng.integers(0, 256, 640).astype(np.uint8)).cuda()
    chunks = torch.from_numpy(rng.integers(-1, 40, (64, 3)).astype(np.int32)).cuda()
    _, hw = gpu_ops.cp_async(src, chunks, 0, 0)
    _, twin = gpu_ops.cp_async(src, chunks, 0, 1)
    assert torch.equal(hw, twin)
    for stages in (2, 3, 4):
        tiles = torch.from_numpy(rng.integers(0, 256, (9, 64, 16)).astype(np.uint8)).cuda()
        assert torch.equal(gpu_ops.pipeline(tiles, stages, 0), gpu_ops.pipeline(tiles, stages, 1))
