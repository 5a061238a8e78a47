"""QuantizeTranspiler: training_transpile, fold_bn, freeze_program, convert_to_int8 on small nets and MobileNet-SSD."""
import contextlib
import copy
import io

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import qkernels
from qkernels import QuantizeTranspiler
from qkernels import reference as ref
from qkernels.nn import (FakeQuantRangeAbsMax, FoldedBatchNorm2d, FrozenConv2d, FrozenLinear, QuantConv2d,
                         QuantLinear, set_quantization_enabled)

HAS_INT8 = hasattr(qkernels, "conv2d_int8") and hasattr(qkernels, "linear_int8")
needs_int8 = pytest.mark.skipif(not HAS_INT8, reason="the int8 ops are not available yet")
if HAS_INT8:
    from qkernels.nn.int8_layers import Int8Conv2d, Int8Linear
ACTIVATION_TYPES = ["abs_max", "range_abs_max", "moving_average_abs_max"]


class SmallNet(nn.Module):
    """Regular conv, depthwise conv, 1x1 conv with bias, BN, ReLU / ReLU6, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


def images(n=4, size=12, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


# --- training_transpile -----------------------------------------------------------------------------

def test_replaces_conv_and_linear_only_and_keeps_parameters():
    net = make_net()
    params = {name: p for name, p in net.named_parameters()}
    float_state = copy.deepcopy(net.state_dict())
    out = QuantizeTranspiler().training_transpile(net)
    assert out is net
    assert count(net, QuantConv2d) == 3 and count(net, QuantLinear) == 1
    assert count(net, nn.BatchNorm2d) == 2 and count(net, FoldedBatchNorm2d) == 0  # BN stays float
    assert count(net, nn.ReLU) == 2 and count(net, nn.ReLU6) == 1
    # same Parameter objects under the same names
    assert {name: p for name, p in net.named_parameters()} == params
    # a float checkpoint loads (strictly) into the transpiled model, and the transpiled one back into float
    net.load_state_dict(float_state)
    make_net(5).load_state_dict({k: v for k, v in net.state_dict().items() if k in float_state})


def reference_forward(float_net, x, bits=8, scales=None):
    """The transpiled forward composed by hand from the reference fake-quant ops (float64): every conv /
    linear sees fake-quantized input (abs_max, or the given static scale) and weight (abs_max)."""
    hooks = []

    def hook(module, inputs, _output):
        a = inputs[0]
        if scales is None:
            qa = ref.fake_quant_abs_max(a, bits)[0]
        else:
            qa = ref.fake_quant(a, torch.tensor(scales[module], dtype=torch.float64), bits)
        qw = ref.fake_quant_abs_max(module.weight.detach(), bits)[0]
        b = None if module.bias is None else module.bias.detach().double()
        if isinstance(module, nn.Conv2d):
            y = F.conv2d(qa, qw, b, module.stride, module.padding, module.dilation, module.groups)
        else:
            y = F.linear(qa, qw, b)
        return y.float()

    for m in float_net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        return float_net(x)
    finally:
        for h in hooks:
            h.remove()


def test_transpiled_forward_equals_reference_composition():
    float_net = make_net().eval()
    net = QuantizeTranspiler().training_transpile(copy.deepcopy(float_net)).eval()
    x = images()
    torch.testing.assert_close(net(x), reference_forward(float_net, x), atol=1e-4, rtol=1e-4)


def test_static_first_step_and_eval_equal_reference_composition():
    float_net = make_net().eval()
    net = QuantizeTranspiler(activation_quantize_type="range_abs_max").training_transpile(copy.deepcopy(float_net))
    x = images()
    # first training step: every window holds one batch, so each scale is that input's abs max
    net.train()
    for m in net.modules():  # float BN in eval mode on both sides: only the quantizers train
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.testing.assert_close(net(x), reference_forward(float_net, x), atol=1e-4, rtol=1e-4)
    # eval: the frozen scales are used for a different batch
    net.eval()
    x2 = images(seed=7) * 3
    quantized = dict(net.named_modules())
    scales = {fm: float(quantized[name].input_quantizer.scale) for name, fm in float_net.named_modules()
              if isinstance(fm, (nn.Conv2d, nn.Linear))}
    torch.testing.assert_close(net(x2), reference_forward(float_net, x2, scales=scales), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ACTIVATION_TYPES)
def test_gradients_reach_float_weights_and_optimizer_trains_them(kind):
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # built on the float model
    QuantizeTranspiler(activation_quantize_type=kind).training_transpile(net).train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(images()).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    for name, p in net.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_transpiling_twice_or_a_single_layer_is_an_error():
    t = QuantizeTranspiler()
    net = t.training_transpile(make_net())
    with pytest.raises(RuntimeError, match="already transpiled"):
        t.training_transpile(net)
    with pytest.raises(TypeError, match="single layer"):
        t.training_transpile(nn.Conv2d(3, 3, 1))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="activation_quantize_type"):
        QuantizeTranspiler(activation_quantize_type="max_abs")
    with pytest.raises(ValueError, match="weight_quantize_type"):
        QuantizeTranspiler(weight_quantize_type="range_abs_max")
    with pytest.raises(ValueError, match="weight_bits"):
        QuantizeTranspiler(weight_bits=1)
    with pytest.raises(ValueError, match="activation_bits"):
        QuantizeTranspiler(activation_bits=32)
    with pytest.raises(ValueError, match="window_size"):
        QuantizeTranspiler(window_size=0)
    with pytest.raises(ValueError, match="ste"):
        QuantizeTranspiler(ste="none")
    with pytest.raises(ValueError, match="weight_storage"):
        QuantizeTranspiler(weight_storage="int4")
    with pytest.raises(RuntimeError, match="training_transpile"):
        QuantizeTranspiler().freeze_program(make_net())


def test_shared_module_stays_shared():
    conv = nn.Conv2d(4, 4, 1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    QuantizeTranspiler().training_transpile(net)
    assert net[0] is net[2] and isinstance(net[0], QuantConv2d)


# --- fold_bn ----------------------------------------------------------------------------------------

def test_fold_bn_structure():
    net = QuantizeTranspiler(fold_bn=True).training_transpile(make_net())
    assert count(net, FoldedBatchNorm2d) == 2
    convs = [m for m in net.modules() if isinstance(m, QuantConv2d)]
    assert [c.folded_bn is not None for c in convs] == [True, True, False]
    assert convs[0].folded_bn is net.features[1]
    # state_dict keys unchanged by folding: float checkpoints still load
    assert set(make_net().state_dict()) <= set(net.state_dict())


def test_fold_bn_equals_conv_bn_in_float_when_quantization_is_disabled():
    float_net = make_net()
    net = QuantizeTranspiler(fold_bn=True).training_transpile(copy.deepcopy(float_net))
    set_quantization_enabled(net, False)
    x = images()
    for mode in (True, False, True):
        float_net.train(mode), net.train(mode)
        want, got = float_net(x), net(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(float_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    state = net.state_dict()
    for name, b in float_net.named_buffers():  # running statistics too
        torch.testing.assert_close(state[name], b, atol=1e-6, rtol=1e-5, msg=name)


def test_fold_bn_quantizes_the_folded_weight():
    net = QuantizeTranspiler(fold_bn=True).training_transpile(make_net()).eval()
    conv, bn = net.features[0], net.features[1]
    captured = {}
    handle = conv.weight_quantizer.register_forward_hook(lambda m, i, o: captured.setdefault("w", i[0].detach()))
    net(images())
    handle.remove()
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(captured["w"], conv.weight.detach() * factor.detach().reshape(-1, 1, 1, 1))


# --- freeze_program ---------------------------------------------------------------------------------

def trained(kind, fold_bn=False, weight_type="abs_max", steps=3):
    t = QuantizeTranspiler(activation_quantize_type=kind, weight_quantize_type=weight_type, fold_bn=fold_bn,
                           window_size=4)
    net = t.training_transpile(make_net())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for step in range(steps):
        net(images(seed=step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return t, net.eval()


def layer_inputs_and_outputs(model, x):
    """Inputs and outputs of every quantized layer, by module name."""
    records, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear, FrozenConv2d, FrozenLinear)):
            hooks.append(m.register_forward_hook(
                lambda m, i, o, name=name: records.__setitem__(name, (i[0].detach(), o.detach()))))
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, records


@pytest.mark.parametrize("kind", ACTIVATION_TYPES)
@pytest.mark.parametrize("fold_bn,weight_type", [(False, "abs_max"), (True, "abs_max"), (True, "channel_wise_abs_max")])
def test_freeze_equals_transpiled_eval(kind, fold_bn, weight_type):
    t, net = trained(kind, fold_bn, weight_type)
    frozen = t.freeze_program(copy.deepcopy(net))
    assert count(frozen, FrozenConv2d) == 3 and count(frozen, FrozenLinear) == 1
    assert count(frozen, QuantConv2d) == 0 and count(frozen, FoldedBatchNorm2d) == 0
    assert count(frozen, nn.BatchNorm2d) == (0 if fold_bn else 2)
    frozen_layers = {n: m for n, m in frozen.named_modules() if isinstance(m, (FrozenConv2d, FrozenLinear))}
    for m in frozen_layers.values():  # weights are integer codes stored in float
        assert m.weight.dtype == torch.float32 and torch.equal(m.weight, m.weight.round())
        assert m.weight.abs().max() <= 127
    x = images(seed=11)
    want, records = layer_inputs_and_outputs(net, x)
    # layer by layer on the same inputs: equal up to float rounding (1e-5 relative to the layer's range)
    assert records.keys() == frozen_layers.keys()
    for name, (inp, out) in records.items():
        with torch.no_grad():
            got = frozen_layers[name](inp)
        torch.testing.assert_close(got, out, atol=1e-5 * out.abs().max().item(), rtol=0)
    # end to end: a float-rounding difference may move an activation code by one step, so allow a few
    # steps of the last layer's quantization
    with torch.no_grad():
        got = frozen(x)
    # one input code step of the linear layer moves its output by at most s_a/127 * max_row|w|
    fc_input, _ = records["fc"]
    fc = frozen_layers["fc"]
    s_a = fc_input.abs().max().item() if kind == "abs_max" else fc.input_quantizer.scale.item()
    step = s_a / 127 * (fc.weight.abs().sum(1) * fc.weight_scale / 127).max().item()
    assert (got - want).abs().max().item() <= 2 * step + 1e-5


def test_frozen_state_dict_round_trip_into_a_fresh_model():
    t, net = trained("range_abs_max", fold_bn=True)
    frozen = t.freeze_program(copy.deepcopy(net))
    state = frozen.state_dict()
    fresh = t.freeze_program(t.training_transpile(make_net(seed=9)))
    fresh.load_state_dict(state)
    x = images(seed=3)
    assert torch.equal(fresh.eval()(x), frozen(x))
    with pytest.raises(RuntimeError, match="already frozen"):
        t.freeze_program(frozen)


# --- torch.compile, AMP -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["range_abs_max"])
def test_torch_compile_fullgraph_training_step(kind):
    torch._dynamo.reset()
    eager = QuantizeTranspiler(activation_quantize_type=kind, fold_bn=True).training_transpile(make_net()).train()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = images(seed=step)
        want, got = eager(x), compiled(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got.square().mean().backward()
    # the state was updated in place through the compiled graph
    q_eager = [m for m in eager.modules() if isinstance(m, FakeQuantRangeAbsMax)]
    q_compiled = [m for m in compiled_net.modules() if isinstance(m, FakeQuantRangeAbsMax)]
    assert all(int(q.step) == 2 for q in q_compiled)
    for a, b in zip(q_eager, q_compiled):
        torch.testing.assert_close(a.scale, b.scale)
    assert compiled_net.features[0].weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_training_step(dtype):
    net = QuantizeTranspiler(activation_quantize_type="moving_average_abs_max", fold_bn=True).training_transpile(make_net())
    with torch.autocast("cpu", dtype=dtype):
        out = net.train()(images())
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all() and net.fc.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["abs_max", "range_abs_max", "moving_average_abs_max"])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_cuda_qat_step_never_synchronises_with_the_host(kind, fold_bn):
    net = QuantizeTranspiler(activation_quantize_type=kind, fold_bn=fold_bn).training_transpile(make_net()).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = images().cuda()

    def step():
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        opt.step()

    step()  # first step outside the guard: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any hidden .item() or device-to-host copy raises
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in net.parameters())


# --- MobileNet-SSD ----------------------------------------------------------------------------------

def test_mobilenet_ssd_transpile_and_freeze():
    from ssd.model import MobileNetSSD

    torch.manual_seed(0)
    model = MobileNetSSD(num_classes=21)
    n_conv = count(model, nn.Conv2d)
    n_bn = count(model, nn.BatchNorm2d)
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=True)
    t.training_transpile(model)
    assert n_conv == 47 and count(model, QuantConv2d) == 47  # 35 body + extras convs, 12 head convs
    assert count(model, FoldedBatchNorm2d) == n_bn == 35
    depthwise = [m for m in model.modules() if isinstance(m, QuantConv2d) and m.groups > 1]
    assert len(depthwise) == 13
    x = torch.randn(2, 3, 64, 64)
    locs, confs = model.train()(x)
    (locs.square().mean() + confs.square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    frozen = t.freeze_program(copy.deepcopy(model))
    assert count(frozen, FrozenConv2d) == 47
    want, records = layer_inputs_and_outputs(model, x)
    layers = dict(frozen.named_modules())
    assert len(records) == 47
    for name, (inp, out) in records.items():
        with torch.no_grad():
            torch.testing.assert_close(layers[name](inp), out, atol=1e-5 * out.abs().max().item(), rtol=0)
    if not HAS_INT8:
        return
    int8 = t.convert_to_int8(copy.deepcopy(frozen))
    int8_layers = [m for m in int8.modules() if isinstance(m, Int8Conv2d)]
    assert len(int8_layers) == 47 and count(int8, nn.ReLU) == 0 and count(int8, nn.BatchNorm2d) == 0
    assert sum(m.activation == "relu" for m in int8_layers) == 35
    # torch.fx traces the model: every body and extra conv writes int8 codes, the six feature maps (read by
    # the next block and the two heads) included; the 12 heads write floats
    assert sum(m.chained for m in int8_layers) == 35
    check_int8_layer_by_layer(frozen, int8, x)
    assert state_dict_bytes(int8) < 0.3 * state_dict_bytes(MobileNetSSD(num_classes=21))


# --- convert_to_int8 --------------------------------------------------------------------------------

def state_dict_bytes(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def frozen_reference_after(frozen, name, out):
    """The frozen layer's output passed through the BatchNorm2d / ReLU / ReLU6 that follow it in its
    nn.Sequential (what the int8 layer fuses)."""
    parent_name, _, child = name.rpartition(".")
    parent = frozen.get_submodule(parent_name) if parent_name else frozen
    if type(parent) is not nn.Sequential:
        return out
    names = list(parent._modules)
    for following in names[names.index(child) + 1:]:
        m = parent._modules[following]
        if not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity)):
            break
        out = m(out)
    return out


def check_int8_layer_by_layer(frozen, int8, x):
    """Every int8 layer, fed the frozen model's input of that layer, gives the frozen layer's output (with
    the fused batch norm and activation) up to float rounding; chained layers give the next layer's input
    codes within half a code step (the rounding), after the next layer's clipping, and dynamic layers that
    write their readers' codes (hands_codes) give codes within half a step of the batch scale they hand
    over, which is the output's abs max."""
    _, records = layer_inputs_and_outputs(frozen, x)
    layers = dict(int8.named_modules())
    assert len(records) == sum(isinstance(m, (Int8Conv2d, Int8Linear)) for m in int8.modules())
    for name, (inp, out) in records.items():
        layer = layers[name]
        with torch.no_grad(), (layer.chain_scope or contextlib.nullcontext()):
            want = frozen_reference_after(frozen, name, out)
            got = layer(inp)
            handed = layer.chain_scope.handed_abs_max(got) if layer.chain_scope is not None else None
        if layer.chained:
            assert got.dtype == torch.int8
            s_n = layer.output_scale
            err = (got.float() * s_n / 127 - want.clamp(-s_n, s_n)).abs().max()
            assert err <= 0.5 * s_n / 127 * (1 + 1e-4) + 1e-6, name
        elif got.dtype == torch.int8:
            assert getattr(layer, "hands_codes", False) and handed is not None, name
            torch.testing.assert_close(handed, want.abs().max(), rtol=1e-5, atol=1e-7, msg=name)
            step = handed / 127
            err = (got.float() * step - want).abs().max()
            assert err <= 0.5 * step * (1 + 1e-4) + 1e-6, name
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item() + 1e-7, rtol=0, msg=name)


