"""NMS and the detection output against plain loop references (ssd.postprocess)."""
import pytest
import torch

from ssd.box_utils import decode
from ssd.postprocess import DetectionOutput, detection_output, greedy_nms, multiclass_nms
from ssd.priors import VARIANCES, prior_boxes

PRIORS = prior_boxes()


def iou_python(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes, scores, threshold):
    """Greedy NMS over candidates already in descending score order -> kept positions."""
    kept = []
    for i, box in enumerate(boxes):
        if all(iou_python(boxes[j], box) <= threshold for j in kept):
            kept.append(i)
    return kept


def reference_detection_output(boxes, scores, score_threshold=0.01, nms_threshold=0.45, nms_top_k=400, keep_top_k=200):
    """One image, the reference procedure written as loops over classes and candidates."""
    rows = []
    for label in range(1, scores.shape[1]):
        candidates = [(float(scores[p, label]), p) for p in range(scores.shape[0]) if scores[p, label] > score_threshold]
        candidates.sort(key=lambda pair: -pair[0])  # Python's sort is stable: ties keep prior order
        candidates = candidates[:nms_top_k]
        cand_boxes = [boxes[p].tolist() for _, p in candidates]
        for i in reference_nms(cand_boxes, None, nms_threshold):
            rows.append([float(label), candidates[i][0], *cand_boxes[i]])
    rows.sort(key=lambda row: -row[1])
    return torch.tensor(rows[:keep_top_k], dtype=torch.float32).reshape(-1, 6)


def test_nms_hand_case():
    boxes = torch.tensor([
        [0.0, 0.0, 0.4, 0.4],  # kept (best)
        [0.02, 0.0, 0.42, 0.4],  # IoU ~0.9 with box 0 -> suppressed
        [0.2, 0.0, 0.6, 0.4],  # IoU 1/3 with box 0 -> kept
        [0.21, 0.0, 0.61, 0.4],  # suppressed by box 2 (which survived)
        [0.5, 0.5, 0.9, 0.9],  # far away -> kept
    ])
    keep = greedy_nms(boxes[None], torch.ones(1, 5, dtype=torch.bool), 0.45)
    assert keep[0].tolist() == [True, False, True, False, True]
    # Invalid (below threshold) candidates neither survive nor suppress: box 1 now leads, and box 2
    # (IoU 0.22 / 0.58 ~ 0.38 with box 1) stays.
    keep = greedy_nms(boxes[None], torch.tensor([[False, True, True, True, True]]), 0.45)
    assert keep[0].tolist() == [False, True, True, False, True]
    keep = greedy_nms(boxes[None], torch.tensor([[True, True, False, True, True]]), 0.45)
    assert keep[0].tolist() == [True, False, False, True, True]  # box 3 (IoU 0.3 with box 0) survives


def test_greedy_nms_matches_loop_on_dense_random_boxes():
    generator = torch.Generator().manual_seed(1)
    centre = torch.rand(6, 120, 2, generator=generator)
    size = torch.rand(6, 120, 2, generator=generator) * 0.5 + 0.05
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    boxes[0, 5] = torch.tensor([0.3, 0.3, 0.3, 0.3])  # degenerate: kept, suppresses nothing
    boxes[1, 7] = boxes[1, 3]  # exact duplicate of a better box: suppressed
    valid = torch.rand(6, 120, generator=generator) > 0.1
    keep = greedy_nms(boxes, valid, 0.45)
    for b in range(6):
        positions = valid[b].nonzero().flatten().tolist()
        expected = [positions[i] for i in reference_nms(boxes[b][positions].tolist(), None, 0.45)]
        assert keep[b].nonzero().flatten().tolist() == expected
    # Thresholds matter: 0 keeps only disjoint boxes, 1 keeps every valid box.
    assert torch.equal(greedy_nms(boxes, valid, 1.0), valid)
    assert greedy_nms(boxes, valid, 0.0).sum() < keep.sum()


@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_detection_output_matches_loop_reference(spread):
    """spread 0.5: scores near uniform, every class has 400 candidates; 3.0: few pass 0.01."""
    generator = torch.Generator().manual_seed(2)
    locs = torch.randn(2, 1917, 4, generator=generator) * 0.5
    confs = torch.randn(2, 1917, 6, generator=generator) * spread
    out = detection_output(locs, confs, PRIORS)
    boxes = decode(locs, PRIORS, VARIANCES)
    scores = torch.softmax(confs, -1)
    for n in range(2):
        expected = reference_detection_output(boxes[n], scores[n])
        assert out[n].shape == expected.shape
        torch.testing.assert_close(out[n], expected)
        assert (out[n][:, 0] >= 1).all() and (out[n][:, 1] > 0.01).all()
        assert (out[n][:-1, 1] >= out[n][1:, 1]).all()  # best score first


def test_top_k_limits_and_ties():
    # Identical scores and boxes everywhere: per class the first prior wins (stable order) and NMS
    # removes its duplicates; tie-broken by prior index, then class.
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3]] * 5 + [[0.6, 0.6, 0.8, 0.8]] * 5)
    scores = torch.full((10, 4), 0.25)
    out = multiclass_nms(boxes, scores, nms_top_k=400, keep_top_k=200)
    assert out[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert out[:, 2].tolist() == pytest.approx([0.1, 0.6] * 3)
    assert multiclass_nms(boxes, scores, keep_top_k=4).shape == (4, 6)
    # nms_top_k=1 keeps only the best (first) candidate per class before NMS.
    assert multiclass_nms(boxes, scores, nms_top_k=1)[:, 2].tolist() == pytest.approx([0.1] * 3)
    assert multiclass_nms(boxes, scores, score_threshold=0.3).shape == (0, 6)


def test_keep_top_k_picks_best_across_classes():
    generator = torch.Generator().manual_seed(4)
    locs = torch.randn(1, 1917, 4, generator=generator)
    confs = torch.randn(1, 1917, 21, generator=generator)
    full = detection_output(locs, confs, PRIORS, keep_top_k=100000)[0]
    top = detection_output(locs, confs, PRIORS)[0]
    assert full.shape[0] > 200 and top.shape[0] == 200
    torch.testing.assert_close(top, full[:200])


def test_module_form_and_errors():
    module = DetectionOutput(PRIORS)
    locs, confs = torch.zeros(3, 1917, 4), torch.zeros(3, 1917, 21)
    confs[..., 0] = 10.0  # all background: nothing above 0.01
    out = module(locs, confs)
    assert len(out) == 3 and all(d.shape == (0, 6) for d in out)
    with pytest.raises(ValueError, match="priors of shape"):
        detection_output(torch.zeros(1, 10, 4), torch.zeros(1, 10, 21), PRIORS)
    with pytest.raises(ValueError, match=r"locs \[N, P, 4\]"):
        detection_output(torch.zeros(1, 1917, 5), torch.zeros(1, 1917, 21), PRIORS)
