"""qkernels.int8_fusion: layers whose output several int8 layers read (one static scale) write int8 codes,
found by one traced forward (convert_to_int8(model, example_inputs=...)); never when anything else reads it."""
import copy
import warnings

import pytest
import torch
from torch import nn

from qkernels import GraphTraceWarning, QuantizeTranspiler
from qkernels.nn.int8_layers import Int8Conv2d

from test_transpiler import check_int8_layer_by_layer


def block(c_in, c_out, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SharedMap(nn.Module):
    """A body whose output map feeds the next block and two heads (the SSD pattern, down to the input check
    that torch.fx cannot trace, so the transpiler falls back to module order); `extra` adds a read of the map
    outside the int8 layers, `expose` returns the map itself."""

    def __init__(self, extra=False, expose=False):
        super().__init__()
        self.body = nn.Sequential(block(3, 8, stride=2), block(8, 16, k=1))
        self.next = nn.Sequential(block(16, 16, stride=2))
        self.heads = nn.ModuleList([nn.Conv2d(16, 4, 1), nn.Conv2d(16, 6, 1)])
        self.extra, self.expose = extra, expose

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("expected a batch of images")
        fmap = self.body(x)
        deeper = self.next(fmap)
        outs = [h(fmap).flatten(1) for h in self.heads] + [deeper.flatten(1)]
        if self.extra:
            outs.append(fmap.mean((2, 3)))
        if self.expose:
            outs.append(fmap)
        return outs


def converted(net, kind="range_abs_max", trace=True, **transpiler_args):
    torch.manual_seed(0)
    warnings.simplefilter("ignore", GraphTraceWarning)
    t = QuantizeTranspiler(activation_quantize_type=kind, fold_bn=True, **transpiler_args)
    qat = t.training_transpile(net).train()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(3)]
    with torch.no_grad():
        for x in calib:
            qat(x)
    qat.eval()
    frozen = t.freeze_program(copy.deepcopy(qat))
    plain = t.convert_to_int8(copy.deepcopy(qat))
    traced = t.convert_to_int8(copy.deepcopy(qat), example_inputs=(calib[0],)) if trace else None
    return frozen, plain, traced


def test_shared_map_is_chained_to_all_its_readers():
    frozen, plain, traced = converted(SharedMap())
    assert not plain.body[1][0].chained  # the Sequential alone cannot show who reads the map
    assert traced.body[1][0].chained and traced.body[0][0].chained
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for a, b in zip(plain(x), traced(x)):
            assert torch.equal(a, b)  # the same codes, only no float tensor in between
    check_int8_layer_by_layer(frozen, traced, x)


@pytest.mark.parametrize("variant", ["extra", "expose"])
def test_map_read_elsewhere_stays_float(variant):
    _, _, traced = converted(SharedMap(**{variant: True}))
    assert not traced.body[1][0].chained
    assert traced.body[0][0].chained  # inside the Sequential, as before


def test_dynamic_readers_are_not_chained():
    _, _, traced = converted(SharedMap(), kind="abs_max")
    assert not any(m.chained for m in traced.modules() if isinstance(m, Int8Conv2d))


def _count_handed(monkeypatch):
    """Counts how often a dynamic layer found its input's abs max handed over (and how often not)."""
    from qkernels.nn.int8_chain import ChainScope

    counts = {"handed": 0, "not": 0}
    real = ChainScope.handed_abs_max

    def counted(self, x):
        got = real(self, x)
        counts["handed" if got is not None else "not"] += 1
        return got

    monkeypatch.setattr(ChainScope, "handed_abs_max", counted)
    return counts


def test_dynamic_producers_hand_their_readers_the_abs_max(monkeypatch):
    """abs_max models: a layer whose output only dynamic int8 layers read takes its abs max while writing it and
    hands it over, with the readers' 8-bit codes at that scale (hands_codes, on the CPU); those may move one
    step on a rounding tie against the readers' own reduction and quantization (the untraced conversion),
    which no code does on this input, so the outputs are equal."""
    frozen, plain, traced = converted(SharedMap(), kind="abs_max")
    assert traced.body[0][0].hands_abs_max and traced.body[1][0].hands_abs_max  # read by next block and heads
    assert traced.body[0][0].hands_codes and traced.body[1][0].hands_codes
    assert not traced.next[0][0].hands_abs_max and not traced.heads[0].hands_abs_max  # read by flatten
    assert not any(m.hands_abs_max for m in plain.modules() if isinstance(m, Int8Conv2d))
    counts = _count_handed(monkeypatch)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        got, want = traced(x), plain(x)
    assert counts["handed"] == 4 and counts["not"] == 1  # every reader but the stem (the image)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    check_int8_layer_by_layer(frozen, traced, x)


