"""Quantizer modules: fake quant-dequant of activations (with state) and of weights.

Activation quantizers (reference-semantics.md, section 2):
- ``FakeQuantAbsMax``: dynamic, ``s = max|x|`` of every batch, in training and in evaluation.
- ``FakeQuantRangeAbsMax``: static, ``s`` = max of the last ``window_size`` batch maxima (training),
  frozen in ``eval()`` (the reference's ``is_test``).
- ``FakeQuantMovingAverageAbsMax``: static, ``s = accum / state`` with a moving average (training),
  frozen in ``eval()``.

The state lives in buffers (``scale``, ``window``, ``step``, ``accum``, ``state``) so ``state_dict``
carries it. Training updates the state in place with the qkernels update ops (no host synchronisation,
no ``.item()``) and quantizes the current batch with the updated scale, as the reference does.
Under ``torch.distributed`` with more than one process, the batch abs max is reduced (MAX) across
ranks before the update, so every rank holds the same state: over ``process_group`` (None: the default
group), or not at all with ``sync_statistics = False`` (each rank then keeps its own state).

A float checkpoint (saved before transpiling) loads into a transpiled model, strictly; a static quantizer
then keeps its initial scale (0.001), and the load warns so (calibrate or train before inference).

State buffers are float32 (int64 for ``step``): use autocast for fp16/bf16, not ``model.half()``.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops as qk
from ..ops.fake_quant import bin_count, check_bits, check_ste

ACTIVATION_QUANTIZE_TYPES = ("abs_max", "range_abs_max", "moving_average_abs_max")
WEIGHT_QUANTIZE_TYPES = ("abs_max", "channel_wise_abs_max")
STATIC_ACTIVATION_TYPES = ("range_abs_max", "moving_average_abs_max")


def _world_size(group=None) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def batch_statistic(x: torch.Tensor, process_group=None, sync: bool = True) -> torch.Tensor:
    """What the state update ops consume: x itself, or (several processes) the MAX-reduced abs max over
    ``process_group`` (None: the default group); ``sync=False`` never reduces.

    The update ops take the abs max of whatever they get, so a 0-dim reduced abs max works as x.
    """
    x = x.detach()
    if sync and _world_size(process_group) > 1:
        cur = qk.abs_max(x)
        torch.distributed.all_reduce(cur, op=torch.distributed.ReduceOp.MAX, group=process_group)
        return cur
    return x


class FloatCheckpointWarning(UserWarning):
    """A checkpoint without quantizer state was loaded: static scales stay at their initial value."""


class _Quantizer(nn.Module):
    """Common parts: bits, straight-through mode, an on/off switch (``enabled``)."""

    def __init__(self, bits: int = 8, ste: str = "identity"):
        super().__init__()
        self.bits = check_bits(bits)
        self.ste = check_ste(ste)
        # When False the module is the identity and leaves its state alone (to compare with float).
        self.enabled = True

    @property
    def bin(self) -> int:
        return bin_count(self.bits)

    def extra_repr(self) -> str:
        return "bits=%d, ste=%s%s" % (self.bits, self.ste, "" if self.enabled else ", disabled")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A float checkpoint (saved before transpiling) has none of the quantizer state: keep the initial
        # state instead of failing a strict load. A checkpoint with part of the state is still an error.
        own = [prefix + name for name, buf in self._buffers.items() if buf is not None and name not in self._non_persistent_buffers_set]
        if own and not any(key in state_dict for key in own):
            if getattr(self, "static", False):
                import warnings

                warnings.warn("qkernels: the loaded checkpoint has no activation-quantizer state (a float "
                              "checkpoint?): static scales stay at their initial value 0.001; calibrate "
                              "(QuantizeTranspiler.calibrate) or train before inference", FloatCheckpointWarning,
                              stacklevel=4)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class ActivationQuantizer(_Quantizer):
    """Base of the activation quantizers. ``static`` says whether the scale is frozen in eval()."""

    quantize_type = ""
    static = False
    sync_statistics = True   # MAX-reduce the batch statistic across processes (static types, training)
    process_group = None     # ... over this torch.distributed group (None: the default group)

    def __init__(self, bits: int = 8, ste: str = "identity"):
        super().__init__(bits, ste)
        self.register_buffer("scale", torch.tensor(0.001, dtype=torch.float32))

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("process_group", None)  # a process group belongs to a running job: never pickled
        return state

    def _statistic(self, x: torch.Tensor) -> torch.Tensor:
        return batch_statistic(x, self.process_group, self.sync_statistics)

    def quantize(self, x: torch.Tensor):
        """(integer codes, scale) of x for inference: the frozen scale (static types) or max|x| (abs_max).
        Never updates the state."""
        if self.static:
            return qk.quantize_with_scale(x, self.scale, self.bits), self.scale
        return qk.quantize_abs_max(x, self.bits)

    def reuse(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quant-dequant ``x`` with the current state and leave the state alone: what a layer does
        that reads the same tensor as an earlier layer owning this quantizer (which updated the state
        for this batch already), so that one tensor has one state, updated once per step."""
        if not self.enabled:
            return x
        if self.static:
            return self._fake_quant_with_state(x)
        return qk.fake_quant_abs_max(x, self.bits, self.ste)[0]

    def _fake_quant_with_state(self, x: torch.Tensor) -> torch.Tensor:
        # With the clipping STE the scale is saved for backward: hand over a copy, so that a later
        # in-place update (the same module used twice before backward) cannot invalidate it.
        scale = self.scale.clone() if self.ste == "clip" else self.scale
        return qk.fake_quant_with_scale(x, scale, self.bits, self.ste)


