"""Parity you can see: the deployed model against the QAT model, layer by layer.

``parity_report(qat_model, deployed, batch)`` runs the transpiled model in eval mode and the deployed
one (frozen, int8, or an ONNX model run by onnxruntime) on the same batch and compares, at every
quantized layer, the input the layer quantizes, in code steps of that layer's input quantizer
(``x * bin / s``, clipped to ``+-bin`` as the quantizer clips):

- ``max_error``: the largest difference between what the deployed layer reads and the QAT model's
  (continuous) value. A deployed layer that reads the previous layer's int8 codes differs by the rounding,
  at most half a step, where the QAT model still holds the unrounded value.
- ``mismatched``: how many of the layer's input codes differ from the QAT model's codes, and
  ``max_code_diff`` the largest such difference. Codes differ only at ties (rounding half to even in ONNX,
  half away from zero in qkernels) or where float rounding moved a value across a half step; a differing
  code then changes every layer after it.
- ``first_divergence``: the first layer (in call order) with a mismatched code.

The layers are matched by their module path (the passes keep it), the ONNX ones by the exporter's
name scopes: the int8 tensor feeding the DequantizeLinear in front of each layer's Conv / Gemm / MatMul.
"""
import ast
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .nn.frozen_layers import FrozenConv2d, FrozenLinear
from .nn.quant_layers import QuantConv2d, QuantLinear
from .ops.fake_quant import bin_count

_QAT_LAYERS = (QuantConv2d, QuantLinear)


@dataclass
class LayerParity:
    name: str
    max_error: float        # in code steps of the layer's input quantizer
    mismatched: int         # input codes that differ from the QAT model's
    numel: int
    max_code_diff: int


@dataclass
class ParityReport:
    deployed: str                                   # 'frozen', 'int8' or 'onnxruntime'
    layers: List[LayerParity] = field(default_factory=list)
    output_max_abs_diff: float = 0.0                # of the model outputs (first output)
    output_max_abs: float = 0.0                     # max |QAT output|, for scale
    missing: List[str] = field(default_factory=list)  # QAT layers the deployed model has no counterpart for

    @property
    def first_divergence(self) -> Optional[str]:
        return next((layer.name for layer in self.layers if layer.mismatched), None)

    @property
    def max_error(self) -> float:
        return max((layer.max_error for layer in self.layers), default=0.0)

    def __str__(self) -> str:
        lines = ["parity of the %s model against the QAT model (eval): %d layers, first divergence: %s"
                 % (self.deployed, len(self.layers), self.first_divergence or "none"),
                 "  %-32s %12s %12s %10s" % ("layer (input)", "max error", "codes off", "max diff")]
        for layer in self.layers:
            lines.append("  %-32s %10.4f st %5d/%-6d %8d" % (layer.name, layer.max_error, layer.mismatched,
                                                               layer.numel, layer.max_code_diff))
        lines.append("  output: max |deployed - QAT| %.4g (max |QAT| %.4g)" % (self.output_max_abs_diff,
                                                                          self.output_max_abs))
        if self.missing:
            lines.append("  not compared (no counterpart): %s" % ", ".join(self.missing))
        return "\n".join(lines)


def _round_half_away(u: torch.Tensor) -> torch.Tensor:
    return torch.trunc(u + torch.copysign(torch.full_like(u, 0.5), u))