@pytest.mark.parametrize("variant", ["relu6", "4-bit readers"])
def test_abs_max_without_codes(variant):
    """A ReLU6 producer (its clamp at 6 is no clamp in codes of the batch scale) and readers of other than 8-bit
    codes get the abs max with the floats, as before; the outputs then equal the untraced conversion's bit
    for bit."""
    net = SharedMap()
    if variant == "relu6":
        net.body[1][2] = nn.ReLU6()
    frozen, plain, traced = converted(net, kind="abs_max", activation_bits=4 if variant == "4-bit readers" else 8)
    assert traced.body[1][0].hands_abs_max and not traced.body[1][0].hands_codes
    assert traced.body[0][0].hands_codes == (variant == "relu6")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        for a, b in zip(plain(x), traced(x)):
            assert torch.equal(a, b)
    check_int8_layer_by_layer(frozen, traced, x)


@pytest.mark.parametrize("variant", ["extra", "expose"])
def test_abs_max_is_not_handed_for_a_map_read_elsewhere(variant):
    _, _, traced = converted(SharedMap(**{variant: True}), kind="abs_max")
    assert not traced.body[1][0].hands_abs_max
    assert traced.body[0][0].hands_abs_max


def test_handed_abs_max_is_for_that_tensor_only(monkeypatch):
    """The hand-over is keyed by the tensor object: an equal copy, a layer called outside the model and a
    new call of the model all reduce for themselves."""
    from qkernels.nn.int8_chain import ChainScope

    scope = ChainScope()
    t = torch.ones(3)
    with scope:
        scope.hand_over_abs_max(t, torch.tensor(1.0))
        assert scope.handed_abs_max(t).item() == 1.0
        assert scope.handed_abs_max(t.clone()) is None
    assert scope.handed_abs_max(t) is None  # cleared when the call ends
    _, _, traced = converted(SharedMap(), kind="abs_max")
    counts = _count_handed(monkeypatch)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fmap = traced.body(x)  # outside the model's call: plain op, nothing handed
        traced.next(fmap)
    assert counts["handed"] == 0


def test_mobilenet_ssd_dynamic_hands_every_abs_max(monkeypatch):
    from ssd.model import MobileNetSSD

    torch.manual_seed(0)
    _, plain, traced = converted(MobileNetSSD(num_classes=3), kind="abs_max")
    counts = _count_handed(monkeypatch)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = traced(x)
        want = plain(x)
    assert counts["handed"] == 46 and counts["not"] == 1  # every conv input but the image
    handing = [m for m in traced.modules() if isinstance(m, Int8Conv2d) and m.hands_abs_max]
    assert handing and all(m.hands_codes for m in handing)  # codes, not floats, between all of them
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_mobilenet_ssd_feature_maps_are_chained():
    from ssd.model import MobileNetSSD

    torch.manual_seed(0)
    _, plain, traced = converted(MobileNetSSD(num_classes=3))
    convs = [m for m in traced.modules() if isinstance(m, Int8Conv2d)]
    reads_codes = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: reads_codes.append(args[0].dtype == torch.int8))
             for m in convs]
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = traced(x)
        want = plain(x)
    for h in hooks:
        h.remove()
    assert sum(reads_codes) == len(convs) - 1 == 46  # every conv but the stem reads int8 codes
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["range_abs_max", "abs_max"])
def test_cached_call_equals_the_plain_path_bit_for_bit(kind, monkeypatch):
    """Int8 layers call their op from a cache built with the epilogue (no module attribute lookups); the plain
    path (what tracing takes) must give the same bits: chained, float-in, dynamic, pickled, after refresh."""
    import io

    _frozen, _plain, traced = converted(SharedMap(), kind)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    layer = next(m for m in traced.modules() if isinstance(m, Int8Conv2d))
    with torch.no_grad():
        cached = traced(x)
        alone = layer(x)  # outside the model's call: a chained layer writes floats
        buf = io.BytesIO()
        torch.save(traced, buf)
        buf.seek(0)
        reloaded = torch.load(buf, weights_only=False)(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert all(m.__dict__.get("_call") is not None for m in traced.modules() if isinstance(m, Int8Conv2d))
        plain = traced(x)
        plain_alone = layer(x)
    assert alone.dtype == torch.float32 and torch.equal(alone, plain_alone)
    for a, b, c in zip(cached, plain, reloaded):
        assert torch.equal(a, b) and torch.equal(a, c)
    monkeypatch.undo()
    head = traced.heads[0]
    assert isinstance(head, Int8Conv2d) and head.activation is None and not head.chained
    with torch.no_grad():  # a changed structure is picked up (fuse_activation refreshes)
        head.fuse_activation("relu")
        after = traced(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.equal(after[0], traced(x)[0]) and torch.equal(after[0], cached[0].clamp_min(0))
