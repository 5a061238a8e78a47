"""torch.ops.qk_emu_mma: the warp-level pieces of csrc/cuda/mma driven one at a time (mma_kernels.cu), built on
the emulator once per test session and shared by the test_mma_*.py files."""
import functools

from . import emu_build


@functools.lru_cache(maxsize=None)
def emulated():
    return emu_build.build_library("qk_emu_mma", [emu_build.EMU_DIR / "mma_kernels.cu"], twin_of=None)


HW, TWIN = 0, 1  # the `arch` argument of every op
