"""Leaving PyTorch: ONNX QDQ export run by onnxruntime (ops, transpiled, frozen and int8 models), the
rounding-tie bound, torch.save / torch.load and torch.export save / load round trips.

ONNX export is slow (seconds per model on this machine), so the models are small and each is exported once."""
import copy
import io
import platform

import pytest
import torch
from torch import nn

import qkernels
from small_nets import small_net as shared_small_net
from qkernels import QuantizeTranspiler

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from qkernels.export import export_onnx, onnxruntime_session, run_onnx  # noqa: E402


def small_net(seed=0):
    return shared_small_net(seed, nn.ReLU6)


def images(n=3, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained(act, weight="abs_max", fold_bn=False, seed=0):
    net = small_net(seed)
    t = QuantizeTranspiler(activation_quantize_type=act, weight_quantize_type=weight, fold_bn=fold_bn)
    t.training_transpile(net)
    net.train()
    with torch.no_grad():
        for i in range(3):
            net(images(4, seed=10 + i))
    return t, net.eval()


def op_types(model):
    return [n.op_type for n in model.graph.node]


def weight_initializers(model):
    return [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]


def code_steps(got, want, step, axis=0):
    """|got - want| in code steps (step: a number or one per slice along ``axis``)."""
    step = torch.as_tensor(step, dtype=torch.float32)
    if step.dim() == 1 and got.dim() > 1:
        shape = [1] * got.dim()
        shape[axis] = -1
        step = step.reshape(shape)
    return ((got - want).abs() / step).max().item()


# --- the ops, through one small module (one export) ----------------------------------------------------

class AllOps(nn.Module):
    """Every qkernels op with an ONNX translation, at 8 and 4 bits."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("scale", torch.tensor(1.5))
        self.register_buffer("w", torch.randn(6, 5, 3, 3, generator=g))
        self.register_buffer("w8", torch.randint(-127, 128, (6, 5, 3, 3), generator=g, dtype=torch.int8))
        self.register_buffer("bias", torch.randn(6, generator=g))
        self.register_buffer("conv_scale", torch.rand(6, generator=g) * 0.05 + 0.01)
        self.register_buffer("lw8", torch.randint(-127, 128, (4, 7), generator=g, dtype=torch.int8))

    def forward(self, x, codes, row):
        out = []
        for bits in (8, 4):
            out += list(qkernels.fake_quant_abs_max(x, bits))
            out += list(qkernels.quantize_abs_max(x, bits))
            out += [qkernels.fake_quant_with_scale(x, self.scale, bits), qkernels.quantize_with_scale(x, self.scale, bits)]
            out += list(qkernels.fake_channel_wise_quant_abs_max(self.w, bits, 0))
            out += list(qkernels.quantize_channel_wise_abs_max(x, bits, 1))
        out.append(qkernels.abs_max(x))
        out.append(qkernels.conv2d_int8(codes, self.w8, self.bias, 1, 1, 1, 1, self.conv_scale, torch.float32, "relu6"))
        out.append(qkernels.conv2d_int8(codes, self.w8, self.bias, 2, 1, 1, 1, 0.02, torch.int8, "relu"))
        out.append(qkernels.linear_int8(row, self.lw8, None, 0.03, torch.int8, None))
        out.append(qkernels.linear_int8(row, self.lw8, self.bias[:4], self.conv_scale[:4], torch.float32, "relu"))
        return tuple(o.contiguous() for o in out)


@pytest.fixture(scope="module")
def all_ops_run():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 6, 6, generator=g) * 2
    x[0, 0, 0, :4] = torch.tensor([0.0, 0.3, 2.5, -2.5])  # NaN is left out: ONNX does not specify its code
    codes = torch.randint(-127, 128, (2, 5, 6, 6), generator=g, dtype=torch.int8)
    row = torch.randint(-127, 128, (3, 7), generator=g, dtype=torch.int8)
    module = AllOps().eval()
    model = export_onnx(module, (x, codes, row))
    got = run_onnx(onnxruntime_session(model), x, codes, row)
    with torch.no_grad():
        want = module(x, codes, row)
    return model, got, want, x


def test_every_op_translates_to_standard_onnx(all_ops_run):
    model, got, want, _ = all_ops_run
    ops = set(op_types(model))
    assert {"QuantizeLinear", "DequantizeLinear", "ReduceMax", "Abs", "Conv", "MatMul", "Clip"} <= ops
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]  # no custom domain
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = next((i for i in model.graph.initializer if i.name == n.input[2]), None)
            if zp is not None:  # int8 codes; int32 for the bias of a Conv unit (on the accumulator's step)
                assert zp.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
                assert not onnx.numpy_helper.to_array(zp).any()
    assert len(got) == len(want)


def test_ops_in_onnxruntime_match_within_one_code_step_on_ties(all_ops_run):
    _model, got, want, x = all_ops_run
    i = 0
    for bits in (8, 4):
        bin_ = 2 ** (bits - 1) - 1
        fq, s, q, s2, fqs, qs, fcw, cws, qcw, cws2 = got[i:i + 10]
        wfq, ws, wq, ws2, wfqs, wqs, wfcw, wcws, wqcw, wcws2 = want[i:i + 10]
        i += 10
        torch.testing.assert_close(s.reshape(ws.shape), ws)  # the abs max itself is exact
        torch.testing.assert_close(cws, wcws)
        for got_codes, want_codes in ((q, wq), (qs, wqs), (qcw, wqcw)):
            assert got_codes.dtype == torch.int8
            assert (got_codes.int() - want_codes.int()).abs().max() <= 1
        assert code_steps(fq, wfq, ws / bin_) <= 1 + 1e-5
        assert code_steps(fqs, wfqs, 1.5 / bin_) <= 1 + 1e-5
        assert code_steps(fcw, wfcw, wcws / bin_) <= 1 + 1e-5
    torch.testing.assert_close(got[i].reshape(want[i].shape), want[i])
    conv_f, conv_q, lin_q, lin_f = got[i + 1], got[i + 2], got[i + 3], got[i + 4]
    w_conv_f, w_conv_q, w_lin_q, w_lin_f = want[i + 1], want[i + 2], want[i + 3], want[i + 4]
    torch.testing.assert_close(conv_f, w_conv_f, atol=1e-4, rtol=1e-5)  # float sums in another order
    torch.testing.assert_close(lin_f, w_lin_f, atol=1e-4, rtol=1e-5)
    assert conv_q.dtype == lin_q.dtype == torch.int8
    assert (conv_q.int() - w_conv_q.int()).abs().max() <= 1 and (lin_q.int() - w_lin_q.int()).abs().max() <= 1


def test_rounding_ties_differ_by_one_code_and_only_there():
    """ONNX rounds half to even, qkernels half away from zero: with scale 127 (step 1) every x = k + 0.5 is
    an exact tie; the codes differ by one exactly where k + 0.5 rounds to an odd number away from zero."""
    class Q(nn.Module):
        def forward(self, x):
            return qkernels.quantize_with_scale(x, 127.0), qkernels.fake_quant_with_scale(x, 127.0)

    ties = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    off = torch.linspace(-127, 127, 1001)
    x = torch.cat([ties, off])
    model = export_onnx(Q().eval(), (x,))
    codes, fake = run_onnx(onnxruntime_session(model), x)
    ours = qkernels.quantize_with_scale(x, 127.0)
    diff = (codes.int() - ours.int()).abs()
    assert diff.max() == 1
    is_tie = (x - x.floor()) == 0.5
    assert not diff[~is_tie].any()                       # away from ties: identical codes
    assert torch.equal(diff[is_tie] == 1, (x[is_tie].abs() - 0.5) % 2 == 0)  # odd away-from-zero neighbour
    assert (fake - qkernels.fake_quant_with_scale(x, 127.0)).abs().max() <= 1.0  # one step = 1


# --- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, act, weight", [
    ("transpiled", "range_abs_max", "channel_wise_abs_max"),
    ("frozen", "abs_max", "abs_max"),
    ("int8", "moving_average_abs_max", "channel_wise_abs_max"),
])
def test_model_exports_to_qdq_and_matches_in_onnxruntime(stage, act, weight):
    t, net = trained(act, weight, fold_bn=stage == "int8")
    qat = copy.deepcopy(net)
    model = net if stage == "transpiled" else (t.freeze_program(net) if stage == "frozen" else t.convert_to_int8(net))
    model.eval()
    x = images()
    onnx_model = export_onnx(model, x, conv_units=False)  # the ops' own translations (units: below)
    ops = op_types(onnx_model)
    assert ops.count("DequantizeLinear") >= 8 and ops.count("QuantizeLinear") >= 2
    weights = weight_initializers(onnx_model)
    assert len(weights) == 4  # every conv / linear weight is an int8 initializer behind a DequantizeLinear
    by_weight = {n.input[0]: n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"}
    for w in weights:
        dq = by_weight[w.name]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        scale = next(i for i in onnx_model.graph.initializer if i.name == dq.input[1])
        if weight == "channel_wise_abs_max" and w.dims[0] > 1 and len(scale.dims) == 1 and scale.dims[0] > 1:
            assert axis in (0, 1)
    if act == "abs_max":
        assert "ReduceMax" in ops and "Abs" in ops
    got = run_onnx(onnxruntime_session(onnx_model), x)[0]
    with torch.no_grad():
        want = model(x)
    # Exporting changes only float rounding (and ties): a handful of input codes may move one step, which
    # moves the output by at most about one step of the last layer's input times its weights.
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got - want).abs().mean() <= 1e-3 * want.abs().max()
    if stage == "int8":
        # our arithmetic as it is (float bias): every layer's input within half a step of the QAT model's
        report = qkernels.parity_report(qat, onnx_model, x)
        assert len(report.layers) == 4 and report.max_error <= 0.5 + 1e-3, str(report)


def optimized_op_types(model, tmp_path, **kwargs):
    """The op types of onnxruntime's optimised graph ('all') of ``model``."""
    path = str(tmp_path / "optimized.onnx")
    onnxruntime_session(model, optimized_model_path=path, **kwargs)
    return op_types(onnx.load(path))


@pytest.mark.parametrize("stage", ["frozen", "int8"])
def test_quantized_convs_run_as_qlinearconv_with_codes_one_step_at_most_apart(stage, tmp_path):
    t, net = trained("range_abs_max", "channel_wise_abs_max", fold_bn=True)
    qat = copy.deepcopy(net)
    model = (t.freeze_program(net) if stage == "frozen" else t.convert_to_int8(net)).eval()
    x = images()
    with torch.no_grad():
        want = model(x)
    units = export_onnx(model, x)
    # conv -> relu -> dw conv and dw conv -> relu6 -> 1x1 conv are units; the 1x1 conv's output is
    # flattened before the linear layer's quantizer, so it stays a float Conv
    optimized = optimized_op_types(units, tmp_path, int8_units=True)
    assert optimized.count("QLinearConv") == 2 and optimized.count("Conv") == 1, optimized
    if platform.machine().lower() in ("x86_64", "amd64"):  # onnxruntime's x86 default: int8 units stay Conv
        assert "QLinearConv" not in optimized_op_types(units, tmp_path)
    assert "Relu" not in op_types(units) and op_types(units).count("Max") == 2  # the ReLUs act on the codes
    plain = export_onnx(model, x, conv_units=False)
    assert "QLinearConv" not in optimized_op_types(plain, tmp_path, int8_units=True)
    # The int32 bias (rounded to the accumulator's step, a small fraction of a code) moves a code by one
    # where it was that close to a rounding tie, and nowhere else by more.
    rep_units, rep_plain = qkernels.parity_report(qat, units, x), qkernels.parity_report(qat, plain, x)
    assert rep_plain.max_error <= 0.5 + 1e-3, str(rep_plain)
    for layer in rep_units.layers:
        assert layer.max_code_diff <= 1 and layer.mismatched <= 0.02 * layer.numel + 1, str(rep_units)
    got = run_onnx(onnxruntime_session(units, int8_units=True), x)[0]
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    # uint8 activations (code + 128, zero point 128): the same graph values, the same QLinearConv units
    as_uint8 = export_onnx(model, x, activations="uint8")
    assert optimized_op_types(as_uint8, tmp_path).count("QLinearConv") == 2
    got8 = run_onnx(onnxruntime_session(as_uint8, optimization="disable"), x)[0]
    assert torch.equal(got8, run_onnx(onnxruntime_session(units, optimization="disable"), x)[0])
    rep_uint8 = qkernels.parity_report(qat, as_uint8, x)
    assert [l.max_code_diff for l in rep_uint8.layers] == [l.max_code_diff for l in rep_units.layers]


def test_export_refuses_training_mode_and_wide_codes():
    t, net = trained("range_abs_max")
    with pytest.raises(RuntimeError, match="eval mode"):
        export_onnx(net.train(), images())


def test_weight_quantize_folding_rounds_half_away():
    from qkernels.export import fold_constant_quantize
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w = numpy_helper.from_array(np.array([[0.5, 1.5, -2.5, 0.49]], np.float32), "w")
    s = numpy_helper.from_array(np.array(1.0, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    q = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"])
    dq = helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["y"])
    g = helper.make_graph([q, dq], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s, z])
    folded = fold_constant_quantize(helper.make_model(g))
    assert [n.op_type for n in folded.graph.node] == ["DequantizeLinear"]
    codes = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "wq"))
    assert codes.tolist() == [[1, 2, -3, 0]]


