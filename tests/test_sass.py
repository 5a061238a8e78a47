"""What the CUDA kernels' designs need, checked in the compiled SASS of the built extension (no GPU needed:
cuobjdump reads the sm_90 code in qkernels/_C*.so). Skips on a CPU-only build."""
import re

import pytest

import qkernels
from benchmarks import sass_report

pytestmark = pytest.mark.skipif(not qkernels.has_cuda_kernels(), reason="a CPU-only build has no SASS")

# (kernel name pattern, opcode pattern, why the design needs it). Every kernel matching the name must hold
# at least one instruction matching the opcode. Kernels are named as sass_report.short_name prints them.
FAKE_QUANT_KERNELS = (r"^(abs_max_partial|abs_max_quantize_small|quantize|clip_grad|mask_grad|channel_abs_max|"
                      r"channel_quantize|channel_small|range_abs_max_update|moving_average_update)_kernel<")
# kernels whose output has the input's dtype (fake quant, gradients): float or 16-bit storage, not codes
FAKE_QUANT_OUTPUTS = (r"^((abs_max_quantize_small|quantize|channel_quantize|channel_small)_kernel<[^,]+, "
                      r"(float|unsigned short), false|(clip_grad|mask_grad)_kernel<)")
REQUIRED = [
    (r"^conv_gemm_kernel$", r"^IDP\.4A", "the int8 implicit GEMM accumulates with dp4a"),
    (FAKE_QUANT_KERNELS, r"^LDG\..*128", "the fake-quant kernels read 16-byte slots"),
    (FAKE_QUANT_OUTPUTS, r"^STG\..*128", "fake-quant outputs and gradients are written as 16-byte slots"),
    (r"^(abs_max_partial|abs_max_finish|abs_max_quantize_small|quantize)_kernel(<|$)", r"^SHFL",
     "block reductions (and the mask words) go through warp shuffles"),
    (r"^channel_(abs_max|small)_kernel<", r"^(RED|ATOM)", "one atomic max per block and channel row/column"),
]
# the int8 tensor-core implicit GEMM (csrc/cuda/mma) and the tiled depthwise kernel (conv_int8.cu)
REQUIRED += [
    (r"^igemm_s8_kernel<.*mma::Hw>$", r"^IMMA\.16832\.S8\.S8", "int8 conv/linear multiply on the tensor cores"),
    (r"^igemm_s8_kernel<.*mma::Hw>$", r"^LDGSTS", "the int8 GEMM pipeline copies global to shared with cp.async"),
    (r"^igemm_s8_kernel<.*mma::Hw>$", r"^LDSM", "the int8 GEMM reads its fragments with ldmatrix"),
    (r"^igemm_s8_kernel<.*mma::Twin>$", r"^SHFL", "the twins exchange fragments with warp shuffles"),
    (r"^igemm_s8_kernel<", r"^(RED|ATOM)", "split-K CTAs add their partial sums with atomics"),
    (r"^depthwise_tile_kernel<16>$", r"^LDG\.E\.128", "the depthwise input tile is read in 16-byte loads"),
]


@pytest.fixture(scope="module")
def report():
    tool = sass_report.find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not installed (nvidia-cuda-cuobjdump in requirements.txt)")
    return sass_report.kernel_report(qkernels._library._C.__file__, tool)


def test_every_kernel_is_compiled_for_hopper(report):
    assert report, "the CUDA build holds no kernels"
    assert {r["arch"] for r in report.values()} == {"sm_90"}


def test_no_kernel_spills_registers_to_local_memory(report):
    spills = {name: (r.get("local"), r["families"]["LDL/STL"]) for name, r in report.items()
              if r.get("local", 0) or r["families"]["LDL/STL"]}
    assert not spills, "kernels with local memory (bytes, LDL/STL count): %s" % spills


@pytest.mark.parametrize("kernels,opcode,why", REQUIRED, ids=[r[2] for r in REQUIRED])
def test_kernels_hold_the_instructions_their_design_needs(report, kernels, opcode, why):
    matching = [n for n in report if re.search(kernels, n)]
    assert matching, "no kernel matches %r (renamed?)" % kernels
    missing = [n for n in matching if not any(re.search(opcode, op) for op in report[n]["mix"])]
    assert not missing, "%s: no %s instruction in %s" % (why, opcode, missing)
