"""Leaving PyTorch: ONNX (standard QDQ, run by onnxruntime) and torch.export.

``export_onnx(model, args, f=None)`` is ``torch.onnx.export(model, args, dynamo=True,
custom_translation_table=qkernels.onnx_translations())`` plus two clean-ups: a QuantizeLinear of a
constant weight (what a transpiled model's fake-quantized weights become) is folded into an int8
initializer with our rounding (half away from zero), so every quantized weight is an int8 tensor behind
a DequantizeLinear and its codes are exactly ours; and each quantized Conv becomes the node unit that
onnxruntime runs as QLinearConv (qkernels/onnx_conv_units.py). It works for a transpiled model in eval mode, a
frozen model (freeze_program) and an int8 model (convert_to_int8); see qkernels/ops/onnx.py for the
QDQ each op becomes and the bounded rounding-tie difference from PyTorch.

torch.export needs nothing of ours: the ops have fake kernels, so ``torch.export.export(model, args)``,
``torch.export.save`` and ``torch.export.load`` work on frozen and int8 models as they are.
"""
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .onnx_conv_units import fuse_conv_units, to_uint8_activations
from .onnx_graph import constant_values, drop_unused_initializers
from .ops.onnx import onnx_translations

__all__ = ["export_onnx", "fold_constant_quantize", "onnxruntime_session", "run_onnx"]


def _check_onnx_deps() -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise ImportError("qkernels: ONNX export needs the packages %s (pip install onnx onnxscript; see "
                          "requirements.txt for the tested versions)" % ", ".join(missing))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _quantize_half_away(x: np.ndarray, step: np.ndarray, axis: Optional[int], low: int, high: int) -> np.ndarray:
    step = step.astype(np.float32)
    if step.ndim == 1 and x.ndim > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        step = step.reshape(shape)
    v = x.astype(np.float32) / step
    codes = np.trunc(v + np.copysign(np.float32(0.5), v))
    return np.clip(codes, low, high)


def fold_constant_quantize(model):
    """Fold every QuantizeLinear whose inputs are all constants (weights) into an int8 / uint8 initializer,
    rounding half away from zero as qkernels does; returns the (changed) onnx.ModelProto."""
    from onnx import numpy_helper

    graph = model.graph
    values = constant_values(graph)
    keep, added = [], []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(name in values for name in node.input if name):
            keep.append(node)
            continue
        x, step = values[node.input[0]], values[node.input[1]]
        zp = values[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if np.any(zp != 0):
            keep.append(node)  # not ours (qkernels is symmetric): leave it to the runtime
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        info = np.iinfo(zp.dtype)
        codes = _quantize_half_away(x, step, axis, info.min, info.max).astype(zp.dtype)
        added.append(numpy_helper.from_array(codes, node.output[0]))
    if added:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(added)
        drop_unused_initializers(graph)
    return model


def export_onnx(model: nn.Module, args: Union[torch.Tensor, Sequence], f: Optional[Union[str, os.PathLike]] = None,
                conv_units: bool = True, activations: str = "int8", **export_kwargs):
    """Export a transpiled (eval mode), frozen or int8 model to ONNX with standard QDQ; returns the
    onnx.ModelProto and writes it to ``f`` when given. ``conv_units``: rewrite each quantized Conv into the
    DequantizeLinear -> Conv -> QuantizeLinear unit that onnxruntime runs as QLinearConv (int32 bias, the
    activation applied to the codes; see qkernels/onnx_conv_units.py); False keeps the ops' plain
    translation. ``activations``: "int8" (zero point 0, as our kernels) or "uint8" (code + 128, zero point
    128: the same values, the form onnxruntime's x86 QLinearConv is fastest at). ``export_kwargs`` go to
    torch.onnx.export (``dynamic_shapes``, ``input_names``...)."""
    _check_onnx_deps()
    if activations not in ("int8", "uint8"):
        raise ValueError("qkernels: activations must be 'int8' or 'uint8', got %r" % (activations,))
    if not isinstance(model, nn.Module):
        raise TypeError("qkernels: export_onnx expects an nn.Module, got %s" % type(model).__name__)
    if model.training:
        raise RuntimeError("qkernels: export the model in eval mode (model.eval()): in training the quantizers "
                           "update their statistics, which has no ONNX inference form")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    table = dict(onnx_translations())
    table.update(export_kwargs.pop("custom_translation_table", None) or {})
    export_kwargs.setdefault("verbose", False)
    program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **export_kwargs)
    proto = fold_constant_quantize(program.model_proto)
    if conv_units:
        fuse_conv_units(proto)
    if activations == "uint8":
        to_uint8_activations(proto)
    if f is not None:
        import onnx

        tmp = "%s.tmp%d" % (os.fspath(f), os.getpid())
        onnx.save(proto, tmp)
        os.replace(tmp, f)
    return proto


def onnxruntime_session(model, optimization: str = "all", threads: Optional[int] = None,
                        optimized_model_path: Optional[str] = None, int8_units: bool = False):
    """An onnxruntime CPU InferenceSession of an onnx.ModelProto (or a path). ``optimization``:
    'disable', 'basic', 'extended' or 'all' (onnxruntime's graph optimisation levels). ``int8_units``:
    let onnxruntime fuse Conv units with int8 activations into QLinearConv on x86 too (its
    ``session.qdqisint8allowed``; by default it fuses them only on ARM and runs float Conv on x86, where
    its int8-activation kernels are slow: export with ``activations="uint8"`` for its fast path)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError("qkernels: optimization must be one of %s, got %r" % (sorted(levels), optimization))
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3
    if int8_units:
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    data = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs: torch.Tensor):
    """Run an onnxruntime session on torch tensors; returns a list of torch tensors."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError("qkernels: the ONNX model takes %d inputs (%s), got %d" % (len(names), names, len(inputs)))
    feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(np.ascontiguousarray(o)) for o in session.run(None, feed)]
