"""Fake-quantize operators (reference-semantics.md, section 2) against float64 references.

How results are compared, and why:
- The kernels compute v = clip(x, -s, s) * fl(bin / s) in float32 and round half away from zero. Two
  float32 roundings (bin/s, then the product) put v within |v| * 2**-23 of the exact float64 value, so a
  code may differ from the float64 reference by exactly one step, but only where v lies that close to a
  .5 tie. `assert_codes_agree` checks exactly that: every mismatch is one step, sits at a near-tie, and
  mismatches are rare. (A flat 1e-5 window is too narrow above ~7 bits: at 16 bits |v| reaches 32767 and
  the float32 error of v reaches ~4e-3.)
- Fake-quant outputs in float32 are turned back into codes (out / step is within 2**-22 of an integer
  for every code up to 32767) and checked the same way; the value must be code * step to float32
  rounding. float16/bfloat16 inputs are compared with the reference computed from their exact float32
  upcast: one step at near-ties plus the output rounding of the low-precision dtype.
- Scales are maxima of the input values, so they must match the reference exactly.
"""

import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

import qkernels
from qkernels import reference as R

from conftest import needs_cuda

ops = torch.ops.qkernels

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION = [torch.float16, torch.bfloat16]
# Half the spacing of the dtype's significand (relative rounding bound) and of its smallest subnormals.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
# Odd sizes cover the scalar tails of the AVX-512/AVX2 loops; 100_003 spans several parallel chunks.
SHAPES = [(), (0,), (1,), (7,), (33,), (5, 17), (3, 4, 5), (0, 6), (100_003,)]
NAN, INF = float("nan"), float("inf")


def dtype_id(d):
    return str(d).replace("torch.", "")


def shape_id(shape):
    return "x".join(map(str, shape)) if shape else "0dim"


def bin_of(bits):
    return 2 ** (bits - 1) - 1


