"""Graph rewrites for what module swaps cannot express: a call to drop at one place only (an activation
module also called elsewhere, or a functional ``F.relu`` fused into the layer before it).

The result is a ``torch.fx.GraphModule`` holding the model's own submodules under their own names (so
``state_dict`` keys are unchanged, stateful modules that forward never calls included), named after the
model's class; it can be saved whole with ``torch.save`` and traced again.
"""
from typing import Iterable

import torch
from torch import nn

from .module_graph import ModuleGraph, Node


def _ensure_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if parts[-1] not in parent._modules:
        parent.add_module(parts[-1], module)


def _has_own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        name not in module._non_persistent_buffers_set for name, b in module._buffers.items() if b is not None)


def drop_calls(model: nn.Module, graph: ModuleGraph, nodes: Iterable[Node]) -> torch.fx.GraphModule:
    """A GraphModule of ``graph`` (traced from ``model``) without the given one-input calls: their readers
    read their input instead."""
    if not graph.rewritable:
        raise RuntimeError("qkernels: only a torch.fx graph can be rewritten (this one came from %s)" % graph.source)
    modes = {path: m.training for path, m in model.named_modules()}
    fx_graph = graph.fx_graph
    for node in nodes:
        fx_node = node.fx_node
        fx_node.replace_all_uses_with(fx_node.all_input_nodes[0])
        fx_graph.erase_node(fx_node)
    fx_graph.lint()
    rewritten = torch.fx.GraphModule(model, fx_graph, class_name=type(model).__name__)
    for path, module in model.named_modules():
        if path and _has_own_state(module):
            try:
                rewritten.get_submodule(path)
            except AttributeError:
                _ensure_path(rewritten, path, module)
    # The containers GraphModule made afresh start in training mode: give them the model's modes.
    for path, module in rewritten.named_modules():
        module.training = modes.get(path, model.training)
    return rewritten
