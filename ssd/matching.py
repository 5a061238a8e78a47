"""Assigning ground-truth boxes to priors (reference-semantics section 4).

Two stages, as the reference's bipartite_match with match_type "per_prediction":
1. bipartite: greedily take the globally highest IoU (GT, prior) pair among the GTs and priors not
   yet matched, until every GT has a prior (pairs with zero overlap are never used), so each GT
   gets its own best available prior even when two GTs prefer the same one;
2. per prediction: every prior still free takes its best GT when that IoU >= the threshold.
The loop in stage 1 runs once per ground truth (a handful per image), never once per prior.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .box_utils import box_iou


class Match(NamedTuple):
    gt_index: torch.Tensor  # [P] int64: index of the assigned GT, -1 for an unmatched prior
    overlap: torch.Tensor  # [P] float: IoU of each prior with its best GT (0 without GTs)


def bipartite_match(iou: torch.Tensor) -> torch.Tensor:
    """Greedy global bipartite matching on an IoU matrix [M, P] -> prior index per GT [M] (-1: none)."""
    num_gt, num_priors = iou.shape
    best_prior = torch.full((num_gt,), -1, dtype=torch.long, device=iou.device)
    if num_gt == 0 or num_priors == 0:
        return best_prior
    remaining = iou.clone()
    flat_remaining = remaining.view(-1)
    # Tensor indices throughout, so a GPU run never waits for the host. Once the best remaining
    # overlap is 0 it stays 0, so clearing rows and columns after that changes nothing.
    for _ in range(num_gt):
        flat = torch.argmax(flat_remaining)
        gt, prior = flat // num_priors, flat % num_priors
        take = flat_remaining[flat] > 0
        best_prior[gt] = torch.where(take, prior, best_prior[gt])
        remaining.index_fill_(0, gt.view(1), -1.0)
        remaining.index_fill_(1, prior.view(1), -1.0)
    return best_prior


def match_priors(gt_boxes: torch.Tensor, priors: torch.Tensor, overlap_threshold: float = 0.5) -> Match:
    """Match one image's GT boxes [M, 4] to priors [P, 4] (both corner, normalised)."""
    num_priors = priors.shape[0]
    if gt_boxes.numel() == 0:
        return Match(
            torch.full((num_priors,), -1, dtype=torch.long, device=priors.device),
            torch.zeros(num_priors, dtype=priors.dtype, device=priors.device),
        )
    iou = box_iou(gt_boxes.to(priors.dtype), priors)  # [M, P]
    overlap, best_gt = iou.max(dim=0)
    gt_index = torch.where(overlap >= overlap_threshold, best_gt, torch.full_like(best_gt, -1))
    # Bipartite matches take precedence over threshold matches of the same prior. A GT left without
    # a prior writes into a spare slot past the end (scatter instead of boolean indexing: no host sync).
    forced_prior = bipartite_match(iou)
    gt_ids = torch.arange(gt_boxes.shape[0], device=priors.device)
    forced_overlap = iou[gt_ids, forced_prior.clamp(min=0)]
    slot = torch.where(forced_prior >= 0, forced_prior, torch.full_like(forced_prior, num_priors))
    gt_index = torch.cat([gt_index, gt_index.new_zeros(1)]).scatter_(0, slot, gt_ids)[:num_priors]
    overlap = torch.cat([overlap, overlap.new_zeros(1)]).scatter_(0, slot, forced_overlap)[:num_priors]
    return Match(gt_index, overlap)
