"""Fake-quantize operators (reference-semantics.md, section 2).

Semantics shared by every op here:
- ``bin = 2**(bits-1) - 1``; codes ``q = round(clip(x, -s, s) * bin / s)``, rounding half away from zero;
  fake-quant output ``q * s / bin`` in the input dtype (float32, float16 or bfloat16; computed in float32).
- A scale at or below 1e-30 (an all-zero input) gives all-zero output, never NaN or Inf.
- NaN and +-Inf never set a scale (``abs_max`` is the max over finite values). NaN inputs stay NaN in
  fake-quant outputs and become code 0; +-Inf is clipped to +-scale.
- Gradients are straight-through: ``ste="identity"`` (the reference) passes them unchanged,
  ``ste="clip"`` zeroes them where the input was clipped (|x| > s, or x not finite). With ``"clip"`` the
  per-tensor ops keep only a bit-packed mask for backward (1 bit per element, made in the forward pass)
  instead of the input; the channel-wise op (for weights, which autograd holds anyway) keeps the input.
- Outputs keep the strides of a dense input (a channels_last activation stays channels_last, a transposed
  weight stays transposed: nothing is copied); other inputs give contiguous outputs.
"""
import contextlib
import threading
from typing import Tuple

import torch
import torch.utils.weak
import torch._prims_common  # noqa: F401  (is_non_overlapping_and_dense_or_false, for the fake kernels)

from .._library import check_backend, check_same_device, ops

STE_MODES = ("identity", "clip")


def bin_count(bits: int) -> int:
    """Largest code of a signed `bits`-bit quantizer: 2**(bits-1) - 1 (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def check_bits(bits, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError("qkernels: %s must be an int in [2, 16], got %r" % (what, bits))
    return bits


def check_ste(ste) -> str:
    if ste not in STE_MODES:
        raise ValueError("qkernels: ste must be one of %s, got %r" % (STE_MODES, ste))
    return ste


def _clip_grad_flag(ste: str) -> bool:
    return check_ste(ste) == "clip"


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError("qkernels: expected a torch.Tensor, got %s" % type(x).__name__)
    check_backend(x)


def code_dtype(bits: int) -> torch.dtype:
    """Storage dtype of integer codes: int8 up to 8 bits, int16 above."""
    return torch.int8 if bits <= 8 else torch.int16


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max|x| over the finite values of x, as a 0-dim float32 tensor on x's device."""
    _check_input(x)
    return ops.abs_max(x)


def fake_quant_abs_max(x: torch.Tensor, bits: int = 8, ste: str = "identity") -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic (``abs_max``) fake quantization: returns ``(out, scale)`` with ``scale = max|x|``."""
    _check_input(x)
    check_bits(bits)
    out, scale, _mask = ops.fake_quant_abs_max(x, bits, _clip_grad_flag(ste))
    _remember(out, x, lambda xd: ops.fake_quant_abs_max(xd, bits, False)[0])
    return out, scale


def quantize_abs_max(x: torch.Tensor, bits: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, or int16 above 8 bits) and the scale ``max|x|``."""
    _check_input(x)
    check_bits(bits)
    return ops.quantize_abs_max(x, bits)


def _as_scale(scale, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor):
        return torch.tensor(float(scale), dtype=torch.float32, device=like.device)
    return scale


def fake_quant_with_scale(x: torch.Tensor, scale, bits: int = 8, ste: str = "identity") -> torch.Tensor:
    """Fake quantization with a given scale (a float or a one-element float32 tensor): static use."""
    _check_input(x)
    check_bits(bits)
    scale = _as_scale(scale, x)
    check_same_device(x, scale=scale)
    out = ops.fake_quant_with_scale(x, scale, bits, _clip_grad_flag(ste))[0]
    if _recording() is not None:
        kept = scale.detach().clone()  # the scale as it is now: a state buffer changes at the next step
        _remember(out, x, lambda xd: ops.fake_quant_with_scale(xd, kept, bits, False)[0])
    return out


def quantize_with_scale(x: torch.Tensor, scale, bits: int = 8) -> torch.Tensor:
    """Integer codes of x for a given scale."""
    _check_input(x)
    check_bits(bits)
    scale = _as_scale(scale, x)
    check_same_device(x, scale=scale)
    return ops.quantize_with_scale(x, scale, bits)


