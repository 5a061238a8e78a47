"""Int8Conv2d / Int8Linear: real int8 inference, made by ``QuantizeTranspiler.convert_to_int8``.

Each layer holds int8 weight codes and runs qkernels.conv2d_int8 / linear_int8 with the fused epilogue
``act(acc * scale + bias)``:
- input: float, quantized here with the frozen scale (static types) or the batch abs max (``abs_max``);
  or already int8 codes, when the previous layer was *chained* to this one (below);
- ``scale = s_a * s_w / (bin_a * bin_w)`` (one per output channel for channel-wise weights), times the
  batch-norm factor ``gamma / sqrt(var + eps)`` when a BatchNorm2d directly after the conv was folded in;
  ``bias`` is the layer's bias with that batch norm folded in;
- ``activation``: a ReLU / ReLU6 directly after the layer (and its batch norm) in an nn.Sequential is
  fused; the module it replaces becomes nn.Identity.

Chaining: when, inside one nn.Sequential (nested Sequentials are followed through), the next thing after
a layer is another int8 layer with a static 8-bit input scale ``s_n``, the layer writes int8 codes of that
layer's input directly (``scale * 127 / s_n``, ``bias * 127 / s_n``, rounding half away from zero and
saturating to [-127, 127], which is what that layer's quantizer would do), so no float tensor is made in
between. A layer with a fused ReLU6 is not chained (its clamp at 6 cannot be expressed in codes of an
arbitrary scale); the chaining decision depends only on the structure, so that a freshly converted model
has the same state_dict keys as a trained one.

Chaining holds only inside a call of the converted model (qkernels/nn/int8_chain.py): called any other
way (a slice of a Sequential, a submodule on its own) a chained layer writes the float values instead.

Dynamic (``abs_max``) models cannot chain (the next scale is the batch abs max of this output), but an
Int8Conv2d whose output only dynamic int8 layers read (``hands_abs_max``, set by convert_to_int8 from a
traced forward) takes that abs max while its kernels write the floats
(``conv2d_int8_packed_abs_max``) and hands it to the readers through the chain scope, for exactly that
output tensor: they quantize with it instead of reducing over the tensor again (same codes, bit for bit).
On the CPU, where the readers all take 8-bit codes and the layer has no ReLU6 (``hands_codes``), it writes
those codes itself instead of the floats (``conv2d_int8_packed_requant_abs_max``: where the product is
cheap its kernels run twice, first for the abs max alone, then writing codes with the scale folded into
the epilogue as for chained static layers, so a code may move one step on a rounding tie): the float
tensor, four bytes a value written and read back, was most of a dynamic model's time on large maps.

State (``state_dict``): ``weight`` (int8; or uint8 = code + 128 with ``weight_storage="uint8"``, converted
back to int8 on load), ``weight_scale``, ``bias``, ``input_scale`` (static types), ``bn_factor`` (folded
batch norm), ``output_scale`` (chained layers). The epilogue constants derive from these and are
recomputed after ``load_state_dict``, and so are the weights packed for the CPU kernels (Int8Conv2d:
``pack_conv2d_int8_weight``, once, not per call; again after ``.to(device)``; call ``refresh()`` after
changing ``weight`` in place). ``_extra_state`` records the structure (version, activation, chained,
static or dynamic input, batch norm folded, bits, storage), so a state_dict loads into a skeleton
converted with other settings, which takes on the saved structure.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops as qk
from .._library import ops as _ops
from ..ops.fake_quant import bin_count

ACTIVATIONS = (None, "relu", "relu6")
STATE_VERSION = 2  # 1: before _extra_state (structure taken from the skeleton)


def _refresh_after_load(module: "_Int8Layer", _incompatible_keys) -> None:
    # A named function, not a lambda, so that whole int8 models can be pickled (torch.save(model)).
    module.refresh()


class _Int8Layer(nn.Module):
    hands_abs_max = False  # layers pickled before the attribute existed
    hands_codes = False

    def _init_common(self, frozen, weight_storage: str):
        quantizer = frozen.input_quantizer
        self.activation_bits = quantizer.bits
        self.weight_bits = frozen.weight_bits
        self.weight_quantize_type = frozen.weight_quantize_type
        self.static = quantizer.static
        self.weight_storage = weight_storage
        self.activation: Optional[str] = None
        self.float_activation: Optional[str] = None  # the activation when not writing codes (chained layers)
        self.chain_scope = None  # set by convert_to_int8: codes only inside a call of the converted model
        self.hands_abs_max = False  # set by convert_to_int8: hand this output's abs max to dynamic readers
        self.hands_codes = False  # set by convert_to_int8: hand them its 8-bit codes at that scale, not floats
        self.register_buffer("weight", frozen.weight.detach().round().to(torch.int8))
        self.register_buffer("weight_scale", frozen.weight_scale.detach().clone())
        self.register_buffer("bias", None if frozen.bias is None else frozen.bias.detach().clone())
        self.register_buffer("input_scale", quantizer.scale.detach().clone() if self.static else None)
        self.register_buffer("bn_factor", None)
        self.register_buffer("output_scale", None)
        self.register_buffer("_epilogue_scale", None, persistent=False)
        self.register_buffer("_epilogue_bias", None, persistent=False)
        self.register_buffer("_float_scale", None, persistent=False)  # chained layers writing floats
        self.register_buffer("_float_bias", None, persistent=False)
        self.register_buffer("_packed_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # --- structure set by the transpiler ----------------------------------------------------------

    def fold_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        """Fold an eval-mode BatchNorm2d that follows this layer into the epilogue scale and bias."""
        if self.activation is not None or self.output_scale is not None:
            raise RuntimeError("qkernels: fold the batch norm before fusing an activation or chaining")
        with torch.no_grad():
            factor = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.affine:
                factor = factor * bn.weight.float()
            shift = -bn.running_mean.float() if self.bias is None else self.bias - bn.running_mean.float()
            bias = shift * factor
            if bn.affine:
                bias = bias + bn.bias.float()
        self.bn_factor = factor if self.bn_factor is None else self.bn_factor * factor
        self.bias = bias
        self.refresh()

    def fuse_activation(self, activation: Optional[str]) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError("qkernels: activation must be None, 'relu' or 'relu6', got %r" % (activation,))
        self.activation = activation
        self.refresh()

    def accepts_codes(self) -> bool:
        """Whether a previous layer may hand this one int8 codes (static 8-bit input scale)."""
        return self.static and self.activation_bits == 8

    def chain_to(self, next_layer: "_Int8Layer", float_activation: Optional[str] = None) -> None:
        """Write int8 codes for ``next_layer``'s input instead of float (``float_activation``: the activation
        to apply when writing floats after all, if not the current one)."""
        if not next_layer.accepts_codes():
            raise RuntimeError("qkernels: can only chain into a layer with a static 8-bit input scale")
        if self.activation == "relu6":
            raise RuntimeError("qkernels: a layer with a fused ReLU6 cannot write int8 codes")
        self.float_activation = float_activation or self.activation
        self.output_scale = next_layer.input_scale.detach().clone()
        self.refresh()

    @property
    def chained(self) -> bool:
        return self.output_scale is not None

    # --- epilogue constants -----------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the epilogue scale and bias from the persistent state."""
        scale = self.weight_scale.float() / float(bin_count(self.activation_bits) * bin_count(self.weight_bits))
        if self.bn_factor is not None:
            scale = scale * self.bn_factor
        if self.static:
            scale = scale * self.input_scale
        bias = None if self.bias is None else self.bias.float()
        self._float_scale = scale.contiguous()
        self._float_bias = None if bias is None else bias.contiguous()
        if self.output_scale is not None:
            # codes of the next layer's input: y * 127 / s_n (a zero scale gives zero codes, as quantize does)
            usable = self.output_scale > 1e-30
            to_codes = torch.where(usable, 127.0 / torch.where(usable, self.output_scale, 1.0), 0.0)
            scale = scale * to_codes
            bias = None if bias is None else bias * to_codes
        self._epilogue_scale = scale.contiguous()
        self._epilogue_bias = None if bias is None else bias.contiguous()
        self._pack_weight()
        self._build_call()

    def _pack_weight(self) -> None:
        """Layers with a packed form of their weights (Int8Conv2d) pack them here: when built, loaded and moved."""

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .cpu(): the packed weights are for the old device's kernels, pack again
        result = super()._apply(fn, recurse)
        if self.weight is not None and self.weight.dtype == torch.int8:
            self._pack_weight()
            self._build_call()
        return result

    # --- the call outside tracing -----------------------------------------------------------------

    def _build_call(self) -> None:
        """What forward hands the op, as one plain attribute (not buffers): a call then reads no module
        attribute through nn.Module.__getattr__ and skips the op wrapper's argument checks, done here
        once. At batch 1 that overhead was a tenth of a small model's time. Rebuilt with the epilogue;
        tracing (torch.export, torch.compile, ONNX) takes the plain path, which reads the buffers."""
        self.__dict__.pop("_call", None)
        if self.weight is None or self.weight.dtype != torch.int8:
            return
        codes = (self._epilogue_scale, self._epilogue_bias, self._out_dtype(), self.activation or "none")
        floats = (self._float_scale, self._float_bias, torch.float32, self.float_activation or "none")
        self.__dict__["_call"] = (self.output_scale is not None, codes, floats, self.input_scale,
                                  self.activation_bits, self.weight.device) + self._op_args()

    def _op_args(self) -> tuple:
        """The layer's fixed op arguments after the input (Int8Conv2d: weight, packed, stride...)."""
        return ()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_call", None)  # references to buffers: rebuilt on first use after unpickling
        return state

    def _fast_call(self, x: torch.Tensor):
        """(codes, scale, bias, out dtype, activation, op arguments) from the cache, or None where the
        plain path must run (tracing, another device)."""
        if torch.compiler.is_compiling():
            return None
        call = self.__dict__.get("_call")
        if call is None:  # unpickled: rebuilt once
            self._build_call()
            call = self.__dict__.get("_call")
            if call is None:
                return None
        chained, codes, floats, input_scale, bits, device = call[:6]
        if x.device != device:
            return None
        scope = self.chain_scope
        scale, bias, out_dtype, activation = floats if chained and not (scope is None or scope.active) else codes
        handed = scope.handed_abs_max(x) if input_scale is None and scope is not None else None
        x, scale = _input_codes(x, input_scale, bits, scale, handed)
        return (x, scale, bias, out_dtype, activation) + call[6:]

    def _writes_codes(self) -> bool:
        """Chained, and inside a call of the model the chaining was decided for (when one was given)."""
        return self.output_scale is not None and (self.chain_scope is None or self.chain_scope.active)

    def _epilogue(self):
        """(epilogue scale, bias, out dtype, activation) for this call."""
        if self.output_scale is not None and not self._writes_codes():
            return self._float_scale, self._float_bias, torch.float32, self.float_activation
        return self._epilogue_scale, self._epilogue_bias, self._out_dtype(), self.activation

    def _input_codes(self, x: torch.Tensor):
        """(int8 codes, scale factor for the epilogue)."""
        return _input_codes(x, self.input_scale, self.activation_bits, self._epilogue()[0])

    def _out_dtype(self) -> torch.dtype:
        return torch.int8 if self.output_scale is not None else torch.float32

    # --- uint8 weight storage ---------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_storage == "uint8":
            destination[prefix + "weight"] = (self.weight.to(torch.int16) + 128).to(torch.uint8)

    def get_extra_state(self):
        return {"version": STATE_VERSION, "activation": self.activation, "float_activation": self.float_activation,
                "chained": self.output_scale is not None, "static": self.static,
                "bn_folded": self.bn_factor is not None, "activation_bits": self.activation_bits,
                "weight_bits": self.weight_bits, "weight_quantize_type": self.weight_quantize_type,
                "weight_storage": self.weight_storage}

    def set_extra_state(self, state) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if not isinstance(version, int) or version > STATE_VERSION:
            raise RuntimeError("qkernels: int8 layer state version %r is not one this qkernels reads (up to %d)"
                               % (version, STATE_VERSION))
        for name in ("activation", "float_activation", "static", "activation_bits", "weight_bits",
                     "weight_quantize_type", "weight_storage"):
            if name in state:
                setattr(self, name, state[name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = prefix + "_extra_state"
        if extra not in state_dict:  # a version-1 state: the skeleton's structure stands
            state_dict = dict(state_dict)
            state_dict[extra] = self.get_extra_state()
        else:  # the saved structure wins: optional buffers it does not have are dropped here too
            for name in ("bias", "input_scale", "bn_factor", "output_scale"):
                if prefix + name not in state_dict and getattr(self, name) is not None:
                    setattr(self, name, None)
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype == torch.uint8:
            state_dict = dict(state_dict)
            state_dict[key] = (state_dict[key].to(torch.int16) - 128).to(torch.int8)
        # Optional buffers (None until folded / chained) must exist to receive values: create them.
        for name in ("bias", "input_scale", "bn_factor", "output_scale"):
            if prefix + name in state_dict and getattr(self, name) is None:
                incoming = state_dict[prefix + name]
                setattr(self, name, torch.empty_like(incoming, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _extra(self) -> str:
        parts = ["weight=%s/%d bit" % (self.weight_quantize_type, self.weight_bits),
                 "input=%s/%d bit" % ("static" if self.static else "abs_max", self.activation_bits)]
        if self.bn_factor is not None:
            parts.append("bn folded")
        if self.activation:
            parts.append("activation=%s" % self.activation)
        if self.output_scale is not None:
            parts.append("int8 out")
        return ", ".join(parts)


def _input_codes(x: torch.Tensor, input_scale: Optional[torch.Tensor], bits: int, epilogue_scale: torch.Tensor,
                 handed_abs_max: Optional[torch.Tensor] = None):
    """(int8 codes of a layer's input, the epilogue scale for them). Codes from a chained previous layer are
    already in this layer's scale; a float input is quantized with the static ``input_scale`` (None: the
    batch abs max, which then scales the epilogue; ``handed_abs_max``: that max, already taken by the
    producer as it wrote x; with int8 codes, the scale they were written at). The kernels read NHWC and
    conv2d_int8 returns channels-last; a float NCHW input (a model's own input) is made so here: on the CPU by
    quantize_with_scale_channels_last (one pass, after the abs max for a dynamic scale), else by torch's
    float transpose (several times faster than one of int8 codes), after which quantizing is elementwise:
    the contiguous NHWC view is quantized and handed back as a channels-last view."""
    if x.dtype == torch.int8:
        if handed_abs_max is not None:  # codes a dynamic producer wrote at the batch scale it handed over
            return x, handed_abs_max * epilogue_scale
        return x, epilogue_scale
    nhwc = x.dim() == 4
    if nhwc and handed_abs_max is None and x.is_cpu and not x.is_contiguous(memory_format=torch.channels_last) \
            and not torch.compiler.is_compiling():
        # quantized and transposed in one pass (torch's transpose of the floats alone took twice as long as
        # quantizing them: a batch-8 300x300 stem); traced models keep the plain ops below
        if input_scale is not None:
            return _ops.quantize_with_scale_channels_last(x, input_scale, bits), epilogue_scale
        s = _ops.abs_max(x)  # what quantize_abs_max takes
        return _ops.quantize_with_scale_channels_last(x, s, bits), s * epilogue_scale
    if nhwc:
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.permute(0, 2, 3, 1)
    if input_scale is not None:
        codes = qk.quantize_with_scale(x, input_scale, bits)
    else:
        if handed_abs_max is not None:
            s = handed_abs_max
            codes = _ops.quantize_with_scale(x, s, bits)
        else:
            codes, s = qk.quantize_abs_max(x, bits)
        epilogue_scale = s * epilogue_scale
    return (codes.permute(0, 3, 1, 2) if nhwc else codes), epilogue_scale


def _int_pair(padding, kernel_size, stride, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if all(s == 1 for s in stride) and all(d * (k - 1) % 2 == 0 for k, d in zip(kernel_size, dilation)):
            return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        raise ValueError("qkernels: convert_to_int8 supports padding='same' only when it is symmetric")
    return tuple(int(p) for p in padding)


class Int8Conv2d(_Int8Layer):
    @classmethod
    def from_frozen(cls, frozen, weight_storage: str = "int8") -> "Int8Conv2d":
        if frozen.padding_mode != "zeros":
            raise ValueError("qkernels: convert_to_int8 supports padding_mode='zeros' only, got %r" % frozen.padding_mode)
        new = cls()
        new.in_channels, new.out_channels, new.groups = frozen.in_channels, frozen.out_channels, frozen.groups
        new.kernel_size, new.stride, new.dilation = frozen.kernel_size, frozen.stride, frozen.dilation
        new.padding = _int_pair(frozen.padding, frozen.kernel_size, frozen.stride, frozen.dilation)
        new._init_common(frozen, weight_storage)
        new.refresh()
        return new

    @torch.no_grad()
    def _pack_weight(self) -> None:
        self._packed_weight = qk.pack_conv2d_int8_weight(self.weight, self.groups)

    def _op_args(self) -> tuple:
        return (self.weight, self._packed_weight, [int(v) for v in self.stride], [int(v) for v in self.padding],
                [int(v) for v in self.dilation], int(self.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast_call(x)
        if fast is not None:
            codes, scale, bias, out_dtype, activation, weight, packed, stride, padding, dilation, groups = fast
            scope = self.chain_scope
            if self.hands_abs_max and out_dtype is torch.float32 and scope is not None and scope.active:
                if self.hands_codes and codes.is_cpu:
                    out, abs_max = _ops.conv2d_int8_packed_requant_abs_max(
                        codes, weight, packed, bias, stride, padding, dilation, groups, scale, activation)
                else:
                    out, abs_max = _ops.conv2d_int8_packed_abs_max(codes, weight, packed, bias, stride, padding,
                                                                   dilation, groups, scale, activation)
                scope.hand_over_abs_max(out, abs_max)
                return out
            return _ops.conv2d_int8_packed(codes, weight, packed, bias, stride, padding, dilation, groups, scale,
                                           out_dtype, activation)
        codes, scale = self._input_codes(x)
        _scale, bias, out_dtype, activation = self._epilogue()
        return qk.conv2d_int8_packed(codes, self.weight, self._packed_weight, bias, self.stride, self.padding,
                                     self.dilation, self.groups, scale, out_dtype, activation)

    def extra_repr(self) -> str:
        return "%d, %d, kernel_size=%s, stride=%s, padding=%s, groups=%d, %s" % (
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.groups, self._extra())


class Int8Linear(_Int8Layer):
    @classmethod
    def from_frozen(cls, frozen, weight_storage: str = "int8") -> "Int8Linear":
        new = cls()
        new.in_features, new.out_features = frozen.in_features, frozen.out_features
        new._init_common(frozen, weight_storage)
        new.refresh()
        return new

    def _op_args(self) -> tuple:
        return (self.weight,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast_call(x)
        if fast is not None:
            codes, scale, bias, out_dtype, activation, weight = fast
            return _ops.linear_int8(codes, weight, bias, scale, out_dtype, activation)
        codes, scale = self._input_codes(x)
        _scale, bias, out_dtype, activation = self._epilogue()
        return qk.linear_int8(codes, self.weight, bias, scale, out_dtype, activation)

    def extra_repr(self) -> str:
        return "in_features=%d, out_features=%d, %s" % (self.in_features, self.out_features, self._extra())
