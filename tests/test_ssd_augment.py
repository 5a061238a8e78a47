"""The training augmentation against the reference's recipe (reference-semantics section 8): the
statistics of many draws, and each step against its formula on small images."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.data import transforms as T
from ssd.data.loader import Collate
from ssd.data.voc import Sample

DRAWS = 4000


def _within(fraction, p, n, sigmas=4.5):
    """A binomial fraction within ``sigmas`` standard deviations of its probability."""
    return abs(fraction - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _uniform_in(values, low, high, n_bins=4):
    """All values in [low, high], reaching both ends, spread evenly over ``n_bins`` bins."""
    values = np.asarray(values)
    assert values.min() >= low and values.max() <= high
    span = high - low
    assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span
    counts = np.histogram(values, bins=n_bins, range=(low, high))[0]
    for c in counts:
        assert _within(c / len(values), 1 / n_bins, len(values)), counts


# ---------------------------------------------------------------- photometric distortion: the draws
@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(0)
    return [T.draw_distortion(rng) for _ in range(DRAWS)]


def test_distortion_orders_are_the_two_of_the_reference_each_half_the_time(draws):
    orders = [d.order for d in draws]
    assert set(orders) == {("brightness", "contrast", "saturation", "hue"),
                           ("brightness", "saturation", "hue", "contrast")}
    assert _within(orders.count(T.ORDER_CONTRAST_LAST) / DRAWS, 0.5, DRAWS)


@pytest.mark.parametrize("step, low, high", [("brightness", 0.875, 1.125), ("contrast", 0.5, 1.5),
                                             ("saturation", 0.5, 1.5), ("hue", -18.0, 18.0)])
def test_each_step_applies_half_the_time_with_a_uniform_value(draws, step, low, high):
    values = [d.values[step] for d in draws if step in d.values]
    assert _within(len(values) / DRAWS, 0.5, DRAWS)
    _uniform_in(values, low, high)


# ---------------------------------------------------------------- photometric distortion: the formulas
def _ramp(width=256, height=3):
    """Every 8-bit value in R, reversed in G, a constant in B; a few rows."""
    v = np.arange(width) % 256
    image = np.stack([v, 255 - v, np.full_like(v, 77)], axis=-1)[None].repeat(height, 0).astype(np.uint8)
    return Image.fromarray(image)


def _apply(image, **values):
    return np.asarray(T.apply_distortion(image, T.Distortion(T.ORDER_CONTRAST_SECOND, values)), dtype=np.float64)


@pytest.mark.parametrize("factor", [0.875, 0.93, 1.06, 1.125])
def test_brightness_multiplies(factor):
    """Multiplicative, not additive: black stays black. PIL truncates its blend to 8 bit (one step)."""
    image = _ramp()
    x = np.asarray(image, dtype=np.float64)
    out = _apply(image, brightness=factor)
    assert np.abs(out - np.clip(np.floor(x * factor), 0, 255)).max() <= 1
    assert out[..., 0][:, 0].max() == 0


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.3, 1.5])
def test_contrast_scales_around_the_mean_grey(factor):
    image = _ramp()
    x = np.asarray(image, dtype=np.float64)
    mean_grey = int(np.asarray(image.convert("L"), dtype=np.float64).mean() + 0.5)
    want = np.clip(mean_grey + factor * (x - mean_grey), 0, 255)
    assert np.abs(_apply(image, contrast=factor) - want).max() <= 1


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.2, 1.5])
def test_saturation_scales_around_the_grey_value(factor):
    image = _ramp()
    x = np.asarray(image, dtype=np.float64)
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    want = np.clip(grey + factor * (x - grey), 0, 255)
    assert np.abs(_apply(image, saturation=factor) - want).max() <= 1


@pytest.mark.parametrize("shift, hue", [(18.0, 18), (7.9, 7), (-3.7, 253), (-18.0, 238)])
def test_hue_shift_is_in_pil_hue_units_truncated_and_wrapped(shift, hue):
    """Pure red has hue 0. The reference adds the shift to PIL's uint8 hue channel: 18 units (25 degrees,
    not 18), truncated toward zero, wrapping below 0."""
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    out = T.apply_distortion(red, T.Distortion(T.ORDER_CONTRAST_SECOND, {"hue": shift}))
    h, s, v = np.asarray(out.convert("HSV"))[0, 0].tolist()
    assert abs(h - hue) <= 1 and s > 250 and v == 255


def test_steps_run_in_the_drawn_order():
    image = _ramp()
    values = {"brightness": 1.1, "contrast": 1.4, "saturation": 0.6, "hue": 9.0}
    last = T.apply_distortion(image, T.Distortion(T.ORDER_CONTRAST_LAST, values))
    by_hand = image
    for step in ("brightness", "saturation", "hue", "contrast"):
        by_hand = T.apply_distortion(by_hand, T.Distortion((step,), {step: values[step]}))
    assert np.array_equal(np.asarray(last), np.asarray(by_hand))
    second = T.apply_distortion(image, T.Distortion(T.ORDER_CONTRAST_SECOND, values))
    assert not np.array_equal(np.asarray(last), np.asarray(second))


# ---------------------------------------------------------------- expand
def test_expand_statistics_and_fill():
    image = Image.new("RGB", (40, 32), (250, 10, 20))
    box = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    rng = np.random.default_rng(1)
    ratios, lefts, expanded = [], [], 0
    for _ in range(DRAWS // 2):
        out, boxes = T.expand(image, box, rng, fill=T.expand_fill())
        if out.size == image.size:
            continue
        expanded += 1
        pixels = np.asarray(out)
        x0, y0 = int(round(boxes[0, 0] * out.size[0])), int(round(boxes[0, 1] * out.size[1]))
        assert abs(boxes[0, 2] * out.size[0] - (x0 + 40)) < 1e-2 and abs(boxes[0, 3] * out.size[1] - (y0 + 32)) < 1e-2
        assert (pixels[y0:y0 + 32, x0:x0 + 40] == (250, 10, 20)).all()      # the image where the box says
        mask = np.ones(pixels.shape[:2], bool)
        mask[y0:y0 + 32, x0:x0 + 40] = False
        assert (pixels[mask] == 127).all()                                  # the mean 127.5 cast to uint8
        ratios.append(out.size[0] / 40)
        lefts.append((x0, out.size[0] - 40))
    assert _within(expanded / (DRAWS // 2), 0.5, DRAWS // 2, sigmas=5)
    # the width is int(40 * ratio) with ratio uniform in [1, 4]
    _uniform_in(ratios, 1.0, 4.0, n_bins=3)
    # the offset is floor(uniform(0, room)): 0 .. room - 1
    assert all(0 <= left < room for left, room in lefts if room > 0)
    expected = np.mean([(room - 1) / (2 * room) for _, room in lefts])   # E[floor(U(0, room))] / room
    assert np.mean([left / room for left, room in lefts]) == pytest.approx(expected, abs=0.015)


def test_expand_fill_is_the_mean_cast_to_uint8_in_rgb_order():
    assert T.expand_fill() == (127, 127, 127)
    assert T.expand_fill((104.0, 117.9, 123.6)) == (123, 117, 104)
    assert T.expand_fill((104.0, 117.9, 123.6), reference_order=True) == (104, 117, 123)


# ---------------------------------------------------------------- crop samplers
def _expected_clamped_fraction(s_low=0.3, s_high=1.0, a_low=0.5, a_high=2.0):
    """P(the drawn aspect falls outside [scale^2, 1/scale^2] and is clamped), scale and aspect uniform."""
    s = np.linspace(s_low, s_high, 200001)
    below = np.clip(s ** 2 - a_low, 0, None) / (a_high - a_low)
    above = np.clip(a_high - 1 / s ** 2, 0, None) / (a_high - a_low)
    return float(np.mean(below + above))


def test_crop_sampler_clamps_the_aspect_ratio_as_the_reference():
    sampler = T.SSD_SAMPLERS[1]
    rng = np.random.default_rng(2)
    windows = np.array([sampler.draw(rng) for _ in range(20000)])
    w, h = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    assert (windows[:, :2] >= 0).all() and (windows[:, 2:] <= 1 + 1e-9).all()
    scale, aspect = np.sqrt(w * h), w / h
    _uniform_in(scale, 0.3, 1.0)
    low, high = np.maximum(0.5, scale ** 2), np.minimum(2.0, 1 / scale ** 2)
    assert (aspect >= low - 1e-9).all() and (aspect <= high + 1e-9).all()
    # clamping (not drawing inside the narrower range) puts a share of the draws on the bounds
    clamped = np.mean((np.abs(aspect - scale ** 2) < 1e-9) | (np.abs(aspect - 1 / scale ** 2) < 1e-9))
    assert _within(clamped, _expected_clamped_fraction(), len(windows))


def test_samplers_are_the_reference_seven():
    whole, *constrained = T.SSD_SAMPLERS
    assert (whole.max_trials, whole.min_scale, whole.max_scale, whole.min_iou, whole.max_iou) == (1, 1, 1, None, None)
    assert [s.min_iou for s in constrained] == [0.1, 0.3, 0.5, 0.7, 0.9, None]
    assert [s.max_iou for s in constrained] == [None] * 5 + [1.0]
    assert all((s.max_trials, s.min_scale, s.max_scale, s.min_aspect, s.max_aspect) == (50, 0.3, 1.0, 0.5, 2.0)
               for s in constrained)


def test_sampler_acceptance():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5]])
    window = np.array([0.0, 0.0, 0.5, 1.0])            # IoU 0.5 with the box
    assert T.CropSampler(1, 1, 1, 1, 1).accepts(window, np.zeros((0, 4)))
    assert T.CropSampler(1, 1, 1, 1, 1, min_iou=0.5).accepts(window, boxes)
    assert not T.CropSampler(1, 1, 1, 1, 1, min_iou=0.51).accepts(window, boxes)
    assert T.CropSampler(1, 1, 1, 1, 1, max_iou=1.0).accepts(window, boxes)
    assert not T.CropSampler(1, 1, 1, 1, 1, max_iou=1.0).accepts(window, np.zeros((0, 4)))
    assert not T.CropSampler(1, 1, 1, 1, 1, max_iou=0.4).accepts(window, boxes)


def test_one_of_the_accepted_windows_is_drawn_uniformly(monkeypatch):
    """Seven candidates (every sampler accepts with a box covering the image): each drawn 1/7 of the time."""
    candidates = [np.array([0.0, 0.0, 1.0, 1.0]) * (1.0 - 0.01 * i) for i in range(7)]
    monkeypatch.setattr(T, "accepted_windows", lambda boxes, rng, samplers: candidates)
    picked = []
    monkeypatch.setattr(T, "crop", lambda image, boxes, labels, difficult, window, ref:
                        picked.append(int(round((1 - window[2]) * 100))) or (image, boxes, labels, difficult))
    tf, rng = T.TrainTransform(size=8), np.random.default_rng(3)
    image, box = Image.new("RGB", (8, 8)), np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    for _ in range(1400):
        tf.geometric(image, box, np.array([1]), np.array([False]), rng)
    counts = np.bincount(picked, minlength=7)
    assert all(_within(c / len(picked), 1 / 7, len(picked)) for c in counts), counts


def test_crop_keeps_boxes_whose_centre_is_inside_bounds_included():
    image = Image.new("RGB", (100, 100))
    boxes = np.array([[0.1, 0.1, 0.3, 0.3],      # centre 0.2: on the window's left/top edge, kept
                      [0.6, 0.6, 0.9, 0.9],      # centre 0.75 inside, clipped at 0.8
                      [0.7, 0.1, 0.95, 0.3]],    # centre x 0.825 outside
                     dtype=np.float32)
    window = np.array([0.2, 0.2, 0.8, 0.8])
    out, kept, labels, difficult = T.crop(image, boxes, np.array([1, 2, 3]), np.array([False] * 3), window)
    assert out.size == (60, 60) and labels.tolist() == [1, 2]
    np.testing.assert_allclose(kept, [[0.0, 0.0, 1 / 6, 1 / 6], [4 / 6, 4 / 6, 1.0, 1.0]], atol=1e-6)


def test_crop_cuts_truncated_pixels_and_maps_boxes_to_them_or_to_the_window():
    image = Image.new("RGB", (10, 10))
    box = np.array([[0.3, 0.3, 0.6, 0.6]], dtype=np.float32)
    window = np.array([0.19, 0.19, 0.79, 0.79])          # pixels 1..7 (int truncation): 6 wide
    out, ours, _, _ = T.crop(image, box, np.array([1]), np.array([False]), window)
    _, ref, _, _ = T.crop(image, box, np.array([1]), np.array([False]), window, reference_boxes=True)
    assert out.size == (6, 6)
    np.testing.assert_allclose(ours, [[2 / 6, 2 / 6, 5 / 6, 5 / 6]], atol=1e-6)           # on the kept pixels
    np.testing.assert_allclose(ref, [[0.11 / 0.6, 0.11 / 0.6, 0.41 / 0.6, 0.41 / 0.6]], atol=1e-6)


def test_a_crop_without_boxes_is_dropped_and_left_out_of_the_batch(monkeypatch):
    """The reference drops such a sample; the transform flags it and brings the whole image instead, which
    the collate uses only where a batch would otherwise have fewer than 2 images."""
    monkeypatch.setattr(T, "expand", lambda image, boxes, rng, fill: (image, boxes))
    monkeypatch.setattr(T, "accepted_windows", lambda boxes, rng, samplers: [np.array([0.6, 0.6, 0.9, 0.9])])
    image = Image.new("RGB", (20, 20), (0, 255, 0))
    box = np.array([[0.0, 0.0, 0.2, 0.2]], dtype=np.float32)
    sample = T.TrainTransform()(image, box, np.array([4]), np.array([False]), np.random.default_rng(0))
    assert sample.dropped and sample.labels.tolist() == [4] and sample.image.shape == (3, 300, 300)
    kept = T.TrainTransform()(image, np.array([[0.6, 0.6, 0.9, 0.9]], np.float32), np.array([4]),
                              np.array([False]), np.random.default_rng(0))
    assert not kept.dropped

    def samples(*dropped):
        return [Sample(i, torch.full((3, 2, 2), float(i)), torch.zeros(1, 4), torch.ones(1, dtype=torch.long),
                       torch.zeros(1, dtype=torch.bool), d) for i, d in enumerate(dropped)]

    batch = Collate(min_images=2)(samples(False, True, False, True))
    assert batch.indices == [0, 2] and batch.dropped == 2 and batch.images.shape[0] == 2
    batch = Collate(min_images=2)(samples(True, False, True, True))
    assert batch.indices == [0, 1] and batch.dropped == 2


# ---------------------------------------------------------------- resize, flip, network input
def test_resize_is_lanczos_in_training_and_testing():
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    lanczos = np.asarray(image.resize((300, 300), Image.LANCZOS))
    assert not np.array_equal(lanczos, np.asarray(image.resize((300, 300), Image.BILINEAR)))
    x = T.EvalTransform()(image, np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, bool)).image
    torch.testing.assert_close(x, T.to_network_input(lanczos))
    light = T.LightTrainTransform(distortion=T.DistortionSettings(prob=0.0))
    y = light(image, np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, bool), np.random.default_rng(0)).image
    assert torch.equal(y, x) or torch.equal(y, x.flip(-1))


def test_flip_half_the_time_after_resize():
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    box = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    tf = T.LightTrainTransform(size=20, distortion=T.DistortionSettings(prob=0.0))
    flipped = 0
    for seed in range(400):
        out = tf(image, box, np.array([1]), np.array([False]), np.random.default_rng(seed))
        if out.boxes[0, 0] > 0.5:
            flipped += 1
            torch.testing.assert_close(out.boxes, torch.tensor([[0.7, 0.2, 0.9, 0.4]]))
    assert _within(flipped / 400, 0.5, 400)


def test_network_input_is_bgr_minus_the_mean_times_0_007843():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0] = 255                       # red
    x = T.to_network_input(image, mean_bgr=(100.0, 110.0, 120.0))
    assert x.shape == (3, 2, 3)
    torch.testing.assert_close(x[0], torch.full((2, 3), -100.0 * 0.007843))
    torch.testing.assert_close(x[2], torch.full((2, 3), (255.0 - 120.0) * 0.007843))


@pytest.mark.parametrize("seed", range(30))
def test_geometric_augmentation_keeps_boxes_on_their_pixels(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
    pixels = np.full((h, w, 3), 90, dtype=np.uint8)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x1, y1 = int(rng.integers(x0 + 40, w + 1)), int(rng.integers(y0 + 40, h + 1))
    pixels[y0:y1, x0:x1] = (255, 0, 255)
    box = np.array([[x0 / w, y0 / h, x1 / w, y1 / h]], dtype=np.float32)
    out, boxes, labels, _, _ = T.TrainTransform().geometric(
        Image.fromarray(pixels), box, np.array([1]), np.array([False]), np.random.default_rng(1000 + seed))
    out = np.asarray(out)
    assert out.shape == (300, 300, 3) and boxes.shape == (1, 4) and labels.tolist() == [1]
    magenta = (out[..., 0] > 200) & (out[..., 1] < 60) & (out[..., 2] > 200)
    bx0, by0, bx1, by1 = (boxes[0] * 300).tolist()
    inner = magenta[int(np.ceil(by0)) + 3:int(by1) - 3, int(np.ceil(bx0)) + 3:int(bx1) - 3]
    assert inner.size == 0 or inner.all(), "box interior is not the box colour"
    outside = magenta.copy()
    outside[max(0, int(by0) - 3):int(np.ceil(by1)) + 3, max(0, int(bx0) - 3):int(np.ceil(bx1)) + 3] = False
    assert not outside.any(), "box colour outside the box"


def test_augmentation_is_a_function_of_the_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    box = np.array([[0.2, 0.2, 0.7, 0.9]], dtype=np.float32)
    a, b = (T.TrainTransform()(image, box, np.array([3]), np.array([True]), np.random.default_rng(5))
            for _ in range(2))
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