def rand(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def with_non_finite(x):
    """A copy of x with NaN, +Inf and -Inf spread over it (head, vector body, tail, later chunks)."""
    x = x.clone()
    flat = x.view(-1)
    n = flat.numel()
    for i, value in zip([0, n // 3, n // 2, n - 1, 40_000, 70_001], [NAN, INF, -INF, NAN, INF, NAN]):
        if i < n:
            flat[i] = value
    return x


def code_dtype(bits):
    return torch.int8 if bits <= 8 else torch.int16


def unrounded_codes(x, scale, bits):
    """v = clip(x, -s, s) / s * bin in float64 before rounding (0 where the scale is unusable)."""
    xd, s = x.double(), scale.double()
    usable = s > 1e-30
    safe = torch.where(usable, s, torch.ones_like(s))
    v = torch.maximum(torch.minimum(xd, safe), -safe) / safe * bin_of(bits)
    return torch.where(usable, v, torch.zeros_like(v))


def near_tie(v):
    frac = v.abs() - v.abs().floor()
    return (frac - 0.5).abs() < 1e-5 + v.abs() * 2.0**-22


def assert_codes_agree(got, ref, v, what=""):
    """got and ref are codes (NaN allowed, at the same places); v the unrounded codes."""
    got, ref, v = torch.broadcast_tensors(got.double().cpu(), ref.double().cpu(), v.double().cpu())
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), "%s: NaN codes at different places" % what
    defined = ~torch.isnan(ref)
    diff = (got - ref)[defined]
    mismatch = diff != 0
    count = int(mismatch.sum())
    if count == 0:
        return
    v_bad = v[defined][mismatch]
    assert (diff[mismatch].abs() == 1).all(), "%s: codes off by more than one step: got %s, want %s" % (
        what, got[defined][mismatch][:5].tolist(), ref[defined][mismatch][:5].tolist())
    far = ~near_tie(v_bad)
    assert not far.any(), "%s: one-step code differences away from a rounding tie, at v = %s" % (
        what, v_bad[far][:5].tolist())
    assert count <= max(2, int(defined.sum()) // 1000), "%s: %d near-tie mismatches is too many" % (what, count)


def check_codes(codes, x, scale, bits, what=""):
    """Integer codes of x (any float dtype, on any device) against the reference; NaN must give 0."""
    x, scale = x.cpu().float(), scale.cpu()
    assert codes.dtype == code_dtype(bits) and codes.shape == x.shape
    ref = R.quant_codes(x, scale, bits)
    v = unrounded_codes(x, scale, bits)
    nan = torch.isnan(ref)
    assert (codes.cpu()[nan] == 0).all(), "%s: NaN inputs must give code 0" % what
    assert_codes_agree(codes, torch.where(nan, 0.0, ref), torch.where(nan, 0.0, v), what)


def check_fake(out, x, scale, bits, what=""):
    """Fake-quant output of x with scale(s) `scale` (broadcastable to x) against the reference."""
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device, what
    out, xf, scale = out.cpu().double(), x.cpu().float(), scale.cpu()
    ref_out = R.fake_quant(xf, scale, bits)
    s = scale.double()
    step = torch.where(s > 1e-30, s / bin_of(bits), torch.zeros_like(s))
    out, ref_out, step = torch.broadcast_tensors(out, ref_out, step)
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), "%s: NaN outputs at different places" % what
    ok = ~torch.isnan(ref_out)
    if x.dtype == torch.float32:
        usable = step > 0
        codes = torch.where(usable, torch.round(out / torch.where(usable, step, 1.0)), out)
        assert_codes_agree(codes, R.quant_codes(xf, scale, bits), unrounded_codes(xf, scale, bits), what)
        expect = codes * step  # out = fl(code * fl(step)): two float32 roundings
        assert ((out - expect).abs() <= expect.abs() * 2.0**-22)[ok].all(), "%s: output is not code * step" % what
    else:
        err = (out - ref_out).abs()
        rounding = ref_out.abs() * (UNIT_ROUNDOFF[x.dtype] + 2.0**-22) + SUBNORMAL_ROUNDOFF[x.dtype]
        off = ok & (err > rounding)
        assert (err[off] <= (step + rounding)[off]).all(), "%s: off by more than one step" % what
        v = unrounded_codes(xf, scale, bits).expand_as(out)
        assert near_tie(v[off]).all(), "%s: one-step output differences away from a tie" % what


# --- abs_max --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_abs_max_matches_reference(device, shape, dtype):
    x = rand(shape, dtype)
    s = qkernels.abs_max(x.to(device))
    assert s.shape == () and s.dtype == torch.float32 and s.device.type == device
    assert s.item() == R.finite_abs_max(x.float()).item()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_abs_max_ignores_nan_and_inf(device, dtype):
    x = torch.tensor([NAN, INF, -INF, 2.0, -3.0, 0.5], dtype=dtype, device=device)
    assert qkernels.abs_max(x).item() == 3.0
    for only in ([NAN, NAN], [INF, -INF, NAN]):
        assert qkernels.abs_max(torch.tensor(only, dtype=dtype, device=device)).item() == 0.0
    big = with_non_finite(rand((100_003,), dtype))
    assert qkernels.abs_max(big.to(device)).item() == R.finite_abs_max(big.float()).item()


# --- per-tensor abs_max fake quantization -----------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fake_quant_abs_max_matches_reference(device, shape, dtype):
    x = rand(shape, dtype, seed=1)
    out, s = qkernels.fake_quant_abs_max(x.to(device), 8)
    assert s.shape == () and s.dtype == torch.float32
    assert s.item() == R.finite_abs_max(x.float()).item()
    check_fake(out, x.to(device), s, 8)
    codes, s2 = qkernels.quantize_abs_max(x.to(device), 8)
    assert s2.item() == s.item()
    check_codes(codes, x, s, 8)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_low_precision_output_is_code_times_float32_step(device, dtype):
    # Computed in float32, rounded once to the input dtype at the end.
    x = rand((4097,), dtype, seed=2)
    out, s = qkernels.fake_quant_abs_max(x.to(device), 8)
    codes, _ = qkernels.quantize_abs_max(x.to(device), 8)
    step = s.cpu() / 127  # float32 division, as in the kernel
    assert torch.equal(out.cpu(), (codes.cpu().float() * step).to(dtype))


@pytest.mark.parametrize("bits", range(2, 17))
def test_all_bit_widths(device, bits):
    x = rand((2049,), seed=bits)
    out, s = qkernels.fake_quant_abs_max(x.to(device), bits)
    check_fake(out, x.to(device), s, bits, "fake_quant_abs_max bits=%d" % bits)
    codes, _ = qkernels.quantize_abs_max(x.to(device), bits)
    check_codes(codes, x, s, bits, "quantize_abs_max bits=%d" % bits)
    assert codes.abs().max().item() == bin_of(bits)  # the abs max lands on the top code
    # A scale below the abs max clips: clipped values take the extreme codes.
    scale = torch.tensor(0.6 * s.item(), dtype=torch.float32)
    codes = qkernels.quantize_with_scale(x.to(device), scale.to(device), bits)
    check_codes(codes, x, scale, bits, "quantize_with_scale bits=%d" % bits)
    clipped = x.abs() > scale
    assert clipped.any() and (codes.cpu()[clipped].abs() == bin_of(bits)).all()


def c_round(v):
    """C round(): halves away from zero, written independently of qkernels.reference."""
    return np.where(v >= 0, np.floor(v + 0.5), np.ceil(v - 0.5))


@pytest.mark.parametrize("bits", [4, 8])
def test_paddle_unit_test_formulas(device, bits):
    # Paddle's test_fake_quantize_op: scale = max|x|, out = round(x / scale * bin); the channel-wise test
    # does the same per slice along quant_axis; dequantization is out * scale / bin.
    b = bin_of(bits)
    x = rand((4, 31), seed=3).numpy()
    scale = np.max(np.abs(x)).astype(np.float64)
    v = x.astype(np.float64) / scale * b
    expected = c_round(v)
    codes, s = qkernels.quantize_abs_max(torch.from_numpy(x).to(device), bits)
    assert s.item() == np.float32(scale)
    assert_codes_agree(codes, torch.from_numpy(expected), torch.from_numpy(v), "paddle abs_max")
    out, _ = qkernels.fake_quant_abs_max(torch.from_numpy(x).to(device), bits)
    dequant = torch.from_numpy(expected * scale / b)
    assert torch.allclose(out.cpu().double(), dequant, rtol=2.0**-22, atol=scale / b * (1 + 1e-6))

    w = rand((6, 3, 3, 3), seed=4).numpy()
    for axis in (0, 1):
        moved = np.moveaxis(w, axis, 0).astype(np.float64)
        scales = np.array([np.max(np.abs(moved[i])) for i in range(moved.shape[0])])
        v = np.moveaxis(np.stack([moved[i] / scales[i] * b for i in range(moved.shape[0])]), 0, axis)
        codes, got_scales = qkernels.quantize_channel_wise_abs_max(torch.from_numpy(w).to(device), bits, axis)
        assert np.array_equal(got_scales.cpu().numpy(), scales.astype(np.float32))
        assert_codes_agree(codes, torch.from_numpy(c_round(v)), torch.from_numpy(v), "paddle axis %d" % axis)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_agrees_with_torch_fake_quantize_away_from_ties(device, bits):
    # torch.fake_quantize_per_tensor_affine with scale s/bin, zero point 0 and range [-bin, bin] computes
    # the same thing, but rounds half to even and multiplies by fl(1 / fl(s / bin)): compare only where v
    # is farther from a tie than both float32 computations can move it (5 roundings of 2**-24).
    b = bin_of(bits)
    x = rand((10_007,), seed=5)
    out, s = qkernels.fake_quant_abs_max(x.to(device), bits)
    clip_scale = torch.tensor(0.5 * s.item())
    clipped = qkernels.fake_quant_with_scale(x.to(device), clip_scale.to(device), bits)
    for got, scale in [(out, s.cpu()), (clipped, clip_scale)]:
        step = (scale / b).item()  # float32 division, then exact as a double
        theirs = torch.fake_quantize_per_tensor_affine(x, step, 0, -b, b)
        v = unrounded_codes(x, scale, bits)
        frac = v.abs() - v.abs().floor()
        away = (frac - 0.5).abs() > 1e-6 + v.abs() * 2.0**-20
        assert away.float().mean() > 0.95
        assert torch.equal(got.cpu()[away], theirs[away])


# --- rounding ties --------------------------------------------------------------------------------

def test_rounding_half_away_from_zero_example(device):
    # bin = 127 and s = 127 make the step exactly 1, so x = k + 0.5 is an exact tie.
    x = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5], device=device)
    codes, s = qkernels.quantize_abs_max(x, 8)
    assert s.item() == 127.0
    assert codes.tolist() == [127, 3, -3, 1, -1, 2, -2, 127, -127]
    out, _ = qkernels.fake_quant_abs_max(x, 8)
    assert out.tolist() == [127.0, 3.0, -3.0, 1.0, -1.0, 2.0, -2.0, 127.0, -127.0]
    # torch rounds these ties to even instead, which is why the reference is not torch's fake_quantize.
    assert torch.fake_quantize_per_tensor_affine(x.cpu(), 1.0, 0, -127, 127)[1].item() == 2.0


# Largest magnitude j + 0.5 that the dtype holds exactly (its significand bits).
EXACT_HALVES = {torch.float32: 2**23, torch.float16: 2**10, torch.bfloat16: 2**7}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [2, 3, 5, 8, 11, 16])
@pytest.mark.parametrize("exponent", [-3, 0, 2])
def test_exact_ties_round_away_from_zero(device, dtype, bits, exponent):
    # s = bin * 2**e makes the step 2**e and bin / s = 2**-e exactly, so v = j + 0.5 is an exact tie.
    b = bin_of(bits)
    top = min(b, EXACT_HALVES[dtype])
    j = torch.arange(top, dtype=torch.float64)
    halves = torch.cat([j + 0.5, -(j + 0.5)])
    want = torch.cat([j + 1, -(j + 1)])
    x = (halves * 2.0**exponent).to(dtype)
    scale = torch.tensor(b * 2.0**exponent, dtype=torch.float32)
    codes = qkernels.quantize_with_scale(x.to(device), scale.to(device), bits)
    assert torch.equal(codes.cpu().double(), want)
    out = qkernels.fake_quant_with_scale(x.to(device), scale.to(device), bits)
    assert torch.equal(out.cpu().double(), want * 2.0**exponent)


# --- fake quantization with a given scale ---------------------------------------------------------

WITH_SCALE_CASES = [((), "0dim"), ((0,), "0dim"), ((7,), "float"), ((7,), "1elem"), ((5, 17), "0dim"),
                    ((100_003,), "float")]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,scale_kind", WITH_SCALE_CASES, ids=lambda c: shape_id(c) if isinstance(c, tuple) else c)
