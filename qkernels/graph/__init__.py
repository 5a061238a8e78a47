"""Traced-graph analysis for the transpiler: which conv -> batch norm -> activation chains exist, which
tensors several quantized layers read, and which producers may hand int8 codes to their readers.

- ``trace(model, example_inputs=None)`` -> ModuleGraph (torch.fx, else torch.export, else nn.Sequential)
- ``patterns``: layer_chain, shared_input_groups, code_readers and the why_not_* explanations
- ``drop_calls``: the one graph rewrite (a torch.fx.GraphModule without some calls)
- ``TranspileSummary``: what a transpiler pass found and did
"""
from .module_graph import ModuleGraph, Node, is_leaf, module_activation, source_of, value_users  # noqa: F401
from .patterns import (LayerChain, add_relu_pairs, code_readers, describe, layer_chain, shared_input_groups,  # noqa: F401
                       why_not_folded, why_not_readers)
from .rewrite import drop_calls  # noqa: F401
from .summary import TranspileSummary  # noqa: F401
from .trace import EXPORT, FX, SEQUENTIAL, trace  # noqa: F401
