"""QuantizeTranspiler: the PyTorch form of PaddlePaddle Fluid's QuantizeTranspiler (reference-semantics.md,
section 3). Each pass first finds the model's structure from a traced graph (qkernels/graph: torch.fx,
else torch.export with ``example_inputs``, else the nn.Sequential fallback with a GraphTraceWarning), then
changes the model by module swaps, in place, so state_dict keys and the model's class survive.

- ``training_transpile(model, example_inputs=None)``: every nn.Conv2d (depthwise included) and nn.Linear
  becomes a QuantConv2d / QuantLinear (fake-quantized input and weight, same ``weight``/``bias``
  Parameters). Layers reading the same tensor share one input quantizer (one state, updated once per
  step: the reference quantizes such a tensor once). With ``fold_bn=True`` a Conv2d whose output only a
  BatchNorm2d reads trains with that batch norm folded into the quantized weight (qkernels/nn/bn_fold.py),
  wherever forward() calls them.
- ``freeze_program(model)``: the inference form (FrozenConv2d / FrozenLinear): integer weight codes in float,
  frozen or per-batch activation scales, dequantization after the conv.
- ``convert_to_int8(model, example_inputs=None)``: Int8Conv2d / Int8Linear running the int8 kernels; a batch
  norm and then a ReLU / ReLU6 reading a layer's output alone are folded / fused into its epilogue, and a
  layer whose readers are all int8 layers with one static 8-bit input scale writes their int8 codes.
  When a fused activation cannot be removed by a swap (a module also called elsewhere, such as the
  ``self.relu`` a ResNet block calls twice, or a functional ``F.relu``), the graph changes: the pass then
  returns a torch.fx.GraphModule (see qkernels/graph/rewrite.py) instead of the model; use what it returns.

- ``calibrate(model, batches, method)``: post-training calibration of the static activation scales
  (qkernels/calibration.py), so freeze_program / convert_to_int8 can follow without training.

Which layers are quantized: exactly the types in ``layer_types`` (nn.Conv2d and nn.Linear by default:
a subclass with its own forward is left float and reported, unless its class is listed), minus those
``skip_pattern`` keeps float (module-path substrings, compiled regexes, layer classes, predicates
``f(name, module)``, and ``"<first>"`` / ``"<last>"`` for the first / last quantizable layer in call order).

After each pass ``summary`` (a TranspileSummary) says what was swapped, folded, fused, chained, shared and
kept float, and what was not and why: ``print(t.summary)``.
"""
import re
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import graph as qg
from .graph.module_graph import MODULE
from .nn.bn_fold import FoldedBatchNorm2d, can_fold
from .nn.frozen_layers import FrozenConv2d, FrozenLinear
from .nn.int8_chain import install_chain_scope
from .nn.quant_layers import QuantConv2d, QuantLinear
from .nn.quantizers import ACTIVATION_QUANTIZE_TYPES, WEIGHT_QUANTIZE_TYPES, FakeQuantWeight, make_activation_quantizer
from .ops.fake_quant import check_bits, check_ste

_TRANSPILED = (QuantConv2d, QuantLinear, FrozenConv2d, FrozenLinear)
_FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
_FROZEN_LAYERS = (FrozenConv2d, FrozenLinear)
_LIST_LIMIT = 12  # names listed in a warning
FIRST_LAYER = "<first>"  # skip_pattern entries: the first / last quantizable layer in call order
LAST_LAYER = "<last>"


class GraphTraceWarning(UserWarning):
    """The model could not be traced; the transpiler used the nn.Sequential fallback (less is folded,
    fused, shared and chained)."""


def _int8_layer_types():
    from .nn.int8_layers import Int8Conv2d, Int8Linear  # imported late: needs the int8 ops

    return (Int8Conv2d, Int8Linear)


