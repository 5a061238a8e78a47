"""Our QDQ graph rewritten into the node units that onnxruntime (and TensorRT) run as integer convolutions.

A runtime fuses ``DequantizeLinear(x), DequantizeLinear(w), [DequantizeLinear(int32 bias)] -> Conv ->
QuantizeLinear`` into one QLinearConv. Our ops translate to a Conv whose output reaches the next
QuantizeLinear through a float bias ``Add``, the layer's activation (Relu, Clip(0, 6)) and the
``Clip(-s, s)`` that stops our codes at -127: any of them between Conv and QuantizeLinear blocks the fusion,
so onnxruntime ran float convolutions on dequantized tensors.

``fuse_conv_units`` moves them. For a Conv whose only path to a QuantizeLinear (constant scale, zero point
0) is such a chain, with every tensor on it used once:
- the float bias (the Add's and the Conv's own) becomes an int32 bias on the accumulator's step
  ``x_step * w_step`` behind a DequantizeLinear, as runtimes expect (rounded half to even);
- the QuantizeLinear reads the Conv directly, and the clamps (each Relu and Clip, of any order) act on the
  codes instead: ``Q(clamp(z, lo, hi)) = clamp(Q(z), Q(lo), Q(hi))`` because quantizing is monotone, so an
  int8 ``Max`` (and ``Min``) after the QuantizeLinear gives the same codes: -127 / 0 below, Q(6) above.

The result equals the unrewritten graph except for the bias rounding: at most half an accumulator step
per output, a small fraction of an output code, so a code moves (by one) only where it was within that of
a rounding tie. Convolutions whose output feeds a float consumer (a residual add, a tap, the model's
output) are left as they are.

``to_uint8_activations`` then optionally stores the activation codes as uint8 with zero point 128.
"""
from collections import defaultdict
from typing import List, Optional, Tuple

import numpy as np

from .onnx_graph import constant_values, drop_unused_initializers

__all__ = ["fuse_conv_units", "to_uint8_activations"]

_INT32 = np.iinfo(np.int32)


