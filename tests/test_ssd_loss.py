"""Matching, hard negative mining and the MultiBox loss (ssd.matching, ssd.loss)."""
import pytest
import torch
import torch.nn.functional as F

from ssd.box_utils import box_iou, encode
from ssd.loss import MultiBoxLoss, build_targets, mine_hard_negatives
from ssd.matching import bipartite_match, match_priors
from ssd.priors import VARIANCES, prior_boxes

PRIORS = prior_boxes()


def random_gt(count, generator):
    centre = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(count, 2, generator=generator) * 0.4 + 0.05
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def reference_bipartite(iou):
    """Plain loop version of the greedy global bipartite match."""
    iou = iou.tolist()
    rows, cols = len(iou), len(iou[0])
    used_rows, used_cols, result = set(), set(), [-1] * rows
    while True:
        best, pair = 0.0, None
        for r in range(rows):
            for c in range(cols):
                if r not in used_rows and c not in used_cols and iou[r][c] > best:
                    best, pair = iou[r][c], (r, c)
        if pair is None:
            return result
        result[pair[0]] = pair[1]
        used_rows.add(pair[0])
        used_cols.add(pair[1])


def test_bipartite_matches_loop_reference():
    torch.manual_seed(0)
    iou = torch.rand(5, 30) * (torch.rand(5, 30) > 0.5)
    iou[3] = 0  # a row without any overlap stays unmatched
    expected = reference_bipartite(iou)
    assert bipartite_match(iou).tolist() == expected
    assert expected[3] == -1


def test_every_ground_truth_matched_even_when_sharing_a_best_prior():
    # Two nearly identical GTs: both prefer the same prior; the second must still get its own prior.
    gt = torch.tensor([[0.30, 0.30, 0.50, 0.50], [0.305, 0.30, 0.505, 0.50], [0.7, 0.1, 0.72, 0.12]])
    match = match_priors(gt, PRIORS)
    assert set(match.gt_index[match.gt_index >= 0].tolist()) == {0, 1, 2}
    iou = box_iou(gt, PRIORS)
    # The tiny third GT has IoU < 0.5 with every prior: only its bipartite match carries it.
    assert iou[2].max() < 0.5 and (match.gt_index == 2).sum() == 1
    # Every prior with IoU >= 0.5 is matched (to its best GT unless taken by a bipartite match).
    assert (match.gt_index[iou.max(0).values >= 0.5] >= 0).all()
    assert ((match.gt_index >= 0) == ((iou.max(0).values >= 0.5) | torch.isin(torch.arange(1917), bipartite_match(iou)))).all()


def test_random_images_every_gt_matched():
    generator = torch.Generator().manual_seed(1)
    for count in (1, 4, 12):
        match = match_priors(random_gt(count, generator), PRIORS)
        assert torch.unique(match.gt_index[match.gt_index >= 0]).tolist() == list(range(count))


def test_no_ground_truth_gives_no_match():
    match = match_priors(torch.zeros(0, 4), PRIORS)
    assert (match.gt_index == -1).all() and (match.overlap == 0).all()


def test_targets_labels_and_offsets():
    gt = torch.tensor([[0.1, 0.1, 0.5, 0.6]])
    targets = build_targets([gt, torch.zeros(0, 4)], [torch.tensor([7]), torch.zeros(0, dtype=torch.long)], PRIORS)
    assert targets.labels.shape == (2, 1917) and targets.offsets.shape == (2, 1917, 4)
    positive = targets.labels[0] > 0
    assert positive.any() and (targets.labels[0][positive] == 7).all() and (targets.labels[1] == 0).all()
    torch.testing.assert_close(targets.offsets[0][positive], encode(gt.expand(int(positive.sum()), 4), PRIORS[positive], VARIANCES))


def test_hard_negative_mining_keeps_highest_losses_at_three_to_one():
    torch.manual_seed(0)
    loss = torch.rand(2, 50)
    positives = torch.zeros(2, 50, dtype=torch.bool)
    positives[0, [3, 10, 20]] = True
    positives[1, :20] = True  # 20 positives: 60 negatives wanted but only 30 candidates
    negatives = mine_hard_negatives(loss, positives, 3.0)
    assert not (negatives & positives).any()
    assert negatives[0].sum() == 9 and negatives[1].sum() == 30
    candidates = loss[0].masked_fill(positives[0], -1)
    assert set(negatives[0].nonzero().flatten().tolist()) == set(candidates.topk(9).indices.tolist())
    assert not mine_hard_negatives(loss, torch.zeros_like(positives), 3.0).any()