def test_fake_quant_with_scale_matches_reference(device, shape, dtype, scale_kind):
    x = rand(shape, dtype, seed=6)  # std 3 against scale 2.5: many values clip
    scale = {"float": 2.5, "0dim": torch.tensor(2.5), "1elem": torch.tensor([2.5])}[scale_kind]
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device)
    s = torch.tensor(2.5)
    out = qkernels.fake_quant_with_scale(x.to(device), scale, 8)
    check_fake(out, x.to(device), s, 8)
    codes = qkernels.quantize_with_scale(x.to(device), scale, 8)
    check_codes(codes, x, s, 8)


# --- channel-wise ---------------------------------------------------------------------------------

CHANNEL_CASES = [
    ((8, 3, 3, 3), 0),  # conv weight [O, C, kh, kw], one scale per output channel
    ((5, 7, 3, 3), 1),
    ((5, 7, 3, 3), -1),
    ((10, 17), 0),  # PyTorch linear weight [O, K]
    ((10, 17), 1),  # linear weight stored in-by-out
    ((10, 17), -1),
    ((6,), 0),
    ((2, 3, 4), -2),
    ((0, 3), 0),
    ((3, 0), 0),
    ((3, 0), 1),
    ((64, 40, 3, 3), 0),
    ((33_000, 4), 1),  # short rows over several threads (CPU) / the multi-launch path (CUDA)
]


def channel_scale_view(scales, x, axis):
    shape = [1] * x.dim()
    shape[axis] = -1
    return scales.view(shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CHANNEL_CASES, ids=lambda c: shape_id(c) if isinstance(c, tuple) else str(c))
def test_channel_wise_matches_reference(device, shape, axis, dtype):
    x = rand(shape, dtype, seed=7)
    if x.dim() > 1 and x.shape[axis] > 2:
        x.select(axis, 2).zero_()  # an all-zero channel: scale 0, zeros out, no NaN
    if x.shape[axis]:
        _, ref_scales = R.fake_channel_wise_quant_abs_max(x.float(), 8, axis)
    else:  # no channels: see test_reference_channel_wise_handles_zero_channels
        ref_scales = torch.zeros(0)
    out, scales = qkernels.fake_channel_wise_quant_abs_max(x.to(device), 8, axis)
    assert scales.dtype == torch.float32 and scales.shape == (x.shape[axis],)
    assert torch.equal(scales.cpu(), ref_scales.float())
    check_fake(out, x.to(device), channel_scale_view(scales.cpu(), x, axis), 8)
    codes, scales2 = qkernels.quantize_channel_wise_abs_max(x.to(device), 8, axis)
    assert torch.equal(scales2.cpu(), scales.cpu())
    check_codes(codes, x, channel_scale_view(scales.cpu(), x, axis), 8)
    if x.dim() > 1 and x.shape[axis] > 2:
        assert scales[2].item() == 0.0 and not out.select(axis, 2).any()


def test_reference_channel_wise_handles_zero_channels():
    out, scales = R.fake_channel_wise_quant_abs_max(torch.zeros(0, 3), 8, 0)
    assert out.shape == (0, 3) and scales.shape == (0,)


@pytest.mark.parametrize("bits", [2, 5, 12, 16])
def test_channel_wise_bit_widths(device, bits):
    x = rand((16, 3, 5, 5), seed=bits)
    out, scales = qkernels.fake_channel_wise_quant_abs_max(x.to(device), bits, 0)
    s = channel_scale_view(scales.cpu(), x, 0)
    check_fake(out, x.to(device), s, bits)
    codes, _ = qkernels.quantize_channel_wise_abs_max(x.to(device), bits, 0)
    check_codes(codes, x, s, bits)
    assert (codes.cpu().abs().amax(dim=(1, 2, 3)) == bin_of(bits)).all()  # each channel reaches the top code


# --- non-contiguous inputs ------------------------------------------------------------------------

def non_contiguous_views(dtype, device):
    # Views are taken on the device: copying a non-dense view to another device makes it contiguous.
    base = rand((24, 40), dtype, seed=8).to(device)
    return {
        "transposed": base.t(),
        "sliced_with_step": base[::3, 1::2],
        "transposed_sliced": base.t()[::2],
        "expanded": rand((24, 1), dtype, seed=9).to(device).expand(24, 40),
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("view", ["transposed", "sliced_with_step", "transposed_sliced", "expanded"])
def test_non_contiguous_inputs_equal_contiguous(device, dtype, view):
    x = non_contiguous_views(dtype, device)[view]
    assert not x.is_contiguous()
    before = x.clone()
    xc = x.contiguous()
    scale = torch.tensor(2.0, device=device)
    pairs = [
        (qkernels.abs_max(x), qkernels.abs_max(xc)),
        (qkernels.fake_quant_abs_max(x, 6), qkernels.fake_quant_abs_max(xc, 6)),
        (qkernels.quantize_abs_max(x, 10), qkernels.quantize_abs_max(xc, 10)),
        (qkernels.fake_quant_with_scale(x, scale, 8), qkernels.fake_quant_with_scale(xc, scale, 8)),
        (qkernels.quantize_with_scale(x, scale, 8), qkernels.quantize_with_scale(xc, scale, 8)),
    ]
    for axis in (0, 1, -1):
        pairs.append((qkernels.fake_channel_wise_quant_abs_max(x, 8, axis),
                      qkernels.fake_channel_wise_quant_abs_max(xc, 8, axis)))
        pairs.append((qkernels.quantize_channel_wise_abs_max(x, 8, axis),
                      qkernels.quantize_channel_wise_abs_max(xc, 8, axis)))
    for got, want in pairs:
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w)
    assert torch.equal(x, before)  # inputs are never written
    out, s = qkernels.fake_quant_abs_max(x, 8)
    check_fake(out, x, s, 8)
    out, scales = qkernels.fake_channel_wise_quant_abs_max(x, 8, 1)
    check_fake(out, x, channel_scale_view(scales.cpu(), x, 1), 8)


# --- zero scale -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_all_zero_input_gives_zeros_and_zero_scale(device, dtype):
    for x in (torch.zeros(37, dtype=dtype), torch.tensor([0.0, -0.0, 0.0], dtype=dtype), torch.zeros((), dtype=dtype)):
        x = x.to(device)
        out, s = qkernels.fake_quant_abs_max(x, 8)
        assert s.item() == 0.0 and torch.equal(out, torch.zeros_like(x))
        codes, s = qkernels.quantize_abs_max(x, 8)
        assert s.item() == 0.0 and not codes.any()
        if x.dim():
            out, scales = qkernels.fake_channel_wise_quant_abs_max(x.view(1, -1), 8, 0)
            assert scales.tolist() == [0.0] and torch.equal(out, torch.zeros_like(out))


def test_scale_below_threshold_gives_zeros(device):
    # float32 subnormals: max|x| ~ 1e-40 is below 1e-30, so the scale counts as zero.
    x = torch.tensor([1e-40, -3e-40, 0.0], device=device)
    out, s = qkernels.fake_quant_abs_max(x, 8)
    assert 0 < s.item() < 1e-30 and torch.equal(out, torch.zeros_like(x))
    assert not qkernels.quantize_abs_max(x, 8)[0].any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", [0.0, 1e-31, -1.0, INF, NAN])
def test_unusable_given_scale_gives_zeros(device, dtype, scale):
    # Zero, tiny and negative scales are at or below 1e-30; quant_math.h also treats non-finite scales
    # as unusable, so a broken scale never turns finite inputs into NaN or Inf.
    x = torch.tensor([0.5, -2.0, 7.0, 0.0, INF, -INF], dtype=dtype, device=device)
    out = qkernels.fake_quant_with_scale(x, scale, 8)
    assert torch.equal(out, torch.zeros_like(x))
    assert not qkernels.quantize_with_scale(x, scale, 8).any()