def fake_channel_wise_quant_abs_max(
    x: torch.Tensor, bits: int = 8, axis: int = 0, ste: str = "identity"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scale per slice along ``axis`` (0 for conv and PyTorch linear weights): ``(out, scales)``."""
    _check_input(x)
    check_bits(bits)
    out, scales = ops.fake_channel_wise_quant_abs_max(x, bits, axis, _clip_grad_flag(ste))
    _remember(out, x, lambda xd: ops.fake_channel_wise_quant_abs_max(xd, bits, axis, False)[0])
    return out, scales


def quantize_channel_wise_abs_max(x: torch.Tensor, bits: int = 8, axis: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel integer codes and scales."""
    _check_input(x)
    check_bits(bits)
    return ops.quantize_channel_wise_abs_max(x, bits, axis)


def range_abs_max_update_(x, scale, window, step, window_size: int) -> None:
    """Training step of ``range_abs_max``: push ``max|x|`` into the window, set ``scale`` to the window max.

    All state is updated in place on x's device; nothing is read back to the host. To share the state
    across processes, reduce ``abs_max(x)`` (MAX) first and pass that 0-dim tensor as ``x``.
    """
    _check_input(x)
    check_same_device(x, scale=scale, window=window, step=step)
    ops.range_abs_max_update_(x, scale, window, step, window_size)


def moving_average_abs_max_update_(x, scale, accum, state, moving_rate: float = 0.9) -> None:
    """Training step of ``moving_average_abs_max``: ``state = r*state + 1; accum = r*accum + max|x|;
    scale = accum / state``, in place on x's device."""
    _check_input(x)
    check_same_device(x, scale=scale, accum=accum, state=state)
    ops.moving_average_abs_max_update_(x, scale, accum, state, float(moving_rate))


# --- recomputing fake-quant outputs in backward instead of keeping them --------------------------------

_RECORDING = threading.local()


def _recording():
    return getattr(_RECORDING, "outputs", None)


class _Recipe:
    """A saved fake-quant output, kept as what recomputes it: the op's input (which autograd usually holds
    anyway, e.g. as a ReLU's saved output, so keeping it costs nothing) and the op's other arguments."""

    __slots__ = ("x", "version", "compute")

    def __init__(self, x, compute):
        self.x, self.version, self.compute = x.detach(), x._version, compute

    def recompute(self) -> torch.Tensor:
        if self.x._version != self.version:
            raise RuntimeError("qkernels: the input of a fake-quant output saved for backward was modified in "
                               "place after the forward pass; it cannot be recomputed (leave "
                               "recompute_fake_quant_outputs() off for this model)")
        with torch.no_grad():
            return self.compute(self.x)


def _remember(out, x, compute) -> None:
    outputs = _recording()
    if outputs is not None and out.requires_grad:
        outputs[out] = _Recipe(x, compute)


@contextlib.contextmanager
def recompute_fake_quant_outputs():
    """Within this context, a fake-quant output that a later op saves for its backward (a conv or linear
    saves its input for the weight gradient) is saved as the recipe that recomputes it from the fake-quant
    input, and recomputed when backward needs it (eager mode; one extra bandwidth-bound pass per layer).

    A QAT step otherwise keeps, per quantized layer, both the activation (saved by the ReLU before it)
    and its fake-quantized copy (saved by the conv): about +50% activation memory over the float step.
    With this context the copy is freed after the forward use, so the step's peak memory stays close to
    the float step's. Recomputation gives the same bits (the ops are deterministic and the scale is taken
    as it was in the forward pass); an input modified in place in between raises a clear error.

        with recompute_fake_quant_outputs():
            loss = loss_fn(model(images), targets)
        loss.backward()
    """
    outputs = torch.utils.weak.WeakTensorKeyDictionary()
    previous = _recording()
    _RECORDING.outputs = outputs

    def pack(t):
        recipe = outputs.get(t)
        return t if recipe is None else recipe

    def unpack(saved):
        return saved.recompute() if isinstance(saved, _Recipe) else saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _RECORDING.outputs = previous


# --- fake (meta) kernels: shapes, dtypes and strides only, so torch.compile traces without graph breaks --

def _scalar_like(x):
    return x.new_empty((), dtype=torch.float32)


def _output_like(x, dtype=None):
    """The kernels' output layout (csrc/checks.h, dense_input): a dense input's strides, else contiguous."""
    dtype = dtype or x.dtype
    if _dense(x):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _dense(x) -> bool:
    return torch._prims_common.is_non_overlapping_and_dense_or_false(x)


def _mask_like(x, clip_grad):
    """The clip-STE mask: one int32 word per 32 elements (empty without clip_grad)."""
    return x.new_empty(((x.numel() + 31) // 32 if clip_grad else 0,), dtype=torch.int32)


@torch.library.register_fake("qkernels::abs_max")
def _(x):
    return _scalar_like(x)


@torch.library.register_fake("qkernels::fake_quant_abs_max")
def _(x, bits, clip_grad=False):
    return _output_like(x), _scalar_like(x), _mask_like(x, clip_grad)


@torch.library.register_fake("qkernels::quantize_abs_max")
def _(x, bits):
    return _output_like(x, code_dtype(bits)), _scalar_like(x)


@torch.library.register_fake("qkernels::fake_quant_with_scale")
def _(x, scale, bits, clip_grad=False):
    return _output_like(x), _mask_like(x, clip_grad)


@torch.library.register_fake("qkernels::quantize_with_scale")
def _(x, scale, bits):
    return _output_like(x, code_dtype(bits))


@torch.library.register_fake("qkernels::quantize_with_scale_channels_last")
def _(x, scale, bits):
    return torch.empty_like(x, dtype=code_dtype(bits), memory_format=torch.channels_last)


@torch.library.register_fake("qkernels::fake_channel_wise_quant_abs_max")
def _(x, bits, axis, clip_grad=False):
    return _output_like(x), x.new_empty((x.shape[axis],), dtype=torch.float32)


@torch.library.register_fake("qkernels::quantize_channel_wise_abs_max")
def _(x, bits, axis):
    return _output_like(x, code_dtype(bits)), x.new_empty((x.shape[axis],), dtype=torch.float32)


@torch.library.register_fake("qkernels::fake_quant_clip_grad")
def _(grad, x, scale):
    return _output_like(x)


@torch.library.register_fake("qkernels::fake_quant_mask_grad")
def _(grad, mask):
    return _output_like(grad)


@torch.library.register_fake("qkernels::range_abs_max_update_")
def _(x, scale, window, step, window_size):
    return None


@torch.library.register_fake("qkernels::moving_average_abs_max_update_")
def _(x, scale, accum, state, moving_rate):
    return None


# --- autograd: straight-through estimators ---------------------------------------------------------

def _setup_per_tensor(ctx, inputs, output):
    # With the clipping STE, backward needs only which elements passed: the forward's 1-bit mask (in the
    # output's memory order), not x or the scale.
    ctx.clip = inputs[-1]
    if ctx.clip:
        out, mask = output[0], output[-1]
        ctx.save_for_backward(mask)
        ctx.out_stride = out.stride()


def _backward_per_tensor(ctx, grad):
    if not ctx.clip:
        return grad
    (mask,) = ctx.saved_tensors
    if grad.stride() != ctx.out_stride:  # the mask follows the output's memory order
        grad = grad.new_empty_strided(grad.shape, ctx.out_stride).copy_(grad)
    return ops.fake_quant_mask_grad(grad, mask)


def _backward_abs_max(ctx, grad_out, grad_scale, grad_mask):
    return _backward_per_tensor(ctx, grad_out), None, None


def _backward_with_scale(ctx, grad_out, grad_mask):
    return _backward_per_tensor(ctx, grad_out), None, None, None


def _setup_channel_wise(ctx, inputs, output):
    x, _bits, axis, clip = inputs
    ctx.clip = clip
    ctx.axis = axis
    if clip:
        ctx.save_for_backward(x, output[1])


def _backward_channel_wise(ctx, grad_out, grad_scales):
    if not ctx.clip:
        return grad_out, None, None, None
    x, scales = ctx.saved_tensors
    axis = ctx.axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    keep = x.float().abs() <= scales.view(shape)
    return grad_out * keep.to(grad_out.dtype), None, None, None


torch.library.register_autograd("qkernels::fake_quant_abs_max", _backward_abs_max, setup_context=_setup_per_tensor)
torch.library.register_autograd("qkernels::fake_quant_with_scale", _backward_with_scale, setup_context=_setup_per_tensor)
torch.library.register_autograd(
    "qkernels::fake_channel_wise_quant_abs_max", _backward_channel_wise, setup_context=_setup_channel_wise
)
