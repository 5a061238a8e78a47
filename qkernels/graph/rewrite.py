"""Graph rewrites for what module swaps cannot express: a call to drop at one place only (an activation
module also called elsewhere, or a functional ``F.relu`` fused into the layer before it).

The result is a ``torch.fx.GraphModule`` holding the model's own submodules under their own names (so
``state_dict`` keys are unchanged, stateful modules that forward never calls included), named after the
model's class; it can be saved whole with ``torch.save`` and traced again.
"""
from typing import Iterable, Tuple

import torch
from torch import nn

from .module_graph import ModuleGraph, Node


def drop_calls(model: nn.Module, graph: ModuleGraph, nodes: Iterable[Node],
               add_relus: Iterable[Tuple[Node, Node]] = ()) -> torch.fx.GraphModule:
    """A GraphModule of ``graph`` (traced from ``model``) without the given one-input calls: their readers
    read their input instead. Each (add, relu) pair of ``add_relus`` becomes one ``aten._add_relu`` (one
    pass over memory instead of two). The GraphModule holds the model's own children (containers
    included) and root-level parameters and buffers, so every submodule keeps its path, type and mode."""
    if not graph.rewritable:
        raise RuntimeError("qkernels: only a torch.fx graph can be rewritten (this one came from %s)" % graph.source)
    fx_graph = graph.fx_graph
    for add, relu in add_relus:
        add.fx_node.target = torch.ops.aten._add_relu.Tensor
        add.fx_node.op = "call_function"
        nodes = list(nodes) + [relu]
    for node in nodes:
        fx_node = node.fx_node
        fx_node.replace_all_uses_with(fx_node.all_input_nodes[0])
        fx_graph.erase_node(fx_node)
    fx_graph.lint()
    rewritten = torch.fx.GraphModule(model, fx_graph, class_name=type(model).__name__)
    # GraphModule copied only what the graph uses, under fresh plain containers: put the originals back.
    for name, child in model._modules.items():
        rewritten._modules[name] = child
    for name, param in model._parameters.items():
        rewritten._parameters[name] = param
    for name, buf in model._buffers.items():
        rewritten.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
    rewritten.training = model.training
    return rewritten
