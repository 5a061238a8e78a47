"""DetectionMAP (ssd.metrics): a published case, hand-built cases and real VOC detections."""
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import SHARED_DIR
from ssd.metrics import DetectionMAP, average_precision

SHARED_DATA = SHARED_DIR / "data"
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def det(label, score, box):
    return [float(label), score, *box]


def single_image_metric(detections, gt_boxes, gt_labels, difficult=None, **kwargs):
    metric = DetectionMAP(num_classes=kwargs.pop("num_classes", 4), **kwargs)
    metric.update(torch.tensor(detections).reshape(-1, 6), torch.tensor(gt_boxes).reshape(-1, 4),
                  torch.tensor(gt_labels, dtype=torch.long), None if difficult is None else torch.tensor(difficult))
    return metric


# ---------------------------------------------------------------- published case

def read_rows(path):
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def test_published_case1():
    """Padilla et al. toolkit case (pixels; one class): 11-point 0.0303030303, all-point 0.0222222222."""
    case = SHARED_DATA / "ap_cases" / "case1"
    if not case.is_dir():
        pytest.skip(f"{case} is absent")
    # Image sizes are not part of the case; IoU is scale invariant, so normalise every box by one size
    # large enough that clipping to [0, 1] never changes a box (the toolkit does not clip).
    scale = 1000.0
    metric = DetectionMAP(num_classes=2)
    images = sorted((case / "gts").glob("*.txt"))
    assert len(images) == 7
    for gt_path in images:
        gts = read_rows(gt_path)
        dets = read_rows(case / "dets" / gt_path.name)
        assert {row[0] for row in gts + dets} == {"object"}
        gt_boxes = torch.tensor([[float(v) for v in row[1:]] for row in gts])
        gt_boxes[:, 2:] += gt_boxes[:, :2]  # left top width height -> corners
        raw = torch.tensor([[float(v) for v in row[1:]] for row in dets])
        boxes = raw[:, 1:].clone()
        boxes[:, 2:] += boxes[:, :2]
        detections = torch.cat([torch.ones(len(raw), 1), raw[:, :1], boxes / scale], dim=1)
        assert boxes.max() < scale
        metric.update(detections, gt_boxes / scale, torch.ones(len(gt_boxes), dtype=torch.long))
    assert metric.accumulate("11point") == pytest.approx(0.0303030303, abs=1e-9)
    assert metric.accumulate("integral") == pytest.approx(0.0222222222, abs=1e-9)
    assert metric.accumulate("all_point") == pytest.approx(0.0222222222, abs=1e-9)
    curve = metric.pr_curve(1)
    assert curve.recall[-1] == pytest.approx(1 / 15) and curve.precision.shape == (24,)


# ---------------------------------------------------------------- hand-built cases

GT_A = [0.1, 0.1, 0.3, 0.3]
GT_B = [0.6, 0.6, 0.9, 0.9]
MISS = [0.4, 0.0, 0.5, 0.1]


def test_duplicates_and_false_positives():
    # Scores .9 miss, .8 on A, .7 on A again (duplicate), .6 on B.
    # precision 0, 1/2, 1/3, 1/2; recall 0, 1/2, 1/2, 1 -> every 11-point threshold sees 0.5.
    metric = single_image_metric(
        [det(1, 0.7, GT_A), det(1, 0.9, MISS), det(1, 0.6, GT_B), det(1, 0.8, [0.11, 0.1, 0.31, 0.3])],
        [GT_A, GT_B], [1, 1])
    curve = metric.pr_curve(1)
    torch.testing.assert_close(curve.precision, torch.tensor([0, 1 / 2, 1 / 3, 1 / 2], dtype=torch.float64))
    torch.testing.assert_close(curve.recall, torch.tensor([0, 1 / 2, 1 / 2, 1], dtype=torch.float64))
    assert metric.accumulate() == pytest.approx(0.5)
    assert metric.accumulate("integral") == pytest.approx(0.5)


def test_integral_versions_differ_when_precision_rises():
    # miss, A, B: precision 0, 1/2, 2/3 at recall 0, 1/2, 1.
    metric = single_image_metric([det(1, 0.9, MISS), det(1, 0.8, GT_A), det(1, 0.7, GT_B)], [GT_A, GT_B], [1, 1])
    assert metric.accumulate("integral") == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)  # reference: raw precision
    assert metric.accumulate("all_point") == pytest.approx(2 / 3)  # VOC2010+: precision envelope
    assert metric.accumulate("11point") == pytest.approx(2 / 3)


