"""Detection output (reference-semantics section 4): softmax, decode, per-class NMS, top-k.

Per image and per foreground class: keep scores > score_threshold, take the nms_top_k best, greedy NMS
(a box is dropped when its IoU with a kept, higher-scoring box of the same class exceeds nms_threshold),
then keep the keep_top_k best of all classes. Boxes are decoded but not clipped (as the reference; the
metric clips). Equal scores keep prior order (stable sorts, as the reference's stable_sort).

All (image, class) pairs of a chunk of images run through NMS together: one [B, K, K] suppression
matrix (K <= nms_top_k) and one loop over the K candidate positions, shared by the B rows.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .box_utils import box_area, decode
from .priors import VARIANCES

# Images per NMS chunk: bounds the [chunk * classes, K, K] boolean suppression matrix (~26 MB at 8 x 20 x 400^2).
IMAGES_PER_CHUNK = 8


def suppression_matrix(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, K, 4] -> symmetric bool [B, K, K], entry [b, i, j] true when IoU(box i, box j) > threshold.

    Division-free: IoU > t  <=>  inter > t * (area_i + area_j - inter)  <=>  (1 + t) * inter >
    t * (area_i + area_j), for any non-negative union (an empty union gives IoU 0 and false here too).
    In-place steps keep the number of [B, K, K] temporaries small: this is the costly part of NMS.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    inter = torch.minimum(x2[:, :, None], x2[:, None, :])
    inter -= torch.maximum(x1[:, :, None], x1[:, None, :])
    inter.clamp_(min=0)
    height = torch.minimum(y2[:, :, None], y2[:, None, :])
    height -= torch.maximum(y1[:, :, None], y1[:, None, :])
    inter *= height.clamp_(min=0)
    area = box_area(boxes)
    area_sum = torch.add(area[:, :, None], area[:, None, :], out=height)
    return inter.mul_(1.0 + threshold) > area_sum.mul_(threshold)


def greedy_nms_keep(suppresses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Greedy NMS over rows of candidates sorted by descending score.

    suppresses [B, K, K] symmetric bool (see suppression_matrix), valid [B, K] bool (candidates to
    consider) -> keep [B, K]: candidate i is kept when valid and no kept candidate j < i suppresses it.
    The loop runs over the K positions once, each step a vector operation across all B rows.
    """
    keep = valid.clone()
    for i in range(1, suppresses.shape[1]):
        keep[:, i] &= ~(keep[:, :i] & suppresses[:, i, :i]).any(dim=1)
    return keep


def _top_candidates(scores: torch.Tensor, top_k: int, background_label: int):
    """scores [N, P, C] -> (class ids [C'], top scores [N, C', k], prior indices [N, C', k])."""
    num_classes = scores.shape[-1]
    classes = torch.tensor([c for c in range(num_classes) if c != background_label], device=scores.device)
    class_scores = scores.index_select(-1, classes).transpose(1, 2)  # [N, C', P]
    k = min(top_k, scores.shape[1])
    # Stable sort: among equal scores the earlier prior comes first, as the reference.
    sorted_scores, order = class_scores.sort(dim=-1, descending=True, stable=True)
    return classes, sorted_scores[..., :k], order[..., :k]


