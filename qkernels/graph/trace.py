"""Build a ModuleGraph from a model: torch.fx symbolic tracing first, then torch.export when example inputs
are given (it follows shape-dependent Python such as ``if x.dim() != 4``), and when both fail the
nn.Sequential fallback: inside a plain nn.Sequential each module's output is the next one's only input,
which is all the structure known without a trace.

Only torch.fx graphs can be rewritten (``ModuleGraph.fx_graph``); the other two serve module swaps.
"""
import os
import traceback
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .module_graph import (EXTERNAL, FUNCTION, INPUT, MODULE, OUTPUT, ModuleGraph, Node, connect, is_leaf,
                           module_activation)

FX = "torch.fx"
EXPORT = "torch.export"
SEQUENTIAL = "nn.Sequential (fallback)"


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)


def _function_activation(name: str, args: Sequence, kwargs: Dict) -> Optional[str]:
    if name in ("relu", "relu_"):
        return "relu"
    if name == "relu6":
        return "relu6"
    if name in ("hardtanh", "hardtanh_"):
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return "relu6" if (low, high) == (0, 6) else None
    return None


def _fx_function_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if getattr(target, "__name__", None) == "getattr" and len(node.args) > 1 and isinstance(node.args[1], str):
        return node.args[1]  # x.shape, x.dtype...: name the attribute read
    opname = getattr(target, "_opname", None)  # torch.ops.aten.relu_.default -> 'relu_'
    return opname or getattr(target, "__name__", None) or str(target)


def fx_module_graph(model: nn.Module) -> ModuleGraph:
    """Symbolic tracing (raises torch.fx's error when the model cannot be traced)."""
    graph = _LeafTracer().trace(model)
    nodes: List[Node] = []
    by_fx: Dict[torch.fx.Node, Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            node = Node(INPUT, n.name, str(n.target))
        elif n.op == "call_module":
            module = model.get_submodule(n.target)
            node = Node(MODULE, n.name, str(n.target), module, module_activation(module))
        elif n.op in ("call_function", "call_method", "get_attr"):
            name = "get_attr" if n.op == "get_attr" else _fx_function_name(n)
            node = Node(FUNCTION, n.name, name, activation=_function_activation(name, n.args, n.kwargs))
        else:
            node = Node(OUTPUT, n.name, "output")
        node.fx_node = n
        for arg in n.all_input_nodes:
            connect(by_fx[arg], node)
        by_fx[n] = node
        nodes.append(node)
    return ModuleGraph(nodes, FX, fx_graph=graph)


def _outermost_leaf(model: nn.Module, stack) -> Optional[tuple]:
    """(call key, path, module) of the outermost leaf module in an export node's nn_module_stack."""
    for key, (path, _type_name) in (stack or {}).items():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if is_leaf(module):
            return key, path, module
    return None


def export_module_graph(model: nn.Module, example_inputs: tuple) -> ModuleGraph:
    """torch.export (non-strict) and the ATen nodes of each leaf-module call collapsed into one node."""
    program = torch.export.export(model, tuple(example_inputs), strict=False)
    user_inputs = set(program.graph_signature.user_inputs)
    nodes: List[Node] = []
    owner: Dict[torch.fx.Node, Optional[Node]] = {}  # export node -> our node (None: a parameter or buffer)
    calls: Dict[str, Node] = {}
    seen = set()
    for n in program.graph.nodes:
        if n.op == "placeholder":
            node = Node(INPUT, n.name, n.name) if n.name in user_inputs else None
        elif n.op == "output":
            node = Node(OUTPUT, n.name, "output")
        else:
            leaf = _outermost_leaf(model, n.meta.get("nn_module_stack"))
            if leaf is not None and leaf[0] in calls:
                node = calls[leaf[0]]
            elif leaf is not None:
                key, path, module = leaf
                node = calls[key] = Node(MODULE, key, path, module, module_activation(module))
            else:
                name = _fx_function_name(n)
                node = Node(FUNCTION, n.name, name, activation=_function_activation(name, n.args, n.kwargs))
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            nodes.append(node)
        owner[n] = node
        if node is None:
            continue
        for arg in n.all_input_nodes:
            producer = owner.get(arg)
            if producer is not None and producer is not node and producer not in node.inputs:
                connect(producer, node)
    return ModuleGraph(nodes, EXPORT)


def _flatten(seq: nn.Sequential) -> List[nn.Module]:
    leaves: List[nn.Module] = []
    for m in seq._modules.values():
        if type(m) is nn.Sequential:
            leaves.extend(_flatten(m))
        elif m is not None:
            leaves.append(m)
    return leaves


def sequential_module_graph(model: nn.Module, failure: str) -> ModuleGraph:
    """Chains of the leaves of every plain nn.Sequential (nested ones followed through); what comes before
    and after a Sequential is unknown (EXTERNAL nodes). A module registered at several places appears at
    each, so it counts as called several times."""
    nodes: List[Node] = []

    def chain(seq: nn.Sequential, prefix: str):
        prev = Node(EXTERNAL, "%s<in>" % prefix, "external")
        nodes.append(prev)
        for i, leaf in enumerate(_flatten(seq)):
            node = Node(MODULE, "%s<%d>" % (prefix, i), prefix, leaf, module_activation(leaf))
            connect(prev, node)
            nodes.append(node)
            prev = node
            visit(leaf, "%s<%d>" % (prefix, i))
        out = Node(EXTERNAL, "%s<out>" % prefix, "external")
        connect(prev, out)
        nodes.append(out)

    def visit(module: nn.Module, prefix: str):
        for name, child in module._modules.items():
            if child is None:
                continue
            path = "%s.%s" % (prefix, name) if prefix else name
            if type(child) is nn.Sequential:
                chain(child, path)
            else:
                visit(child, path)

    if type(model) is nn.Sequential:
        chain(model, "")
    else:
        visit(model, "")
    return ModuleGraph(nodes, SEQUENTIAL, failure=failure)


def _where(exc: BaseException) -> str:
    """The model's own source line that made tracing fail (the last frame outside torch)."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and not f.filename.startswith(here)]
    if not frames:
        return ""
    f = frames[-1]
    return " at %s:%d (%s)" % (f.filename, f.lineno, (f.line or "").strip())


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return "%s: %s%s" % (type(exc).__name__, text, _where(exc))


def trace(model: nn.Module, example_inputs: Optional[tuple] = None) -> ModuleGraph:
    """The best graph available: torch.fx, else torch.export (with ``example_inputs``), else the
    nn.Sequential fallback, whose ``failure`` says what could not be traced and why."""
    failures = []
    try:
        return fx_module_graph(model)
    except Exception as exc:  # any tracing error means: fall back, and say why
        failures.append("torch.fx: " + _short(exc))
    if example_inputs is not None:
        try:
            return export_module_graph(model, example_inputs)
        except Exception as exc:
            failures.append("torch.export: " + _short(exc))
    else:
        failures.append("torch.export: not tried (no example_inputs)")
    return sequential_module_graph(model, "; ".join(failures))
