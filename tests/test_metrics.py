"""Confusion-matrix metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import ConfusionMatrix, miou


def test_hand_computed_matrix():
    # gt:   0 0 1 1 2 255      pred: 0 1 1 1 0 2
    gt = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = cm.iou().tolist()
    assert iou[0] == pytest.approx(1 / 3)      # tp 1, gt 2, pred 2 -> 1/(2+2-1)
    assert iou[1] == pytest.approx(2 / 3)      # tp 2, gt 2, pred 3
    assert iou[2] == 0.0                       # tp 0, gt 1, pred 0
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_excluded():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1]]), np.array([[0, 1]]))
    assert math.isnan(cm.iou()[2])
    assert cm.miou() == 1.0


def test_one_matrix_over_split_differs_from_mean_of_images():
    a_pred, a_gt = torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 0])
    b_pred, b_gt = torch.tensor([0]), torch.tensor([0])
    split = miou([a_pred, b_pred], [a_gt, b_gt], 2)
    # class0: tp1, gt2, pred1 -> 1/2 ; class1: tp3, gt3, pred4 -> 3/4
    assert split == pytest.approx((0.5 + 0.75) / 2)


def test_merge_equals_single_accumulation():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, (5, 6)) for _ in range(6)]
    gts = [rng.choice([0, 1, 2, 3, 255], (5, 6)) for _ in range(6)]
    whole = ConfusionMatrix(4)
    parts = [ConfusionMatrix(4), ConfusionMatrix(4)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.update(p, g)
        parts[i % 2].update(p, g)
    merged = parts[0].merge(parts[1])
    assert torch.equal(merged.matrix, whole.matrix)
    assert merged.miou() == whole.miou()


@pytest.mark.parametrize("mode, expected_iou1", [("drop", 1.0), ("background", 0.5), ("wrong", 0.5)])
def test_predicted_ignore_modes(mode, expected_iou1):
    gt = torch.tensor([0, 1, 1])
    pred = torch.tensor([0, 1, 255])
    cm = ConfusionMatrix(2, pred_ignore=mode)
    cm.update(pred, gt)
    assert cm.iou()[1].item() == pytest.approx(expected_iou1)
    if mode == "background":
        assert cm.iou()[0].item() == pytest.approx(0.5)
    if mode == "wrong":
        assert cm.iou()[0].item() == pytest.approx(1.0)
        assert cm.pixel_accuracy() == pytest.approx(2 / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="value 5"):
        ConfusionMatrix(2).update(torch.zeros(2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(2).merge(ConfusionMatrix(3))
    with pytest.raises(ValueError, match="class names"):
        ConfusionMatrix(2).summary(["a"])


def test_summary_is_json_ready():
    import json
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    summary = cm.summary(["background", "cat"])
    json.dumps(summary)
    assert summary["per_class_iou"]["background"] == pytest.approx(0.5)
    assert summary["per_class_iou"]["cat"] == 0.0
