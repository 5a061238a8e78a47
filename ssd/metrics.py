"""Detection mean average precision (reference-semantics section 6).

Per image and class, detections in descending score order are true positives when their best-overlap
GT of the same class has IoU strictly above the threshold and was not matched before; false positives
otherwise; a detection whose best GT is difficult counts as neither (unless evaluate_difficult). Only
non-difficult GTs count as positives. Predictions are clipped to [0, 1]; IoU has no +1 term. Results
accumulate over every image given to update(); accumulate() returns the mean over classes that have
positives. A class with positives but no detections has AP 0.

AP versions: "11point" (the reference's number): mean over recall 0, 0.1, ..., 1 of the best precision
at recall >= t. "integral": as the reference's integral mode, sum of precision x recall increment at
each detection (precision not interpolated). "all_point": the VOC2010+ all-point AP, the same sum with
the precision envelope (best precision at any higher recall); never below "integral".
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .box_utils import box_iou

AP_VERSIONS = ("11point", "integral", "all_point")


class PRCurve(NamedTuple):
    precision: torch.Tensor  # [D] float64, after each detection in descending score order
    recall: torch.Tensor  # [D] float64
    scores: torch.Tensor  # [D] the detection scores in that order


def match_detections(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_difficult: torch.Tensor,
    overlap_threshold: float = 0.5,
    evaluate_difficult: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, one class. -> (true_positive [D] bool, counted [D] bool) in the input order.

    The first detection (by descending score, ties in input order) whose best GT is g takes g; later
    ones with the same best GT are false positives. That is the sequential reference rule in closed
    form, because a detection never moves on to its second-best GT.
    """
    num_det = det_boxes.shape[0]
    if num_det == 0 or gt_boxes.shape[0] == 0:
        false = torch.zeros(num_det, dtype=torch.bool, device=det_boxes.device)
        return false, ~false
    order = det_scores.argsort(descending=True, stable=True)
    best_iou, best_gt = box_iou(det_boxes[order], gt_boxes).max(dim=1)
    hit = best_iou > overlap_threshold
    ignored_gt = gt_difficult & (not evaluate_difficult)
    position = torch.arange(num_det, device=det_boxes.device)
    # First position (in score order) of a hit on each GT.
    first_hit = torch.full((gt_boxes.shape[0],), num_det, dtype=torch.long, device=det_boxes.device)
    first_hit = first_hit.scatter_reduce(0, best_gt[hit], position[hit], reduce="amin")
    ignored = hit & ignored_gt[best_gt]
    true_positive = hit & ~ignored & (first_hit[best_gt] == position)
    # Back to the caller's order.
    tp_out = torch.empty_like(true_positive)
    counted_out = torch.empty_like(true_positive)
    tp_out[order] = true_positive
    counted_out[order] = ~ignored
    return tp_out, counted_out


def average_precision(precision: torch.Tensor, recall: torch.Tensor, ap_version: str = "11point") -> float:
    """AP from a precision / recall curve given in descending score order."""
    if ap_version not in AP_VERSIONS:
        raise ValueError(f"ap_version must be one of {AP_VERSIONS}, got {ap_version!r}")
    if precision.numel() == 0:
        return 0.0
    precision = precision.double()
    recall = recall.double()
    if ap_version == "11point":
        thresholds = torch.linspace(0, 1, 11, dtype=torch.float64)
        # Best precision among points with recall >= t (0 when recall never gets there).
        reaches = recall[None, :] >= thresholds[:, None] - 1e-12
        best = torch.where(reaches, precision[None, :], torch.zeros_like(precision)[None, :]).amax(dim=1)
        return float(best.mean())
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    if ap_version == "all_point":
        precision = precision.flip(0).cummax(dim=0).values.flip(0)  # envelope: best at any higher recall
    return float((precision * steps).sum())


