"""Detection output (reference-semantics section 4): softmax, decode, per-class NMS, top-k.

Per image and per foreground class: keep scores > score_threshold, take the nms_top_k best, greedy NMS
(a box is dropped when its IoU with a kept, higher-scoring box of the same class exceeds nms_threshold),
then keep the keep_top_k best of all classes. Boxes are decoded but not clipped (as the reference; the
metric clips). Equal scores keep prior order (stable sorts, as the reference's stable_sort).

NMS runs on (image, class) rows of K <= nms_top_k candidates, many rows at once. Each round takes the
best undecided candidate of every row (it is kept: nothing undecided scores higher) and drops what it
overlaps, so IoU is computed only against kept boxes (as torchvision's CPU kernel), and the number of
rounds is the largest number of boxes kept in a row, not K. Rows are grouped so that each step stays
below PyTorch's parallel grain: the many small steps then never pay for waking OpenMP threads, which
costs most on a busy machine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .box_utils import box_area, decode
from .priors import VARIANCES

# Elements per NMS step (rows x candidates); at or below PyTorch's parallel grain (32768).
LOOP_STEP_ELEMENTS = 32768


def greedy_nms(boxes: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS on rows of candidates sorted by descending score.

    boxes [B, K, 4] corner boxes, valid [B, K] bool (candidates to consider) -> keep [B, K] bool:
    candidate i is kept when valid and no kept candidate j < i has IoU(j, i) > threshold.
    The overlap test is division-free: IoU > t <=> (1 + t) * inter > t * (area_i + area_j) for any
    non-negative union; x is pre-scaled by (1 + t) so the widths already carry that factor.
    """
    num_rows, count = boxes.shape[:2]
    # One spare candidate per row (an empty box, never undecided): finished rows point there, so every
    # update is a plain gather / scatter along dim 1 (much cheaper than (row, column) indexing).
    boxes = torch.cat([boxes, boxes.new_zeros(num_rows, 1, 4)], dim=1)
    undecided = torch.cat([valid, valid.new_zeros(num_rows, 1)], dim=1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, x2 = x1 * (1.0 + threshold), x2 * (1.0 + threshold)
    scaled_area = box_area(boxes) * threshold
    features = torch.stack([x1, y1, x2, y2, scaled_area], dim=-1)  # one gather per round
    keep = torch.zeros_like(undecided)
    spare = torch.full((num_rows, 1), count, dtype=torch.long, device=boxes.device)
    start = 0  # every position before `start` is decided in every row: the rounds skip those columns
    for _ in range(count):
        window = undecided[:, start:]
        first = window.view(torch.uint8).argmax(dim=1, keepdim=True) + start  # best undecided per row
        first = torch.where(undecided.gather(1, first), first, spare)
        start = int(first.min())
        if start == count:  # every row finished
            break
        keep.scatter_(1, first, True)
        undecided.scatter_(1, first, False)  # also covers a zero-area box, which does not overlap itself
        bx1, by1, bx2, by2, barea = features.gather(1, first[..., None].expand(-1, 1, 5)).unbind(-1)
        window = undecided[:, start:]
        wx1, wy1, wx2, wy2, warea = (v[:, start:] for v in (x1, y1, x2, y2, scaled_area))
        width = torch.minimum(wx2, bx2).sub_(torch.maximum(wx1, bx1)).clamp_(min=0)
        # Height is left unclamped: when negative the product is <= 0, which never suppresses, as 0 would.
        height = torch.minimum(wy2, by2).sub_(torch.maximum(wy1, by1))
        window &= width.mul_(height) <= warea + barea
    return keep[:, :count]


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
    rows_boxes = candidate_boxes.reshape(-1, k_used, 4)
    rows_valid = valid.reshape(-1, k_used)
    rows_per_group = max(1, LOOP_STEP_ELEMENTS // k_used)
    keep = torch.cat([greedy_nms(rows_boxes[start:start + rows_per_group], rows_valid[start:start + rows_per_group],
                                 nms_threshold)
                      for start in range(0, rows_valid.shape[0], rows_per_group)]).reshape(batch, num_fg, k_used)

    # Gather the kept rows of all images at once; rows stay class-major within each image.
    labels = classes.to(boxes.dtype)[None, :, None].expand(batch, num_fg, k_used)
    flat_kept = keep.reshape(-1).nonzero().squeeze(1)
    kept_rows = torch.cat([labels.reshape(-1, 1), top_scores.reshape(-1, 1), candidate_boxes.reshape(-1, 4)],
                          dim=1).index_select(0, flat_kept)
    per_image = torch.bincount(flat_kept // (num_fg * k_used), minlength=batch).tolist()
    detections = []
    for rows in kept_rows.split(per_image):
        # Among equal scores the lower class stays first (stable sort over class-major rows).
        best = rows[:, 1].sort(descending=True, stable=True).indices[:keep_top_k]
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
