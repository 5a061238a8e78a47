"""MobileNetSSD structure and outputs, priors, and box geometry (ssd.model, ssd.priors, ssd.box_utils)."""
import math

import pytest
import torch
from torch import nn

from ssd.box_utils import box_iou, center_to_corners, corners_to_center, decode, encode
from ssd.model import MobileNetSSD
from ssd.priors import VARIANCES, prior_boxes, priors_per_location


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MobileNetSSD(num_classes=21).eval()


@pytest.fixture(scope="module")
def outputs(model):
    """One forward of two images shared by the tests (the full model is ~0.6 GFLOP per image)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        return model.feature_maps(images), *model(images)


# ---------------------------------------------------------------- priors

def test_prior_count_and_layout():
    priors = prior_boxes()
    assert priors.shape == (1917, 4) and priors.dtype == torch.float32
    assert priors_per_location() == [3, 6, 6, 6, 6, 6]
    assert 19 * 19 * 3 + (10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6 == 1917


def test_first_and_last_priors_by_hand():
    priors = prior_boxes().double()
    # First map 19x19, step 300/19, first centre (0.5 * 300/19) / 300 = 0.5/19; min size 60 -> half 0.1.
    c = 0.5 / 19
    torch.testing.assert_close(priors[0], torch.tensor([c - 0.1, c - 0.1, c + 0.1, c + 0.1], dtype=torch.float64))
    # Second prior: aspect ratio 2 -> width 60*sqrt(2), height 60/sqrt(2) (pixels of 300).
    hw, hh = 60 * math.sqrt(2) / 600, 60 / math.sqrt(2) / 600
    torch.testing.assert_close(priors[1], torch.tensor([c - hw, c - hh, c + hw, c + hh], dtype=torch.float64))
    # Third prior: the flip 1/2 (no max size on the first map, so 3 per location).
    torch.testing.assert_close(priors[2], torch.tensor([c - hh, c - hw, c + hh, c + hw], dtype=torch.float64))
    # Location (y=0, x=1) of the first map starts at index 3.
    c1 = 1.5 / 19
    torch.testing.assert_close(priors[3], torch.tensor([c1 - 0.1, c - 0.1, c1 + 0.1, c + 0.1], dtype=torch.float64))
    # Last prior: 1x1 map, centre 0.5, sqrt(285 * 300) square; unclipped.
    half = math.sqrt(285 * 300) / 600
    torch.testing.assert_close(priors[-1], torch.tensor([0.5 - half] * 2 + [0.5 + half] * 2, dtype=torch.float64))
    # Second to last: ratio 1/3 of min size 285 -> width 285/sqrt(3), height 285*sqrt(3) (beyond the image).
    w3, h3 = 285 / math.sqrt(3) / 600, 285 * math.sqrt(3) / 600
    torch.testing.assert_close(priors[-2], torch.tensor([0.5 - w3, 0.5 - h3, 0.5 + w3, 0.5 + h3], dtype=torch.float64))
    assert priors.min() < 0 and priors.max() > 1  # not clipped, as the reference


def test_second_map_starts_after_first():
    priors = prior_boxes().double()
    first = 19 * 19 * 3
    # 10x10 map, step 30, min 105, max 150: order 1, 2, 1/2, 3, 1/3, sqrt(105*150).
    c = 15 / 300
    sizes = [(105, 105), (105 * math.sqrt(2), 105 / math.sqrt(2)), (105 / math.sqrt(2), 105 * math.sqrt(2)),
             (105 * math.sqrt(3), 105 / math.sqrt(3)), (105 / math.sqrt(3), 105 * math.sqrt(3)),
             (math.sqrt(105 * 150), math.sqrt(105 * 150))]
    expected = torch.tensor([[c - w / 600, c - h / 600, c + w / 600, c + h / 600] for w, h in sizes], dtype=torch.float64)
    torch.testing.assert_close(priors[first:first + 6], expected)


# ---------------------------------------------------------------- box utilities

def test_iou_known_values_and_degenerate_boxes():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.2, 0.2, 0.2, 0.2]])
    iou = box_iou(a, b)
    expected = torch.tensor([[0.0625 / (0.25 + 0.25 - 0.0625), 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)


def test_center_corner_round_trip():
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.8], [-0.1, 0.0, 1.2, 0.3]])
    center = corners_to_center(boxes)
    torch.testing.assert_close(center[0], torch.tensor([0.25, 0.5, 0.3, 0.6]))
    torch.testing.assert_close(center_to_corners(center), boxes)


def test_encode_decode_round_trip_and_known_value():
    priors = prior_boxes()
    torch.manual_seed(0)
    centre = torch.rand(1917, 2)
    size = torch.rand(1917, 2) * 0.5 + 0.01
    boxes = center_to_corners(torch.cat([centre, size], 1))
    offsets = encode(boxes, priors, VARIANCES)
    torch.testing.assert_close(decode(offsets, priors, VARIANCES), boxes, atol=1e-5, rtol=1e-5)
    # A box equal to its prior encodes to zeros; a box shifted by one prior width -> 1/0.1 = 10.
    torch.testing.assert_close(encode(priors, priors, VARIANCES), torch.zeros(1917, 4), atol=1e-5, rtol=0)
    prior = torch.tensor([0.2, 0.2, 0.4, 0.6])
    shifted = torch.tensor([0.4, 0.2, 0.6, 0.6])
    torch.testing.assert_close(encode(shifted, prior, VARIANCES), torch.tensor([10.0, 0.0, 0.0, 0.0]))
    doubled = torch.tensor([0.1, 0.0, 0.5, 0.8])  # same centre, twice the size -> log(2)/0.2
    torch.testing.assert_close(encode(doubled, prior, VARIANCES), torch.tensor([0, 0, math.log(2) / 0.2, math.log(2) / 0.2]))


# ---------------------------------------------------------------- model

def test_output_shapes_and_feature_maps(outputs):
    maps, locs, confs = outputs
    assert [tuple(m.shape[1:]) for m in maps] == [(512, 19, 19), (1024, 10, 10), (512, 5, 5), (256, 3, 3),
                                                  (256, 2, 2), (128, 1, 1)]
    assert locs.shape == (2, 1917, 4) and confs.shape == (2, 1917, 21)
    assert torch.isfinite(locs).all() and torch.isfinite(confs).all()


def test_flatten_order_is_row_y_column_x_prior(model, outputs):
    maps, locs, confs = outputs
    with torch.no_grad():
        loc_map = model.loc_heads[1](maps[1])  # 10x10 map, 6 priors: [2, 24, 10, 10]
        conf_map = model.conf_heads[1](maps[1])  # [2, 126, 10, 10]
    y, x, prior = 3, 7, 4
    index = 19 * 19 * 3 + (y * 10 + x) * 6 + prior
    torch.testing.assert_close(locs[0, index], loc_map[0, prior * 4:(prior + 1) * 4, y, x])
    torch.testing.assert_close(confs[0, index], conf_map[0, prior * 21:(prior + 1) * 21, y, x])


def test_every_body_conv_is_followed_by_its_batchnorm_and_relu(model):
    """The transpiler folds a BN that directly follows a Conv2d in a Sequential; keep that layout."""
    body_convs = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i, child in enumerate(children):
            if isinstance(child, nn.Conv2d):
                body_convs += 1
                assert child.bias is None
                assert isinstance(children[i + 1], nn.BatchNorm2d) and children[i + 1].num_features == child.out_channels
                assert isinstance(children[i + 2], nn.ReLU)
    assert body_convs == 1 + 13 * 2 + 4 * 2
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    heads = [*model.loc_heads, *model.conf_heads]
    assert len(heads) == 12 and all(h.kernel_size == (1, 1) and h.bias is not None for h in heads)
    assert [h.out_channels for h in model.loc_heads] == [12, 24, 24, 24, 24, 24]
    assert [h.out_channels for h in model.conf_heads] == [63, 126, 126, 126, 126, 126]


def test_msra_init_bounds():
    torch.manual_seed(0)
    model = MobileNetSSD(num_classes=5)
    conv = model.body_19[1][0][0]  # first depthwise conv: fan-in 9
    bound = math.sqrt(6 / 9)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    assert all(h.bias.abs().sum() == 0 for h in model.conf_heads)
    assert [h.out_channels for h in model.conf_heads] == [15, 30, 30, 30, 30, 30]


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        MobileNetSSD()(torch.randn(3, 300, 300))


def test_rejects_wrong_input_also_when_traced():
    """The check is one torch.fx call (not traced through), so a GraphModule of the model keeps it."""
    traced = torch.fx.symbolic_trace(MobileNetSSD(num_classes=3))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \(2, 1, 64, 64\)"):
        traced(torch.randn(2, 1, 64, 64))


# ---------------------------------------------------------------- the QAT transpiler's view of the model

def test_transpiler_traces_the_whole_model_without_a_warning():
    """torch.fx traces MobileNetSSD (no nn.Sequential fallback, no GraphTraceWarning): every BN folds into its
    conv, each feature map's three readers share one input quantizer, and the int8 model chains every body and
    extra conv (the feature maps included) without example inputs, as a traced forward would."""
    import copy
    import warnings

    from qkernels import GraphTraceWarning, QuantizeTranspiler
    from qkernels.graph import FX
    from qkernels.nn.int8_layers import Int8Conv2d

    torch.manual_seed(0)
    net = MobileNetSSD(num_classes=3)
    bn_after = {f"{name}.0": f"{name}.1" for name, m in net.named_modules()
                if isinstance(m, nn.Sequential) and isinstance(getattr(m, "1", None), nn.BatchNorm2d)}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphTraceWarning)
        qat = t.training_transpile(net)
        s = t.summary
        assert (s.graph, s.trace_failure) == (FX, None) and qat is net
        assert dict(s.folded) == bn_after and len(bn_after) == 35
        assert len(s.shared_inputs) == 6
        assert s.shared_inputs[0] == ("body_10.0.0.0", "loc_heads.0", "conf_heads.0")
        assert s.shared_inputs[-1] == ("loc_heads.5", "conf_heads.5")
        with torch.no_grad():  # calibrate the static scales (batch norms keep their initial statistics)
            qat.train()(x)
        qat.eval()
        int8 = t.convert_to_int8(copy.deepcopy(qat))
        s = t.summary
    assert s.graph == FX and isinstance(int8, MobileNetSSD)  # module swaps only: the app's methods stay
    assert len(s.fused) == 35 and s.float_ops == {"batch norms": 0, "activations": 0}
    assert sorted(name for name, _ in s.chained) == sorted(bn_after)
    assert sorted(name for name, _ in s.not_chained) == sorted(f"{k}_heads.{i}" for k in ("loc", "conf")
                                                               for i in range(6))
    # The traced-forward chaining (example inputs) finds nothing more: the graph already showed every reader.
    traced = t.convert_to_int8(copy.deepcopy(qat), example_inputs=(x,))
    assert sorted(t.summary.chained) == sorted(s.chained)
    convs = [m for m in int8.modules() if isinstance(m, Int8Conv2d)]
    reads_codes = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: reads_codes.append(args[0].dtype == torch.int8))
             for m in convs]
    with torch.inference_mode():
        got = int8(x)
        want = traced(x)
    for h in hooks:
        h.remove()
    assert sum(reads_codes) == len(convs) - 1 == 46  # every conv but the stem reads int8 codes
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        int8(torch.randn(3, 64, 64))
