"""Box geometry shared by matching, the loss, the detection output and the metric.

Boxes are (xmin, ymin, xmax, ymax) in normalised coordinates unless a name says "center" (cx, cy, w, h).
IoU uses no +1 pixel term (normalised coordinates, as the reference does).
"""
from __future__ import annotations

from typing import Sequence

import torch


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """(xmin, ymin, xmax, ymax) -> (cx, cy, w, h) over the last dimension."""
    mins, maxs = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(mins + maxs) / 2, maxs - mins], dim=-1)


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (xmin, ymin, xmax, ymax) over the last dimension."""
    centres, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([centres - half, centres + half], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box; inverted boxes count as empty rather than negative."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: [..., A, 4] x [..., B, 4] -> [..., A, B]. Empty unions give 0, never NaN."""
    top_left = torch.maximum(boxes_a[..., :, None, :2], boxes_b[..., None, :, :2])
    bottom_right = torch.minimum(boxes_a[..., :, None, 2:], boxes_b[..., None, :, 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(boxes_a)[..., :, None] + box_area(boxes_b)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def _variance_tensor(variances: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(variances, dtype=like.dtype, device=like.device)


def encode(boxes: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Centre-size encoding of corner boxes against corner priors (broadcasting), -> offsets [..., 4]."""
    box_c = corners_to_center(boxes)
    prior_c = corners_to_center(priors)
    var = _variance_tensor(variances, boxes)
    centre = (box_c[..., :2] - prior_c[..., :2]) / prior_c[..., 2:] / var[:2]
    size = torch.log(box_c[..., 2:] / prior_c[..., 2:]) / var[2:]
    return torch.cat([centre, size], dim=-1)


def decode(offsets: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Inverse of encode: offsets [..., 4] against corner priors -> corner boxes [..., 4]."""
    prior_c = corners_to_center(priors)
    var = _variance_tensor(variances, offsets)
    centre = prior_c[..., :2] + offsets[..., :2] * var[:2] * prior_c[..., 2:]
    size = prior_c[..., 2:] * torch.exp(offsets[..., 2:] * var[2:])
    return center_to_corners(torch.cat([centre, size], dim=-1))
