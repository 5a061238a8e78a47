"""Small reads and clean-ups of an onnx graph shared by the export passes (qkernels/export.py,
qkernels/onnx_conv_units.py)."""
from typing import Dict

import numpy as np


def constant_values(graph) -> Dict[str, np.ndarray]:
    """name -> numpy array for the graph's initializers and Constant nodes."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def drop_unused_initializers(graph) -> None:
    """Remove the initializers no node and no graph output reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
