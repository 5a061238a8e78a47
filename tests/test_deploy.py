"""Deployment without training and per-layer control: calibration (abs_max / percentile / mse),
skip_pattern and layer_types, the quantizers' process group, the float-checkpoint warning, chained int8
codes only inside a call of the converted model (ChainScope), parity_report and sensitivity analysis.
Small models only (the whole file runs in a few seconds)."""
import copy
import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import qkernels
from small_nets import small_net as shared_small_net
from qkernels import FloatCheckpointWarning, QuantizeTranspiler
from qkernels.calibration import _Histogram
from qkernels.nn import FakeQuantRangeAbsMax, QuantConv2d, QuantLinear

quantizers = importlib.import_module("qkernels.nn.quantizers")  # qkernels.nn.quantizers is also a function's name
from qkernels.nn.int8_layers import Int8Conv2d


def small_net(seed=0):
    return shared_small_net(seed, nn.ReLU).eval()


def images(n=4, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


BATCHES = [images(seed=s) for s in range(3)]


def quantizer_inputs(model, batches):
    """max |x| each static activation quantizer sees on the float activations."""
    seen = {}
    hooks = []
    for name, q in model.named_modules():
        if isinstance(q, quantizers.ActivationQuantizer):
            def hook(_m, args, name=name):
                seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
            hooks.append(q.register_forward_pre_hook(hook))
    for m in model.modules():
        if isinstance(m, quantizers._Quantizer):
            m.enabled = False
    with torch.no_grad():
        for b in batches:
            model(b)
    for m in model.modules():
        if isinstance(m, quantizers._Quantizer):
            m.enabled = True
    for h in hooks:
        h.remove()
    return seen


# --- calibration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["range_abs_max", "moving_average_abs_max"])
def test_abs_max_calibration_sets_the_float_abs_max_and_touches_nothing_else(act):
    t = QuantizeTranspiler(activation_quantize_type=act)
    net = t.training_transpile(small_net())
    net.train()
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    want = quantizer_inputs(copy.deepcopy(net).eval(), BATCHES)
    t.calibrate(net, BATCHES, method="abs_max")
    assert net.training  # modes restored
    assert all(m.enabled for m in net.modules() if isinstance(m, quantizers._Quantizer))
    for k, v in bn_before.items():
        assert torch.equal(net.state_dict()[k], v), k  # batch-norm statistics untouched
    got = {name: s for name, s, _seen in t.summary.calibrated}
    assert got.keys() == want.keys() and len(got) == 4
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6)
        assert float(net.get_submodule(name).scale) == pytest.approx(want[name], rel=1e-6)
    # The scale is the quantizer's state: a training step with the same data keeps it (range_abs_max's
    # window holds it; the moving average starts from it).
    assert "calibrated: abs_max over 3 batches" in str(t.summary)
    net.eval()
    frozen = t.freeze_program(copy.deepcopy(net))
    with torch.no_grad():
        assert torch.isfinite(frozen(images())).all()


def test_percentile_clips_an_outlier_and_mse_weighs_it():
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max")
    batches = [b.clone() for b in BATCHES]
    batches[0][0, 0, 0, 0] = 60.0  # one outlier in the first layer's input
    scales = {}
    for method in ("abs_max", "percentile", "mse"):
        net = t.training_transpile(small_net())
        t.calibrate(net, batches, method=method, percentile=99.9)  # the outlier is 1 of ~7000 values
        scales[method] = {name: s for name, s, _ in t.summary.calibrated}
    first = next(iter(scales["abs_max"]))
    assert scales["abs_max"][first] == pytest.approx(60.0)
    assert scales["percentile"][first] < 10.0
    # MSE keeps this outlier: clipping it costs (60 - s)^2, more than the rounding error of ~7000 values at s = 60
    assert scales["mse"][first] > 30.0
    for name in scales["abs_max"]:
        assert 0 < scales["percentile"][name] <= scales["abs_max"][name] * (1 + 1e-6)
        assert 0 < scales["mse"][name] <= scales["abs_max"][name] * (1 + 1e-6)


def test_histogram_percentile_and_mse_against_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    h = _Histogram()
    parts = [torch.randn(5000, generator=g) * s for s in (0.5, 1.0, 3.0)]  # growing range: rebinning
    for p in parts:
        h.add(p)
    a = torch.cat(parts).abs().numpy()
    assert h.counts.sum() == a.size
    want = np.percentile(a, 99.0)
    assert abs(h.percentile(99.0) - want) <= 2 * h.top / h.bins + 1e-6  # one bin, plus one for the rebinning
    # The MSE scale minimises the error model: no candidate on a grid does better by more than one bin.
    s = h.mse_scale(8)
    assert 0 < s <= h.top
    def err(scale):
        return float(np.mean(np.where(a > scale, (a - scale) ** 2, (scale / 127) ** 2 / 12)))
    assert err(s) <= min(err(c) for c in np.linspace(h.top / 64, h.top, 64)) * 1.05