def _count(model: nn.Module, kinds) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _as_inputs(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("qkernels: example_inputs must be a tensor or a tuple of forward()'s arguments, got %s"
                    % type(example_inputs).__name__)


def _names(model: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _replace_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` wherever ``old`` is registered (a module registered twice stays shared)."""
    seen = set()

    def visit(module: nn.Module):
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = replacements.get(id(child))
            if new is not None:
                module._modules[name] = new
            else:
                visit(child)

    visit(model)


def _float_layers(model: nn.Module, layer_types: tuple) -> Tuple[List[nn.Module], List[Tuple[nn.Module, str]]]:
    """(the Conv2d / Linear modules to swap, each once, [(module, why it stays float)] for the subclasses
    not listed in ``layer_types``). Not those inside nn.MultiheadAttention, whose forward reads its
    projection weights directly."""
    found: Dict[int, nn.Module] = {}
    refused: Dict[int, Tuple[nn.Module, str]] = {}

    def visit(module: nn.Module):
        for child in module.children():
            if type(child) in layer_types:
                found.setdefault(id(child), child)
            elif isinstance(child, _FLOAT_LAYERS):
                base = nn.Conv2d if isinstance(child, nn.Conv2d) else nn.Linear
                refused.setdefault(id(child), (child, "%s is a subclass of nn.%s (its own forward would be lost); "
                                               "add it to layer_types to quantize it as a plain %s"
                                               % (type(child).__name__, base.__name__, base.__name__)))
            elif not isinstance(child, nn.MultiheadAttention):
                visit(child)

    visit(model)
    return list(found.values()), list(refused.values())


def _check_layer_types(layer_types) -> tuple:
    types = tuple(layer_types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, _FLOAT_LAYERS))]
    if not types or bad:
        raise TypeError("qkernels: layer_types must be classes derived from nn.Conv2d or nn.Linear, got %r" % (bad or types,))
    return types


def _check_skip_pattern(skip_pattern) -> list:
    if skip_pattern is None:
        return []
    items = [skip_pattern] if isinstance(skip_pattern, (str, re.Pattern)) or callable(skip_pattern) else list(skip_pattern)
    for item in items:
        if not (isinstance(item, (str, re.Pattern, type)) or callable(item)):
            raise TypeError("qkernels: skip_pattern entries must be module-path substrings, compiled regexes, layer "
                            "classes or predicates f(name, module), got %r" % (item,))
    return items


def _skip_reason(items: list, name: str, module: nn.Module, position: Dict[int, str]) -> Optional[str]:
    for item in items:
        if isinstance(item, str) and item in (FIRST_LAYER, LAST_LAYER):
            if position.get(id(module)) == item:
                return "skip_pattern %s" % item
        elif isinstance(item, str):
            if item in name:
                return "skip_pattern %r" % item
        elif isinstance(item, re.Pattern):
            if item.search(name):
                return "skip_pattern re %r" % item.pattern
        elif isinstance(item, type):
            if isinstance(module, item):
                return "skip_pattern type %s" % item.__name__
        elif item(name, module):
            return "skip_pattern predicate %s" % getattr(item, "__name__", type(item).__name__)
    return None


def _listing(names: List[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (" and %d more" % (len(names) - _LIST_LIMIT) if len(names) > _LIST_LIMIT else "")


def _warn_fallback(stage: str, model: nn.Module, graph: qg.ModuleGraph, missed: str) -> None:
    warnings.warn("qkernels: %s could not trace %s (%s), so it used the nn.Sequential fallback (only modules "
                  "adjacent in a plain nn.Sequential are known to feed each other): %s. Pass example_inputs "
                  "(forward's arguments) to trace shape-dependent Python with torch.export, or make forward() "
                  "traceable by torch.fx." % (stage, type(model).__name__, graph.failure, missed),
                  GraphTraceWarning, stacklevel=3)


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
    - ``skip_pattern``: layers kept float (see the module docstring): e.g. ``["heads"]``, ``"<first>"``,
      ``re.compile("^extras[.][0-9]+[.]0$")``, ``nn.Linear`` or ``lambda name, m: m.groups > 1``.
    - ``layer_types``: the exact classes quantized (default nn.Conv2d, nn.Linear; list a subclass to
      quantize it, its own forward is then replaced by the plain conv / linear one).
    - ``sync_statistics`` / ``process_group``: static scales under torch.distributed: MAX-reduce each batch
      statistic over ``process_group`` (None: the default group), or not at all.
    """

    def __init__(self, weight_bits: int = 8, activation_bits: int = 8, activation_quantize_type: str = "abs_max",
                 weight_quantize_type: str = "abs_max", window_size: int = 10000, moving_rate: float = 0.9,
                 fold_bn: bool = False, ste: str = "identity", weight_storage: str = "int8", skip_pattern=None,
                 layer_types: Iterable[type] = (nn.Conv2d, nn.Linear), sync_statistics: bool = True,
                 process_group=None):
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
        self.skip_pattern = _check_skip_pattern(skip_pattern)
        self.layer_types = _check_layer_types(layer_types)
        self.sync_statistics = bool(sync_statistics)
        self.process_group = process_group
        self.summary: Optional[qg.TranspileSummary] = None  # what the last pass did
        self._example_inputs: Optional[tuple] = None

    def _input_quantizer(self):
        q = make_activation_quantizer(self.activation_quantize_type, self.activation_bits, self.window_size,
                                      self.moving_rate, self.ste)
        if not self.sync_statistics:
            q.sync_statistics = False
        if self.process_group is not None:
            q.process_group = self.process_group
        return q

    def _layers_to_swap(self, model: nn.Module, graph, names: Dict[int, str], summary) -> List[nn.Module]:
        """The layers training_transpile swaps; the others go into ``summary.skipped`` with the reason."""
        layers, refused = _float_layers(model, self.layer_types)
        for m, why in refused:
            summary.skipped.append((names[id(m)], why))
        if not self.skip_pattern:
            return layers
        in_order = [n.module for n in graph.nodes if n.kind == MODULE and any(n.module is m for m in layers)]
        order = list({id(m): m for m in in_order + layers}.values())  # call order, then the never-called ones
        position = {}
        if order:
            position[id(order[-1])] = LAST_LAYER
            position[id(order[0])] = FIRST_LAYER
        kept = []
        for m in layers:
            why = _skip_reason(self.skip_pattern, names[id(m)], m, position)
            if why is None:
                kept.append(m)
            else:
                summary.skipped.append((names[id(m)], why))
        return kept

    def _weight_quantizer(self):
        return FakeQuantWeight(self.weight_bits, self.weight_quantize_type, axis=0, ste=self.ste)

    # --- training -------------------------------------------------------------------------------

    def training_transpile(self, model: nn.Module, example_inputs=None) -> nn.Module:
        """Swap in QuantConv2d / QuantLinear, in place; returns ``model``. ``example_inputs`` (a tensor or a
        tuple of forward's arguments) let torch.export trace a model torch.fx cannot; convert_to_int8 reuses
        them."""
        if not isinstance(model, nn.Module):
            raise TypeError("qkernels: training_transpile expects an nn.Module, got %s" % type(model).__name__)
        if _count(model, _TRANSPILED) or self._has_int8(model):
            raise RuntimeError("qkernels: this model was already transpiled (it holds quantized layers); "
                               "transpile the float model once")
        if isinstance(model, _FLOAT_LAYERS):
            raise TypeError("qkernels: pass a model that contains the layers (e.g. nn.Sequential(layer)); "
                            "a single layer cannot be swapped in place")
        inputs = _as_inputs(example_inputs)
        self._example_inputs = inputs
        graph = qg.trace(model, inputs)
        names = _names(model)
        summary = qg.TranspileSummary("training_transpile", type(model).__name__, graph.source, graph.failure)
        layers = self._layers_to_swap(model, graph, names, summary)
        swapped_ids = {id(m) for m in layers}

        folds: Dict[int, nn.BatchNorm2d] = {}
        if self.fold_bn:
            after_float: Dict[int, str] = {}  # batch norms after a conv kept float
            for m in [m for m, _ in _float_layers(model, (nn.Conv2d,))[1]] + _float_layers(model, _FLOAT_LAYERS)[0]:
                node = graph.single_call(m) if isinstance(m, nn.Conv2d) else None
                chain = qg.layer_chain(graph, node, can_fold, with_activation=False) if node is not None else None
                if chain is not None and chain.bn is not None:
                    if id(m) in swapped_ids:
                        folds[id(m)] = chain.bn.module
                    else:
                        after_float[id(chain.bn.module)] = "after %s, which is kept float" % names[id(m)]
            folded_ids = {id(bn) for bn in folds.values()}
            for m in model.modules():
                if type(m) is nn.BatchNorm2d and id(m) not in folded_ids:
                    why = after_float.get(id(m)) or qg.why_not_folded(graph, m, nn.Conv2d, can_fold)
                    summary.not_folded.append((names[id(m)], why))

        replacements: Dict[int, nn.Module] = {}
        for m in layers:
            bn = folds.get(id(m))
            if isinstance(m, nn.Conv2d):
                folded = FoldedBatchNorm2d.from_bn(bn) if bn is not None else None
                new = QuantConv2d.from_float(m, self._input_quantizer(), self._weight_quantizer(), folded)
                if bn is not None:
                    replacements[id(bn)] = folded
                    summary.folded.append((names[id(m)], names[id(bn)]))
            else:
                new = QuantLinear.from_float(m, self._input_quantizer(), self._weight_quantizer())
            replacements[id(m)] = new
            summary.swapped.append((names[id(m)], type(m).__name__, type(new).__name__))

        for group in qg.shared_input_groups(graph, _FLOAT_LAYERS):
            group = [node for node in group if id(node.module) in swapped_ids]
            if len(group) < 2:
                continue
            owner = replacements[id(group[0].module)]
            for node in group[1:]:
                reader = replacements[id(node.module)]
                reader.input_quantizer = owner.input_quantizer
                reader.shares_input_quantizer = True
            summary.shared_inputs.append(tuple(names[id(n.module)] for n in group))

        _replace_modules(model, replacements)
        self.summary = summary
        if not graph.traced:
            missed = "tensors read by several layers keep one quantizer per layer"
            if self.fold_bn:
                missed = "batch norms not folded: %s; %s" % (_listing([n for n, _ in summary.not_folded]), missed)
            _warn_fallback("training_transpile", model, graph, missed)
        return model

    # --- post-training calibration -------------------------------------------------------------

    def calibrate(self, model: nn.Module, batches, method: str = "abs_max", percentile: float = 99.99,
                  forward=None) -> nn.Module:
        """Static activation scales from ``batches`` without training (qkernels/calibration.py): statistics
        of the float activations (fake quant off, eval mode: batch norms keep their statistics), then
        ``method`` ('abs_max', the reference's; 'percentile'; 'mse') sets each scale. Returns ``model``;
        ``summary`` lists the scales."""
        from .calibration import calibrate

        if self._has_int8(model) or _count(model, _FROZEN_LAYERS):
            raise RuntimeError("qkernels: calibrate the transpiled model (training_transpile), before "
                               "freeze_program / convert_to_int8")
        result = calibrate(model, batches, method=method, percentile=percentile, forward=forward)
        summary = qg.TranspileSummary("calibrate", type(model).__name__, "none (forward hooks on the quantizers)")
        summary.returned = "the same model, its static activation scales set"
        summary.calibration = "%s over %d batches" % (method if method != "percentile" else
                                                      "percentile %g" % percentile, result.batches)
        summary.calibrated = [(name, result.scales[name], result.abs_max[name]) for name in result.scales]
        summary.skipped = [(name, "dynamic abs_max quantizer (no state to calibrate)") for name in result.skipped]
        self.summary = summary
        return model

    # --- inference ------------------------------------------------------------------------------

    def freeze_program(self, model: nn.Module) -> nn.Module:
        """Swap QuantConv2d / QuantLinear for FrozenConv2d / FrozenLinear, in place; returns ``model``.
        Folded batch norms become nn.Identity (they live in the frozen weights and bias)."""
        if self._has_int8(model):
            raise RuntimeError("qkernels: this model was already converted to int8; freeze the transpiled model")
        if not _count(model, (QuantConv2d, QuantLinear)):
            if _count(model, _FROZEN_LAYERS):
                raise RuntimeError("qkernels: this model is already frozen")
            raise RuntimeError("qkernels: the model has no quantized layers: call training_transpile(model) "
                               "(and train it) before freeze_program")
        names = _names(model)
        summary = qg.TranspileSummary("freeze_program", type(model).__name__, "none (module swaps only)")
        replacements: Dict[int, nn.Module] = {}
        for m in model.modules():
            if isinstance(m, QuantConv2d):
                new = FrozenConv2d.from_quant(m)
            elif isinstance(m, QuantLinear):
                new = FrozenLinear.from_quant(m)
            elif isinstance(m, FoldedBatchNorm2d):
                new = nn.Identity()
            else:
                continue
            new.train(m.training)
            replacements[id(m)] = new
            summary.swapped.append((names[id(m)], type(m).__name__, type(new).__name__))
        _replace_modules(model, replacements)
        self.summary = summary
        return model

    # --- int8 ---------------------------------------------------------------------------------------

    def convert_to_int8(self, model: nn.Module, example_inputs=None) -> nn.Module:
        """Int8Conv2d / Int8Linear for the frozen layers (the training form is frozen first), batch norms
        folded and ReLU / ReLU6 fused into the layer before them, int8 codes passed between layers where
        every reader takes them (see the module docstring). Returns ``model`` changed in place, or a
        torch.fx.GraphModule when the graph had to change (``summary.returned`` says which).
        ``example_inputs`` default to those given to training_transpile.

        With ``example_inputs`` (a tuple of model inputs), one traced forward also chains the layers whose output
        several int8 layers read with one static scale (e.g. a feature map read by the next block and the
        heads; see qkernels/int8_fusion.py).

        To load a saved int8 state_dict: ``convert_to_int8(training_transpile(fresh float model))`` with the
        same transpiler settings, then ``load_state_dict``."""
        int8_conv, int8_linear = _int8_layer_types()
        if not isinstance(model, nn.Module):
            raise TypeError("qkernels: convert_to_int8 expects an nn.Module, got %s" % type(model).__name__)
        if self._has_int8(model):
            raise RuntimeError("qkernels: this model was already converted to int8")
        if _count(model, (QuantConv2d, QuantLinear)):
            self.freeze_program(model)
        frozen = [m for m in model.modules() if isinstance(m, _FROZEN_LAYERS)]
        if not frozen:
            raise RuntimeError("qkernels: the model has no quantized layers: call training_transpile(model) "
                               "(and train it) before convert_to_int8")
        for m in frozen:
            if m.weight_bits > 8 or m.input_quantizer.bits > 8:
                raise ValueError("qkernels: convert_to_int8 needs weight_bits and activation_bits <= 8 (int8 "
                                 "kernels), got %d and %d" % (m.weight_bits, m.input_quantizer.bits))
        inputs = _as_inputs(example_inputs)
        graph = qg.trace(model, inputs if inputs is not None else getattr(self, "_example_inputs", None))
        names = _names(model)
        summary = qg.TranspileSummary("convert_to_int8", type(model).__name__, graph.source, graph.failure)

        int8: Dict[int, nn.Module] = {}
        replacements: Dict[int, nn.Module] = {}
        fused_nodes, dropped, needs_rewrite = set(), [], False
        unfusable: Dict[int, str] = {}  # id(activation node) -> why it is not fused
        ends = []  # (frozen layer, int8 layer, node whose output the fused layer produces)
        for f in frozen:
            name = names[id(f)]
            new = (int8_conv if isinstance(f, FrozenConv2d) else int8_linear).from_frozen(f, self.weight_storage)
            new.train(f.training)
            int8[id(f)] = replacements[id(f)] = new
            summary.swapped.append((name, type(f).__name__, type(new).__name__))
            if f.bn_folded:
                summary.folded.append((name, "(folded during QAT)"))
            node = graph.single_call(f)
            if node is None:
                calls = len(graph.calls(f))
                summary.not_chained.append((name, "called %d times" % calls if calls else "never called"))
                continue
            fold_rule = can_fold if isinstance(f, FrozenConv2d) and not f.bn_folded else None
            chain = qg.layer_chain(graph, node, fold_rule, with_activation=True)
            end = node
            if chain.bn is not None:
                new.fold_batch_norm(chain.bn.module)
                replacements[id(chain.bn.module)] = nn.Identity()
                dropped.append(chain.bn)
                summary.folded.append((name, names[id(chain.bn.module)]))
                end = chain.bn
            act = chain.activation
            if act is not None:
                swappable = act.kind == MODULE and graph.single_call(act.module) is act
                if swappable or graph.rewritable:
                    new.fuse_activation(act.activation)
                    if swappable:
                        replacements[id(act.module)] = nn.Identity()
                    dropped.append(act)
                    fused_nodes.add(id(act))
                    summary.fused.append((name, act.activation, qg.describe(act)))
                    end = act
                    needs_rewrite = needs_rewrite or not swappable
                else:
                    unfusable[id(act)] = ("after %s, but removing it needs a graph rewrite (it is %s), which only "
                                          "torch.fx graphs get" % (name, "called elsewhere too" if act.kind == MODULE
                                                                   else "a function call"))
            ends.append((f, new, end, name))

        by_quantizer: Dict[int, List[str]] = {}
        for f in frozen:
            by_quantizer.setdefault(id(f.input_quantizer), []).append(names[id(f)])
        summary.shared_inputs = [tuple(g) for g in by_quantizer.values() if len(g) > 1]
        for f, new, end, name in ends:
            why = self._chain(graph, new, end, int8, names)
            if why is None:
                readers = qg.value_users(end)
                summary.chained.append((name, tuple(names[id(r.module)] for r in readers)))
            else:
                summary.not_chained.append((name, why))

        # Once the graph changes anyway, a ReLU after a residual add is fused into the (float) add too.
        add_relus = qg.add_relu_pairs(graph) if needs_rewrite else []
        for add, relu in add_relus:
            summary.fused_adds.append((add.target, qg.describe(relu)))
            fused_nodes.add(id(relu))
        _replace_modules(model, replacements)
        self._float_ops(graph, summary, fused_nodes, unfusable, replacements, model)
        if needs_rewrite:
            model = qg.drop_calls(model, graph, dropped, add_relus)
            summary.returned = ("a torch.fx.GraphModule (class %s) with the model's submodules under the same "
                                "names: fused activations called elsewhere too or called as functions are gone "
                                "from its graph" % type(model).__name__)
        self.summary = summary
        if not graph.traced:
            left = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, nn.ReLU, nn.ReLU6)]
            _warn_fallback("convert_to_int8", model, graph, "left in float: %s (modules; functional calls unknown): "
                           "%s" % (", ".join("%d %s" % (n, k) for k, n in sorted(summary.float_ops.items())),
                                   _listing(left)))
        # A layer whose output several int8 layers read (MobileNet-SSD's feature maps: the next block and both
        # heads) is chained when one traced forward shows that only int8 readers with one static scale read it.
        traced_inputs = inputs if inputs is not None else getattr(self, "_example_inputs", None)
        if traced_inputs is not None:
            from .int8_fusion import chain_shared_outputs

            newly, handing = chain_shared_outputs(model, tuple(traced_inputs), (int8_conv, int8_linear), int8_conv)
            summary.not_chained = [(n, why) for n, why in summary.not_chained if n not in newly]
            summary.chained += [(n, ("the int8 readers of its output, found by a traced forward",)) for n in newly]
            summary.abs_max_handed = handing
        if summary.chained or summary.abs_max_handed:
            # Codes flow only inside a call of this model (its graph or traced forward decided the chaining).
            scope = install_chain_scope(model)
            for layer in model.modules():
                if isinstance(layer, (int8_conv, int8_linear)) and (layer.chained or summary.abs_max_handed):
                    layer.chain_scope = scope  # readers of a handed abs max look it up in the scope too
        return model

    @staticmethod
    def _chain(graph, layer, end, int8, names) -> Optional[str]:
        """Make ``layer`` write int8 codes for the layers reading ``end``; None, or why it cannot."""
        readers = qg.code_readers(graph, end, _FROZEN_LAYERS)
        if not readers:
            return qg.why_not_readers(graph, end, _FROZEN_LAYERS)
        if len({id(r.module.input_quantizer) for r in readers}) > 1:
            return "its readers %s have separate input quantizers" % ", ".join(names[id(r.module)] for r in readers)
        targets = [int8[id(r.module)] for r in readers]
        refused = [names[id(r.module)] for r, t in zip(readers, targets) if not t.accepts_codes()]
        if refused:
            return "%s takes no int8 codes (dynamic abs_max or wider than 8-bit input)" % ", ".join(refused)
        if layer.activation == "relu6":
            # A reader's quantizer clips at its scale s: when s <= 6 that clip includes ReLU6's clamp, so the
            # codes of relu(y) saturated at s are exactly those of relu6(y).
            scale = float(targets[0].input_scale.max())
            if scale > 6.0:
                return "fused ReLU6 and the readers' input scale %.4g is above 6" % scale
            layer.fuse_activation("relu")
            layer.chain_to(targets[0], float_activation="relu6")
            return None
        layer.chain_to(targets[0])
        return None

    @staticmethod
    def _float_ops(graph, summary, fused_nodes, unfusable, replacements, model) -> None:
        """Batch norms and activations the int8 model still runs in float, and why the activations are not fused."""
        if graph.traced:
            bns = [n for n in graph.nodes if n.is_module(nn.BatchNorm2d) and id(n.module) not in replacements]
            acts = [n for n in graph.nodes if n.activation and id(n) not in fused_nodes]
            for n in acts:
                producer = qg.source_of(n.main_input) if n.main_input is not None else None
                why = unfusable.get(id(n)) or "reads %s" % (qg.describe(producer) if producer else "nothing")
                summary.not_fused.append((qg.describe(n), why))
            summary.float_ops = {"batch norms": len(bns), "activations": len(acts)}
        else:  # forward is unknown: count the modules left
            summary.float_ops = {"batch norms": _count(model, nn.BatchNorm2d),
                                 "activations": sum(type(m) in (nn.ReLU, nn.ReLU6) for m in model.modules())}

    @staticmethod
    def _has_int8(model: nn.Module) -> bool:
        try:
            kinds = _int8_layer_types()
        except ImportError:
            return False
        return bool(_count(model, kinds))