def _units(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x in code steps of a quantizer with ``scale`` (clipped as it clips), float64."""
    bin_ = float(bin_count(bits))
    s = float(scale)
    if not s > 1e-30:
        return torch.zeros_like(x, dtype=torch.float64)
    return (x.detach().double() * (bin_ / s)).clamp(-bin_, bin_)


def _finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    a = x.detach().float().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), device=a.device)).max() if a.numel() else a.new_zeros(())


def _qat_units(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    q = layer.input_quantizer
    scale = q.scale if q.static else _finite_abs_max(x)
    return _units(x, scale, q.bits)


def _deployed_units(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, (FrozenConv2d, FrozenLinear)):
        q = layer.input_quantizer
        return _units(x, q.scale if q.static else _finite_abs_max(x), q.bits)
    if x.dtype == torch.int8:  # codes from a chained int8 layer, in this layer's steps
        return x.detach().double()
    scale = layer.input_scale if layer.static else _finite_abs_max(x)
    return _units(x, scale, layer.activation_bits)


def _run_with_hooks(model: nn.Module, layers: Dict[str, nn.Module], convert, batch) -> Tuple[Dict, List[str], object]:
    seen: Dict[str, torch.Tensor] = {}
    order: List[str] = []
    hooks = []
    for name, layer in layers.items():
        def hook(module, args, name=name):
            if name not in seen:
                order.append(name)
                seen[name] = convert(module, args[0])
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(*batch)
    finally:
        for h in hooks:
            h.remove()
    return seen, order, out


def _first_tensor(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    return out


def _compare(qat_units: torch.Tensor, dep_units: torch.Tensor, name: str) -> LayerParity:
    if qat_units.shape != dep_units.shape:
        dep_units = dep_units.reshape(qat_units.shape)
    qat_codes = _round_half_away(qat_units)
    dep_codes = _round_half_away(dep_units)
    diff = (dep_codes - qat_codes).abs()
    return LayerParity(name, float((dep_units - qat_units).abs().max()) if qat_units.numel() else 0.0,
                       int((diff > 0).sum()), qat_units.numel(), int(diff.max()) if diff.numel() else 0)


def _onnx_layer_inputs(model, names: List[str]) -> Dict[str, Tuple[str, int]]:
    """layer path -> (name of the code tensor the layer's Conv / Gemm / MatMul reads through its
    DequantizeLinear, that DequantizeLinear's zero point: 0 for int8 codes, 128 for uint8), found by the
    exporter's name scopes."""
    from onnx import numpy_helper

    zero_points = {i.name: int(numpy_helper.to_array(i).reshape(-1)[0]) for i in model.graph.initializer
                   if i.data_type in (2, 3) and not i.dims}  # scalar uint8 / int8
    producers = {out: node for node in model.graph.node for out in node.output}
    wanted = set(names)
    found: Dict[str, Tuple[str, int]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not node.input:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        try:
            paths = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        layer = next((p for p in reversed(paths) if p in wanted), None)
        dq = producers.get(node.input[0])
        if layer is None or layer in found or dq is None or dq.op_type != "DequantizeLinear":
            continue
        found[layer] = (dq.input[0], zero_points.get(dq.input[2], 0) if len(dq.input) > 2 else 0)
    return found


def _onnx_run(model, names: List[str], batch) -> Tuple[Dict[str, torch.Tensor], object]:
    import copy

    import onnx

    from .export import onnxruntime_session, run_onnx

    taps = _onnx_layer_inputs(model, names)
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for tensor, zero_point in taps.values():
        if tensor not in existing:
            kind = onnx.TensorProto.UINT8 if zero_point == 128 else onnx.TensorProto.INT8
            probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, kind, None))
            existing.add(tensor)
    session = onnxruntime_session(probe, optimization="disable")
    outputs = run_onnx(session, *batch)
    by_name = dict(zip([o.name for o in session.get_outputs()], outputs))
    return {layer: by_name[t].double() - zp for layer, (t, zp) in taps.items()}, outputs[0]


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module):
    """Every module in eval mode inside the block; each module's own mode restored after it."""
    modes = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m in model.modules():
            m.training = modes[id(m)]


def parity_report(qat_model: nn.Module, deployed, batch) -> ParityReport:
    """Compare ``deployed`` (a frozen or int8 nn.Module, or an onnx.ModelProto) with the transpiled
    ``qat_model`` (both run in eval mode; modes are restored) on ``batch`` (a tensor or a tuple of forward's
    arguments), layer by layer. See the module docstring for what is measured."""
    batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    qat_layers = {name: m for name, m in qat_model.named_modules() if isinstance(m, _QAT_LAYERS)}
    if not qat_layers:
        raise ValueError("qkernels: parity_report needs the transpiled (QAT) model, with QuantConv2d / "
                         "QuantLinear layers, as its first argument")
    with _in_eval_mode(qat_model):
        qat, order, qat_out = _run_with_hooks(qat_model, qat_layers, _qat_units, batch)
    if isinstance(deployed, nn.Module):
        from .transpiler import _int8_layer_types

        kinds = (FrozenConv2d, FrozenLinear) + _int8_layer_types()
        dep_layers = {name: m for name, m in deployed.named_modules() if isinstance(m, kinds) and name in qat_layers}
        if not dep_layers:
            raise ValueError("qkernels: the deployed model has no frozen or int8 layers under the QAT model's "
                             "layer names")
        kind = "frozen" if any(isinstance(m, (FrozenConv2d, FrozenLinear)) for m in dep_layers.values()) else "int8"
        with _in_eval_mode(deployed):
            dep, _order, dep_out = _run_with_hooks(deployed, dep_layers, _deployed_units, batch)
    else:
        kind = "onnxruntime"
        dep, dep_out = _onnx_run(deployed, order, batch)
    report = ParityReport(kind)
    for name in order:
        if name not in dep:
            report.missing.append(name)
            continue
        report.layers.append(_compare(qat[name], dep[name], name))
    a, b = _first_tensor(qat_out).detach().float(), _first_tensor(dep_out).detach().float()
    report.output_max_abs = float(a.abs().max()) if a.numel() else 0.0
    report.output_max_abs_diff = float((a - b.reshape(a.shape)).abs().max()) if a.numel() else 0.0
    return report