def test_difficult_objects_are_neither_positive_nor_penalised():
    detections = [det(1, 0.9, GT_A), det(1, 0.8, GT_B), det(1, 0.7, GT_A)]
    metric = single_image_metric(detections, [GT_A, GT_B], [1, 1], difficult=[True, False])
    curve = metric.pr_curve(1)
    # Both detections on the difficult A are ignored (A is never "taken", so the second is ignored too).
    assert curve.precision.tolist() == [1.0] and curve.recall.tolist() == [1.0]
    assert metric.accumulate() == pytest.approx(1.0)
    # evaluate_difficult: A counts, the second detection on A is a duplicate.
    metric = single_image_metric(detections, [GT_A, GT_B], [1, 1], difficult=[True, False], evaluate_difficult=True)
    torch.testing.assert_close(metric.pr_curve(1).recall, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(metric.pr_curve(1).precision, torch.tensor([1.0, 1.0, 2 / 3], dtype=torch.float64))
    # A class whose only objects are difficult has no positives and is left out of the mean.
    metric = single_image_metric([det(2, 0.9, GT_B)], [GT_A, GT_B], [1, 2], difficult=[True, False])
    assert metric.per_class_ap() == {2: pytest.approx(1.0)}


def test_class_without_detections_scores_zero_and_class_without_gt_is_ignored():
    metric = single_image_metric([det(1, 0.9, GT_A), det(3, 0.8, GT_B)], [GT_A, GT_B], [1, 2])
    assert metric.per_class_ap() == {1: pytest.approx(1.0), 2: 0.0}
    assert metric.accumulate() == pytest.approx(0.5)
    assert metric.pr_curve(2).precision.numel() == 0


def test_iou_must_exceed_threshold_strictly_and_predictions_are_clipped():
    # IoU exactly 0.5 (0.25 / 0.5, exact in binary): not a true positive.
    metric = single_image_metric([det(1, 0.9, [0.0, 0.0, 0.5, 1.0])], [[0.0, 0.0, 0.5, 0.5]], [1])
    assert metric.accumulate() == 0.0
    # Unclipped IoU 0.5; clipped to the image the box equals the GT.
    metric = single_image_metric([det(1, 0.9, [0.6, 0.0, 1.4, 0.5])], [[0.6, 0.0, 1.0, 0.5]], [1])
    assert metric.accumulate() == pytest.approx(1.0)


def test_empty_images_and_accumulation_over_images():
    metric = DetectionMAP(num_classes=4)
    metric.update(torch.zeros(0, 6), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # nothing at all
    assert metric.accumulate() == 0.0 and metric.per_class_ap() == {}
    metric.update(torch.tensor([det(1, 0.95, MISS)]), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # FP only
    metric.update(torch.zeros(0, 6), torch.tensor([GT_B]), torch.tensor([1]))  # a missed object
    metric.update(torch.tensor([det(1, 0.5, GT_A)]), torch.tensor([GT_A]), torch.tensor([1]))
    # Over the set: 0.95 FP then 0.5 TP; 2 positives -> precision 0, 1/2 at recall 0, 1/2.
    torch.testing.assert_close(metric.pr_curve(1).precision, torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert metric.accumulate() == pytest.approx(6 * 0.5 / 11)
    metric.reset()
    assert metric.accumulate() == 0.0


def test_batch_update_equals_per_image_updates():
    generator = torch.Generator().manual_seed(0)
    images = []
    for _ in range(5):
        gt = torch.rand(3, 2, generator=generator) * 0.6
        gt_boxes = torch.cat([gt, gt + 0.3], 1)
        noise = (torch.rand(6, 4, generator=generator) - 0.5) * 0.1
        boxes = gt_boxes.repeat(2, 1) + noise
        detections = torch.cat([torch.randint(1, 4, (6, 1), generator=generator).float(),
                                torch.rand(6, 1, generator=generator), boxes], 1)
        images.append((detections, gt_boxes, torch.randint(1, 4, (3,), generator=generator),
                       torch.rand(3, generator=generator) > 0.8))
    one, batch = DetectionMAP(num_classes=4), DetectionMAP(num_classes=4)
    for image in images:
        one.update(*image)
    batch.update(*map(list, zip(*images)))
    assert one.accumulate() == batch.accumulate() > 0
    with pytest.raises(ValueError, match="one entry per image"):
        batch.update([images[0][0]], [images[0][1], images[1][1]], [images[0][2]], [images[0][3]])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ap_version"):
        DetectionMAP(ap_version="101point")
    with pytest.raises(ValueError, match="labels must lie"):
        DetectionMAP(num_classes=3).update(torch.tensor([det(5, 0.5, GT_A)]), torch.tensor([GT_A]), torch.tensor([1]))
    with pytest.raises(ValueError, match="disagree"):
        DetectionMAP().update(torch.zeros(0, 6), torch.tensor([GT_A]), torch.tensor([1, 2]))
    assert average_precision(torch.zeros(0), torch.zeros(0)) == 0.0


# ---------------------------------------------------------------- real VOC detections

def load_voc_sample():
    root = SHARED_DATA / "voc2012_sample"
    annotations = root / "VOCdevkit" / "VOC2012" / "Annotations"
    if not annotations.is_dir():
        pytest.skip(f"{annotations} is absent")
    images = []
    for xml_path in sorted(annotations.glob("*.xml")):
        tree = ET.parse(xml_path).getroot()
        width = float(tree.find("size/width").text)
        height = float(tree.find("size/height").text)
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        boxes, labels, difficult = [], [], []
        for obj in tree.findall("object"):
            box = obj.find("bndbox")
            boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(VOC_CLASSES.index(obj.find("name").text.strip()) + 1)
            flag = obj.find("difficult")
            difficult.append(flag is not None and flag.text.strip() == "1")
        det_path = root / "detections" / f"{xml_path.stem}.txt"
        rows = [[float(v) for v in line.split()] for line in det_path.read_text().splitlines() if line.strip()] \
            if det_path.exists() else []
        raw = torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)
        detections = torch.cat([raw[:, :1] + 1, raw[:, 1:2], raw[:, 2:] / scale], 1)
        images.append((detections, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4) / scale,
                       torch.tensor(labels), torch.tensor(difficult)))
    return images


def reference_class_ap(images, label, eleven_point=True):
    """VOC-devkit style loop for one class: all detections of the set in score order, one at a time."""
    dets = []
    for index, (detections, _, _, _) in enumerate(images):
        for row in detections.tolist():
            if int(row[0]) == label:
                dets.append((row[1], index, [min(max(v, 0.0), 1.0) for v in row[2:]]))
    dets.sort(key=lambda d: -d[0])
    npos = sum(int(((labels == label) & ~difficult).sum()) for _, _, labels, difficult in images)
    taken = set()
    tp, fp = [], []
    for _, index, box in dets:
        _, gt_boxes, labels, difficult = images[index]
        best, best_gt = 0.0, -1
        for g in range(len(labels)):
            if int(labels[g]) != label:
                continue
            gt = gt_boxes[g].tolist()
            w = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
            h = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
            inter = w * h
            union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
            overlap = inter / union if union > 0 else 0.0
            if overlap > best:
                best, best_gt = overlap, g
        if best > 0.5:
            if bool(difficult[best_gt]):
                continue
            if (index, best_gt) not in taken:
                taken.add((index, best_gt))
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    precision, recall, ctp, cfp = [], [], 0, 0
    for t, f in zip(tp, fp):
        ctp, cfp = ctp + t, cfp + f
        precision.append(ctp / (ctp + cfp))
        recall.append(ctp / npos)
    if eleven_point:
        return sum(max([p for p, r in zip(precision, recall) if r >= t / 10] or [0.0]) for t in range(11)) / 11
    ap, previous = 0.0, 0.0
    for i, r in enumerate(recall):
        ap += max(precision[i:]) * (r - previous)
        previous = r
    return ap


def test_real_voc_detections():
    images = load_voc_sample()
    assert len(images) == 100
    metric = DetectionMAP(num_classes=21)
    for image in images:
        metric.update(*image)
    m11, m_all = metric.accumulate("11point"), metric.accumulate("all_point")
    assert len(metric.per_class_ap()) == 20
    assert 0.3 < m11 < 0.99 and 0.3 < m_all < 0.99
    per_class_11, per_class_all = metric.per_class_ap(), metric.per_class_ap("all_point")
    for label in range(1, 21):
        assert per_class_11[label] == pytest.approx(reference_class_ap(images, label), abs=1e-12)
        assert per_class_all[label] == pytest.approx(reference_class_ap(images, label, False), abs=1e-12)
    assert m11 == pytest.approx(sum(per_class_11.values()) / 20)