@needs_int8
@pytest.mark.parametrize("kind", ACTIVATION_TYPES)
@pytest.mark.parametrize("fold_bn,weight_type", [(False, "abs_max"), (True, "channel_wise_abs_max")])
def test_int8_equals_frozen(kind, fold_bn, weight_type):
    t, net = trained(kind, fold_bn, weight_type)
    frozen = t.freeze_program(copy.deepcopy(net))
    int8 = t.convert_to_int8(copy.deepcopy(frozen))
    assert count(int8, Int8Conv2d) == 3 and count(int8, Int8Linear) == 1
    assert count(int8, nn.BatchNorm2d) == 0 and count(int8, nn.ReLU) == 0 and count(int8, nn.ReLU6) == 0
    convs = [m for m in int8.modules() if isinstance(m, Int8Conv2d)]
    static = kind != "abs_max"
    # conv1's ReLU6 runs as the next layer's clip when it writes that layer's codes (its scale is <= 6)
    assert [c.activation for c in convs] == ["relu", "relu" if static else "relu6", "relu"]
    # static scales: conv0 -> conv1 -> conv2 chain; conv2's output goes to a float pooling
    assert [c.chained for c in convs] == [static, static, False]
    for m in convs:
        assert m.weight.dtype == torch.int8
    x = images(seed=11)
    check_int8_layer_by_layer(frozen, int8, x)
    with torch.no_grad():
        want, got = frozen(x), int8(x)
    # end to end: rounding differences may move a code by one step; allow a few steps of the fc output
    fc = int8.fc
    _, records = layer_inputs_and_outputs(frozen, x)
    s_a = records["fc"][0].abs().max().item() if kind == "abs_max" else fc.input_scale.item()
    step = s_a / 127 * (fc.weight.float().abs().sum(1) * fc.weight_scale / 127).max().item()
    assert (got - want).abs().max().item() <= 2 * step + 1e-5