class _Graph:
    """Producers, consumers and constant values of an onnx GraphProto (constants through Reshape too)."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes = list(graph.node)  # these wrappers throughout, so that id(node) stays one node's
        self.values = constant_values(graph)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.uses = defaultdict(int)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.uses[name] += 1
        for out in graph.output:
            self.uses[out.name] += 1

    def constant(self, name: str) -> Optional[np.ndarray]:
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Reshape":
            data, shape = self.constant(node.input[0]), self.constant(node.input[1])
            if data is not None and shape is not None:
                return data.reshape([int(d) for d in shape])
        return None

    def single_use(self, name: str) -> bool:
        return self.uses.get(name, 0) == 1


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _dequantized(g: _Graph, name: str) -> Optional[Tuple[object, np.ndarray]]:
    """(DequantizeLinear node, its step) when ``name`` is a DequantizeLinear of int8 with constant step and a
    zero point of 0."""
    node = g.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    step = g.constant(node.input[1])
    zp = g.constant(node.input[2]) if len(node.input) > 2 else None
    if step is None or (zp is not None and (zp.dtype != np.int8 or np.any(zp != 0))):
        return None
    return node, step.astype(np.float32)


def _clamp_bounds(g: _Graph, node) -> Optional[Tuple[float, float]]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    lo = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(-np.inf)
    hi = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(np.inf)
    if lo is None or hi is None or lo.size != 1 or hi.size != 1:
        return None
    return float(lo), float(hi)


def _code(value: float, step: float) -> int:
    """QuantizeLinear of one value as onnxruntime computes it (float32 division, half to even, saturated)."""
    if np.isinf(value):
        return 127 if value > 0 else -128
    return int(np.clip(np.rint(np.float32(value) / np.float32(step)), -128, 127))


class _Unit:
    """One Conv -> [Add bias] -> clamps -> QuantizeLinear chain found in the graph."""

    def __init__(self, conv, add, add_bias, clamps, quantize, lo, hi, x_step, w_step):
        self.conv, self.add, self.add_bias, self.clamps, self.quantize = conv, add, add_bias, clamps, quantize
        self.lo, self.hi, self.x_step, self.w_step = lo, hi, x_step, w_step


def _find_unit(g: _Graph, q) -> Optional[_Unit]:
    step = g.constant(q.input[1])
    zp = g.constant(q.input[2]) if len(q.input) > 2 else None
    if step is None or step.size != 1 or zp is None or zp.dtype != np.int8 or np.any(zp != 0):
        return None
    lo, hi, clamps, add, add_bias = -np.inf, np.inf, [], None, None
    name = q.input[0]
    while True:
        node = g.producer.get(name)
        if node is None or not g.single_use(name):
            return None
        bounds = _clamp_bounds(g, node)
        if bounds is None:
            break
        if add is not None:
            return None  # a clamp before the bias: not one of ours
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        clamps.append(node)
        name = node.input[0]
    if node.op_type == "Add":
        for i in (0, 1):
            bias = g.constant(node.input[i])
            if bias is not None:
                add, add_bias, name = node, bias, node.input[1 - i]
                break
        if add is None:
            return None
        node = g.producer.get(name)
        if node is None or not g.single_use(name):
            return None
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    x, w = _dequantized(g, node.input[0]), _dequantized(g, node.input[1])
    if x is None or w is None or x[1].size != 1 or g.constant(w[0].input[0]) is None:
        return None
    if len(node.input) > 2 and node.input[2] and g.constant(node.input[2]) is None:
        return None
    out_channels = g.constant(w[0].input[0]).shape[0]
    if add_bias is not None and add_bias.size not in (1, out_channels):
        return None
    if w[1].size not in (1, out_channels) or (w[1].size > 1 and _attr(w[0], "axis", 1) != 0):
        return None
    return _Unit(node, add, add_bias, clamps, q, lo, hi, float(x[1]), w[1])


def _rewrite(g: _Graph, unit: _Unit, index: int) -> Tuple[List, List]:
    """(new nodes before the Conv, new nodes after the QuantizeLinear); edits the Conv and QuantizeLinear."""
    from onnx import helper, numpy_helper

    conv, q = unit.conv, unit.quantize
    out_channels = g.constant(g.producer[conv.input[1]].input[0]).shape[0]
    bias = np.zeros(out_channels, np.float64)
    has_bias = False
    if len(conv.input) > 2 and conv.input[2]:
        bias += g.constant(conv.input[2]).astype(np.float64).reshape(-1)
        has_bias = True
    if unit.add_bias is not None:
        bias += np.broadcast_to(unit.add_bias.astype(np.float64).reshape(-1), (out_channels,))
        has_bias = True
    before, after = [], []
    inputs = list(conv.input[:2])
    if has_bias:
        step = (np.float32(unit.x_step) * np.broadcast_to(unit.w_step.reshape(-1), (out_channels,))).astype(np.float32)
        usable = step > 0
        codes = np.where(usable, np.rint(bias / np.where(usable, step, 1.0)), 0.0)
        prefix = "qk_unit%d_bias" % index
        g.graph.initializer.extend([
            numpy_helper.from_array(np.clip(codes, _INT32.min, _INT32.max).astype(np.int32), prefix + "_q"),
            numpy_helper.from_array(np.where(usable, step, np.float32(1.0)).astype(np.float32), prefix + "_step"),
            numpy_helper.from_array(np.zeros(out_channels, np.int32), prefix + "_zero")])
        before.append(helper.make_node("DequantizeLinear", [prefix + "_q", prefix + "_step", prefix + "_zero"],
                                       [prefix], name=prefix + "_dq", axis=0))
        inputs.append(prefix)
    del conv.input[:]
    conv.input.extend(inputs)
    q.input[0] = conv.output[0]
    step = float(g.constant(q.input[1]))
    lo, hi = _code(unit.lo, step), _code(unit.hi, step)
    codes_out = q.output[0]
    raw = "qk_unit%d_codes" % index
    current = raw
    q.output[0] = raw
    for op, bound, needed in (("Max", lo, lo > -128), ("Min", hi, hi < 127)):
        if not needed:
            continue
        name = "qk_unit%d_%s" % (index, op.lower())
        g.graph.initializer.append(numpy_helper.from_array(np.array(bound, np.int8), name + "_bound"))
        after.append(helper.make_node(op, [current, name + "_bound"], [name], name=name))
        current = name
    if after:
        after[-1].output[0] = codes_out
    else:
        q.output[0] = codes_out
    return before, after


def _without_dead_nodes(nodes: List, graph_outputs) -> List:
    """nodes minus those whose outputs nothing reads (a bias Reshape left behind), repeatedly."""
    while True:
        used = {name for node in nodes for name in node.input} | set(graph_outputs)
        alive = [n for n in nodes if any(out in used for out in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def fuse_conv_units(model) -> int:
    """Rewrite ``model`` (an onnx.ModelProto, changed in place) so that every Conv whose output is quantized
    is a DequantizeLinear -> Conv -> QuantizeLinear unit (see the module doc); returns how many were."""
    g = _Graph(model.graph)
    units = [u for u in (_find_unit(g, n) for n in g.nodes if n.op_type == "QuantizeLinear") if u is not None]
    if not units:
        return 0
    removed = {id(n) for u in units for n in ([u.add] if u.add is not None else []) + u.clamps}
    gone = {out for u in units for n in ([u.add] if u.add is not None else []) + u.clamps for out in n.output}
    before, after = {}, {}
    for i, u in enumerate(units):
        before[id(u.conv)], after[id(u.quantize)] = _rewrite(g, u, i)
    nodes = []
    for node in g.nodes:
        if id(node) in removed:
            continue
        nodes.extend(before.get(id(node), []))
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    nodes = _without_dead_nodes(nodes, [o.name for o in model.graph.output])
    kept = {out for n in nodes for out in n.output}
    gone |= {out for n in g.nodes for out in n.output if out not in kept}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for vi in [vi for vi in model.graph.value_info if vi.name in gone]:
        model.graph.value_info.remove(vi)
    drop_unused_initializers(model.graph)
    return len(units)


# ops that move or reshape their first input without looking at its values
_MOVES_CODES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Expand")


def to_uint8_activations(model) -> int:
    """Store every activation code as uint8 with zero point 128 (``code + 128``) instead of int8 with zero
    point 0: the same values, in the form onnxruntime's x86 kernels are fastest at (its int8-activation
    QLinearConv there is several times slower; see benchmarks/bench_onnx_export.py). Weights stay int8.
    Changes ``model`` in place; returns how many QuantizeLinear / DequantizeLinear nodes were changed."""
    from onnx import TensorProto, numpy_helper

    g = _Graph(model.graph)
    zero = "qk_uint8_zero_point"
    model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zero))
    codes, changed = set(), 0
    for node in g.nodes:
        if node.op_type == "QuantizeLinear" and g.constant(node.input[0]) is None:
            zp = g.constant(node.input[2]) if len(node.input) > 2 else None
            if zp is None or zp.dtype != np.int8 or zp.size != 1 or np.any(zp != 0):
                continue
            node.input[2] = zero
            codes.add(node.output[0])
            changed += 1
        elif node.op_type in ("Max", "Min") and node.input[0] in codes:
            bound = g.constant(node.input[1])
            name = node.input[1] + "_uint8"
            model.graph.initializer.append(numpy_helper.from_array((bound.astype(np.int32) + 128).astype(np.uint8), name))
            node.input[1] = name
            codes.add(node.output[0])
        elif node.op_type == "DequantizeLinear" and node.input[0] in codes:
            node.input[2] = zero
            changed += 1
        elif node.op_type in _MOVES_CODES and node.input and node.input[0] in codes:
            codes.update(node.output)  # layout changes of the codes (a channels-last permute) carry them
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name in codes and vi.type.tensor_type.elem_type == TensorProto.INT8:
            vi.type.tensor_type.elem_type = TensorProto.UINT8
    drop_unused_initializers(model.graph)
    return changed
