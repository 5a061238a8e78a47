"""The module-level data-flow graph the transpiler reasons about.

Whatever traced the model (torch.fx, torch.export, or the nn.Sequential fallback), the result is the same
small structure: one ``Node`` per call of a leaf module (conv, batch norm, ReLU, a qkernels layer...), per
other operation (add, cat, flatten, functional relu...), per model input and one for the model output,
with the producer -> consumer edges between them. A module called at two places gives two nodes.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import nn

# Node kinds.
INPUT = "input"        # a model input
MODULE = "module"      # a call of a leaf module
FUNCTION = "function"  # any other operation (torch function, tensor method, operator)
OUTPUT = "output"      # the model output: a consumer that needs float values
EXTERNAL = "external"  # fallback graphs only: whatever lies outside an nn.Sequential (unknown)

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Operations that read only a tensor's shape, never its values (so they do not care about int8 codes).
METADATA_OPS = frozenset({"size", "dim", "shape", "numel", "sym_size", "sym_numel"})


def is_leaf(module: nn.Module) -> bool:
    """Modules kept whole in the graph: PyTorch's own layers (not its containers, whose subclasses such as
    torchvision's Conv2dNormActivation are traced through), subclasses of the layers the transpiler swaps,
    and every qkernels module."""
    if isinstance(module, CONTAINERS):
        return False
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        return True
    owner = type(module).__module__
    return owner.startswith(("torch.nn.", "torch.ao.nn.", "qkernels."))


def module_activation(module: nn.Module) -> Optional[str]:
    """'relu' / 'relu6' for the activation modules a conv epilogue can fuse, else None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.ReLU6:
        return "relu6"
    if type(module) is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0:
        return "relu6"
    return None


@dataclass(eq=False)
class Node:
    kind: str
    name: str                      # unique within the graph
    target: str                    # module path for MODULE nodes; the operation's name for FUNCTION nodes
    module: Optional[nn.Module] = None
    activation: Optional[str] = None   # 'relu' / 'relu6' when the node is one (module or function)
    inputs: List["Node"] = field(default_factory=list)  # producers, first = the main input
    users: List["Node"] = field(default_factory=list)
    fx_node: object = None         # the torch.fx node, when the graph can be rewritten

    def __repr__(self) -> str:
        return "Node(%s %s)" % (self.kind, self.target)

    @property
    def main_input(self) -> Optional["Node"]:
        return self.inputs[0] if self.inputs else None

    @property
    def reads_metadata_only(self) -> bool:
        return self.kind == FUNCTION and self.target in METADATA_OPS

    def is_module(self, kinds) -> bool:
        return self.kind == MODULE and isinstance(self.module, kinds)

    @property
    def transparent(self) -> bool:
        """An nn.Identity call: its output is its input."""
        return self.kind == MODULE and type(self.module) is nn.Identity


@dataclass
class ModuleGraph:
    nodes: List[Node]
    source: str                       # 'torch.fx', 'torch.export' or 'nn.Sequential (fallback)'
    failure: Optional[str] = None     # why tracing failed (fallback graphs)
    fx_graph: object = None           # the torch.fx.Graph the nodes came from, when rewritable
    _calls: Dict[int, List[Node]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for node in self.nodes:
            if node.kind == MODULE:
                self._calls.setdefault(id(node.module), []).append(node)

    @property
    def traced(self) -> bool:
        return self.failure is None

    @property
    def rewritable(self) -> bool:
        return self.fx_graph is not None

    def calls(self, module: nn.Module) -> List[Node]:
        """The nodes calling ``module`` (empty when forward never calls it)."""
        return self._calls.get(id(module), [])

    def single_call(self, module: nn.Module) -> Optional[Node]:
        calls = self.calls(module)
        return calls[0] if len(calls) == 1 else None

    def module_nodes(self, kinds) -> List[Node]:
        return [n for n in self.nodes if n.is_module(kinds)]


def connect(producer: Node, consumer: Node) -> None:
    consumer.inputs.append(producer)
    producer.users.append(consumer)


def value_users(node: Node) -> List[Node]:
    """Consumers of ``node``'s values, seen through nn.Identity calls (shape-only reads left out)."""
    out: List[Node] = []
    for user in node.users:
        if user.reads_metadata_only:
            continue
        if user.transparent and user.main_input is node:
            out.extend(value_users(user))
        else:
            out.append(user)
    return out


def source_of(node: Node) -> Node:
    """The node whose output ``node`` passes on unchanged (through nn.Identity calls)."""
    while node.transparent and node.main_input is not None:
        node = node.main_input
    return node