def batched_multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    nms_top_k: int = 400,
    keep_top_k: int = 200,
    background_label: int = 0,
) -> list[torch.Tensor]:
    """Decoded boxes [N, P, 4] and class probabilities [N, P, C] -> per-image detections [K, 6].

    Rows are (label, score, xmin, ymin, xmax, ymax), best score first.
    """
    batch, num_priors, num_classes = scores.shape
    if num_classes <= 1 or num_priors == 0:
        return [boxes.new_zeros((0, 6)) for _ in range(batch)]
    classes, top_scores, top_index = _top_candidates(scores, nms_top_k, background_label)
    num_fg, k = top_scores.shape[1:]
    valid = top_scores > score_threshold
    # Candidates beyond the last valid position in every row need no NMS at all.
    k_used = int(valid.sum(dim=-1).max()) if valid.numel() else 0
    if k_used == 0:
        return [boxes.new_zeros((0, 6)) for _ in range(batch)]
    top_scores, top_index, valid = top_scores[..., :k_used], top_index[..., :k_used], valid[..., :k_used]
    candidate_boxes = torch.gather(boxes[:, None].expand(batch, num_fg, num_priors, 4), 2,
                                   top_index[..., None].expand(batch, num_fg, k_used, 4))  # [N, C', k, 4]
    keep = torch.zeros_like(valid)
    for start in range(0, batch, IMAGES_PER_CHUNK):
        images = range(start, min(start + IMAGES_PER_CHUNK, batch))
        # One image at a time for the matrix (its temporaries stay small), all rows of the chunk at once
        # for the sequential keep loop (its cost is per step, not per row).
        suppresses = torch.cat([suppression_matrix(candidate_boxes[i], nms_threshold) for i in images])
        chunk_valid = valid[images.start:images.stop].reshape(-1, k_used)
        keep[images.start:images.stop] = greedy_nms_keep(suppresses, chunk_valid).reshape(-1, num_fg, k_used)

    labels = classes.to(boxes.dtype)[:, None].expand(num_fg, k_used)
    detections = []
    for image in range(batch):
        kept = keep[image]
        kept_scores = top_scores[image][kept]
        rows = torch.cat([labels[kept][:, None], kept_scores[:, None], candidate_boxes[image][kept]], dim=1)
        # Rows are class-major, so among equal scores the lower class stays first (stable sort).
        best = kept_scores.sort(descending=True, stable=True).indices[:keep_top_k]
        detections.append(rows[best])
    return detections


def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
    """One image: boxes [P, 4], class probabilities [P, C] -> detections [K, 6]."""
    return batched_multiclass_nms(boxes[None], scores[None], **kwargs)[0]


@torch.no_grad()
def detection_output(
    locs: torch.Tensor,
    confs: torch.Tensor,
    priors: torch.Tensor,
    variances: Sequence[float] = VARIANCES,
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    nms_top_k: int = 400,
    keep_top_k: int = 200,
    background_label: int = 0,
) -> list[torch.Tensor]:
    """Model logits locs [N, P, 4], confs [N, P, C] -> per-image detections [K, 6], best score first.

    Rows are (label, score, xmin, ymin, xmax, ymax), coordinates normalised and unclipped.
    """
    if locs.dim() != 3 or locs.shape[-1] != 4 or confs.dim() != 3 or confs.shape[:2] != locs.shape[:2]:
        raise ValueError(f"expected locs [N, P, 4] and confs [N, P, C]; got {tuple(locs.shape)} and {tuple(confs.shape)}")
    if tuple(priors.shape) != (locs.shape[1], 4):
        raise ValueError(f"{locs.shape[1]} predictions per image but priors of shape {tuple(priors.shape)}")
    boxes = decode(locs.float(), priors.to(locs.device, torch.float32), variances)
    scores = torch.softmax(confs.float(), dim=-1)
    return batched_multiclass_nms(boxes, scores, score_threshold, nms_threshold, nms_top_k, keep_top_k,
                                  background_label)


class DetectionOutput(torch.nn.Module):
    """Module form of detection_output holding the priors (moves with .to(device))."""

    def __init__(self, priors: torch.Tensor, variances: Sequence[float] = VARIANCES, score_threshold: float = 0.01,
                 nms_threshold: float = 0.45, nms_top_k: int = 400, keep_top_k: int = 200, background_label: int = 0):
        super().__init__()
        self.register_buffer("priors", priors.clone(), persistent=False)
        self.variances = tuple(variances)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.nms_top_k = nms_top_k
        self.keep_top_k = keep_top_k
        self.background_label = background_label

    def forward(self, locs: torch.Tensor, confs: torch.Tensor) -> list[torch.Tensor]:
        return detection_output(locs, confs, self.priors, self.variances, self.score_threshold, self.nms_threshold,
                                self.nms_top_k, self.keep_top_k, self.background_label)
