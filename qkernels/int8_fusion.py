"""Graph-level rewrites of a converted int8 model that need its data flow, found by one traced forward.

``chain_shared_outputs(model, example_inputs)``: an int8 layer whose output is read only by int8 layers
(one or several) that all quantize it with the same static 8-bit scale writes those codes directly. In
MobileNet-SSD these are the six feature maps: each is read by the next block and by its two heads, which
the module structure alone (nn.Sequential order, see transpiler._chain_int8_layers) cannot show.

The data flow comes from running the model once on ``example_inputs``: forward hooks note which tensor
each int8 layer reads and writes, and a TorchFunctionMode notes every tensor that any other code reads
(outside the int8 layers). A layer is chained only when its output is read by int8 layers alone, is not
part of the model's output, and every reader accepts codes in one scale; anything else keeps float.
The decision holds for the model as traced: a forward whose data flow depends on the input may differ.
"""
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class _OutsideReads(TorchFunctionMode):
    """Records the tensors read by torch functions called outside the int8 layers."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while inside an int8 layer's forward
        self.read: Dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self.read[id(t)] = t
        return func(*args, **kwargs)


def _data_flow(model: nn.Module, example_inputs: Sequence, layers: Dict[str, nn.Module]):
    """One traced forward: (the tensor each int8 layer read, the one it wrote, ids of the tensors other code
    read, ids of the tensors the model returned)."""
    inputs: Dict[str, torch.Tensor] = {}
    outputs: Dict[str, torch.Tensor] = {}
    mode = _OutsideReads()
    hooks = []
    for name, m in layers.items():
        def pre(mod, args, name=name):
            inputs[name] = args[0]
            mode.depth += 1

        def post(mod, args, out, name=name):
            mode.depth -= 1
            outputs[name] = out

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode(), mode:
            result = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    returned = {id(t) for t in tree_leaves(result) if isinstance(t, torch.Tensor)}
    return inputs, outputs, set(mode.read), returned


def chain_shared_outputs(model: nn.Module, example_inputs: Sequence, int8_kinds, int8_conv=None):
    """Chain every int8 layer whose output only int8 layers with one common static input scale read (see the
    module doc), and mark every ``int8_conv`` layer whose output only dynamic (abs_max) int8 layers read to
    hand them its abs max (``hands_abs_max``) and, where they all take 8-bit codes and it has no ReLU6, those
    codes (``hands_codes``). Returns (names chained, names handing their abs max)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, int8_kinds)}
    inputs, outputs, read_outside, returned = _data_flow(model, example_inputs, layers)
    readers: Dict[int, List[str]] = {}
    for name, x in inputs.items():
        readers.setdefault(id(x), []).append(name)
    chained, handing = [], []
    for name, out in outputs.items():
        producer = layers[name]
        if producer.chained or out.dtype != torch.float32:
            continue
        consumers = [layers[n] for n in readers.get(id(out), [])]
        if not consumers or id(out) in read_outside or id(out) in returned:
            continue
        if all(c.input_scale is None for c in consumers):  # dynamic readers: the abs max is all they need
            if int8_conv is not None and isinstance(producer, int8_conv):
                producer.hands_abs_max = True
                if producer.activation != "relu6" and all(c.activation_bits == 8 for c in consumers):
                    producer.hands_codes = True  # and the 8-bit codes they all take
                handing.append(name)
            continue
        if producer.activation == "relu6" or not all(c.accepts_codes() for c in consumers):
            continue
        scale = consumers[0].input_scale
        if not all(torch.equal(c.input_scale, scale) for c in consumers[1:]):
            continue
        producer.chain_to(consumers[0])
        chained.append(name)
    return chained, handing