# --- NaN and Inf ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [9, 100_003])
def test_nan_and_inf_per_tensor(device, dtype, n):
    x = with_non_finite(rand((n,), dtype, seed=10))
    out, s = qkernels.fake_quant_abs_max(x.to(device), 8)
    assert s.item() == R.finite_abs_max(x.float()).item()  # non-finite values never set the scale
    check_fake(out, x.to(device), s, 8)  # NaN stays NaN, +-Inf clips to +-scale
    out = out.cpu()
    top = (127 * (s.cpu() / 127)).to(dtype)  # code 127 times the float32 step
    assert (out[x == INF] == top).all()
    assert (out[x == -INF] == -out[x == INF][0]).all()
    codes, _ = qkernels.quantize_abs_max(x.to(device), 8)
    check_codes(codes, x, s, 8)
    codes = codes.cpu()
    assert (codes[torch.isnan(x)] == 0).all() and (codes[x == INF] == 127).all() and (codes[x == -INF] == -127).all()
    scale = torch.tensor(1.5)
    check_fake(qkernels.fake_quant_with_scale(x.to(device), scale.to(device), 8), x.to(device), scale, 8)
    check_codes(qkernels.quantize_with_scale(x.to(device), scale.to(device), 8), x, scale, 8)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nan_and_inf_channel_wise(device, dtype):
    x = rand((4, 3, 3, 3), dtype, seed=11)
    x[0, 0, 0, 0], x[1, 2, 2, 2], x[2, 1, 0, 2], x[2, 0, 0, 0] = NAN, INF, -INF, NAN
    out, scales = qkernels.fake_channel_wise_quant_abs_max(x.to(device), 8, 0)
    assert torch.equal(scales.cpu(), R.fake_channel_wise_quant_abs_max(x.float(), 8, 0)[1].float())
    check_fake(out, x.to(device), channel_scale_view(scales.cpu(), x, 0), 8)
    codes, _ = qkernels.quantize_channel_wise_abs_max(x.to(device), 8, 0)
    check_codes(codes, x, channel_scale_view(scales.cpu(), x, 0), 8)


def test_nan_stays_nan_when_the_scale_is_unusable(device):
    # The documented NaN rule has no exception: with the scale guarded to zero, finite values give 0
    # and NaN still gives NaN (codes: 0).
    x = torch.tensor([NAN, 0.0, -0.0, NAN], device=device)
    out, s = qkernels.fake_quant_abs_max(x, 8)
    assert s.item() == 0.0
    assert torch.isnan(out[[0, 3]]).all() and (out[[1, 2]] == 0).all()
    assert not qkernels.quantize_abs_max(x, 8)[0].any()
    out = qkernels.fake_quant_with_scale(torch.tensor([NAN, 1.0], device=device), 0.0, 8)
    assert torch.isnan(out[0]) and out[1].item() == 0.0
    out, scales = qkernels.fake_channel_wise_quant_abs_max(torch.tensor([[NAN, NAN], [1.0, NAN]], device=device), 8, 0)
    assert scales.tolist() == [0.0, 1.0] and torch.isnan(out[0]).all() and torch.isnan(out[1, 1])
    assert out[1, 0].item() == pytest.approx(1.0, rel=2.0**-22)


def test_reference_agrees_with_kernels_on_nan_under_zero_scale():
    x = torch.tensor([NAN, 0.0, 0.0])
    out, s = qkernels.fake_quant_abs_max(x, 8)
    ref, ref_s = R.fake_quant_abs_max(x, 8)
    assert ref_s.item() == s.item()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


# --- straight-through gradients -------------------------------------------------------------------

def fake_quant_calls(scale):
    return {
        "abs_max": lambda x, ste: qkernels.fake_quant_abs_max(x, 8, ste=ste)[0],
        "with_scale": lambda x, ste: qkernels.fake_quant_with_scale(x, scale, 8, ste=ste),
        "channel_wise": lambda x, ste: qkernels.fake_channel_wise_quant_abs_max(x, 8, 1, ste=ste)[0],
        "channel_wise_last": lambda x, ste: qkernels.fake_channel_wise_quant_abs_max(x, 8, -1, ste=ste)[0],
    }


def grad_of(fn, x, ste, upstream):
    x = x.detach().requires_grad_(True)  # no clone: keep the caller's strides
    out = fn(x, ste)
    out.backward(upstream)
    return x.grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["abs_max", "with_scale", "channel_wise", "channel_wise_last"])
def test_identity_ste_passes_gradient_unchanged(device, dtype, op):
    x = with_non_finite(rand((6, 9), dtype, seed=12)).to(device)
    upstream = rand((6, 9), dtype, seed=13).to(device)
    fn = fake_quant_calls(torch.tensor(0.5, device=device))[op]
    assert torch.equal(grad_of(fn, x, "identity", upstream), upstream)
    assert torch.equal(grad_of(lambda x, ste: fn(x, ste), x.t(), "identity", upstream.t()), upstream.t())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_clip_ste_zeroes_gradient_where_clipped(device, dtype):
    x = with_non_finite(rand((6, 50), dtype, seed=14, scale=1.0))
    x[0, 0], x[0, 2] = 0.75, -0.75  # exactly at the scale: not clipped
    upstream = rand((6, 50), dtype, seed=15)
    for view in (lambda t: t, lambda t: t.t()[::2]):  # contiguous and non-contiguous inputs
        xv, gv = view(x.to(device)), view(upstream.to(device))
        fn = fake_quant_calls(torch.tensor(0.75, device=device))["with_scale"]
        got = grad_of(fn, xv, "clip", gv)
        xv, gv, got = xv.cpu(), gv.cpu(), got.cpu()
        keep = xv.float().abs() <= 0.75  # False for NaN and +-Inf
        assert 0.2 < keep.float().mean() < 0.8  # clipping really happens on both sides of the mask
        assert torch.equal(got, torch.where(keep, gv, torch.zeros_like(gv)))


@pytest.mark.parametrize("op", ["abs_max", "channel_wise", "channel_wise_last"])
def test_clip_ste_with_abs_max_scales_zeroes_only_non_finite(device, op):
    # With s = max|x| nothing finite is clipped; NaN and +-Inf are.
    x = with_non_finite(rand((6, 50), seed=16))
    upstream = rand((6, 50), seed=17)
    got = grad_of(fake_quant_calls(None)[op], x.to(device), "clip", upstream.to(device)).cpu()
    assert torch.equal(got, torch.where(torch.isfinite(x), upstream, torch.zeros_like(upstream)))


# --- layouts: dense inputs are read in place and outputs keep their strides ----------------------------