class FakeQuantAbsMax(ActivationQuantizer):
    """Dynamic quantization with the abs max of each batch. ``scale`` records the last training batch's
    scale (for inspection only: inference also uses the per-batch abs max)."""

    quantize_type = "abs_max"
    static = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        out, scale = qk.fake_quant_abs_max(x, self.bits, self.ste)
        if self.training:
            self.scale.copy_(scale.detach())
        return out


class FakeQuantRangeAbsMax(ActivationQuantizer):
    quantize_type = "range_abs_max"
    static = True

    def __init__(self, bits: int = 8, window_size: int = 10000, ste: str = "identity"):
        super().__init__(bits, ste)
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError("qkernels: window_size must be an int >= 1, got %r" % (window_size,))
        self.window_size = window_size
        self.register_buffer("window", torch.zeros(window_size, dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return "%s, window_size=%d" % (super().extra_repr(), self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training:
            qk.range_abs_max_update_(self._statistic(x), self.scale, self.window, self.step, self.window_size)
        return self._fake_quant_with_state(x)


class FakeQuantMovingAverageAbsMax(ActivationQuantizer):
    quantize_type = "moving_average_abs_max"
    static = True

    def __init__(self, bits: int = 8, moving_rate: float = 0.9, ste: str = "identity"):
        super().__init__(bits, ste)
        if not 0.0 <= float(moving_rate) <= 1.0:
            raise ValueError("qkernels: moving_rate must be in [0, 1], got %r" % (moving_rate,))
        self.moving_rate = float(moving_rate)
        self.register_buffer("accum", torch.ones((), dtype=torch.float32))
        self.register_buffer("state", torch.ones((), dtype=torch.float32))

    def extra_repr(self) -> str:
        return "%s, moving_rate=%g" % (super().extra_repr(), self.moving_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training:
            qk.moving_average_abs_max_update_(self._statistic(x), self.scale, self.accum, self.state, self.moving_rate)
        return self._fake_quant_with_state(x)


def make_activation_quantizer(quantize_type: str, bits: int = 8, window_size: int = 10000,
                              moving_rate: float = 0.9, ste: str = "identity") -> ActivationQuantizer:
    if quantize_type == "abs_max":
        return FakeQuantAbsMax(bits, ste=ste)
    if quantize_type == "range_abs_max":
        return FakeQuantRangeAbsMax(bits, window_size=window_size, ste=ste)
    if quantize_type == "moving_average_abs_max":
        return FakeQuantMovingAverageAbsMax(bits, moving_rate=moving_rate, ste=ste)
    raise ValueError("qkernels: unknown activation_quantize_type %r; expected one of %s"
                     % (quantize_type, ACTIVATION_QUANTIZE_TYPES))


class FakeQuantWeight(_Quantizer):
    """Weight fake quant-dequant: ``abs_max`` (one scale) or ``channel_wise_abs_max`` (one scale per
    slice along ``axis``: 0 for conv weights and for PyTorch's [out, in] linear weights). Stateless:
    the scales follow the weights."""

    def __init__(self, bits: int = 8, quantize_type: str = "abs_max", axis: int = 0, ste: str = "identity"):
        super().__init__(bits, ste)
        if quantize_type not in WEIGHT_QUANTIZE_TYPES:
            raise ValueError("qkernels: unknown weight_quantize_type %r; expected one of %s"
                             % (quantize_type, WEIGHT_QUANTIZE_TYPES))
        self.quantize_type = quantize_type
        self.axis = axis

    @property
    def channel_wise(self) -> bool:
        return self.quantize_type == "channel_wise_abs_max"

    def extra_repr(self) -> str:
        return "%s, type=%s" % (super().extra_repr(), self.quantize_type)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.channel_wise:
            return qk.fake_channel_wise_quant_abs_max(w, self.bits, self.axis, self.ste)[0]
        return qk.fake_quant_abs_max(w, self.bits, self.ste)[0]

    @torch.no_grad()
    def quantize(self, w: torch.Tensor):
        """(integer codes, scale): scale is 0-dim (abs_max) or [w.shape[axis]] (channel-wise), float32."""
        if self.channel_wise:
            return qk.quantize_channel_wise_abs_max(w, self.bits, self.axis)
        return qk.quantize_abs_max(w, self.bits)


def set_quantization_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every qkernels quantizer in ``model`` on or off (off: float behaviour, state untouched)."""
    for m in model.modules():
        if isinstance(m, _Quantizer):
            m.enabled = bool(enabled)
    return model


def quantizers(model: nn.Module, kind: Optional[type] = None):
    """The qkernels quantizer modules in ``model`` (optionally only those of class ``kind``)."""
    kind = kind or _Quantizer
    return [m for m in model.modules() if isinstance(m, kind)]
