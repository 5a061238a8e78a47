"""conv2d_int8_packed_requant_abs_max: a dynamic (abs_max) reader's 8-bit input codes written by the producing
conv, and the scale they are at, ``m = abs_max(y)`` of the float output ``y``. ``m`` is bit for bit that of
conv2d_int8_packed_abs_max (the first pass computes the values for their max alone, on every kernel path:
AVX2 blocks and depthwise in registers, AVX-512 tiles from the accumulators, the other paths from a row or
tile buffer). The codes are ``quantize_with_scale(y, m, 8)`` up to one step where ``y * 127 / m`` lies at a
rounding tie: the second pass folds ``127 / m`` into scale and bias, as chained static layers do. (AVX2 and
portable products over more than 64 values take one pass and quantize y: exact codes; the ISA fixture and
the cases run both kinds.)"""
import pytest
import torch

import qkernels
from qkernels._library import ops

from conftest import needs_cuda
from test_ops_int8 import CONV_CASES, ISA_EPILOGUE_CASES, case_seed, isa, rand_int8  # noqa: F401 (fixture)
from test_ops_int8_abs_max import epilogue_case, non_finite_case, packed_conv_samples


def _float_and_codes(x, weight, bias, scale, activation, kw):
    packed = qkernels.pack_conv2d_int8_weight(weight, kw["groups"])
    y, m = qkernels.conv2d_int8_packed_abs_max(x, weight, packed, bias, scale=scale, activation=activation, **kw)
    codes, m2 = qkernels.conv2d_int8_packed_requant_abs_max(x, weight, packed, bias, scale=scale,
                                                            activation=activation, **kw)
    return y, m, codes, m2


def assert_codes_of(codes, y, m, what):
    """codes == quantize_with_scale(y, m, 8), except one step off where y * 127 / m is within float rounding
    of a .5 tie (the folded epilogue rounds fma(acc, s * f, b * f), not (acc * s + b) * f)."""
    want = qkernels.quantize_with_scale(y, m, 8)
    assert codes.dtype == torch.int8 and codes.shape == y.shape, what
    assert codes.is_contiguous(memory_format=torch.channels_last), what
    diff = (codes.int() - want.int()).abs()
    off = diff > 0
    if diff.numel():
        assert int(diff.max()) <= 1, what
    if off.any():
        v = (y.double() * 127 / m.double())[off]
        assert ((v.abs() - v.abs().floor() - 0.5).abs() < 1e-4).all(), (what, v)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("inputs", ["x >= 0", "signed x"])
def test_codes_are_those_of_the_float_output(case, inputs, isa):
    x, weight, bias, scale, kw = epilogue_case(case, inputs, case_seed(case[0], 1013))
    for activation in (None, "relu"):
        y, m, codes, m2 = _float_and_codes(x, weight, bias, scale, activation, kw)
        assert m2.dim() == 0 and m2.dtype == torch.float32
        assert torch.equal(m2, m), (activation, m2, m)
        assert_codes_of(codes, y, m, (case[0], activation))


@pytest.mark.parametrize("kind", list(ISA_EPILOGUE_CASES))
def test_non_finite_values(kind, isa):
    """A NaN channel codes 0, an infinite one +-127 (quantize_with_scale clips it to +-m); neither sets m."""
    x, w, bias, scale, kw = non_finite_case(kind, 31)
    y, m, codes, m2 = _float_and_codes(x, w, bias, scale, None, kw)
    assert torch.equal(m2, m) and m.isfinite()
    assert (codes[:, 1] == 0).all() and (codes[:, 2] == -127).all() and (codes[:, 3] == 127).all()
    assert_codes_of(codes, y, m, kind)


def test_all_zero_output_and_empty_batch():
    w = rand_int8(16, 8, 3, 3)
    packed = qkernels.pack_conv2d_int8_weight(w)
    codes, m = qkernels.conv2d_int8_packed_requant_abs_max(torch.zeros(2, 8, 5, 5, dtype=torch.int8), w, packed,
                                                           padding=1)
    assert m.item() == 0.0 and codes.shape == (2, 16, 5, 5) and (codes == 0).all()  # scale 0: codes 0
    codes, m = qkernels.conv2d_int8_packed_requant_abs_max(torch.zeros(0, 8, 5, 5, dtype=torch.int8), w, packed,
                                                           padding=1)
    assert codes.shape == (0, 16, 5, 5) and m.item() == 0.0


def test_relu6_and_bad_input_are_refused():
    w = rand_int8(4, 3, 1, 1)
    packed = qkernels.pack_conv2d_int8_weight(w)
    with pytest.raises(RuntimeError, match="relu6"):
        qkernels.conv2d_int8_packed_requant_abs_max(rand_int8(1, 3, 4, 4), w, packed, activation="relu6")
    with pytest.raises((RuntimeError, ValueError, TypeError), match="int8"):
        qkernels.conv2d_int8_packed_requant_abs_max(torch.randn(1, 3, 4, 4), w, packed)


def test_opcheck():
    for args in packed_conv_samples(5):
        torch.library.opcheck(ops.conv2d_int8_packed_requant_abs_max, args)


@needs_cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    x, w = rand_int8(2, 32, 9, 9, gen=gen).abs(), rand_int8(48, 32, 1, 1, gen=gen)
    bias, scale = torch.randn(48, generator=gen), torch.rand(48, generator=gen) * 0.01
    cpu = qkernels.conv2d_int8_packed_requant_abs_max(x, w, qkernels.pack_conv2d_int8_weight(w), bias, scale=scale,
                                                      activation="relu")
    wc = w.cuda()
    got = qkernels.conv2d_int8_packed_requant_abs_max(x.cuda(), wc, qkernels.pack_conv2d_int8_weight(wc), bias.cuda(),
                                                      scale=scale.cuda(), activation="relu")
    assert torch.equal(got[1].cpu(), cpu[1]) and (got[0].cpu().int() - cpu[0].int()).abs().max() <= 1
