"""QuantizeTranspiler: the PyTorch form of PaddlePaddle Fluid's QuantizeTranspiler (reference-semantics.md,
section 3), working by module swaps on an nn.Module, in place.

- ``training_transpile(model)``: every nn.Conv2d (depthwise included) and nn.Linear becomes a QuantConv2d /
  QuantLinear (fake-quantized input and weight, same ``weight``/``bias`` Parameters). With ``fold_bn=True``
  a Conv2d directly followed by a BatchNorm2d in an nn.Sequential trains with the BN folded into the
  quantized weight (see qkernels/nn/bn_fold.py).
- ``freeze_program(model)``: the inference form (FrozenConv2d / FrozenLinear): integer weight codes in float,
  frozen or per-batch activation scales, dequantization after the conv.
- ``convert_to_int8(model)``: Int8Conv2d / Int8Linear with int8 weights running the int8 kernels.

Each layer quantizes its own input (the reference quantizes a tensor shared by several layers once); the
results are the same, see qkernels/nn/quant_layers.py.
"""
from typing import Callable, Dict, Tuple

from torch import nn

from .nn.bn_fold import FoldedBatchNorm2d, can_fold
from .nn.frozen_layers import FrozenConv2d, FrozenLinear
from .nn.quant_layers import QuantConv2d, QuantLinear
from .nn.quantizers import (ACTIVATION_QUANTIZE_TYPES, WEIGHT_QUANTIZE_TYPES, FakeQuantWeight, check_bits,
                            check_ste, make_activation_quantizer)

_TRANSPILED = (QuantConv2d, QuantLinear, FrozenConv2d, FrozenLinear)


def _int8_layer_types():
    from .nn.int8_layers import Int8Conv2d, Int8Linear  # imported late: needs the int8 ops

    return (Int8Conv2d, Int8Linear)


def _count(model: nn.Module, kinds) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _swap_children(module: nn.Module, swap: Callable[[nn.Module, nn.Module, str, Dict[int, nn.Module]], None],
                   memo: Dict[int, Tuple[nn.Module, nn.Module]]) -> None:
    """Depth-first over the tree; ``swap(parent, child, name, memo)`` may replace ``parent.<name>``.
    ``memo`` maps id(old module) -> (old, new) so a module used at two places stays shared (the old module
    is kept alive so that its id is not reused by a new object during the walk)."""
    for name in list(module._modules.keys()):
        child = module._modules[name]
        if child is None:
            continue
        if id(child) in memo:
            module._modules[name] = memo[id(child)][1]
            continue
        swap(module, child, name, memo)
        replaced = module._modules[name]
        if replaced is child and not isinstance(child, nn.MultiheadAttention):
            _swap_children(child, swap, memo)


def _next_sibling(parent: nn.Module, name: str):
    if not isinstance(parent, nn.Sequential):
        return None, None
    names = list(parent._modules.keys())
    i = names.index(name)
    if i + 1 >= len(names):
        return None, None
    return names[i + 1], parent._modules[names[i + 1]]