@needs_int8
@pytest.mark.parametrize("storage", ["int8", "uint8"])
def test_int8_state_dict_round_trip(storage):
    t, net = trained("range_abs_max", fold_bn=False)
    t.weight_storage = storage
    int8 = t.convert_to_int8(copy.deepcopy(net))  # straight from the training form: frozen on the way
    state = int8.state_dict()
    assert state["features.0.weight"].dtype == (torch.int8 if storage == "int8" else torch.uint8)
    if storage == "uint8":
        torch.testing.assert_close(state["features.0.weight"].to(torch.int16) - 128,
                                   int8.features[0].weight.to(torch.int16), rtol=0, atol=0)
    assert "features.0.output_scale" in state and "features.0.bn_factor" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = t.convert_to_int8(t.training_transpile(make_net(seed=9)))
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.features[0].weight.dtype == torch.int8
    x = images(seed=5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), int8.eval()(x))


@needs_int8
def test_int8_bad_use():
    t = QuantizeTranspiler()
    with pytest.raises(RuntimeError, match="training_transpile"):
        t.convert_to_int8(make_net())
    int8 = t.convert_to_int8(t.training_transpile(make_net()))
    with pytest.raises(RuntimeError, match="already converted"):
        t.convert_to_int8(int8)
    with pytest.raises(RuntimeError, match="already"):
        t.training_transpile(int8)
    wide = QuantizeTranspiler(weight_bits=12)
    with pytest.raises(ValueError, match="<= 8"):
        wide.convert_to_int8(wide.training_transpile(make_net()))


# --- DistributedDataParallel ------------------------------------------------------------------------

def _ddp_worker(rank, world, port, result_path):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model on both ranks
        net = QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=True,
                                 window_size=4).training_transpile(make_net())
        # broadcast_buffers=False: the quantizer state must agree because of the MAX reduction alone
        ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for step in range(3):
            x = images(seed=100 * step + rank) * (1 + 2 * rank)  # rank 1 sees larger inputs
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.save(net.state_dict(), "%s.%d" % (result_path, rank))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_keeps_quantizer_state_equal_across_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=True)
    states = [torch.load("%s.%d" % (path, r)) for r in range(2)]
    quantizer_keys = [k for k in states[0] if "input_quantizer" in k]
    assert len(quantizer_keys) == 4 * 3
    for key in quantizer_keys:
        assert torch.equal(states[0][key], states[1][key]), key
    for key in states[0]:
        if "weight" in key or "bias" in key:  # DDP averaged the gradients: same parameters
            torch.testing.assert_close(states[0][key], states[1][key], msg=key)
