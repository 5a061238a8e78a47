"""The reference's training augmentation and test-time transform (reference-semantics sections 5 and 8).

Training, in order: photometric distortion, expand, SSD crop, resize to 300x300 (Lanczos), horizontal
flip; then every image becomes BGR ``(pixel - mean) * 0.007843``. Images stay PIL RGB (8 bit, as the
reference's PIL pipeline) until ``to_network_input``; boxes are normalised xmin, ymin, xmax, ymax.
Every random choice comes from the numpy Generator passed in, so a sample is a function of its seed.

One deliberate difference, on by default (``TrainTransform(reference_boxes=False)``): after a crop the
reference maps the boxes with the unrounded crop window while it cuts the pixels at truncated integer
positions, so boxes can be off by up to one source pixel (several output pixels for a small crop of a
small image); here the boxes follow the pixels actually kept. ``reference_boxes=True`` (``--augment
reference``) restores the reference's mapping, and its expand fill in B, G, R order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

IMAGE_SIZE = 300
MEAN_BGR = (127.5, 127.5, 127.5)
PIXEL_SCALE = 0.007843
RESAMPLE = Image.LANCZOS   # PIL's antialiasing filter, the reference's Image.ANTIALIAS


# ---------------------------------------------------------------- photometric distortion
@dataclass(frozen=True)
class DistortionSettings:
    """Each step runs with probability ``prob``; factors are drawn in 1 +- delta, the hue shift in +-delta."""

    prob: float = 0.5
    brightness_delta: float = 0.125
    contrast_delta: float = 0.5
    saturation_delta: float = 0.5
    hue_delta: float = 18.0      # units of PIL's 8-bit hue channel (0-255 is the full circle)


DISTORTION = DistortionSettings()
ORDER_CONTRAST_SECOND = ("brightness", "contrast", "saturation", "hue")
ORDER_CONTRAST_LAST = ("brightness", "saturation", "hue", "contrast")


@dataclass(frozen=True)
class Distortion:
    """One draw of the photometric distortion: the order and each step's value (absent: skipped)."""

    order: tuple[str, ...]
    values: dict[str, float] = field(default_factory=dict)


def draw_distortion(rng: np.random.Generator, settings: DistortionSettings = DISTORTION) -> Distortion:
    """The reference's draws: the order (1/2 each), then per step an apply-or-not and its value."""
    order = ORDER_CONTRAST_SECOND if rng.uniform(0.0, 1.0) > 0.5 else ORDER_CONTRAST_LAST
    deltas = {"brightness": settings.brightness_delta, "contrast": settings.contrast_delta,
              "saturation": settings.saturation_delta, "hue": settings.hue_delta}
    values = {}
    for step in order:
        if rng.uniform(0.0, 1.0) < settings.prob:
            shift = rng.uniform(-deltas[step], deltas[step])
            values[step] = shift if step == "hue" else 1.0 + shift
    return Distortion(order, values)


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Add ``shift`` to the hue of PIL's 8-bit HSV image. The reference stores ``hue + shift`` back into
    the uint8 array: truncation toward zero, then wrap-around modulo 256 (hue is circular)."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = np.mod(np.trunc(hsv[..., 0] + shift), 256).astype(np.uint8)
    return Image.frombytes("HSV", image.size, hsv.tobytes()).convert("RGB")


_ENHANCERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}


def apply_distortion(image: Image.Image, distortion: Distortion) -> Image.Image:
    """Brightness, contrast and saturation multiply by their factor (PIL ImageEnhance: blends with black,
    with the mean grey, with the greyscale image); hue shifts. Each step rounds to 8 bit, as the reference."""
    for step in distortion.order:
        if step not in distortion.values:
            continue
        value = distortion.values[step]
        image = shift_hue(image, value) if step == "hue" else _ENHANCERS[step](image).enhance(value)
    return image


def photometric_distort(image: Image.Image, rng: np.random.Generator,
                        settings: DistortionSettings = DISTORTION) -> Image.Image:
    return apply_distortion(image, draw_distortion(rng, settings))


# ---------------------------------------------------------------- expand
def expand_fill(mean_bgr=MEAN_BGR, reference_order: bool = False) -> tuple[int, int, int]:
    """The canvas colour: the mean cast to uint8 (127.5 -> 127), per RGB channel. The reference fills
    the RGB canvas with the B, G, R values in that order (the same thing when the three are equal)."""
    mean = tuple(mean_bgr) if reference_order else tuple(mean_bgr)[::-1]
    return tuple(int(np.uint8(v)) for v in mean)