class QuantizeTranspiler:
    def __init__(self, weight_bits: int = 8, activation_bits: int = 8, activation_quantize_type: str = "abs_max",
                 weight_quantize_type: str = "abs_max", window_size: int = 10000, moving_rate: float = 0.9,
                 fold_bn: bool = False, ste: str = "identity", weight_storage: str = "int8"):
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.activation_bits = check_bits(activation_bits, "activation_bits")
        if activation_quantize_type not in ACTIVATION_QUANTIZE_TYPES:
            raise ValueError("qkernels: unknown activation_quantize_type %r; expected one of %s"
                             % (activation_quantize_type, ACTIVATION_QUANTIZE_TYPES))
        if weight_quantize_type not in WEIGHT_QUANTIZE_TYPES:
            raise ValueError("qkernels: unknown weight_quantize_type %r; expected one of %s"
                             % (weight_quantize_type, WEIGHT_QUANTIZE_TYPES))
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError("qkernels: window_size must be an int >= 1, got %r" % (window_size,))
        if not 0.0 <= float(moving_rate) <= 1.0:
            raise ValueError("qkernels: moving_rate must be in [0, 1], got %r" % (moving_rate,))
        if weight_storage not in ("int8", "uint8"):
            raise ValueError("qkernels: weight_storage must be 'int8' or 'uint8', got %r" % (weight_storage,))
        self.activation_quantize_type = activation_quantize_type
        self.weight_quantize_type = weight_quantize_type
        self.window_size = window_size
        self.moving_rate = float(moving_rate)
        self.fold_bn = bool(fold_bn)
        self.ste = check_ste(ste)
        self.weight_storage = weight_storage

    def _input_quantizer(self):
        return make_activation_quantizer(self.activation_quantize_type, self.activation_bits, self.window_size,
                                         self.moving_rate, self.ste)

    def _weight_quantizer(self):
        return FakeQuantWeight(self.weight_bits, self.weight_quantize_type, axis=0, ste=self.ste)

    # --- training -------------------------------------------------------------------------------

    def training_transpile(self, model: nn.Module) -> nn.Module:
        """Swap in QuantConv2d / QuantLinear, in place; returns ``model``."""
        if not isinstance(model, nn.Module):
            raise TypeError("qkernels: training_transpile expects an nn.Module, got %s" % type(model).__name__)
        if _count(model, _TRANSPILED) or self._has_int8(model):
            raise RuntimeError("qkernels: this model was already transpiled (it holds quantized layers); "
                               "transpile the float model once")
        if isinstance(model, (nn.Conv2d, nn.Linear)):
            raise TypeError("qkernels: pass a model that contains the layers (e.g. nn.Sequential(layer)); "
                            "a single layer cannot be swapped in place")

        def swap(parent, child, name, memo):
            if isinstance(child, nn.Conv2d):
                bn = None
                next_name, nxt = _next_sibling(parent, name)
                if self.fold_bn and nxt is not None and id(nxt) not in memo and can_fold(child, nxt):
                    bn = FoldedBatchNorm2d.from_bn(nxt)
                    memo[id(nxt)] = (nxt, bn)
                    parent._modules[next_name] = bn
                new = QuantConv2d.from_float(child, self._input_quantizer(), self._weight_quantizer(), bn)
            elif isinstance(child, nn.Linear):
                new = QuantLinear.from_float(child, self._input_quantizer(), self._weight_quantizer())
            else:
                return
            memo[id(child)] = (child, new)
            parent._modules[name] = new

        _swap_children(model, swap, {})
        return model

    # --- inference ------------------------------------------------------------------------------

    def freeze_program(self, model: nn.Module) -> nn.Module:
        """Swap QuantConv2d / QuantLinear for FrozenConv2d / FrozenLinear, in place; returns ``model``.
        Folded batch norms become nn.Identity (they live in the frozen weights and bias)."""
        if self._has_int8(model):
            raise RuntimeError("qkernels: this model was already converted to int8; freeze the transpiled model")
        if not _count(model, (QuantConv2d, QuantLinear)):
            if _count(model, (FrozenConv2d, FrozenLinear)):
                raise RuntimeError("qkernels: this model is already frozen")
            raise RuntimeError("qkernels: the model has no quantized layers: call training_transpile(model) "
                               "(and train it) before freeze_program")

        def swap(parent, child, name, memo):
            if isinstance(child, QuantConv2d):
                new = FrozenConv2d.from_quant(child)
            elif isinstance(child, QuantLinear):
                new = FrozenLinear.from_quant(child)
            elif isinstance(child, FoldedBatchNorm2d):
                new = nn.Identity()
            else:
                return
            new.train(child.training)
            memo[id(child)] = (child, new)
            parent._modules[name] = new

        _swap_children(model, swap, {})
        return model

    @staticmethod
    def _has_int8(model: nn.Module) -> bool:
        try:
            kinds = _int8_layer_types()
        except ImportError:
            return False
        return bool(_count(model, kinds))