def test_calibrate_refuses_bad_input():
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max")
    net = t.training_transpile(small_net())
    with pytest.raises(ValueError, match="method"):
        t.calibrate(net, BATCHES, method="kl")
    with pytest.raises(ValueError, match="no batches"):
        t.calibrate(net, [])
    with pytest.raises(RuntimeError, match="training_transpile"):
        t.calibrate(small_net(), BATCHES)
    d = QuantizeTranspiler(activation_quantize_type="abs_max")
    with pytest.raises(RuntimeError, match="dynamic"):
        d.calibrate(d.training_transpile(small_net()), BATCHES)


# --- skip_pattern, layer_types ------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, kept", [
    ("<first>", ["0"]), ("<last>", ["8"]), (["3", "6"], ["3", "6"]),
    (re.compile("^[36]$"), ["3", "6"]), (nn.Linear, ["8"]), (lambda name, m: getattr(m, "groups", 1) > 1, ["3"]),
])
def test_skip_pattern_keeps_layers_float_and_reports_them(pattern, kept):
    t = QuantizeTranspiler(skip_pattern=pattern)
    net = t.training_transpile(small_net())
    for name in ("0", "3", "6", "8"):
        layer = net.get_submodule(name)
        assert isinstance(layer, (QuantConv2d, QuantLinear)) != (name in kept), name
    assert [name for name, _why in t.summary.skipped] == kept
    assert all("skip_pattern" in why for _name, why in t.summary.skipped)
    int8 = t.convert_to_int8(net)  # the float layers stay float through every pass
    for name in kept:
        assert type(int8.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    with torch.no_grad():
        assert torch.isfinite(int8(images())).all()


def test_subclasses_are_left_float_unless_listed():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = small_net()
    old = net[6]
    net[6] = MyConv(8, 6, 1)
    net[6].load_state_dict(old.state_dict())
    x = images()
    with torch.no_grad():
        want = net(x)
    t = QuantizeTranspiler()
    q = t.training_transpile(copy.deepcopy(net))
    assert type(q[6]) is MyConv and "subclass" in dict(t.summary.skipped)["6"]
    t2 = QuantizeTranspiler(layer_types=(nn.Conv2d, nn.Linear, MyConv))
    q2 = t2.training_transpile(copy.deepcopy(net))
    assert isinstance(q2[6], QuantConv2d) and not t2.summary.skipped
    with torch.no_grad():
        assert torch.allclose(q(x), want, atol=0.2 * want.abs().max())
    with pytest.raises(TypeError, match="layer_types"):
        QuantizeTranspiler(layer_types=(nn.ReLU,))
    with pytest.raises(TypeError, match="skip_pattern"):
        QuantizeTranspiler(skip_pattern=[3])


# --- process group, float checkpoints --------------------------------------------------------------------

def test_statistics_reduce_over_the_given_process_group_or_not_at_all(monkeypatch):
    calls = []
    monkeypatch.setattr(quantizers, "_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, op=None, group=None: calls.append(group) or t.mul_(2))
    group = object()
    q = FakeQuantRangeAbsMax().train()
    q.process_group = group
    q(torch.tensor([1.0, -3.0]))
    assert calls == [group] and float(q.scale) == 6.0  # the reduced (here: doubled) max is the state
    q2 = FakeQuantRangeAbsMax().train()
    q2.sync_statistics = False
    q2(torch.tensor([1.0, -3.0]))
    assert calls == [group] and float(q2.scale) == 3.0
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max", sync_statistics=False)
    net = t.training_transpile(small_net())
    assert all(not m.sync_statistics for m in net.modules() if isinstance(m, quantizers.ActivationQuantizer))
    import pickle
    pickle.loads(pickle.dumps(q))  # the process group is not pickled


def test_a_float_checkpoint_in_a_static_model_warns():
    state = small_net().state_dict()
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max")
    net = t.training_transpile(small_net(1))
    with pytest.warns(FloatCheckpointWarning, match="initial value"):
        net.load_state_dict(state)
    d = QuantizeTranspiler(activation_quantize_type="abs_max")
    dyn = d.training_transpile(small_net(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatCheckpointWarning)
        dyn.load_state_dict(state)  # dynamic scales: nothing is missing


# --- chain scope, parity ---------------------------------------------------------------------------------

def trained(act="range_abs_max", fold_bn=False):
    t = QuantizeTranspiler(activation_quantize_type=act, weight_quantize_type="channel_wise_abs_max", fold_bn=fold_bn)
    net = t.training_transpile(small_net())
    net.train()
    with torch.no_grad():
        for b in BATCHES:
            net(b)
    return t, net.eval()


def test_chained_codes_only_inside_a_call_of_the_converted_model():
    t, net = trained()
    int8 = t.convert_to_int8(copy.deepcopy(net)).eval()
    assert isinstance(int8[0], Int8Conv2d) and int8[0].chained
    x = images()
    with torch.no_grad():
        whole = int8(x)
        head = int8[:3](x)                 # a slice: the chained layer gives floats, not codes
        assert head.dtype == torch.float32
        alone = int8[0](x)
        assert alone.dtype == torch.float32 and torch.equal(alone, head)
        with int8[0].chain_scope:         # explicitly as the model calls it
            codes = int8[0](x)
        assert codes.dtype == torch.int8
        # the floats are what the codes stand for (within half a step of the next layer's input scale)
        step = float(int8[3].input_scale) / 127
        assert (codes.float() * step - head.clamp(-127 * step, 127 * step)).abs().max() <= step / 2 + 1e-6
        assert torch.equal(int8[3:](head), int8[3:](head))
        assert torch.equal(int8(x), whole)


def test_parity_report_holds_int8_and_frozen_within_half_a_step():
    t, net = trained(fold_bn=True)
    x = images(seed=9)
    frozen = t.freeze_program(copy.deepcopy(net))
    int8 = t.convert_to_int8(copy.deepcopy(net))
    for deployed, kind in ((frozen, "frozen"), (int8, "int8")):
        report = qkernels.parity_report(net, deployed, x)
        assert report.deployed == kind and len(report.layers) == 4 and not report.missing
        assert report.max_error <= 0.5 + 1e-4, str(report)
        assert report.output_max_abs_diff <= 0.05 * report.output_max_abs, str(report)
        assert "first divergence" in str(report)
    # a deliberately wrong deployment is seen: a scale off by 10% moves codes by up to ~12 steps
    with torch.no_grad():
        int8[3].input_scale.mul_(1.1)
    int8[3].refresh()
    int8[0].output_scale.mul_(1.1)
    int8[0].refresh()
    bad = qkernels.parity_report(net, int8, x)
    assert bad.first_divergence == "3" and bad.max_error > 2, str(bad)


def test_parity_report_needs_the_qat_model():
    with pytest.raises(ValueError, match="QAT"):
        qkernels.parity_report(small_net(), small_net(), images())


# --- sensitivity -----------------------------------------------------------------------------------------

def test_sensitivity_finds_the_layer_that_hurts_and_its_skip_pattern():
    net = small_net()
    with torch.no_grad():
        net[8].weight[0, 0] = 40.0  # one huge weight: per-tensor 4-bit weights of the linear layer lose the rest
    x = torch.cat(BATCHES)
    with torch.no_grad():
        reference = net(x)

    def evaluate(model):
        with torch.no_grad():
            return -float((model(x) - reference).pow(2).mean())

    t = QuantizeTranspiler(weight_bits=4, activation_quantize_type="range_abs_max")
    report = qkernels.sensitivity(net, t, evaluate, BATCHES)
    assert report.float_metric == 0.0
    assert [r.group for r in report.rows][0] == "8" and len(report.rows) == 4
    assert report.rows[0].drop > 2 * report.rows[1].drop > 0
    assert report.worst_kept_float_metric > report.quantized_metric
    pattern = report.skip_pattern(1)
    kept = QuantizeTranspiler(skip_pattern=pattern).training_transpile(copy.deepcopy(net))
    assert type(kept[8]) is nn.Linear and isinstance(kept[6], QuantConv2d)
    assert "skip_pattern=['^8$']" in str(report)
    grouped = qkernels.sensitivity(net, t, evaluate, BATCHES, groups={"convs": ["0", "3"], "tail": ["6", "8"]})
    assert [r.group for r in grouped.rows] == ["tail", "convs"]
    with pytest.raises(ValueError, match="does not quantize"):
        qkernels.sensitivity(net, t, evaluate, BATCHES, groups={"x": ["nope"]})
    assert torch.equal(net(x), reference)  # the model given is unchanged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_layers_run_their_integer_code_conv_in_float32_under_autocast(dtype):
    t, net = trained()
    frozen = t.freeze_program(copy.deepcopy(net)).eval()
    x = images()
    with torch.no_grad():
        want = frozen(x)
        with torch.autocast("cpu", dtype=dtype):
            got = frozen(x)
    # Codes times codes summed in fp16 / bf16 would be off by whole steps; in float32 only the final
    # dequantized output may be rounded to the autocast dtype (its relative precision, times max |out|).
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() <= 4 * eps * want.abs().max()
