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
from .nn.quantizers import ACTIVATION_QUANTIZE_TYPES, WEIGHT_QUANTIZE_TYPES, FakeQuantWeight, make_activation_quantizer
from .ops.fake_quant import check_bits, check_ste

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


def _next_sibling(parent: nn.Module, name: str, skip_identity: bool = False):
    # Only a plain nn.Sequential says that one module's output is the next one's only input.
    if type(parent) is not nn.Sequential:
        return None, None
    names = list(parent._modules.keys())
    for next_name in names[names.index(name) + 1:]:
        nxt = parent._modules[next_name]
        if not (skip_identity and isinstance(nxt, nn.Identity)):
            return next_name, nxt
    return None, None


def _flatten_sequential(seq: nn.Module):
    leaves = []
    for m in seq._modules.values():
        if type(m) is nn.Sequential:
            leaves.extend(_flatten_sequential(m))
        elif m is not None:
            leaves.append(m)
    return leaves


def _chain_int8_layers(model: nn.Module, int8_kinds) -> None:
    """Let an int8 layer write int8 codes when, in a plain nn.Sequential (nested ones followed through),
    the next module after it (skipping nn.Identity) is an int8 layer with a static 8-bit input scale.
    Modules used at several places are left alone (their successor is not unique)."""
    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1

    def visit(module):
        if type(module) is nn.Sequential:
            leaves = _flatten_sequential(module)
            for i, layer in enumerate(leaves):
                if not isinstance(layer, int8_kinds) or uses[id(layer)] > 1 or layer.activation == "relu6":
                    continue
                following = [m for m in leaves[i + 1:] if not isinstance(m, nn.Identity)]
                if following and isinstance(following[0], int8_kinds) and uses[id(following[0])] == 1 \
                        and following[0].accepts_codes():
                    layer.chain_to(following[0])
            children = leaves
        else:
            children = [m for m in module._modules.values() if m is not None]
        for child in children:
            visit(child)

    visit(model)


class QuantizeTranspiler:
    """Settings shared by the three passes.

    - ``weight_bits`` / ``activation_bits``: 2..16 (int8 conversion needs <= 8).
    - ``activation_quantize_type``: ``abs_max`` (dynamic), ``range_abs_max`` or ``moving_average_abs_max``
      (static: scale frozen in eval()); ``window_size`` / ``moving_rate`` configure the last two.
    - ``weight_quantize_type``: ``abs_max`` (one scale) or ``channel_wise_abs_max`` (one per output channel).
    - ``fold_bn``: train Conv2d + BatchNorm2d pairs with the batch norm folded into the quantized weight.
    - ``ste``: ``identity`` (the reference: gradients pass unchanged) or ``clip`` (zero where clipped).
    - ``weight_storage``: how convert_to_int8 layers save weights in ``state_dict``: ``int8`` or ``uint8``
      (code + 128, as the reference suggested); in memory they are int8 either way.
    """

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

    # --- int8 ---------------------------------------------------------------------------------------

    def convert_to_int8(self, model: nn.Module, example_inputs=None) -> nn.Module:
        """Swap the frozen (or still training-form: they are frozen first) layers for Int8Conv2d / Int8Linear,
        in place; returns ``model``. In a plain nn.Sequential, a BatchNorm2d right after a conv is folded
        into the epilogue and a following ReLU / ReLU6 fused (both become nn.Identity), and a layer whose
        next layer has a static 8-bit input scale writes that layer's int8 codes directly.

        With ``example_inputs`` (a tuple of model inputs), one traced forward also chains the layers whose output
        several int8 layers read with one static scale (e.g. a feature map read by the next block and the
        heads; see qkernels/int8_fusion.py).

        To load a saved int8 state_dict: ``convert_to_int8(training_transpile(fresh float model))`` with the
        same transpiler settings, then ``load_state_dict``."""
        from .nn.int8_layers import Int8Conv2d, Int8Linear

        if not isinstance(model, nn.Module):
            raise TypeError("qkernels: convert_to_int8 expects an nn.Module, got %s" % type(model).__name__)
        if self._has_int8(model):
            raise RuntimeError("qkernels: this model was already converted to int8")
        if _count(model, (QuantConv2d, QuantLinear)):
            self.freeze_program(model)
        frozen = [m for m in model.modules() if isinstance(m, (FrozenConv2d, FrozenLinear))]
        if not frozen:
            raise RuntimeError("qkernels: the model has no quantized layers: call training_transpile(model) "
                               "(and train it) before convert_to_int8")
        for m in frozen:
            if m.weight_bits > 8 or m.input_quantizer.bits > 8:
                raise ValueError("qkernels: convert_to_int8 needs weight_bits and activation_bits <= 8 (int8 "
                                 "kernels), got %d and %d" % (m.weight_bits, m.input_quantizer.bits))

        def swap(parent, child, name, memo):
            if isinstance(child, FrozenConv2d):
                new = Int8Conv2d.from_frozen(child, self.weight_storage)
            elif isinstance(child, FrozenLinear):
                new = Int8Linear.from_frozen(child, self.weight_storage)
            else:
                return
            new.train(child.training)
            memo[id(child)] = (child, new)
            parent._modules[name] = new
            next_name, nxt = _next_sibling(parent, name, skip_identity=True)
            if isinstance(new, Int8Conv2d) and nxt is not None and id(nxt) not in memo and can_fold(new, nxt):
                new.fold_batch_norm(nxt)
                parent._modules[next_name] = nn.Identity()
                next_name, nxt = _next_sibling(parent, next_name, skip_identity=True)
            if nxt is not None and type(nxt) in (nn.ReLU, nn.ReLU6):
                new.fuse_activation("relu" if type(nxt) is nn.ReLU else "relu6")
                parent._modules[next_name] = nn.Identity()

        _swap_children(model, swap, {})
        _chain_int8_layers(model, (Int8Conv2d, Int8Linear))
        if example_inputs is not None:
            from .int8_fusion import chain_shared_outputs
            chain_shared_outputs(model, tuple(example_inputs), (Int8Conv2d, Int8Linear))
        return model

    @staticmethod
    def _has_int8(model: nn.Module) -> bool:
        try:
            kinds = _int8_layer_types()
        except ImportError:
            return False
        return bool(_count(model, kinds))
