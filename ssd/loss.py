"""MultiBox loss with hard negative mining (reference-semantics section 4).

Per image: match GTs to priors (ssd.matching); matched priors are positives and learn their GT's class
and encoded offsets; among the unmatched priors (IoU < 0.5 with every GT) the ones with the highest
background cross-entropy are kept as negatives, 3 per positive. Loss = softmax cross-entropy over
positives and mined negatives + smooth-L1 over positive offsets (weights 1 and 1), divided by the
number of positives in the batch. An image without objects has no positives and therefore mines no
negatives (as the reference); a batch without any object returns 0 with a working graph.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .box_utils import encode
from .matching import match_priors
from .priors import VARIANCES, prior_boxes


class MultiBoxLossOutput(NamedTuple):
    total: torch.Tensor
    loc: torch.Tensor  # smooth-L1 part, already divided by the number of positives
    conf: torch.Tensor  # cross-entropy part, already divided by the number of positives
    num_positives: torch.Tensor


class PriorTargets(NamedTuple):
    labels: torch.Tensor  # [N, P] int64, 0 = background
    offsets: torch.Tensor  # [N, P, 4] encoded GT offsets (meaningful where labels > 0)


def build_targets(
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    priors: torch.Tensor,
    variances: Sequence[float] = VARIANCES,
    overlap_threshold: float = 0.5,
) -> PriorTargets:
    """Per-prior class and offset targets for a batch given per-image GT boxes [M, 4] and labels [M]."""
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"got {len(gt_boxes)} box tensors but {len(gt_labels)} label tensors")
    labels, offsets = [], []
    for boxes, classes in zip(gt_boxes, gt_labels):
        boxes = boxes.to(device=priors.device, dtype=priors.dtype).reshape(-1, 4)
        classes = classes.to(device=priors.device, dtype=torch.long).reshape(-1)
        if boxes.shape[0] != classes.shape[0]:
            raise ValueError(f"an image has {boxes.shape[0]} boxes but {classes.shape[0]} labels")
        match = match_priors(boxes, priors, overlap_threshold)
        matched = match.gt_index >= 0
        safe_index = match.gt_index.clamp(min=0)
        if boxes.shape[0] == 0:
            labels.append(torch.zeros_like(match.gt_index))
            offsets.append(torch.zeros_like(priors))
            continue
        labels.append(torch.where(matched, classes[safe_index], torch.zeros_like(safe_index)))
        target = encode(boxes[safe_index], priors, variances)
        offsets.append(torch.where(matched[:, None], target, torch.zeros_like(target)))
    return PriorTargets(torch.stack(labels), torch.stack(offsets))


def mine_hard_negatives(background_loss: torch.Tensor, positives: torch.Tensor, neg_pos_ratio: float) -> torch.Tensor:
    """Mask [N, P] of the highest-loss non-positive priors, neg_pos_ratio per positive in each image."""
    num_neg = (positives.sum(dim=1, keepdim=True) * neg_pos_ratio).floor().long()
    ranked_loss = background_loss.masked_fill(positives, float("-inf"))
    order = ranked_loss.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)  # rank of each prior in its image, 0 = highest loss
    return (rank < num_neg) & ~positives


class MultiBoxLoss(nn.Module):
    """SSD training loss. forward(locs [N,P,4], confs [N,P,C], gt_boxes, gt_labels) -> total loss.

    gt_boxes / gt_labels are per-image lists of corner boxes [M, 4] normalised to [0, 1] and labels
    [M] in 1..num_classes-1. Use `components(...)` for the loc / conf split.
    """

    def __init__(
        self,
        num_classes: int = 21,
        priors: torch.Tensor | None = None,
        neg_pos_ratio: float = 3.0,
        overlap_threshold: float = 0.5,
        variances: Sequence[float] = VARIANCES,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.neg_pos_ratio = neg_pos_ratio
        self.overlap_threshold = overlap_threshold
        self.variances = tuple(variances)
        # A buffer so that .to(device) moves it with the module; not saved (it is derived, not learned).
        self.register_buffer("priors", prior_boxes() if priors is None else priors.clone(), persistent=False)

    def components(self, locs, confs, gt_boxes, gt_labels) -> MultiBoxLossOutput:
        num_priors = self.priors.shape[0]
        if locs.shape[:2] != confs.shape[:2] or locs.shape[1:] != (num_priors, 4):
            raise ValueError(f"expected locs [N, {num_priors}, 4] and confs [N, {num_priors}, C]; "
                             f"got {tuple(locs.shape)} and {tuple(confs.shape)}")
        if confs.shape[2] != self.num_classes:
            raise ValueError(f"confs have {confs.shape[2]} classes, the loss was built for {self.num_classes}")
        if len(gt_boxes) != locs.shape[0]:
            raise ValueError(f"{locs.shape[0]} predictions but targets for {len(gt_boxes)} images")
        with torch.no_grad():
            targets = build_targets(gt_boxes, gt_labels, self.priors, self.variances, self.overlap_threshold)
            labels = targets.labels  # cross_entropy itself rejects labels >= num_classes
        positives = labels > 0

        # Cross-entropy per prior against its target (background where unmatched), in float32.
        ce = F.cross_entropy(confs.float().reshape(-1, self.num_classes), labels.reshape(-1), reduction="none")
        ce = ce.reshape(labels.shape)
        with torch.no_grad():
            negatives = mine_hard_negatives(ce.detach(), positives, self.neg_pos_ratio)
        conf_loss = (ce * (positives | negatives)).sum()

        loc_loss = F.smooth_l1_loss(locs.float(), targets.offsets, reduction="none", beta=1.0).sum(dim=-1)
        loc_loss = (loc_loss * positives).sum()

        num_pos = positives.sum()
        normaliser = num_pos.clamp(min=1).to(conf_loss.dtype)
        loc_loss = loc_loss / normaliser
        conf_loss = conf_loss / normaliser
        return MultiBoxLossOutput(loc_loss + conf_loss, loc_loss, conf_loss, num_pos)

    def forward(self, locs, confs, gt_boxes, gt_labels) -> torch.Tensor:
        return self.components(locs, confs, gt_boxes, gt_labels).total
