"""What the transpiler looks for in a ModuleGraph.

- ``layer_chain``: a layer call followed by a batch norm and / or an activation, each the only reader of
  the previous output (nn.Identity calls in between are seen through): what can be folded and fused.
- ``shared_input_groups``: layers that read the very same tensor: one input quantizer serves them all.
- ``code_readers``: the layers reading an output when nothing else reads it: the producer may hand them
  int8 codes instead of floats.
The ``why_not_*`` helpers say, in words, why a pattern did not match (for the transpiler's summary).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn

from .module_graph import EXTERNAL, MODULE, OUTPUT, ModuleGraph, Node, source_of, value_users

FoldRule = Callable[[nn.Module, nn.Module], bool]


@dataclass
class LayerChain:
    layer: Node
    bn: Optional[Node] = None
    activation: Optional[Node] = None

    @property
    def end(self) -> Node:
        """The last node of the chain: its output is what the fused layer produces."""
        return self.activation or self.bn or self.layer


def describe(node: Node) -> str:
    if node.kind == MODULE:
        return "%s (%s)" % (node.target or "the model", type(node.module).__name__)
    if node.kind == OUTPUT:
        return "the model output"
    if node.kind == EXTERNAL:
        return "code outside the nn.Sequential (not traced)"
    return node.target


def _only_reader(node: Node) -> Optional[Node]:
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def _reads(consumer: Node, producer: Node) -> bool:
    return consumer.main_input is not None and source_of(consumer.main_input) is producer


def layer_chain(graph: ModuleGraph, layer: Node, can_fold: Optional[FoldRule], with_activation: bool) -> LayerChain:
    """``layer`` -> batch norm (when ``can_fold`` accepts it; called once) -> activation (when asked)."""
    chain = LayerChain(layer)
    nxt = _only_reader(layer)
    if (can_fold is not None and nxt is not None and nxt.kind == MODULE and can_fold(layer.module, nxt.module)
            and graph.single_call(nxt.module) is nxt and _reads(nxt, layer)):
        chain.bn = nxt
        nxt = _only_reader(nxt)
    if with_activation and nxt is not None and nxt.activation is not None and _reads(nxt, chain.end):
        chain.activation = nxt
    return chain


def why_not_folded(graph: ModuleGraph, bn: nn.Module, layer_kinds, can_fold: FoldRule) -> str:
    calls = graph.calls(bn)
    if not calls:
        return "never called by forward()" if graph.traced else "not directly after a conv in an nn.Sequential"
    if len(calls) > 1:
        return "called %d times" % len(calls)
    producer = source_of(calls[0].main_input) if calls[0].main_input is not None else None
    if producer is None or not producer.is_module(layer_kinds):
        return "its input comes from %s, not a conv" % (describe(producer) if producer else "nothing")
    if not can_fold(producer.module, bn):
        return "does not match %s (channels, type or running statistics)" % describe(producer)
    if graph.single_call(producer.module) is not producer:
        return "%s is called several times" % describe(producer)
    others = [describe(u) for u in value_users(producer) if u is not calls[0]]
    return "the output of %s is also read by %s" % (describe(producer), ", ".join(others))


def shared_input_groups(graph: ModuleGraph, layer_kinds) -> List[List[Node]]:
    """Groups (in call order) of two or more layers, each called once, reading one tensor."""
    groups = {}
    for node in graph.module_nodes(layer_kinds):
        if graph.single_call(node.module) is not node or node.main_input is None:
            continue
        source = source_of(node.main_input)
        if source.kind == EXTERNAL:
            continue
        groups.setdefault(id(source), []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def code_readers(graph: ModuleGraph, end: Node, layer_kinds) -> List[Node]:
    """The layers (each called once) reading ``end``'s output, when nothing else reads it; else []."""
    users = value_users(end)
    if users and all(u.is_module(layer_kinds) and graph.single_call(u.module) is u and _reads(u, end)
                     for u in users):
        return users
    return []


def why_not_readers(graph: ModuleGraph, end: Node, layer_kinds) -> str:
    users = value_users(end)
    if not users:
        return "its output is not read"
    for u in users:
        if not u.is_module(layer_kinds):
            return "its output is read by %s" % describe(u)
        if graph.single_call(u.module) is not u:
            return "%s is called several times" % describe(u)
    return "its output reaches %s by another argument" % describe(users[0])


def add_relu_pairs(graph: ModuleGraph) -> List[tuple]:
    """(add, relu) pairs: a two-tensor ``a + b`` whose only reader is a ReLU: one fused op in float."""
    pairs = []
    for node in graph.nodes:
        fx_node = node.fx_node
        if (node.target not in ("add", "iadd") or fx_node is None or fx_node.kwargs or len(fx_node.args) != 2
                or not all(isinstance(a, type(fx_node)) for a in fx_node.args)
                or any(i.reads_metadata_only or i.kind != MODULE and i.target in ("size", "getitem") for i in node.inputs)):
            continue
        reader = _only_reader(node)
        if reader is not None and reader.activation == "relu" and _reads(reader, node) and reader.fx_node is not None:
            pairs.append((node, reader))
    return pairs