def expand(image: Image.Image, boxes: np.ndarray, rng: np.random.Generator, fill=(127, 127, 127),
           prob: float = 0.5, max_ratio: float = 4.0):
    """With probability ``prob``: paste the image at a random integer offset of a canvas ``ratio`` times
    larger (ratio uniform in [1, max_ratio]) filled with ``fill``."""
    if rng.uniform(0.0, 1.0) >= prob or max_ratio - 1.0 < 0.01:
        return image, boxes
    ratio = rng.uniform(1.0, max_ratio)
    w, h = image.size
    new_w, new_h = int(w * ratio), int(h * ratio)
    top = math.floor(rng.uniform(0, new_h - h))
    left = math.floor(rng.uniform(0, new_w - w))
    canvas = Image.new("RGB", (new_w, new_h), tuple(fill))
    canvas.paste(image, (left, top))
    scale = np.array([w / new_w, h / new_h, w / new_w, h / new_h], dtype=np.float32)
    shift = np.array([left / new_w, top / new_h, left / new_w, top / new_h], dtype=np.float32)
    return canvas, (boxes * scale + shift).astype(np.float32)


# ---------------------------------------------------------------- SSD crop
@dataclass(frozen=True)
class CropSampler:
    """A crop window generator. A window is accepted when its IoU with at least one box lies within
    [min_iou, max_iou] (an absent bound does not constrain); with neither bound it always is."""

    max_trials: int
    min_scale: float
    max_scale: float
    min_aspect: float
    max_aspect: float
    min_iou: float | None = None
    max_iou: float | None = None

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A window [xmin, ymin, xmax, ymax] inside the image. The aspect ratio is drawn in
        [min_aspect, max_aspect] and then clamped to [scale^2, 1/scale^2] (so width and height are <= 1)."""
        scale = rng.uniform(self.min_scale, self.max_scale)
        aspect = rng.uniform(self.min_aspect, self.max_aspect)
        aspect = min(max(aspect, scale ** 2), 1.0 / scale ** 2)
        width, height = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
        # max(0, .): scale * sqrt(1 / scale^2) can round to just above 1
        xmin = rng.uniform(0.0, max(0.0, 1.0 - width))
        ymin = rng.uniform(0.0, max(0.0, 1.0 - height))
        return np.array([xmin, ymin, xmin + width, ymin + height], dtype=np.float64)

    def accepts(self, window: np.ndarray, boxes: np.ndarray) -> bool:
        if self.min_iou is None and self.max_iou is None:
            return True
        iou = box_iou(window, boxes)
        ok = np.ones_like(iou, dtype=bool)
        if self.min_iou is not None:
            ok &= iou >= self.min_iou
        if self.max_iou is not None:
            ok &= iou <= self.max_iou
        return bool(ok.any())

    def sample(self, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """The first accepted window of up to ``max_trials`` draws (the reference keeps one per sampler)."""
        for _ in range(self.max_trials):
            window = self.draw(rng)
            if self.accepts(window, boxes):
                return window
        return None


# The whole image, then six samplers with scale 0.3-1 and aspect 0.5-2: a minimum IoU of 0.1 ... 0.9
# with some box, and one that only asks for an IoU <= 1 with some box (any image that has a box).
SSD_SAMPLERS = (
    CropSampler(1, 1.0, 1.0, 1.0, 1.0),
    *(CropSampler(50, 0.3, 1.0, 0.5, 2.0, min_iou=iou) for iou in (0.1, 0.3, 0.5, 0.7, 0.9)),
    CropSampler(50, 0.3, 1.0, 0.5, 2.0, max_iou=1.0),
)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` (normalised coordinates, no +1 term)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def accepted_windows(boxes: np.ndarray, rng: np.random.Generator, samplers=SSD_SAMPLERS) -> list[np.ndarray]:
    return [w for w in (s.sample(boxes, rng) for s in samplers) if w is not None]


def project_boxes(boxes: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mask [K] of the boxes whose centre lies in ``window`` (bounds included) and still have an area once
    projected into it and clipped, and those projected boxes [kept, 4]."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    inside = np.all((centres >= window[:2]) & (centres <= window[2:]), axis=1)
    size = window[2:] - window[:2]
    projected = np.clip((boxes - np.tile(window[:2], 2)) / np.tile(size, 2), 0.0, 1.0)
    has_area = (projected[:, 2] > projected[:, 0]) & (projected[:, 3] > projected[:, 1])
    keep = inside & has_area
    return keep, projected[keep].astype(np.float32)


def crop(image: Image.Image, boxes, labels, difficult, window: np.ndarray, reference_boxes: bool = False):
    """Cut ``window`` (normalised) out of the image at truncated pixel positions, as the reference;
    keep the boxes whose centre lies in it. The boxes are mapped to the pixels kept, or (with
    ``reference_boxes``) to the unrounded window as the reference does."""
    window = np.clip(window, 0.0, 1.0)
    w, h = image.size
    x0, y0 = int(window[0] * w), int(window[1] * h)
    x1, y1 = max(int(window[2] * w), x0 + 1), max(int(window[3] * h), y0 + 1)
    region = window if reference_boxes else np.array([x0 / w, y0 / h, x1 / w, y1 / h])
    keep, kept = project_boxes(boxes, region)
    return image.crop((x0, y0, x1, y1)), kept, labels[keep], difficult[keep]


# ---------------------------------------------------------------- flip, resize, network input
def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return flipped


def resize(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """To ``size`` x ``size`` with Lanczos (train, test and infer, as the reference)."""
    return image.resize((size, size), RESAMPLE)


def to_network_input(image, mean_bgr=MEAN_BGR) -> torch.Tensor:
    """An RGB image (PIL or HWC uint8) -> CHW float32 BGR, ``(pixel - mean) * 0.007843``."""
    bgr = np.asarray(image, dtype=np.float32)[..., ::-1]
    normalised = (bgr - np.asarray(mean_bgr, dtype=np.float32)) * np.float32(PIXEL_SCALE)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


class Transformed(NamedTuple):
    image: torch.Tensor      # [3, H, W] network input
    boxes: torch.Tensor      # [K, 4] normalised
    labels: torch.Tensor     # [K] int64
    difficult: torch.Tensor  # [K] bool
    dropped: bool            # the reference would drop this sample (its crop kept no box)


def _tensors(image, boxes, labels, difficult, mean_bgr, dropped: bool = False) -> Transformed:
    return Transformed(to_network_input(image, mean_bgr),
                       torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)),
                       torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                       torch.from_numpy(np.asarray(difficult, dtype=bool)), dropped)


class TrainTransform:
    """The reference training augmentation: distort, expand, SSD crop, resize, flip, normalise.

    An image whose crop keeps no box is dropped by the reference. Here the sample comes back with
    ``dropped=True`` and, in place of the crop, the whole (expanded) image, so that the batch collate can
    leave it out, or use it where leaving it out would leave a batch too small for batch norm.
    """

    def __init__(self, size: int = IMAGE_SIZE, mean_bgr=MEAN_BGR, reference_boxes: bool = False,
                 distortion: DistortionSettings = DISTORTION, samplers=SSD_SAMPLERS):
        self.size, self.mean_bgr = size, tuple(mean_bgr)
        self.reference_boxes = reference_boxes
        self.distortion, self.samplers = distortion, samplers
        self.fill = expand_fill(mean_bgr, reference_order=reference_boxes)

    def geometric(self, image: Image.Image, boxes, labels, difficult, rng):
        """Expand, crop, resize and flip: (image, boxes, labels, difficult, dropped)."""
        image, boxes = expand(image, boxes, rng, self.fill)
        windows = accepted_windows(boxes, rng, self.samplers)
        dropped = False
        if windows:
            window = windows[int(rng.uniform(0, len(windows)))]
            cropped = crop(image, boxes, labels, difficult, window, self.reference_boxes)
            if len(cropped[1]):
                image, boxes, labels, difficult = cropped
            else:
                dropped = True
        image = resize(image, self.size)
        if int(rng.uniform(0, 2)) == 1:
            image, boxes = image.transpose(Image.FLIP_LEFT_RIGHT), flip_boxes(boxes)
        return image, boxes, labels, difficult, dropped

    def __call__(self, image: Image.Image, boxes, labels, difficult, rng) -> Transformed:
        image = photometric_distort(image, rng, self.distortion)
        *sample, dropped = self.geometric(image, boxes, labels, difficult, rng)
        return _tensors(*sample, self.mean_bgr, dropped)


class LightTrainTransform:
    """Photometric distortion, resize and flip only (``--augment light``, for short runs on easy data)."""

    def __init__(self, size: int = IMAGE_SIZE, mean_bgr=MEAN_BGR, distortion: DistortionSettings = DISTORTION):
        self.size, self.mean_bgr, self.distortion = size, tuple(mean_bgr), distortion

    def __call__(self, image: Image.Image, boxes, labels, difficult, rng) -> Transformed:
        image = resize(photometric_distort(image, rng, self.distortion), self.size)
        if int(rng.uniform(0, 2)) == 1:
            image, boxes = image.transpose(Image.FLIP_LEFT_RIGHT), flip_boxes(boxes)
        return _tensors(image, boxes, labels, difficult, self.mean_bgr)


class EvalTransform:
    """Resize (Lanczos) and normalise; boxes unchanged (they are normalised already)."""

    def __init__(self, size: int = IMAGE_SIZE, mean_bgr=MEAN_BGR):
        self.size, self.mean_bgr = size, tuple(mean_bgr)

    def __call__(self, image: Image.Image, boxes, labels, difficult, rng=None) -> Transformed:
        return _tensors(resize(image, self.size), boxes, labels, difficult, self.mean_bgr)