def reference_loss(locs, confs, gt_boxes, gt_labels):
    """Straightforward per-image loop version of the MultiBox loss."""
    total_loc, total_conf, total_pos = 0.0, 0.0, 0
    for n in range(locs.shape[0]):
        iou = box_iou(gt_boxes[n], PRIORS) if len(gt_boxes[n]) else torch.zeros(0, 1917)
        gt_index = [-1] * 1917
        for p in range(1917):
            if iou.shape[0] and iou[:, p].max() >= 0.5:
                gt_index[p] = int(iou[:, p].argmax())
        for g, p in enumerate(reference_bipartite(iou) if iou.shape[0] else []):
            if p >= 0:
                gt_index[p] = g
        labels = torch.tensor([int(gt_labels[n][g]) if g >= 0 else 0 for g in gt_index])
        ce = F.cross_entropy(confs[n], labels, reduction="none")
        positives = [p for p in range(1917) if gt_index[p] >= 0]
        negatives = sorted((p for p in range(1917) if gt_index[p] < 0), key=lambda p: -float(ce[p]))
        negatives = negatives[:3 * len(positives)]
        total_conf += float(ce[positives + negatives].sum())
        for p in positives:
            target = encode(gt_boxes[n][gt_index[p]], PRIORS[p], VARIANCES)
            total_loc += float(F.smooth_l1_loss(locs[n, p], target, reduction="sum"))
        total_pos += len(positives)
    return (total_loc + total_conf) / max(total_pos, 1), total_loc / max(total_pos, 1), total_conf / max(total_pos, 1)


def test_loss_matches_loop_reference_including_empty_image():
    generator = torch.Generator().manual_seed(3)
    locs = torch.randn(3, 1917, 4, generator=generator)
    confs = torch.randn(3, 1917, 21, generator=generator) * 2
    gt_boxes = [random_gt(3, generator), torch.zeros(0, 4), random_gt(1, generator)]
    gt_labels = [torch.tensor([1, 5, 20]), torch.zeros(0, dtype=torch.long), torch.tensor([9])]
    out = MultiBoxLoss(21).components(locs, confs, gt_boxes, gt_labels)
    total, loc, conf = reference_loss(locs, confs, gt_boxes, gt_labels)
    assert out.total.item() == pytest.approx(total, rel=1e-4)
    assert out.loc.item() == pytest.approx(loc, rel=1e-4)
    assert out.conf.item() == pytest.approx(conf, rel=1e-4)


def test_batch_without_objects_gives_zero_loss_with_gradient():
    locs = torch.randn(2, 1917, 4, requires_grad=True)
    confs = torch.randn(2, 1917, 21, requires_grad=True)
    empty = [torch.zeros(0, 4)] * 2
    loss = MultiBoxLoss()(locs, confs, empty, [torch.zeros(0, dtype=torch.long)] * 2)
    assert loss.item() == 0.0
    loss.backward()
    assert confs.grad is not None and torch.isfinite(confs.grad).all()


def test_loss_rejects_mismatched_inputs():
    loss = MultiBoxLoss(21)
    with pytest.raises(ValueError, match="targets for 1 images"):
        loss(torch.zeros(2, 1917, 4), torch.zeros(2, 1917, 21), [torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(ValueError, match="built for 21"):
        loss(torch.zeros(1, 1917, 4), torch.zeros(1, 1917, 5), [torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        loss(torch.zeros(1, 1917, 4), torch.zeros(1, 1917, 21), [torch.zeros(2, 4)], [torch.ones(1)])


def test_loss_decreases_when_overfitting_two_images():
    from ssd.model import MobileNetSSD
    torch.manual_seed(0)
    model = MobileNetSSD(num_classes=4)
    images = torch.randn(2, 3, 300, 300)
    gt_boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.5, 0.5, 0.9, 0.8], [0.05, 0.1, 0.3, 0.4]])]
    gt_labels = [torch.tensor([1]), torch.tensor([2, 3])]
    criterion = MultiBoxLoss(num_classes=4)
    # Backward through the high-resolution body dominates on a 2-core CPU: train everything after the
    # 19x19 map (blocks 12-13, extras, all heads) so the test stays quick.
    model.body_19.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):  # the full model is slow on a 2-core CPU: few steps, measured after the last one
        optimizer.zero_grad()
        loss = criterion(*model(images), gt_boxes, gt_labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(criterion(*model(images), gt_boxes, gt_labels).item())
    assert losses[-1] < 0.85 * losses[0], losses
