"""conv2d_int8_packed_abs_max: the float output of conv2d_int8_packed and abs_max of it, both bit for bit, on
every conv kind and instruction set (the abs max is gathered inside each kernel path: AVX2 tiles and
depthwise blocks in registers, other paths from the rows or tiles they just wrote, depthwise rows redone
for negative inputs after their redo)."""
import pytest
import torch

import qkernels
from qkernels._library import ops

from conftest import needs_cuda
from test_ops_int8 import CONV_CASES, ISA_EPILOGUE_CASES, _conv_case, case_seed, isa, rand_int8  # noqa: F401 (fixture)


def _both(x, weight, bias, scale, activation, kw):
    packed = qkernels.pack_conv2d_int8_weight(weight, kw["groups"])
    want = qkernels.conv2d_int8_packed(x, weight, packed, bias, scale=scale, activation=activation, **kw)
    out, m = qkernels.conv2d_int8_packed_abs_max(x, weight, packed, bias, scale=scale, activation=activation, **kw)
    return want, out, m


def epilogue_case(case, inputs, seed):
    """(x, weight, bias, scale, conv kwargs) of a CONV_CASES case: x >= 0 (the uint8 kernels) or signed (the
    others and the depthwise redo), random per-channel scale and bias."""
    gen = torch.Generator().manual_seed(seed)
    x, weight, kw = _conv_case(case, gen)
    if inputs == "x >= 0":
        x = x.abs().clamp(max=127)
    o = weight.shape[0]
    return x, weight, torch.randn(o, generator=gen), torch.rand(o, generator=gen) * 0.01, kw


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("inputs", ["x >= 0", "signed x"])
def test_abs_max_is_that_of_the_output(case, inputs, isa):
    x, weight, bias, scale, kw = epilogue_case(case, inputs, case_seed(case[0], 1009))
    for activation in (None, "relu", "relu6"):
        want, out, m = _both(x, weight, bias, scale, activation, kw)
        assert out.dtype == torch.float32 and m.dim() == 0 and m.dtype == torch.float32
        assert torch.equal(out, want)
        assert torch.equal(m, qkernels.abs_max(want)), (activation, m, qkernels.abs_max(want))


def non_finite_case(kind, seed):
    """(x, w, bias, scale, conv kwargs) of an ISA_EPILOGUE_CASES kind whose channel 1 is NaN (a NaN scale),
    channel 2 -Inf and channel 3 +Inf (infinite biases)."""
    n, c, h, w_, o, k, s, g = ISA_EPILOGUE_CASES[kind]
    gen = torch.Generator().manual_seed(seed)
    x, w = rand_int8(n, c, h, w_, gen=gen), rand_int8(o, c // g, k, k, gen=gen)
    scale = torch.rand(o, generator=gen) * 0.004 + 1e-4
    bias = torch.randn(o, generator=gen)
    scale[1], bias[2], bias[3] = float("nan"), float("-inf"), float("inf")
    return x, w, bias, scale, dict(stride=(s, s), padding=(k // 2, k // 2), dilation=(1, 1), groups=g)


@pytest.mark.parametrize("kind", list(ISA_EPILOGUE_CASES))
def test_non_finite_outputs_do_not_set_the_abs_max(kind, isa):
    """NaN and +-Inf channels (a NaN scale, an infinite bias) count as 0, as in abs_max."""
    x, w, bias, scale, kw = non_finite_case(kind, 29)
    want, out, m = _both(x, w, bias, scale, None, kw)
    assert torch.equal(out.nan_to_num(7.0), want.nan_to_num(7.0)) and out[:, 1].isnan().all()
    finite = want[want.isfinite()]
    assert m.item() == finite.abs().max().item() and torch.equal(m, qkernels.abs_max(want))


def test_empty_output_has_abs_max_zero():
    x, w = torch.zeros(0, 8, 5, 5, dtype=torch.int8), rand_int8(16, 8, 3, 3)
    out, m = qkernels.conv2d_int8_packed_abs_max(x, w, qkernels.pack_conv2d_int8_weight(w), padding=1)
    assert out.shape == (0, 16, 5, 5) and m.item() == 0.0


def packed_conv_samples(seed):
    """Argument tuples (x, weight, packed, bias, stride, padding, dilation, groups, scale, activation) of the
    packed conv ops that take no out_dtype: a 3x3 conv with bias and a strided depthwise one without."""
    gen = torch.Generator().manual_seed(seed)
    x, w = rand_int8(2, 8, 5, 6, gen=gen), rand_int8(12, 8, 3, 3, gen=gen)
    dw = rand_int8(8, 1, 3, 3, gen=gen)
    sc = torch.rand(12, generator=gen) * 0.01
    for args in ((x, w, torch.randn(12, generator=gen), [1, 1], [1, 1], [1, 1], 1, sc, "relu"),
                 (x.abs(), dw, None, [2, 1], [1, 0], [1, 1], 8, torch.tensor(0.02), "none")):
        yield (args[0], args[1], ops.pack_conv2d_int8_weight(args[1], args[6])) + args[2:]


def test_opcheck():
    for args in packed_conv_samples(4):
        torch.library.opcheck(ops.conv2d_int8_packed_abs_max, args)


def test_bad_input_names_the_problem():
    w = rand_int8(4, 3, 1, 1)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="int8"):
        qkernels.conv2d_int8_packed_abs_max(torch.randn(1, 3, 4, 4), w, qkernels.pack_conv2d_int8_weight(w))
    with pytest.raises(TypeError, match="packed"):
        qkernels.conv2d_int8_packed_abs_max(rand_int8(1, 3, 4, 4), w, None)


@needs_cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    x, w = rand_int8(2, 32, 9, 9, gen=gen).abs(), rand_int8(32, 1, 3, 3, gen=gen)
    kw = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=32)
    bias, scale = torch.randn(32, generator=gen), torch.rand(32, generator=gen) * 0.01
    cpu_out, cpu_m = qkernels.conv2d_int8_packed_abs_max(x, w, qkernels.pack_conv2d_int8_weight(w, 32), bias,
                                                         scale=scale, activation="relu", **kw)
    wc = w.cuda()
    out, m = qkernels.conv2d_int8_packed_abs_max(x.cuda(), wc, qkernels.pack_conv2d_int8_weight(wc, 32), bias.cuda(),
                                                 scale=scale.cuda(), activation="relu", **kw)
    assert torch.equal(out.cpu(), cpu_out) and torch.equal(m.cpu(), cpu_m)
