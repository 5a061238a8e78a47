"""Prior (default) boxes of MobileNet-v1-SSD 300x300, in the reference order.

Layout (reference-semantics section 4): six feature maps 19, 10, 5, 3, 2, 1; per location the priors are
the min-size square (ratio 1), then each aspect ratio and its flip (2, 1/2, 3, 1/3), then the
sqrt(min * max) square when the map has a max size. Boxes are (xmin, ymin, xmax, ymax) normalised by the
image size and deliberately not clipped (the reference does not clip them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FEATURE_MAP_SIZES = (19, 10, 5, 3, 2, 1)
MIN_SIZES = (60.0, 105.0, 150.0, 195.0, 240.0, 285.0)
MAX_SIZES = (None, 150.0, 195.0, 240.0, 285.0, 300.0)
ASPECT_RATIOS = ((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0))
# Centre-size encoding divides centre offsets by 0.1 and log size ratios by 0.2.
VARIANCES = (0.1, 0.1, 0.2, 0.2)


@dataclass(frozen=True)
class PriorSpec:
    """One feature map's prior settings (sizes in pixels of the input image)."""

    map_size: int
    min_size: float
    max_size: float | None
    aspect_ratios: tuple[float, ...]

    def box_shapes(self) -> list[tuple[float, float]]:
        """(width, height) in pixels of each prior at one location, in the reference order."""
        shapes = [(self.min_size, self.min_size)]
        for ratio in self.aspect_ratios:
            root = math.sqrt(ratio)
            shapes.append((self.min_size * root, self.min_size / root))
            shapes.append((self.min_size / root, self.min_size * root))  # the flipped ratio 1/ratio
        if self.max_size is not None:
            side = math.sqrt(self.min_size * self.max_size)
            shapes.append((side, side))
        return shapes


def default_specs() -> list[PriorSpec]:
    return [
        PriorSpec(size, min_size, max_size, ratios)
        for size, min_size, max_size, ratios in zip(FEATURE_MAP_SIZES, MIN_SIZES, MAX_SIZES, ASPECT_RATIOS)
    ]


def priors_per_location(specs: list[PriorSpec] | None = None) -> list[int]:
    """Number of priors at each location of each feature map: [3, 6, 6, 6, 6, 6] by default."""
    return [len(spec.box_shapes()) for spec in (specs or default_specs())]


def prior_boxes(image_size: int = 300, specs: list[PriorSpec] | None = None) -> torch.Tensor:
    """All priors as a float32 tensor [P, 4] (1917 by default), ordered map, row y, column x, prior."""
    per_map = []
    for spec in specs or default_specs():
        step = image_size / spec.map_size
        centres = (torch.arange(spec.map_size, dtype=torch.float64) + 0.5) * step
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # row-major: y outer, x inner
        cx = cx.reshape(-1, 1)
        cy = cy.reshape(-1, 1)
        shapes = torch.tensor(spec.box_shapes(), dtype=torch.float64)  # [A, 2]
        half_w = shapes[:, 0].reshape(1, -1) / 2
        half_h = shapes[:, 1].reshape(1, -1) / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)  # [H*W, A, 4]
        per_map.append(boxes.reshape(-1, 4) / image_size)
    return torch.cat(per_map).to(torch.float32)