def layout_views(dtype, device):
    base = rand((4, 6, 5, 7), dtype, seed=30).to(device)
    return {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed_weight": rand((24, 40), dtype, seed=31).to(device).t(),
        "permuted": base.permute(2, 0, 3, 1),
        "offset": rand((1001,), dtype, seed=32).to(device)[3:],
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("view", ["channels_last", "transposed_weight", "permuted", "offset"])
def test_dense_inputs_keep_their_strides(device, dtype, view):
    x = layout_views(dtype, device)[view]
    xc = x.contiguous()
    scale = torch.tensor(2.0, device=device)
    outs = {
        "fake_quant_abs_max": (qkernels.fake_quant_abs_max(x, 8)[0], qkernels.fake_quant_abs_max(xc, 8)[0]),
        "quantize_abs_max": (qkernels.quantize_abs_max(x, 8)[0], qkernels.quantize_abs_max(xc, 8)[0]),
        "fake_quant_with_scale": (qkernels.fake_quant_with_scale(x, scale, 8, ste="clip"),
                                  qkernels.fake_quant_with_scale(xc, scale, 8)),
        "quantize_with_scale": (qkernels.quantize_with_scale(x, scale, 12), qkernels.quantize_with_scale(xc, scale, 12)),
    }
    for axis in range(x.dim()):
        outs["channel-wise axis %d" % axis] = (qkernels.fake_channel_wise_quant_abs_max(x, 8, axis)[0],
                                               qkernels.fake_channel_wise_quant_abs_max(xc, 8, axis)[0])
        outs["channel-wise codes axis %d" % axis] = (qkernels.quantize_channel_wise_abs_max(x, 6, axis)[0],
                                                     qkernels.quantize_channel_wise_abs_max(xc, 6, axis)[0])
    for what, (got, want) in outs.items():
        assert got.stride() == x.stride(), "%s: strides %s, input %s" % (what, got.stride(), x.stride())
        assert torch.equal(got, want), what  # same values as from a contiguous copy


def test_non_dense_inputs_give_contiguous_outputs(device):
    x = rand((6, 8, 5), seed=33).to(device)[:, ::2]
    assert qkernels.fake_quant_abs_max(x, 8)[0].is_contiguous()
    assert qkernels.fake_channel_wise_quant_abs_max(x, 8, 1)[0].is_contiguous()


# --- the clip-STE mask ----------------------------------------------------------------------------

def mask_bits(mask, n):
    """The mask's bits as a bool tensor of n elements (bit p % 32 of word p // 32)."""
    words = mask.cpu().to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(1) >> torch.arange(32)) & 1
    return bits.reshape(-1)[:n].bool()


