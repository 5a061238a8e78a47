"""Plain-PyTorch references of every qkernels op, written for clarity, computed in float64.

Tests compare the kernels with these; benchmarks use the eager compositions as baselines. Nothing
here imports the compiled library.
"""
import math

import torch


def bin_count(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C round(): ties go away from zero (torch.round goes to even)."""
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    a = x.double().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return a.max() if a.numel() else torch.zeros((), dtype=torch.float64)


def quant_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clip(x, -s, s) / s * bin) in float64; zero where the scale is unusable (<= 1e-30 or not
    finite), except that NaN inputs stay NaN."""
    xd, s = x.double(), scale.double()
    usable = (s > 1e-30) & torch.isfinite(s)
    safe = torch.where(usable, s, torch.ones_like(s))
    q = round_half_away(torch.maximum(torch.minimum(xd, safe), -safe) / safe * bin_count(bits))
    return torch.where(usable, q, q * 0)  # q * 0 keeps NaN inputs NaN, as the kernels do


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    s = scale.double()
    usable = (s > 1e-30) & torch.isfinite(s)
    step = torch.where(usable, s, torch.zeros_like(s)) / bin_count(bits)
    return quant_codes(x, scale, bits) * step


def fake_quant_abs_max(x: torch.Tensor, bits: int = 8):
    s = finite_abs_max(x)
    return fake_quant(x, s, bits), s


def fake_channel_wise_quant_abs_max(x: torch.Tensor, bits: int = 8, axis: int = 0):
    axis = axis % x.dim()
    moved = x.double().movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))  # also for zero channels
    a = flat.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    scales = a.amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0], dtype=torch.float64)
    shape = [1] * x.dim()
    shape[axis] = -1
    s = scales.view(shape)
    return fake_quant(x, s, bits), scales


class RangeAbsMaxReference:
    """range_abs_max state by its definition: the max of the last `window_size` batch maxima. The
    initial scale 0.001 stands until some batch maximum exceeds it."""

    def __init__(self, window_size: int):
        self.window_size = window_size
        self.history = []
        self.scale = 0.001
        self.surpassed = False

    def update(self, x: torch.Tensor) -> float:
        cur = float(finite_abs_max(x).float())
        self.history.append(cur)
        self.surpassed = self.surpassed or cur > 0.001
        self.scale = max(self.history[-self.window_size:]) if self.surpassed else 0.001
        return self.scale


class MovingAverageAbsMaxReference:
    def __init__(self, moving_rate: float = 0.9):
        self.rate, self.accum, self.state, self.scale = moving_rate, 1.0, 1.0, 0.001

    def update(self, x: torch.Tensor) -> float:
        cur = float(finite_abs_max(x).float())
        self.state = self.rate * self.state + 1.0
        self.accum = self.rate * self.accum + cur
        self.scale = self.accum / self.state
        return self.scale


def eager_fake_quant_abs_max(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """PyTorch's own composition (the benchmark peer): abs().max() then fake_quantize_per_tensor_affine.
    Note: torch rounds ties to even, so results differ from the reference on exact ties."""
    b = bin_count(bits)
    s = x.abs().max().float()
    step = torch.clamp(s / b, min=1e-30)
    return torch.fake_quantize_per_tensor_affine(x, step, torch.zeros((), dtype=torch.int32), -b, b)


# --- int8 convolution / linear (qkernels.conv2d_int8, qkernels.linear_int8) -------------------------

def _int8_epilogue(acc: torch.Tensor, scale, bias, out_dtype, activation, channel_dim: int) -> torch.Tensor:
    """act(acc * scale + bias) in float64; int8 output rounds half away from zero and saturates to
    [-127, 127]; int32 output is the accumulator itself."""
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    s = torch.as_tensor(scale, dtype=torch.float64)
    s = s.reshape(shape) if s.numel() > 1 else s.reshape(())
    v = acc * s
    if bias is not None:
        v = v + bias.double().reshape(shape)
    if activation == "relu":
        v = torch.relu(v)
    elif activation == "relu6":
        v = torch.clamp(v, 0.0, 6.0)
    if out_dtype == torch.int8:
        return round_half_away(v).clamp(-127, 127).to(torch.int8)
    return v


def conv2d_int8(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, scale=1.0,
                out_dtype=torch.float32, activation=None) -> torch.Tensor:
    """The int32 accumulator as an exact float64 convolution of the integer values, then the epilogue
    (float outputs are returned in float64)."""
    acc = torch.nn.functional.conv2d(x.double(), weight.double(), None, stride, padding, dilation, groups)
    return _int8_epilogue(acc, scale, bias, out_dtype, activation, channel_dim=1)


def linear_int8(x, weight, bias=None, scale=1.0, out_dtype=torch.float32, activation=None) -> torch.Tensor:
    acc = x.double() @ weight.double().t()
    return _int8_epilogue(acc, scale, bias, out_dtype, activation, channel_dim=-1)
