"""SSD augmentation (the reference's training pipeline) and the test-time transform, numpy/PIL based.

Every random choice comes from the ``rng`` (a numpy Generator) passed in, so a sample is reproducible.
Boxes are normalised xmin, ymin, xmax, ymax; images are HWC uint8 RGB until ``to_network_input``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 300
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.007843


# ---------------------------------------------------------------- photometric distortion
def _blend(image: np.ndarray, factor: float, other) -> np.ndarray:
    return np.clip(other + factor * (image - other), 0.0, 255.0)


def _grey(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def random_brightness(image, rng, delta=32.0):
    return np.clip(image + rng.uniform(-delta, delta), 0.0, 255.0)


def random_contrast(image, rng, low=0.5, high=1.5):
    return _blend(image, rng.uniform(low, high), _grey(image).mean())


def random_saturation(image, rng, low=0.5, high=1.5):
    return _blend(image, rng.uniform(low, high), _grey(image)[..., None])


def random_hue(image, rng, delta_degrees=18.0):
    hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).copy()
    shift = int(round(rng.uniform(-delta_degrees, delta_degrees) / 360.0 * 256.0))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"), dtype=np.float32)


def photometric_distort(image: np.ndarray, rng, prob: float = 0.5) -> np.ndarray:
    """Brightness, contrast, saturation, hue, each applied with probability ``prob``."""
    out = image.astype(np.float32)
    for op in (random_brightness, random_contrast, random_saturation, random_hue):
        if rng.random() < prob:
            out = op(out, rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- geometric ops
def expand(image, boxes, rng, prob=0.5, max_ratio=4.0, fill=PIXEL_MEAN):
    """Place the image at a random spot of a canvas up to ``max_ratio`` times larger, filled with the mean."""
    if rng.random() >= prob:
        return image, boxes
    ratio = rng.uniform(1.0, max_ratio)
    h, w = image.shape[:2]
    new_h, new_w = int(h * ratio), int(w * ratio)
    top = int(rng.integers(0, new_h - h + 1))
    left = int(rng.integers(0, new_w - w + 1))
    canvas = np.full((new_h, new_w, image.shape[2]), int(round(fill)), dtype=image.dtype)
    canvas[top:top + h, left:left + w] = image
    scale = np.array([w / new_w, h / new_h, w / new_w, h / new_h], dtype=np.float32)
    shift = np.array([left / new_w, top / new_h, left / new_w, top / new_h], dtype=np.float32)
    return canvas, boxes * scale + shift


@dataclass(frozen=True)
class CropSampler:
    max_trials: int
    min_scale: float
    max_scale: float
    min_aspect: float
    max_aspect: float
    min_iou: float
    max_iou: float

    def constrained(self) -> bool:
        return self.min_iou > 0.0 or self.max_iou < 1.0


# One whole-image sampler, then six with scale 0.3-1.0, aspect 0.5-2.0 and a minimum IoU with some object.
SSD_SAMPLERS = (
    CropSampler(1, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0),
    *(CropSampler(50, 0.3, 1.0, 0.5, 2.0, min_iou, 1.0) for min_iou in (0.1, 0.3, 0.5, 0.7, 0.9, 0.0)),
)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` (normalised coordinates, no +1 term)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def _sample_crop(sampler: CropSampler, boxes: np.ndarray, rng) -> np.ndarray | None:
    for _ in range(sampler.max_trials):
        scale = rng.uniform(sampler.min_scale, sampler.max_scale)
        # keep the crop inside the image: aspect limited by the scale (w = s*sqrt(a) <= 1, h = s/sqrt(a) <= 1)
        lo = max(sampler.min_aspect, scale * scale)
        hi = min(sampler.max_aspect, 1.0 / (scale * scale))
        aspect = rng.uniform(lo, hi)
        w, h = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
        x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        crop = np.array([x0, y0, x0 + w, y0 + h], dtype=np.float32)
        if not sampler.constrained():
            return crop
        if len(boxes):
            iou = box_iou(crop, boxes)
            if np.any((iou >= sampler.min_iou) & (iou <= sampler.max_iou)):
                return crop
    return None


def ssd_crop(image, boxes, labels, difficult, rng, samplers=SSD_SAMPLERS):
    """Pick one crop among those the samplers find; keep objects whose centre lies in it."""
    candidates = [c for c in (_sample_crop(s, boxes, rng) for s in samplers) if c is not None]
    if not candidates:
        return image, boxes, labels, difficult
    crop = candidates[int(rng.integers(len(candidates)))]
    h, w = image.shape[:2]
    px0, py0 = int(np.floor(crop[0] * w)), int(np.floor(crop[1] * h))
    px1, py1 = max(px0 + 1, int(np.ceil(crop[2] * w))), max(py0 + 1, int(np.ceil(crop[3] * h)))
    px1, py1 = min(px1, w), min(py1, h)
    # the pixel-aligned crop, so boxes stay consistent with the pixels
    crop = np.array([px0 / w, py0 / h, px1 / w, py1 / h], dtype=np.float32)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    keep = np.all((centres > crop[:2]) & (centres < crop[2:]), axis=1)
    if not keep.any():
        return image, boxes, labels, difficult
    size = crop[2:] - crop[:2]
    kept = boxes[keep].copy()
    kept[:, :2] = np.clip((kept[:, :2] - crop[:2]) / size, 0.0, 1.0)
    kept[:, 2:] = np.clip((kept[:, 2:] - crop[:2]) / size, 0.0, 1.0)
    return image[py0:py1, px0:px1], kept, labels[keep], difficult[keep]


def random_flip(image, boxes, rng, prob=0.5):
    if rng.random() >= prob:
        return image, boxes
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return image[:, ::-1], flipped


def resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR))


def to_network_input(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 BGR, ``(pixel - 127.5) * 0.007843`` as the reference."""
    bgr = image[..., ::-1].astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(((bgr - PIXEL_MEAN) * PIXEL_SCALE).transpose(2, 0, 1)))


def _as_tensors(image, boxes, labels, difficult):
    return (to_network_input(image), torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            torch.from_numpy(np.asarray(difficult, dtype=bool)))


class TrainTransform:
    """The reference training augmentation: distort, expand, SSD crop, flip, resize, normalise."""

    def __init__(self, size: int = IMAGE_SIZE, photometric: bool = True):
        self.size = size
        self.photometric = photometric

    def geometric(self, image, boxes, labels, difficult, rng):
        image, boxes = expand(image, boxes, rng)
        image, boxes, labels, difficult = ssd_crop(image, boxes, labels, difficult, rng)
        image, boxes = random_flip(image, boxes, rng)
        return resize(image, self.size), boxes, labels, difficult

    def __call__(self, image, boxes, labels, difficult, rng):
        if self.photometric:
            image = photometric_distort(image, rng)
        return _as_tensors(*self.geometric(image, boxes, labels, difficult, rng))


class EvalTransform:
    """Resize and normalise; boxes unchanged (they are normalised already)."""

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size

    def __call__(self, image, boxes, labels, difficult, rng=None):
        return _as_tensors(resize(image, self.size), boxes, labels, difficult)
