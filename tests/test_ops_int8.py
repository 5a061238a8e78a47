"""conv2d_int8 / linear_int8: exact int32 accumulators, epilogues against the float64 reference, a peer
(torch.ao quantized conv), opcheck, CUDA against CPU, and argument errors."""
import os
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import qkernels
from qkernels import reference as ref
from qkernels._library import ops

from conftest import needs_cuda

# Every CPU product kernel that this processor can run (the library caps itself to these on request).
ALL_ISAS = ["portable", "avx2", "avx_vnni", "avx512_vnni", "amx"]


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


ISAS = ["portable"] + [
    isa for isa, flags in (("avx2", ["avx2", "fma"]), ("avx_vnni", ["avx_vnni"]),
                           ("avx512_vnni", ["avx512_vnni", "avx512bw"]), ("amx", ["amx_int8", "amx_tile"]))
    if all(_cpu_has(f) for f in flags)
]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("QKERNELS_INT8_ISA", request.param)
    return request.param


def case_seed(name: str, modulus: int) -> int:
    """A seed from a case's name that is the same in every process (str hash() is salted per process, so a
    failure seeded by it could not be reproduced)."""
    return zlib.crc32(name.encode()) % modulus


def rand_int8(*shape, low=-128, high=127, gen=None):
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=gen)