class DetectionMAP:
    """Accumulating mAP over a data set. Coordinates normalised to [0, 1]; labels 1..num_classes-1."""

    def __init__(
        self,
        num_classes: int = 21,
        overlap_threshold: float = 0.5,
        evaluate_difficult: bool = False,
        ap_version: str = "11point",
        background_label: int = 0,
    ):
        if ap_version not in AP_VERSIONS:
            raise ValueError(f"ap_version must be one of {AP_VERSIONS}, got {ap_version!r}")
        self.num_classes = num_classes
        self.overlap_threshold = overlap_threshold
        self.evaluate_difficult = evaluate_difficult
        self.ap_version = ap_version
        self.background_label = background_label
        self.reset()

    def reset(self) -> None:
        self._scores: dict[int, list[torch.Tensor]] = {}
        self._true_positive: dict[int, list[torch.Tensor]] = {}
        self._num_positives = torch.zeros(self.num_classes, dtype=torch.long)

    def update(self, detections, gt_boxes, gt_labels, difficult=None) -> None:
        """Add one image: detections [K, 6] rows (label, score, xmin, ymin, xmax, ymax); gt_boxes [M, 4];
        gt_labels [M]; difficult [M] bool (None: none difficult).

        Or a batch: lists (or tuples) of such tensors, one entry per image, for every argument.
        """
        # A list of arrays / tensors is a batch; a list of plain lists is one image's boxes.
        if isinstance(gt_boxes, (list, tuple)) and len(gt_boxes) > 0 and all(hasattr(b, "shape") for b in gt_boxes):
            count = len(gt_boxes)
            difficult = [None] * count if difficult is None else difficult
            if not (len(detections) == len(gt_labels) == len(difficult) == count):
                raise ValueError(f"batch update needs one entry per image: {len(detections)} detections, "
                                 f"{count} gt_boxes, {len(gt_labels)} gt_labels, {len(difficult)} difficult")
            for image in zip(detections, gt_boxes, gt_labels, difficult):
                self._update_image(*image)
            return
        self._update_image(detections, gt_boxes, gt_labels, difficult)

    def _update_image(self, detections, gt_boxes, gt_labels, difficult) -> None:
        detections = torch.as_tensor(detections, dtype=torch.float64).detach().cpu().reshape(-1, 6)
        gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float64).detach().cpu().reshape(-1, 4)
        gt_labels = torch.as_tensor(gt_labels).detach().cpu().reshape(-1).long()
        if difficult is None:
            difficult = torch.zeros_like(gt_labels, dtype=torch.bool)
        difficult = torch.as_tensor(difficult).detach().cpu().reshape(-1).bool()
        if not (gt_boxes.shape[0] == gt_labels.shape[0] == difficult.shape[0]):
            raise ValueError(f"gt_boxes {tuple(gt_boxes.shape)}, gt_labels {tuple(gt_labels.shape)} and "
                             f"difficult {tuple(difficult.shape)} disagree on the number of objects")
        det_labels = detections[:, 0].round().long()
        for name, labels in (("detection", det_labels), ("ground-truth", gt_labels)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"{name} labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")

        counted_gt = gt_labels[~difficult] if not self.evaluate_difficult else gt_labels
        self._num_positives += torch.bincount(counted_gt, minlength=self.num_classes)
        det_boxes = detections[:, 2:].clamp(0.0, 1.0)
        for label in det_labels.unique().tolist():
            if label == self.background_label:
                continue
            in_class = det_labels == label
            gt_in_class = gt_labels == label
            tp, counted = match_detections(det_boxes[in_class], detections[in_class, 1], gt_boxes[gt_in_class],
                                           difficult[gt_in_class], self.overlap_threshold, self.evaluate_difficult)
            self._scores.setdefault(label, []).append(detections[in_class, 1][counted])
            self._true_positive.setdefault(label, []).append(tp[counted])

    def classes_with_positives(self) -> list[int]:
        return [c for c in range(self.num_classes) if c != self.background_label and self._num_positives[c] > 0]

    def pr_curve(self, label: int) -> PRCurve:
        """Precision / recall after each counted detection of one class, best score first."""
        if label not in self._scores:
            empty = torch.zeros(0, dtype=torch.float64)
            return PRCurve(empty, empty, empty)
        scores = torch.cat(self._scores[label])
        true_positive = torch.cat(self._true_positive[label])
        # Stable: equal scores keep the order in which images were added, as the reference.
        order = scores.argsort(descending=True, stable=True)
        tp_cum = true_positive[order].double().cumsum(0)
        fp_cum = (~true_positive[order]).double().cumsum(0)
        precision = tp_cum / (tp_cum + fp_cum)
        num_pos = int(self._num_positives[label])
        recall = tp_cum / num_pos if num_pos > 0 else torch.zeros_like(tp_cum)
        return PRCurve(precision, recall, scores[order])

    def pr_curves(self) -> dict[int, PRCurve]:
        return {label: self.pr_curve(label) for label in self.classes_with_positives()}

    def per_class_ap(self, ap_version: str | None = None) -> dict[int, float]:
        """AP of every class with positives (0 for those without detections)."""
        version = ap_version or self.ap_version
        return {label: average_precision(curve.precision, curve.recall, version)
                for label, curve in self.pr_curves().items()}

    def accumulate(self, ap_version: str | None = None) -> float:
        """mAP over the classes that have positives; 0.0 when no class has any."""
        aps = self.per_class_ap(ap_version)
        return sum(aps.values()) / len(aps) if aps else 0.0