# --- torch.save / torch.load, torch.export ----------------------------------------------------------------

def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("act", ["range_abs_max", "abs_max"])
def test_torch_save_load_of_qat_frozen_and_int8_models(act):
    t, net = trained(act, "channel_wise_abs_max")
    x = images()
    frozen = t.freeze_program(copy.deepcopy(net)).eval()
    int8 = t.convert_to_int8(copy.deepcopy(net)).eval()
    for model in (net, frozen, int8):
        loaded = _roundtrip(model).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("stage", ["frozen", "int8"])
def test_torch_export_save_load_round_trip(stage):
    t, net = trained("range_abs_max", "channel_wise_abs_max", fold_bn=True)
    model = (t.freeze_program(net) if stage == "frozen" else t.convert_to_int8(net)).eval()
    x = images()
    program = torch.export.export(model, (x,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(images(seed=7)), model(images(seed=7)))


def test_int8_state_records_structure_and_loads_into_another_skeleton():
    t, net = trained("range_abs_max")
    int8 = t.convert_to_int8(copy.deepcopy(net)).eval()
    state = int8.state_dict()
    extra = state["0._extra_state"]
    assert extra["version"] == 2 and extra["activation"] == "relu" and extra["chained"] and extra["static"]
    assert state["3._extra_state"]["float_activation"] == "relu6"
    # A skeleton converted with other settings (dynamic inputs: nothing chained, no input scales) takes on
    # the saved structure.
    t2 = QuantizeTranspiler(activation_quantize_type="abs_max")
    skeleton = t2.convert_to_int8(t2.training_transpile(small_net(5))).eval()
    assert not skeleton[0].chained and not skeleton[0].static
    skeleton.load_state_dict(state)
    assert skeleton[0].chained and skeleton[0].static and skeleton[3].float_activation == "relu6"
    x = images()
    with torch.no_grad():
        assert torch.equal(skeleton(x), int8(x))
    with pytest.raises(RuntimeError, match="version"):
        skeleton[0].set_extra_state({"version": 99})