# (name, N, C, H, W, O, kernel, stride, padding, dilation, groups): every conv kind of MobileNet-SSD
# 300x300 on small maps, plus general cases.
CONV_CASES = [
    ("stem 3->32 s2", 2, 3, 15, 15, 32, 3, 2, 1, 1, 1),
    ("dw32 s1", 2, 32, 10, 10, 32, 3, 1, 1, 1, 32),
    ("dw64 s2", 1, 64, 9, 9, 64, 3, 2, 1, 1, 64),
    ("dw1024 s1", 1, 1024, 3, 3, 1024, 3, 1, 1, 1, 1024),
    ("dw200 s2 odd", 2, 200, 7, 5, 200, 3, 2, 1, 1, 200),
    ("pw 32->64", 2, 32, 8, 8, 64, 1, 1, 0, 1, 1),
    ("pw 512->512", 1, 512, 5, 5, 512, 1, 1, 0, 1, 1),
    ("pw 1024->1024", 1, 1024, 3, 3, 1024, 1, 1, 0, 1, 1),
    ("extra 1x1 1024->256", 1, 1024, 4, 4, 256, 1, 1, 0, 1, 1),
    ("extra 3x3 256->512 s2 4->2", 1, 256, 4, 4, 512, 3, 2, 1, 1, 1),
    ("extra 3x3 128->256 s2 3->2", 2, 128, 3, 3, 256, 3, 2, 1, 1, 1),
    ("extra 3x3 64->128 s2 2->1", 2, 64, 2, 2, 128, 3, 2, 1, 1, 1),
    ("head box 512->12", 2, 512, 5, 5, 12, 1, 1, 0, 1, 1),
    ("head cls 1024->126", 1, 1024, 3, 3, 126, 1, 1, 0, 1, 1),
    ("head cls 256->126 1x1 map", 1, 256, 1, 1, 126, 1, 1, 0, 1, 1),
    ("head box 128->24 1x1 map", 3, 128, 1, 1, 24, 1, 1, 0, 1, 1),
    ("groups 4 multiplier 2", 2, 8, 7, 9, 16, 3, 1, 1, 1, 4),
    ("groups 2", 1, 12, 6, 5, 10, 3, 1, 1, 1, 2),
    ("dilation 2 padding 2", 3, 8, 10, 9, 12, 3, 1, 2, 2, 1),
    ("depthwise dilation 2", 1, 16, 9, 8, 16, 3, 1, 2, 2, 16),
    ("depthwise few rows, channel blocks split", 1, 200, 5, 6, 200, 3, 1, 1, 1, 200),
    ("5x5 stride 3 odd K", 2, 5, 13, 11, 7, 5, 3, 2, 1, 1),
    ("7x7 stem 3->16 s2 (21-byte kernel rows)", 1, 3, 17, 16, 16, 7, 2, 3, 1, 1),
    ("kernel rows dilated (2, 1), short runs", 2, 3, 11, 10, 8, 3, 1, (2, 1), (2, 1), 1),
    ("no padding valid", 1, 4, 4, 4, 3, 3, 1, 0, 1, 1),
    ("rectangular kernel and stride", 1, 6, 9, 8, 9, (3, 1), (2, 1), (1, 0), 1, 1),
    ("5x3 kernel, 30-byte patches (not 3 rows)", 2, 2, 9, 8, 6, (5, 3), 1, (2, 1), 1, 1),
    ("K >= 64 on a tail of columns", 1, 80, 5, 7, 40, 1, 1, 0, 1, 1),
    ("pw 64->80 whole row panels read in place", 2, 64, 11, 13, 80, 1, 1, 0, 1, 1),
    ("dw 80 s1 wide rows", 2, 80, 5, 23, 80, 3, 1, 1, 1, 80),
    ("dw 40 s2 wide rows", 1, 40, 6, 21, 40, 3, 2, 1, 1, 40),
    ("dw 32 s1 odd width (2 pixels per block)", 1, 32, 4, 37, 32, 3, 1, 1, 1, 32),
    ("dw 8 s1 (8 pixels per block)", 2, 8, 5, 13, 8, 3, 1, 1, 1, 8),
    ("dw 4x2 kernel stride (3, 1)", 1, 70, 9, 11, 70, (4, 2), (3, 1), (1, 0), 1, 70),
    ("dw 5x5 more kernel rows than a dword", 1, 24, 8, 9, 24, 5, 1, 2, 1, 24),
    ("dw 3x5 dilation (1, 2) wide map", 2, 16, 5, 70, 16, (3, 5), 1, (1, 4), (1, 2), 16),
    ("empty batch", 0, 8, 5, 5, 16, 3, 1, 1, 1, 1),
    ("empty batch depthwise", 0, 8, 5, 5, 8, 3, 1, 1, 1, 8),
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _conv_case(case, gen):
    name, n, c, h, w, o, k, s, p, d, g = case
    kh, kw = _pair(k)
    x = rand_int8(n, c, h, w, gen=gen)
    weight = rand_int8(o, c // g, kh, kw, gen=gen)
    return x, weight, dict(stride=_pair(s), padding=_pair(p), dilation=_pair(d), groups=g)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_accumulator_is_exact(case, isa):
    gen = torch.Generator().manual_seed(case_seed(case[0], 1000))
    x, weight, kw = _conv_case(case, gen)
    out = qkernels.conv2d_int8(x, weight, out_dtype=torch.int32, **kw)
    expected = F.conv2d(x.double(), weight.double(), None, **kw)
    assert out.dtype == torch.int32 and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.double(), expected)


# The AVX2 product picks its kernel from the operands' ranges (uint8 activations when none is negative,
# the sign moved onto the weights when no weight is -128, int16 otherwise): every pairing, exact.
OPERAND_RANGES = {"x >= 0, any w": ((0, 127), (-128, 127)), "x >= 0, w = -128 only": ((0, 127), (-128, -128)),
                  "signed x, w in [-127, 127]": ((-128, 127), (-127, 127)), "signed x, any w": ((-128, 127), (-128, 127)),
                  "x = -128 only, w = -127 only": ((-128, -128), (-127, -127))}


DEPTHWISE_RANGE_CASES = [c for c in CONV_CASES if c[-1] == c[2] and c[-1] > 1 and c[1] > 0]


@pytest.mark.parametrize("case", DEPTHWISE_RANGE_CASES, ids=[c[0] for c in DEPTHWISE_RANGE_CASES])
@pytest.mark.parametrize("negatives", ["none", "one", "all"])
def test_depthwise_nonnegative_inputs_are_exact(case, negatives, isa):
    """The AVX2 depthwise kernel takes x >= 0 (ReLU outputs) and recomputes rows with a negative input."""
    gen = torch.Generator().manual_seed(case_seed(case[0], 997))
    x, weight, kw = _conv_case(case, gen)
    x = x.abs().clamp(max=127) if negatives != "all" else x
    if negatives == "one":
        x[0, -1, x.shape[2] // 2, x.shape[3] - 1] = -128
    bias, scale = torch.randn(weight.shape[0], generator=gen), torch.rand(weight.shape[0], generator=gen) * 0.02
    out = qkernels.conv2d_int8(x, weight, out_dtype=torch.int32, **kw)
    assert torch.equal(out.double(), F.conv2d(x.double(), weight.double(), None, **kw))
    out8 = qkernels.conv2d_int8(x, weight, bias, scale=scale, out_dtype=torch.int8, activation="relu", **kw)
    _assert_int8_close(out8, ref.conv2d_int8(x, weight, bias, scale=scale, activation="relu", **kw))
    outf = qkernels.conv2d_int8(x, weight, bias, scale=scale, **kw)
    torch.testing.assert_close(outf.double(), ref.conv2d_int8(x, weight, bias, scale=scale, **kw), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("ranges", list(OPERAND_RANGES))
@pytest.mark.parametrize("shape", [(2, 64, 7, 9, 40, 1), (1, 24, 6, 5, 20, 3), (1, 512, 3, 3, 130, 1)])
def test_conv_operand_ranges_are_exact(ranges, shape, isa):
    (xl, xh), (wl, wh) = OPERAND_RANGES[ranges]
    n, c, h, w_, o, k = shape
    gen = torch.Generator().manual_seed(c + o)
    x = rand_int8(n, c, h, w_, low=xl, high=xh, gen=gen)
    w = rand_int8(o, c, k, k, low=wl, high=wh, gen=gen)
    out = qkernels.conv2d_int8(x, w, padding=k // 2, out_dtype=torch.int32)
    assert torch.equal(out.double(), F.conv2d(x.double(), w.double(), padding=k // 2))
    lin = qkernels.linear_int8(x.flatten(1)[:, :c], w.flatten(1)[:, :c], out_dtype=torch.int32)
    assert torch.equal(lin.double(), x.flatten(1)[:, :c].double() @ w.flatten(1)[:, :c].double().t())


def test_conv_extreme_values_are_exact(isa):
    # all -128: the largest products; K = 9 * 256 = 2304 products of 16384 each
    x = torch.full((1, 256, 3, 3), -128, dtype=torch.int8)
    w = torch.full((64, 256, 3, 3), -128, dtype=torch.int8)
    out = qkernels.conv2d_int8(x, w, padding=1, out_dtype=torch.int32)
    assert torch.equal(out.double(), F.conv2d(x.double(), w.double(), padding=1))
    assert int(out.max()) == 2304 * 16384


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted_weight"])
def test_conv_memory_layouts(layout):
    gen = torch.Generator().manual_seed(3)
    x = rand_int8(2, 16, 9, 11, gen=gen)
    w = rand_int8(24, 16, 3, 3, gen=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = rand_int8(2, 32, 9, 22, gen=gen)[:, ::2, :, 1::2]
        assert not x.is_contiguous()
    else:
        w = rand_int8(24, 3, 3, 16, gen=gen).permute(0, 3, 1, 2)
    out = qkernels.conv2d_int8(x, w, padding=1, out_dtype=torch.int32)
    assert torch.equal(out.double(), F.conv2d(x.double(), w.double(), padding=1))
    dw = rand_int8(16, 1, 3, 3, gen=gen)
    out = qkernels.conv2d_int8(x, dw, padding=1, groups=16, out_dtype=torch.int32)
    assert torch.equal(out.double(), F.conv2d(x.double(), dw.double(), padding=1, groups=16))


LINEAR_CASES = [(1, 64, 126), (7, 37, 12), (200, 256, 64), (33, 1024, 1024), (0, 16, 8), (5, 3, 1), (300, 128, 40)]


@pytest.mark.parametrize("m,k,o", LINEAR_CASES)
def test_linear_accumulator_is_exact(m, k, o, isa):
    gen = torch.Generator().manual_seed(m * 7 + k)
    x, w = rand_int8(m, k, gen=gen), rand_int8(o, k, gen=gen)
    out = qkernels.linear_int8(x, w, out_dtype=torch.int32)
    assert out.shape == (m, o) and out.dtype == torch.int32
    assert torch.equal(out.double(), x.double() @ w.double().t())


def test_linear_leading_dims_and_1d():
    gen = torch.Generator().manual_seed(5)
    w = rand_int8(10, 20, gen=gen)
    x = rand_int8(2, 3, 20, gen=gen)
    out = qkernels.linear_int8(x, w, out_dtype=torch.int32)
    assert out.shape == (2, 3, 10)
    assert torch.equal(out.double(), x.double() @ w.double().t())
    x1 = rand_int8(20, gen=gen)
    assert torch.equal(qkernels.linear_int8(x1, w, out_dtype=torch.int32).double(), w.double() @ x1.double())
    xt = rand_int8(20, 6, gen=gen).t()  # non-contiguous rows
    assert torch.equal(qkernels.linear_int8(xt, w, out_dtype=torch.int32).double(), xt.double() @ w.double().t())


# --- epilogues ---------------------------------------------------------------------------------------

def _assert_int8_close(out, expected_float):
    """int8 output against the float64 value before rounding: exact except within 1e-4 of a rounding
    boundary (float32 vs float64 arithmetic), where one step either way is allowed."""
    expected = ref.round_half_away(expected_float).clamp(-127, 127)
    diff = (out.double() - expected).abs()
    frac = (expected_float.abs() - expected_float.abs().floor() - 0.5).abs()
    near_tie = (frac < 1e-4) & (expected_float.abs() < 127.5)
    assert diff.max() <= 1
    assert bool(((diff == 0) | near_tie).all())


def _epilogue_params(o, per_channel, with_bias, gen):
    if per_channel:
        scale = torch.rand(o, generator=gen) * 0.002 + 1e-4
    else:
        scale = 0.0007
    bias = torch.randn(o, generator=gen) * 3 if with_bias else None
    return scale, bias


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("kind", ["pointwise", "depthwise", "3x3"])
@pytest.mark.parametrize("inputs", ["signed", "nonnegative"])
def test_conv_epilogue(per_channel, with_bias, activation, kind, inputs):
    gen = torch.Generator().manual_seed(11)
    c, o, k, g = {"pointwise": (64, 48, 1, 1), "depthwise": (48, 48, 3, 48), "3x3": (16, 24, 3, 1)}[kind]
    # nonnegative: the uint8 kernels, whose GEMM blocks run the epilogue from their registers; 5 x 7 pixels
    # per image leave a last row step of 4 of 6 rows
    x = rand_int8(2, c, 6, 7, gen=gen) if inputs == "signed" else rand_int8(2, c, 5, 7, low=0, gen=gen)
    w = rand_int8(o, c // g, k, k, gen=gen)
    scale, bias = _epilogue_params(o, per_channel, with_bias, gen)
    kw = dict(padding=k // 2, groups=g, scale=scale, activation=activation)
    expected = ref.conv2d_int8(x, w, bias, **kw)
    out = qkernels.conv2d_int8(x, w, bias, **kw)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    # int8: scale chosen so values spread over and beyond [-127, 127] (saturation)
    big = scale * 300
    out8 = qkernels.conv2d_int8(x, w, bias, out_dtype=torch.int8, **dict(kw, scale=big))
    assert out8.dtype == torch.int8
    pre = ref.conv2d_int8(x, w, bias, **dict(kw, scale=big))
    if activation != "relu6":
        assert float(pre.abs().max()) > 127.5, "the case must exercise saturation"
    _assert_int8_close(out8, pre)


# (N, C, H, W, O, kernel, stride, groups): shapes that reach every kernel's blocks and tails
ISA_EPILOGUE_CASES = {
    "pointwise": (2, 64, 11, 13, 80, 1, 1, 1),
    "pointwise small K": (2, 24, 9, 11, 40, 1, 1, 1),
    "depthwise s1": (2, 72, 6, 19, 72, 3, 1, 72),
    "depthwise s2": (1, 40, 7, 17, 40, 3, 2, 40),
    "depthwise 32 s1": (2, 32, 5, 11, 32, 3, 1, 32),
    "3x3": (2, 16, 7, 9, 24, 3, 1, 1),
}


@pytest.mark.parametrize("case", list(ISA_EPILOGUE_CASES))
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_epilogue_is_identical_on_every_isa(case, activation, monkeypatch):
    """Every kernel applies the same fma and rounding per element, so float and int8 outputs agree bit
    for bit between instruction sets (the exactness tests above only cover the int32 accumulator)."""
    n, c, h, w_, o, k, s, g = ISA_EPILOGUE_CASES[case]
    gen = torch.Generator().manual_seed(17)
    x, w = rand_int8(n, c, h, w_, gen=gen), rand_int8(o, c // g, k, k, gen=gen)
    scale = torch.rand(o, generator=gen) * 0.004 + 1e-4
    bias = torch.randn(o, generator=gen) * 20
    kw = dict(stride=s, padding=k // 2, groups=g, scale=scale, activation=activation)
    results = {}
    for isa in ISAS:
        monkeypatch.setenv("QKERNELS_INT8_ISA", isa)
        results[isa] = [qkernels.conv2d_int8(x, w, bias, out_dtype=dt, **kw) for dt in (torch.float32, torch.int8)]
    base = results["portable"]
    assert int(base[1].abs().max()) == (6 if activation == "relu6" else 127), "the case must exercise saturation"
    for isa, outs in results.items():
        for got, want in zip(outs, base):
            assert torch.equal(got, want), isa


@pytest.mark.parametrize("kind", ["pointwise", "depthwise s1", "3x3"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_nan_and_inf_in_the_epilogue(kind, activation, isa):
    """A NaN scale or bias gives 0 as int8 (and NaN as float, through relu/relu6 too); +-inf saturates."""
    n, c, h, w_, o, k, s, g = ISA_EPILOGUE_CASES[kind]
    gen = torch.Generator().manual_seed(23)
    x, w = rand_int8(n, c, h, w_, gen=gen), rand_int8(o, c // g, k, k, gen=gen)
    scale = torch.rand(o, generator=gen) * 0.004 + 1e-4
    bias = torch.randn(o, generator=gen)
    scale[1], bias[2], bias[3], bias[4] = float("nan"), float("nan"), float("inf"), float("-inf")
    kw = dict(stride=s, padding=k // 2, groups=g, scale=scale, activation=activation)
    out8 = qkernels.conv2d_int8(x, w, bias, out_dtype=torch.int8, **kw)
    assert (out8[:, 1:3] == 0).all()
    high = {None: 127, "relu": 127, "relu6": 6}[activation]
    assert (out8[:, 3] == high).all() and (out8[:, 4] == (-127 if activation is None else 0)).all()
    outf = qkernels.conv2d_int8(x, w, bias, **kw)
    assert outf[:, 1:3].isnan().all()
    expected = ref.conv2d_int8(x, w, bias, **kw)
    torch.testing.assert_close(outf.double(), expected, rtol=1e-6, atol=1e-5, equal_nan=True)
    _assert_int8_close(out8[:, 5:], expected[:, 5:])


def test_int8_rounds_half_away_from_zero_and_saturates():
    # 1x1 conv with one input channel and weight 1: acc == x, so acc * 0.5 hits every half
    x = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 1, 16, 16)
    w = torch.ones(1, 1, 1, 1, dtype=torch.int8)
    out = qkernels.conv2d_int8(x, w, scale=0.5, out_dtype=torch.int8).flatten().tolist()
    for xv, got in zip(range(-128, 128), out):
        half = xv / 2
        want = int(half + 0.5) if half >= 0 else -int(-half + 0.5)
        assert got == want, (xv, got, want)
    assert qkernels.conv2d_int8(x, w, scale=10.0, out_dtype=torch.int8).min() == -127
    assert qkernels.conv2d_int8(x, w, scale=10.0, out_dtype=torch.int8).max() == 127
    # the same through the linear op and the depthwise path
    lin = qkernels.linear_int8(x.reshape(256, 1), torch.ones(1, 1, dtype=torch.int8), scale=0.5, out_dtype=torch.int8)
    assert lin.flatten().tolist() == out
    dw = qkernels.conv2d_int8(x.reshape(1, 256, 1, 1), torch.ones(256, 1, 1, 1, dtype=torch.int8), groups=256,
                              scale=0.5, out_dtype=torch.int8)
    assert dw.flatten().tolist() == out


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("activation", [None, "relu6"])
def test_linear_epilogue(per_channel, activation):
    gen = torch.Generator().manual_seed(2)
    x, w = rand_int8(3, 5, 40, gen=gen), rand_int8(30, 40, gen=gen)
    scale, bias = _epilogue_params(30, per_channel, True, gen)
    expected = ref.linear_int8(x, w, bias, scale=scale, activation=activation)
    out = qkernels.linear_int8(x, w, bias, scale=scale, activation=activation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    big = scale * 100
    _assert_int8_close(qkernels.linear_int8(x, w, bias, scale=big, out_dtype=torch.int8, activation=activation),
                       ref.linear_int8(x, w, bias, scale=big, activation=activation))


def test_scale_as_tensor_forms():
    gen = torch.Generator().manual_seed(9)
    x, w = rand_int8(1, 8, 4, 4, gen=gen), rand_int8(4, 8, 1, 1, gen=gen)
    a = qkernels.conv2d_int8(x, w, scale=0.25)
    assert torch.equal(a, qkernels.conv2d_int8(x, w, scale=torch.tensor(0.25)))
    assert torch.equal(a, qkernels.conv2d_int8(x, w, scale=torch.full((4,), 0.25)))
    assert torch.equal(a, qkernels.conv2d_int8(x, w, scale=torch.tensor([0.25])))


# --- peer: torch.ao quantized conv (fbgemm / x86) ---------------------------------------------------

def _peer_engine():
    for engine in ("x86", "fbgemm"):
        if engine in torch.backends.quantized.supported_engines:
            return engine
    return None


@pytest.mark.skipif(_peer_engine() is None, reason="no x86/fbgemm quantized engine in this torch")
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (0, 1, 2, 5, 9, 12, 16, 18)],
                         ids=[CONV_CASES[i][0] for i in (0, 1, 2, 5, 9, 12, 16, 18)])
def test_conv_matches_torch_ao_quantized(case):
    """Same integers through torch.ops.quantized.conv2d: x as quint8 (zero point 128), weights qint8
    restricted to [-64, 63] (fbgemm's 16-bit intermediates saturate beyond that without VNNI); output
    requantized with a power-of-two scale (so both compute the same real values). Ties round differently (to even there), so one step is allowed."""
    gen = torch.Generator().manual_seed(21)
    name, n, c, h, w_, o, k, s, p, d, g = case
    x = rand_int8(n, c, h, w_, gen=gen)
    w = rand_int8(o, c // g, k, k, low=-64, high=63, gen=gen)
    # peer bias is in accumulator units (it is quantized to int32 with scale 1 here); ours is added after
    # the scale, in output units
    out_scale = 64.0
    bias_acc = torch.randint(-500, 501, (o,), generator=gen).float()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = _peer_engine()
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated in recent torch
            warnings.simplefilter("ignore")
            xq = torch._make_per_tensor_quantized_tensor((x.int() + 128).to(torch.uint8), 1.0, 128)
            wq = torch._make_per_tensor_quantized_tensor(w, 1.0, 0)
        packed = torch.ops.quantized.conv2d_prepack(wq, bias_acc, [s, s], [p, p], [d, d], g)
        yq = torch.ops.quantized.conv2d(xq, packed, out_scale, 128)
    finally:
        torch.backends.quantized.engine = previous
    peer = (yq.int_repr().int() - 128).clamp(-127, 127)
    ours = qkernels.conv2d_int8(x, w, bias_acc / out_scale, stride=s, padding=p, dilation=d, groups=g, scale=1.0 / out_scale,
                                out_dtype=torch.int8)
    diff = (ours.int() - peer).abs()
    assert diff.max() <= 1
    assert (diff == 0).double().mean() > 0.97


# --- weights packed once -----------------------------------------------------------------------------

PACKED_CASES = [c for c in CONV_CASES if c[0] in ("stem 3->32 s2", "pw 32->64", "pw 512->512", "head box 512->12",
                                                  "extra 3x3 64->128 s2 2->1", "groups 2", "dw64 s2", "empty batch")]


@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_conv_packed_equals_conv(case, isa):
    gen = torch.Generator().manual_seed(41)
    x, weight, kw = _conv_case(case, gen)
    x = x.abs().clamp(max=127) if case[0].startswith("pw") else x  # also the uint8 kernels
    packed = qkernels.pack_conv2d_int8_weight(weight, kw["groups"])
    assert packed.dtype == torch.int8 and packed.dim() == 1
    o = weight.shape[0]
    bias, scale = torch.randn(o, generator=gen), torch.rand(o, generator=gen) * 0.01
    for out_dtype, b, sc, act in ((torch.int32, None, 1.0, None), (torch.int8, bias, scale, "relu"),
                                  (torch.float32, bias, scale, None)):
        want = qkernels.conv2d_int8(x, weight, b, scale=sc, out_dtype=out_dtype, activation=act, **kw)
        got = qkernels.conv2d_int8_packed(x, weight, packed, b, scale=sc, out_dtype=out_dtype, activation=act, **kw)
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", [c for c in PACKED_CASES if c[0] in ("pw 32->64", "pw 512->512", "extra 3x3 64->128 s2 2->1",
                                                                  "groups 2")], ids=lambda c: c[0])
def test_conv_packed_blob_is_what_the_kernel_reads(case, isa):
    """Every instruction set packs GEMM weights once, and the call multiplies by the packed copy, not by
    `weight` (so a blob that fits must hold exactly the weights): the same blob with its packed bytes
    changed changes the result."""
    gen = torch.Generator().manual_seed(44)
    x, weight, kw = _conv_case(case, gen)
    packed = qkernels.pack_conv2d_int8_weight(weight, kw["groups"])
    assert packed.numel() > weight.numel()  # header + packed groups
    want = qkernels.conv2d_int8(x, weight, out_dtype=torch.int32, **kw)
    assert torch.equal(qkernels.conv2d_int8_packed(x, weight, packed, out_dtype=torch.int32, **kw), want)
    changed = packed.clone()
    changed[128:] = changed[128:].bitwise_xor(torch.tensor(0x15, dtype=torch.int8))  # past header and flags
    assert not torch.equal(qkernels.conv2d_int8_packed(x, weight, changed, out_dtype=torch.int32, **kw), want)


def test_conv_packed_blob_that_does_not_fit_is_ignored(monkeypatch):
    gen = torch.Generator().manual_seed(42)
    x, w = rand_int8(2, 32, 5, 5, gen=gen), rand_int8(48, 32, 1, 1, gen=gen)
    want = qkernels.conv2d_int8(x, w, out_dtype=torch.int32)
    other = qkernels.pack_conv2d_int8_weight(rand_int8(40, 32, 1, 1, gen=gen))  # another shape
    for blob in (other, torch.zeros(0, dtype=torch.int8), torch.full((300,), 7, dtype=torch.int8)):
        assert torch.equal(qkernels.conv2d_int8_packed(x, w, blob, out_dtype=torch.int32), want)
    packed = qkernels.pack_conv2d_int8_weight(w)
    monkeypatch.setenv("QKERNELS_INT8_ISA", "portable")  # packed for another instruction set
    assert torch.equal(qkernels.conv2d_int8_packed(x, w, packed, out_dtype=torch.int32), want)
    with pytest.raises(RuntimeError, match="groups"):
        qkernels.pack_conv2d_int8_weight(w, 5)
    with pytest.raises(RuntimeError, match="int8 weight"):
        qkernels.pack_conv2d_int8_weight(w.float())


def test_depthwise_blob_that_does_not_fit_is_ignored(monkeypatch):
    """Depthwise weights pack for the AVX2 depthwise kernel in a blob of their own kind: it is used only for
    the conv it was made for (a GEMM blob, another channel count or kernel, another ISA are ignored)."""
    gen = torch.Generator().manual_seed(43)
    x = rand_int8(2, 64, 7, 7, gen=gen).abs()
    w = rand_int8(64, 1, 3, 3, gen=gen)
    kw = dict(padding=1, groups=64)
    want = qkernels.conv2d_int8(x, w, out_dtype=torch.int32, **kw)
    own = qkernels.pack_conv2d_int8_weight(w, 64)
    if qkernels.build_info().get("int8_isa_selected", "avx2") == "avx2":
        assert own.numel() > 0  # packed where the AVX2 depthwise kernel runs
    others = (qkernels.pack_conv2d_int8_weight(rand_int8(32, 1, 3, 3, gen=gen), 32),  # other channels
              qkernels.pack_conv2d_int8_weight(rand_int8(64, 1, 3, 1, gen=gen), 64),  # other kernel
              qkernels.pack_conv2d_int8_weight(rand_int8(64, 64, 3, 3, gen=gen)),     # a GEMM blob
              own[:-1].clone())                                                      # cut short
    for blob in (own,) + others:
        assert torch.equal(qkernels.conv2d_int8_packed(x, w, blob, out_dtype=torch.int32, **kw), want)
    pw = rand_int8(48, 64, 1, 1, gen=gen)  # and a depthwise blob given to a GEMM conv
    assert torch.equal(qkernels.conv2d_int8_packed(x, pw, own, out_dtype=torch.int32),
                       qkernels.conv2d_int8(x, pw, out_dtype=torch.int32))
    monkeypatch.setenv("QKERNELS_INT8_ISA", "portable")
    assert torch.equal(qkernels.conv2d_int8_packed(x, w, own, out_dtype=torch.int32, **kw), want)


# --- opcheck, CUDA ----------------------------------------------------------------------------------

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(4)
    x, w = rand_int8(2, 8, 5, 6, gen=gen).to(device), rand_int8(12, 8, 3, 3, gen=gen).to(device)
    dw = rand_int8(8, 1, 3, 3, gen=gen).to(device)
    bias = torch.randn(12, generator=gen).to(device)
    s = torch.tensor(0.01, device=device)
    sc = (torch.rand(12, generator=gen) * 0.01).to(device)
    conv = [
        (x, w, bias, [1, 1], [1, 1], [1, 1], 1, sc, torch.float32, "relu"),
        (x, w, None, [2, 1], [0, 1], [1, 1], 1, s, torch.int8, "none"),
        (x, dw, None, [1, 1], [1, 1], [1, 1], 8, torch.tensor(1.0, device=device), torch.int32, "none"),
    ]
    xl, wl = rand_int8(3, 4, 16, gen=gen).to(device), rand_int8(12, 16, gen=gen).to(device)
    lin = [(xl, wl, bias, sc, torch.float32, "relu6"), (xl, wl, None, s, torch.int8, "none")]
    return conv, lin


def test_opcheck(device):
    conv, lin = _opcheck_samples(device)
    for args in conv:
        torch.library.opcheck(ops.conv2d_int8, args)
        packed = ops.pack_conv2d_int8_weight(args[1], args[6])
        torch.library.opcheck(ops.conv2d_int8_packed, (args[0], args[1], packed) + args[2:])
    for args in lin:
        torch.library.opcheck(ops.linear_int8, args)


@needs_cuda
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_cuda_conv_matches_cpu(case):
    gen = torch.Generator().manual_seed(31)
    x, weight, kw = _conv_case(case, gen)
    o = weight.shape[0]
    acc_cpu = qkernels.conv2d_int8(x, weight, out_dtype=torch.int32, **kw)
    acc_gpu = qkernels.conv2d_int8(x.cuda(), weight.cuda(), out_dtype=torch.int32, **kw)
    assert torch.equal(acc_gpu.cpu(), acc_cpu)
    bias = torch.randn(o, generator=gen)
    scale = torch.rand(o, generator=gen) * 0.01
    for out_dtype in (torch.float32, torch.int8):
        a = qkernels.conv2d_int8(x, weight, bias, scale=scale, out_dtype=out_dtype, activation="relu6", **kw)
        b = qkernels.conv2d_int8(x.cuda(), weight.cuda(), bias.cuda(), scale=scale.cuda(), out_dtype=out_dtype,
                                 activation="relu6", **kw)
        assert b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(b.cpu(), a), "CPU and CUDA must agree bit for bit (same fma epilogue)"
    xcl = x.cuda().contiguous(memory_format=torch.channels_last)
    assert torch.equal(qkernels.conv2d_int8(xcl, weight.cuda(), out_dtype=torch.int32, **kw).cpu(), acc_cpu)


@needs_cuda
@pytest.mark.parametrize("m,k,o", LINEAR_CASES)
def test_cuda_linear_matches_cpu(m, k, o):
    gen = torch.Generator().manual_seed(32)
    x, w = rand_int8(m, k, gen=gen), rand_int8(o, k, gen=gen)
    assert torch.equal(qkernels.linear_int8(x.cuda(), w.cuda(), out_dtype=torch.int32).cpu(),
                       qkernels.linear_int8(x, w, out_dtype=torch.int32))
    bias, scale = torch.randn(o, generator=gen), torch.rand(o, generator=gen) * 0.01
    for out_dtype in (torch.float32, torch.int8):
        a = qkernels.linear_int8(x, w, bias, scale=scale, out_dtype=out_dtype, activation="relu")
        b = qkernels.linear_int8(x.cuda(), w.cuda(), bias.cuda(), scale=scale.cuda(), out_dtype=out_dtype,
                                 activation="relu")
        assert torch.equal(b.cpu(), a)


@needs_cuda
def test_cuda_device_mismatch_is_an_error():
    x, w = rand_int8(1, 4, 3, 3), rand_int8(4, 4, 1, 1)
    with pytest.raises(RuntimeError, match="weight is on"):
        qkernels.conv2d_int8(x.cuda(), w)
    with pytest.raises(RuntimeError, match="bias is on"):
        qkernels.conv2d_int8(x.cuda(), w.cuda(), torch.zeros(4))


# --- errors ---------------------------------------------------------------------------------------

def test_conv_errors():
    x, w = rand_int8(1, 8, 5, 5), rand_int8(4, 8, 3, 3)
    cases = [
        (lambda: qkernels.conv2d_int8(x.float(), w), RuntimeError, "input must be int8"),
        (lambda: qkernels.conv2d_int8(x, w.float()), RuntimeError, "weight must be int8"),
        (lambda: qkernels.conv2d_int8(x[0], w), RuntimeError, "input must be 4-D"),
        (lambda: qkernels.conv2d_int8(x, w, groups=3), RuntimeError, "must divide the input channels"),
        (lambda: qkernels.conv2d_int8(x, rand_int8(6, 4, 3, 3), groups=4), RuntimeError,
         "must divide the output channels"),
        (lambda: qkernels.conv2d_int8(x, rand_int8(4, 3, 3, 3)), RuntimeError, "input channels"),
        (lambda: qkernels.conv2d_int8(x, w, torch.zeros(5)), RuntimeError, r"bias must have shape \[4\]"),
        (lambda: qkernels.conv2d_int8(x, w, torch.zeros(4, dtype=torch.float64)), RuntimeError, "bias must be float32"),
        (lambda: qkernels.conv2d_int8(x, w, scale=torch.ones(3)), RuntimeError, "scale must be 0-dim"),
        (lambda: qkernels.conv2d_int8(x, w, scale=torch.ones(4, dtype=torch.float64)), RuntimeError,
         "scale must be float32"),
        (lambda: qkernels.conv2d_int8(x, w, scale=2.0, out_dtype=torch.int32), ValueError, "raw accumulator"),
        (lambda: qkernels.conv2d_int8(x, w, torch.zeros(4), out_dtype=torch.int32), ValueError, "raw accumulator"),
        (lambda: qkernels.conv2d_int8(x, w, activation="relu", out_dtype=torch.int32), ValueError, "raw accumulator"),
        (lambda: qkernels.conv2d_int8(x, w, out_dtype=torch.float16), ValueError, "out_dtype"),
        (lambda: qkernels.conv2d_int8(x, w, activation="gelu"), ValueError, "activation"),
        (lambda: qkernels.conv2d_int8(x, w, stride=0), RuntimeError, "stride must be >= 1"),
        (lambda: qkernels.conv2d_int8(x, w, padding=-1), RuntimeError, "padding must be >= 0"),
        (lambda: qkernels.conv2d_int8(x, rand_int8(4, 8, 7, 7)), RuntimeError, "smaller than the dilated kernel"),
        # the raw op, bypassing the Python checks, still refuses these
        (lambda: ops.conv2d_int8(x, w, torch.zeros(4), [1, 1], [0, 0], [1, 1], 1, torch.tensor(1.0), torch.int32,
                                 "none"), RuntimeError, "bias is not allowed"),
        (lambda: ops.conv2d_int8(x, w, None, [1, 1], [0, 0], [1, 1], 1, torch.tensor(2.0), torch.int32, "none"),
         RuntimeError, "scale must be 1"),
        (lambda: ops.conv2d_int8(x, w, None, [1, 1], [0, 0], [1, 1], 1, torch.tensor(1.0), torch.float16, "none"),
         RuntimeError, "out_dtype must be"),
        (lambda: ops.conv2d_int8(x, w, None, [1, 1], [0, 0], [1, 1], 1, torch.tensor(1.0), torch.float32, "tanh"),
         RuntimeError, "activation must be"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_linear_errors():
    x, w = rand_int8(3, 8), rand_int8(4, 8)
    with pytest.raises(RuntimeError, match="input must be int8"):
        qkernels.linear_int8(x.float(), w)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        qkernels.linear_int8(x, w[None])
    with pytest.raises(RuntimeError, match="input features"):
        qkernels.linear_int8(x, rand_int8(4, 7))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\]"):
        qkernels.linear_int8(x, w, torch.zeros(3))
    with pytest.raises(ValueError, match="raw accumulator"):
        qkernels.linear_int8(x, w, scale=0.5, out_dtype=torch.int32)


def test_bad_isa_override_is_an_error(monkeypatch):
    monkeypatch.setenv("QKERNELS_INT8_ISA", "sse9")
    with pytest.raises(RuntimeError, match="QKERNELS_INT8_ISA"):
        qkernels.linear_int8(rand_int8(2, 4), rand_int8(3, 4))
    assert os.environ["QKERNELS_INT8_ISA"] == "sse9"  # restored by monkeypatch afterwards