def memory_order(t):
    """t's elements in the order its memory holds them (t dense)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset()) if t.numel() else t.reshape(-1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100_003])
def test_mask_holds_one_bit_per_element_in_memory_order(device, dtype, n):
    x = (with_non_finite(rand((n,), dtype, seed=34)) if n else torch.zeros(0, dtype=dtype)).to(device)
    scale = torch.tensor(1.5, device=device)
    out, mask = ops.fake_quant_with_scale(x, scale, 8, True)
    assert mask.dtype == torch.int32 and mask.shape == ((n + 31) // 32,) and mask.device == x.device
    keep = x.cpu().float().abs() <= 1.5  # False for NaN and +-Inf
    assert torch.equal(mask_bits(mask, n), keep)
    if n:
        assert (mask_bits(mask, ((n + 31) // 32) * 32)[n:] == 0).all()  # bits past the end are zero
    out2, s, mask2 = ops.fake_quant_abs_max(x, 8, True)
    assert torch.equal(mask_bits(mask2, n), torch.isfinite(x.cpu()))  # s = max|x|: only non-finite are clipped
    assert ops.fake_quant_with_scale(x, scale, 8, False)[1].numel() == 0  # no mask without clip_grad
    assert ops.fake_quant_abs_max(x, 8, False)[2].numel() == 0
    for view in layout_views(dtype, device).values():
        _, m = ops.fake_quant_with_scale(view, scale, 8, True)
        assert torch.equal(mask_bits(m, view.numel()), memory_order(view).cpu().float().abs() <= 1.5)


def clip_grad_today(x, scale, grad):
    """The gradient as computed before the mask existed: fake_quant_clip_grad reads x and the scale."""
    return ops.fake_quant_clip_grad(grad.contiguous(), x, scale.reshape(()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["abs_max", "with_scale"])
def test_mask_gradient_equals_the_saved_input_gradient(device, dtype, op):
    scale = torch.tensor(0.9, device=device)
    inputs = [with_non_finite(rand((n,), dtype, seed=35 + n, scale=1.0)).to(device) for n in (1, 37, 100_003)]
    inputs += list(layout_views(dtype, device).values()) + [rand((6, 8, 5), dtype, seed=36).to(device)[:, ::2],
                                                             rand((), dtype, seed=37).to(device)]
    for x in inputs:
        upstream = rand(x.shape, dtype, seed=38).to(device)  # contiguous: often not x's layout
        if op == "abs_max":
            fn = lambda t, ste: qkernels.fake_quant_abs_max(t, 8, ste=ste)[0]  # noqa: E731
            s = qkernels.abs_max(x)
        else:
            fn = lambda t, ste: qkernels.fake_quant_with_scale(t, scale, 8, ste=ste)  # noqa: E731
            s = scale
        got = grad_of(fn, x, "clip", upstream)
        assert torch.equal(got, clip_grad_today(x, s, upstream))
        keep = x.float().abs() <= s.float()
        assert torch.equal(got, torch.where(keep, upstream, torch.zeros_like(upstream)))
        # an expanded gradient (from .sum()) and a transposed one go through the same mask
        xg = x.detach().requires_grad_(True)
        fn(xg, "clip").sum().backward()
        assert torch.equal(xg.grad, keep.to(dtype))


def test_clip_ste_saves_only_the_mask(device):
    # The point of the mask: backward keeps 1 bit per element instead of the input (and the scale).
    x = rand((8, 16, 9, 9), seed=39).to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.relu(x) * 1.0  # an intermediate activation, freed unless something saves it
    for call in (lambda t: qkernels.fake_quant_with_scale(t, torch.tensor(0.5, device=device), 8, ste="clip"),
                 lambda t: qkernels.fake_quant_abs_max(t, 8, ste="clip")[0]):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            call(y)
        assert [(t.dtype, t.numel()) for t in saved] == [(torch.int32, (y.numel() + 31) // 32)]


def test_mask_grad_rejects_a_mismatched_mask(device):
    g = torch.ones(70, device=device)
    with pytest.raises(RuntimeError, match="mask must hold 3 words for a grad of 70 elements"):
        ops.fake_quant_mask_grad(g, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="mask must be int32"):
        ops.fake_quant_mask_grad(g, torch.zeros(3, dtype=torch.int64, device=device))


def test_clip_ste_under_torch_compile_matches_eager(device):
    # aot_eager traces forward and backward through the fake kernels (strides, the mask) without inductor's
    # code generation.
    def step(x, scale):
        out, _ = qkernels.fake_quant_abs_max(x, 6, ste="clip")
        return qkernels.fake_quant_with_scale(out * 3.0, scale, 4, ste="clip")

    x = rand((4, 8, 5, 5), seed=40).to(device).contiguous(memory_format=torch.channels_last)
    scale, g = torch.tensor(2.0, device=device), rand((4, 8, 5, 5), seed=41).to(device)
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        xg = x.clone().requires_grad_(True)
        out = fn(xg, scale)
        out.backward(g)
        results.append((out, xg.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert results[1][0].stride() == x.stride()


# --- recompute_fake_quant_outputs ------------------------------------------------------------------

def quant_conv_step(x, w, scale, ste, rounds=2):
    """relu -> fake quant (given scale) -> conv with a fake-quantized weight, twice: the convs save their
    fake-quantized inputs and weights for backward."""
    for _ in range(rounds):
        a = qkernels.fake_quant_with_scale(torch.relu(x), scale, 8, ste=ste)
        wq = qkernels.fake_quant_abs_max(w, 6, ste=ste)[0]
        x = torch.nn.functional.conv2d(a, wq, padding=1)
        wc = qkernels.fake_channel_wise_quant_abs_max(w, 8, 0, ste=ste)[0]
        x = torch.nn.functional.conv2d(x, wc, padding=1)
    return x.square().sum()


@pytest.mark.parametrize("ste", ["identity", "clip"])
def test_recomputed_fake_quant_outputs_give_the_same_gradients(device, ste, monkeypatch):
    from qkernels.ops import fake_quant as fq

    x = rand((2, 4, 9, 9), seed=42).to(device).contiguous(memory_format=torch.channels_last)
    w = rand((4, 4, 3, 3), seed=43).to(device)
    scale = torch.tensor(1.5, device=device)
    grads, calls, original = [], [], fq._Recipe.recompute
    monkeypatch.setattr(fq._Recipe, "recompute", lambda self: calls.append(1) or original(self))
    for recompute in (False, True):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        calls.clear()
        with qkernels.recompute_fake_quant_outputs() if recompute else torch.enable_grad():
            loss = quant_conv_step(xg, wg, scale, ste)
        loss.backward()
        grads.append((loss.detach(), xg.grad, wg.grad))
        assert len(calls) == (6 if recompute else 0)  # 3 saved conv inputs per round, each recomputed once
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_recompute_refuses_an_input_modified_in_place(device):
    x = rand((1, 2, 5, 5), seed=44).to(device).requires_grad_(True)
    w = rand((2, 2, 3, 3), seed=45).to(device).requires_grad_(True)
    with qkernels.recompute_fake_quant_outputs():
        a = torch.relu(x) * 1.0  # not saved by anything but the recipe
        y = torch.nn.functional.conv2d(qkernels.fake_quant_with_scale(a, 1.0, 8), w)
    with torch.no_grad():
        a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward pass"):
        y.sum().backward()


# --- quantizer state ------------------------------------------------------------------------------

def batch_maxima_sequence():
    # Starts below the initial scale 0.001, then a maximum that is evicted after `window` steps,
    # duplicates of the maximum, a NaN/Inf batch, an all-zero batch, an empty one and a 0-dim one.
    return [1e-4, 5e-4, 5.0, 1.0, 2.0, 3.0, 0.5, 0.2, 0.1, 4.0, 4.0, 0.3, 0.0, 0.25, 7.0, 0.01, 0.02, 0.03,
            0.04, 2e-4, 6.0, 1.5]


def batches(device, n_random=30):
    out = []
    for i, m in enumerate(batch_maxima_sequence()):
        x = rand((3, 5), seed=100 + i)
        x = x / x.abs().max() * m if m else torch.zeros(3, 5)
        out.append(x)
    out[6] = with_non_finite(out[6])
    out.append(torch.empty(0))
    out.append(torch.tensor(-2.5))
    out.append(rand((17,), torch.float16, seed=5))
    out.append(rand((17,), torch.bfloat16, seed=6))
    g = torch.Generator().manual_seed(7)
    for i in range(n_random):  # magnitudes over three decades
        out.append(rand((11,), seed=200 + i) * float(10 ** (torch.rand((), generator=g) * 3 - 2)))
    return [x.to(device) for x in out]


def new_range_state(window_size, device):
    return (torch.full((1,), 0.001, device=device), torch.zeros(window_size, device=device),
            torch.zeros(1, dtype=torch.long, device=device))


@pytest.mark.parametrize("window_size", [1, 3, 5, 100])
def test_range_abs_max_follows_reference(device, window_size):
    scale, window, step = new_range_state(window_size, device)
    ref = R.RangeAbsMaxReference(window_size)
    for i, x in enumerate(batches(device)):
        qkernels.range_abs_max_update_(x, scale, window, step, window_size)
        want = ref.update(x.cpu())
        assert scale.item() == torch.tensor(want, dtype=torch.float32).item(), "step %d" % i
        assert step.item() == i + 1
        assert window[i % window_size].item() == torch.tensor(ref.history[-1], dtype=torch.float32).item()
    expected_window = torch.zeros(window_size)
    for i, cur in enumerate(ref.history):
        expected_window[i % window_size] = cur
    assert torch.equal(window.cpu(), expected_window)


def test_range_abs_max_evicts_the_maximum(device):
    # Spelled out for window 3 so the test reads without the reference.
    scale, window, step = new_range_state(3, device)
    seen = []
    for m in [1e-4, 5e-4, 5.0, 1.0, 2.0, 3.0, 0.5, 0.2, 0.1]:
        qkernels.range_abs_max_update_(torch.tensor([m, -m / 2], device=device), scale, window, step, 3)
        seen.append(scale.item())
    f = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    assert seen == [f(v) for v in [0.001, 0.001, 5.0, 5.0, 5.0, 3.0, 3.0, 3.0, 0.5]]
    assert step.item() == 9


@pytest.mark.parametrize("rate", [0.9, 0.5, 0.0, 1.0])
def test_moving_average_abs_max_follows_reference(device, rate):
    scale = torch.full((1,), 0.001, device=device)
    accum, state = torch.ones(1, device=device), torch.ones(1, device=device)
    ref = R.MovingAverageAbsMaxReference(rate)
    for i, x in enumerate(batches(device)):
        qkernels.moving_average_abs_max_update_(x, scale, accum, state, rate)
        ref.update(x.cpu())
        # float32 state against float64: the recursion damps old rounding errors (|r| <= 1), so the
        # relative error stays within a few float32 roundings per step (at r = 1, state and accum are sums).
        got = [scale.item(), accum.item(), state.item()]
        assert got == pytest.approx([ref.scale, ref.accum, ref.state], rel=1e-5), "step %d" % i


# --- CUDA: agreement with CPU, and no host synchronisation ----------------------------------------

def cuda_vs_cpu_cases():
    return {
        "abs_max": lambda x: (qkernels.abs_max(x),),
        "fake_quant_abs_max": lambda x: qkernels.fake_quant_abs_max(x, 8),
        "fake_quant_abs_max_3bit": lambda x: qkernels.fake_quant_abs_max(x, 3),
        "quantize_abs_max_12bit": lambda x: qkernels.quantize_abs_max(x, 12),
        "fake_quant_with_scale": lambda x: (qkernels.fake_quant_with_scale(x, torch.tensor(1.3, device=x.device), 8),),
        "quantize_with_scale": lambda x: (qkernels.quantize_with_scale(x, torch.tensor(1.3, device=x.device), 8),),
        "channel_wise_axis0": lambda x: qkernels.fake_channel_wise_quant_abs_max(x, 8, 0),
        "channel_wise_axis1": lambda x: qkernels.fake_channel_wise_quant_abs_max(x, 6, 1),
        "channel_wise_last": lambda x: qkernels.quantize_channel_wise_abs_max(x, 8, -1),
        "abs_max_mask": lambda x: ops.fake_quant_abs_max(x, 8, True),
        "with_scale_mask": lambda x: ops.fake_quant_with_scale(x, torch.tensor(1.3, device=x.device), 5, True),
        "mask_grad": lambda x: (ops.fake_quant_mask_grad(torch.ones_like(x), ops.fake_quant_with_scale(
            x, torch.tensor(1.3, device=x.device), 8, True)[1]),),
        "clip_grad": lambda x: (ops.fake_quant_clip_grad(torch.ones_like(x), x, torch.tensor(1.3, device=x.device)),),
    }


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(cuda_vs_cpu_cases()))
def test_cuda_matches_cpu_bit_for_bit(dtype, case):
    # quant_math.h is shared, so the two backends must agree exactly (NaN at the same places).
    fn = cuda_vs_cpu_cases()[case]
    for x in (with_non_finite(rand((64, 3, 3, 3), dtype, seed=20)), rand((257, 129), dtype, seed=21).t()[::2],
              rand((3, 100_003), dtype, seed=22), torch.zeros(5, 4, dtype=dtype),
              rand((8, 24, 30, 30), dtype, seed=23).contiguous(memory_format=torch.channels_last),
              rand((4097, 33), dtype, seed=24).t(), rand((70_001,), dtype, seed=25)[1:]):
        for got, want in zip(fn(x.cuda()), fn(x)):
            assert got.device.type == "cuda" and got.stride() == want.stride()
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@needs_cuda
def test_cuda_state_updates_do_not_synchronise_and_match_cpu():
    xs = batches("cpu")
    states = {}
    for device in ("cpu", "cuda"):
        inputs = [x.to(device) for x in xs]
        rng = new_range_state(5, device)
        mov = (torch.full((1,), 0.001, device=device), torch.ones(1, device=device), torch.ones(1, device=device))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any hidden device-to-host read raises
        try:
            for x in inputs:
                qkernels.range_abs_max_update_(x, *rng, 5)
                qkernels.moving_average_abs_max_update_(x, *mov, 0.9)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        states[device] = [t.cpu() for t in rng + mov]
    for got, want in zip(states["cuda"][:3], states["cpu"][:3]):
        assert torch.equal(got, want)  # maxima: exact
    for got, want in zip(states["cuda"][3:], states["cpu"][3:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # nvcc may fuse r*a+b into an FMA


@needs_cuda
def test_cuda_fake_quant_does_not_synchronise():
    x = rand((33, 65), seed=23).cuda()
    scale = torch.tensor(1.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        qkernels.fake_quant_abs_max(x, 8)
        qkernels.quantize_abs_max(x, 8)
        qkernels.fake_quant_with_scale(x, scale, 8)
        qkernels.fake_channel_wise_quant_abs_max(x, 8, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- quantize_with_scale_channels_last: a model's NCHW input to the int8 kernels' NHWC codes -------------

CHANNELS_LAST_SHAPES = [(2, 3, 7, 19), (1, 3, 30, 33), (2, 5, 4, 9), (3, 1, 2, 2), (0, 3, 4, 4), (1, 3, 1, 1)]
CHANNELS_LAST_INPUTS = [(torch.float32, 8, "nchw"), (torch.float32, 4, "nchw"), (torch.float32, 12, "nchw"),
                        (torch.float32, 8, "channels_last"), (torch.float32, 8, "strided"),
                        (torch.float16, 8, "nchw"), (torch.bfloat16, 8, "nchw")]


def _laid_out(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(x.shape[:3] + (2 * x.shape[3],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,bits,layout", CHANNELS_LAST_INPUTS, ids=lambda v: str(v).replace("torch.", ""))
def test_quantize_with_scale_channels_last(shape, dtype, bits, layout):
    """Channels_last codes of any 4-D input, equal bit for bit to quantize_with_scale of the same values
    (the fast path, float32 NCHW up to 8 bits, quantizes plane rows with the same vectorised code and then
    interleaves them; the others copy to channels_last first), and to the float64 reference within one
    step on rounding ties (NaN codes 0)."""
    x = with_non_finite(rand(shape, seed=61)) if math.prod(shape) >= 64 else rand(shape, seed=61)
    x = _laid_out(x.to(dtype), layout)
    s = torch.tensor(2.5)
    got = ops.quantize_with_scale_channels_last(x, s, bits)
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert got.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert torch.equal(got, ops.quantize_with_scale(x.contiguous(), s, bits))
    want = torch.nan_to_num(R.quant_codes(x.float(), s, bits), nan=0.0)
    if got.numel():
        assert (got.double() - want).abs().max().item() <= 1


def test_quantize_with_scale_channels_last_bad_input():
    with pytest.raises(RuntimeError, match="4-D"):
        ops.quantize_with_scale_channels_last(rand((3, 4, 5)), torch.tensor(1.0), 8)
    with pytest.raises(RuntimeError, match="float"):
        ops.quantize_with_scale_channels_last(torch.zeros(1, 3, 2, 2, dtype=torch.int8), torch.tensor(1.0), 8)


# --- opcheck and torch.compile --------------------------------------------------------------------

def opcheck_samples(device):
    x = rand((5, 7), seed=24).to(device)
    xh = rand((3, 4), torch.float16, seed=25).to(device)
    s = torch.tensor(0.5, device=device)
    x4 = rand((2, 3, 4, 5), seed=29).to(device).contiguous(memory_format=torch.channels_last)
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731  (clone keeps a dense layout)
    return [
        (ops.abs_max.default, (x,)),
        (ops.abs_max.default, (xh,)),
        (ops.fake_quant_abs_max.default, (grad(x), 8, False)),
        (ops.fake_quant_abs_max.default, (grad(xh), 4, True)),
        (ops.quantize_abs_max.default, (x, 8)),
        (ops.quantize_abs_max.default, (x, 12)),
        (ops.fake_quant_with_scale.default, (grad(x), s, 8, True)),
        (ops.fake_quant_with_scale.default, (grad(x.t()), s, 3, False)),
        (ops.quantize_with_scale.default, (x, s, 8)),
        (ops.fake_channel_wise_quant_abs_max.default, (grad(rand((4, 3, 2, 2), seed=26).to(device)), 8, 0, True)),
        (ops.fake_channel_wise_quant_abs_max.default, (grad(x), 8, -1, False)),
        (ops.quantize_channel_wise_abs_max.default, (x, 10, 1)),
        (ops.fake_quant_clip_grad.default, (rand((5, 7), seed=27).to(device), x, s)),
        (ops.fake_quant_clip_grad.default, (rand((7, 5), seed=27).to(device), x.t(), s)),
        (ops.fake_quant_with_scale.default, (grad(x4), s, 8, True)),
        (ops.fake_quant_abs_max.default, (grad(x4), 8, True)),
        (ops.quantize_abs_max.default, (x4, 8)),
        (ops.fake_channel_wise_quant_abs_max.default, (grad(x4), 8, 1, True)),
        (ops.quantize_channel_wise_abs_max.default, (x4, 8, 1)),
        (ops.fake_channel_wise_quant_abs_max.default, (grad(x[:, ::2]), 8, 1, False)),
        (ops.fake_quant_mask_grad.default, (rand((5, 7), seed=28).to(device), ops.fake_quant_with_scale(x, s, 8, True)[1])),
        (ops.fake_quant_mask_grad.default, (x4, ops.fake_quant_with_scale(x4, s, 8, True)[1])),
        (ops.range_abs_max_update_.default, (x, *new_range_state(4, device), 4)),
        (ops.moving_average_abs_max_update_.default,
         (x, torch.full((1,), 0.001, device=device), torch.ones(1, device=device), torch.ones(1, device=device), 0.9)),
    ]


def test_opcheck_every_op(device):
    samples = opcheck_samples(device)
    if device == "cpu":  # a CPU op: the int8 kernels' input from a model's NCHW float input
        x4 = rand((2, 3, 4, 5), seed=30)
        samples += [(ops.quantize_with_scale_channels_last.default, (x4, torch.tensor(0.5), 8)),
                    (ops.quantize_with_scale_channels_last.default, (x4.contiguous(memory_format=torch.channels_last),
                                                                      torch.tensor(0.5), 12))]
    for op, args in samples:
        opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager(device):
    # Only the two custom ops in the graph: inductor then has no C++ of its own to compile (cold
    # compiles of a pointwise kernel take ~30 s on the 2-core test machine).
    def qat_step(x, scale):
        out, s = qkernels.fake_quant_abs_max(x, 8)
        return qkernels.fake_quant_with_scale(out, scale, 4, ste="clip"), s

    x, scale = rand((4, 33), seed=28).to(device), torch.tensor(1.5, device=device)
    compiled = torch.compile(qat_step, fullgraph=True)
    torch.testing.assert_close(compiled(x, scale), qat_step(x, scale), rtol=0, atol=0)


# --- bad input --------------------------------------------------------------------------------------

def bad_calls(device="cpu"):
    x = rand((4, 6)).to(device)
    s = torch.tensor(1.0, device=device)
    rng = new_range_state(4, device)
    mov = (torch.full((1,), 0.001, device=device), torch.ones(1, device=device), torch.ones(1, device=device))
    on = dict(device=device)
    dtype_msg = "x must be float32, float16 or bfloat16, got "
    bits_msg = r"bits must be an int in \[2, 16\], got "
    return {
        "float64_input": (lambda: qkernels.fake_quant_abs_max(x.double()), RuntimeError, dtype_msg + "Double"),
        "int64_input": (lambda: qkernels.abs_max(torch.arange(4, **on)), RuntimeError, dtype_msg + "Long"),
        "int32_quantize": (lambda: qkernels.quantize_with_scale(torch.arange(4, dtype=torch.int32, **on), 1.0),
                           RuntimeError, dtype_msg + "Int"),
        "uint8_channel": (lambda: qkernels.fake_channel_wise_quant_abs_max(torch.zeros(2, 2, dtype=torch.uint8, **on)),
                          RuntimeError, dtype_msg + "Byte"),
        "float64_state_input": (lambda: qkernels.range_abs_max_update_(x.double(), *rng, 4), RuntimeError,
                                dtype_msg + "Double"),
        "not_a_tensor": (lambda: qkernels.abs_max([1.0, 2.0]), TypeError, "expected a torch.Tensor, got list"),
        "bits_1": (lambda: qkernels.fake_quant_abs_max(x, 1), ValueError, bits_msg + "1"),
        "bits_17": (lambda: qkernels.quantize_abs_max(x, 17), ValueError, bits_msg + "17"),
        "bits_float": (lambda: qkernels.fake_quant_with_scale(x, 1.0, 8.0), ValueError, bits_msg + "8.0"),
        "bits_bool": (lambda: qkernels.fake_channel_wise_quant_abs_max(x, True), ValueError, bits_msg + "True"),
        "op_bits_1": (lambda: ops.fake_quant_abs_max(x, 1), RuntimeError, r"bits must be in \[2, 16\], got 1"),
        "op_bits_17": (lambda: ops.quantize_channel_wise_abs_max(x, 17, 0), RuntimeError,
                       r"bits must be in \[2, 16\], got 17"),
        "bad_ste": (lambda: qkernels.fake_quant_abs_max(x, 8, ste="round"), ValueError,
                    r"ste must be one of \('identity', 'clip'\), got 'round'"),
        "bad_ste_channel": (lambda: qkernels.fake_channel_wise_quant_abs_max(x, 8, 0, ste="Clip"), ValueError,
                            "ste must be one of"),
        "scale_float64": (lambda: qkernels.fake_quant_with_scale(x, s.double()), RuntimeError,
                          "scale must be float32, got Double"),
        "scale_int": (lambda: qkernels.quantize_with_scale(x, torch.tensor(1, **on)), RuntimeError,
                      "scale must be float32, got Long"),
        "scale_shape": (lambda: qkernels.fake_quant_with_scale(x, torch.ones(2, **on)), RuntimeError,
                        r"scale must hold one value, got shape \[2\]"),
        "axis_2_of_2dim": (lambda: qkernels.fake_channel_wise_quant_abs_max(x, 8, 2), RuntimeError,
                           "axis 2 is out of range for a 2-dim tensor"),
        "axis_-3_of_2dim": (lambda: qkernels.quantize_channel_wise_abs_max(x, 8, -3), RuntimeError,
                            "axis -3 is out of range for a 2-dim tensor"),
        "channel_wise_0dim": (lambda: qkernels.fake_channel_wise_quant_abs_max(torch.tensor(1.0, **on)), RuntimeError,
                              "needs at least 1 dimension"),
        "window_size_mismatch": (lambda: qkernels.range_abs_max_update_(x, *rng, 5), RuntimeError,
                                 r"window must hold 5 values, got shape \[4\]"),
        "window_size_0": (lambda: qkernels.range_abs_max_update_(x, rng[0], torch.zeros(0, **on), rng[2], 0),
                          RuntimeError, "window_size must be >= 1, got 0"),
        "window_not_contiguous": (
            lambda: qkernels.range_abs_max_update_(x, rng[0], torch.zeros(8, **on)[::2], rng[2], 4),
            RuntimeError, "window must be contiguous"),
        "step_int32": (
            lambda: qkernels.range_abs_max_update_(x, rng[0], rng[1], torch.zeros(1, dtype=torch.int32, **on), 4),
            RuntimeError, "step must be Long, got Int"),
        "state_scale_float64": (lambda: qkernels.moving_average_abs_max_update_(x, mov[0].double(), *mov[1:]),
                                RuntimeError, "scale must be Float, got Double"),
        "accum_shape": (lambda: qkernels.moving_average_abs_max_update_(x, mov[0], torch.ones(2, **on), mov[2]),
                        RuntimeError, r"accum must hold 1 values, got shape \[2\]"),
        "moving_rate": (lambda: qkernels.moving_average_abs_max_update_(x, *mov, 1.5), RuntimeError,
                        r"moving_rate must be in \[0, 1\], got 1.5"),
        "clip_grad_shape": (lambda: ops.fake_quant_clip_grad(torch.ones(3, **on), torch.ones(4, **on), s), RuntimeError,
                            r"grad shape \[3\] differs from the input shape \[4\]"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_input_raises_clear_error(device, case):
    call, error, message = bad_calls(device)[case]
    with pytest.raises(error, match=message):
        call()


def test_tensors_on_the_meta_device_raise_clear_error():
    x = rand((4, 6))
    with pytest.raises(RuntimeError, match="scale is on meta but the input is on cpu"):
        qkernels.quantize_with_scale(x, torch.tensor(1.0, device="meta"))
    with pytest.raises(RuntimeError, match="scale is on meta but the input is on cpu"):
        scale, window, step = new_range_state(4, "cpu")
        qkernels.range_abs_max_update_(x, scale.to("meta"), window, step, 4)


@needs_cuda
def test_tensors_on_another_device_raise_clear_error():
    x = rand((4, 6)).cuda()
    with pytest.raises(RuntimeError, match="scale is on cpu but the input is on cuda"):
        qkernels.fake_quant_with_scale(x, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="window is on cpu but the input is on cuda"):
        scale, window, step = new_range_state(4, "cuda")
        qkernels.range_abs_max_update_(x, scale, window.cpu(), step, 4)
    with pytest.raises(RuntimeError, match="accum is on cpu but the input is on cuda"):
        ones = torch.ones(1, device="cuda")
        qkernels.moving_average_abs_max_update_(x, ones, torch.ones(1), ones, 0.9)
