"""Pseudo-mask evaluation: both ways of counting predicted 255, labelled fraction, bad input."""

import numpy as np
import pytest

from pipeline.config import DataConfig, SyntheticConfig
from pipeline.data import build_dataset
from pipeline.data.palette import save_label_png
from pipeline.mask_eval import evaluate_masks, headline


class TinyDataset:
    """Just what evaluate_masks reads from a SegDataset (hand-computable ground truth)."""

    def __init__(self, masks):
        self.masks = masks
        self.ids = list(masks)
        self.class_names = ["background", "a", "b"]
        self.num_classes = 3

    def load_mask(self, image_id):
        return self.masks[image_id]


GT = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
PRED = np.array([[0, 255, 1, 1], [2, 0, 1, 255]], np.uint8)


def test_hand_computed_case(tmp_path):
    save_label_png(tmp_path / "x.png", PRED)
    result = evaluate_masks(tmp_path, TinyDataset({"x": GT}))
    # 255 dropped: M = [[1,0,0],[0,2,0],[1,0,1]] -> IoU 1/2, 1, 1/2
    assert result["ignore_dropped"]["per_class_iou"] == pytest.approx({"background": 0.5, "a": 1.0, "b": 0.5})
    assert result["miou"] == pytest.approx(2 / 3)
    # 255 as background: M = [[2,0,0],[1,2,0],[1,0,1]] -> IoU 2/4, 2/3, 1/2
    assert result["ignore_as_background"]["per_class_iou"] == pytest.approx(
        {"background": 0.5, "a": 2 / 3, "b": 0.5})
    assert result["miou_ignore_as_background"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert result["labelled_fraction"] == pytest.approx(6 / 8)
    assert result["images"] == 1 and result["missing"] == 0
    assert headline(result) == "mIoU 66.7% (255 dropped) / 55.6% (255 as background), 75.0% of pixels labelled, 1 images"


def test_ground_truth_as_prediction_scores_one(tmp_path):
    cfg = DataConfig(dataset="synthetic", root=tmp_path / "syn",
                     synthetic=SyntheticConfig(num_classes=2, num_train=3, num_val=1, image_size=32))
    dataset = build_dataset(cfg, "train")
    for image_id in dataset.ids:
        save_label_png(tmp_path / "pred" / f"{image_id}.png", dataset.load_mask(image_id))
    result = evaluate_masks(tmp_path / "pred", dataset)
    assert result["miou"] == pytest.approx(1.0) and result["miou_ignore_as_background"] == pytest.approx(1.0)
    assert result["images"] == 3


def test_missing_masks_error_or_skip(tmp_path):
    save_label_png(tmp_path / "x.png", PRED)
    dataset = TinyDataset({"x": GT, "y": GT})
    with pytest.raises(FileNotFoundError, match=r"y.png"):
        evaluate_masks(tmp_path, dataset)
    result = evaluate_masks(tmp_path, dataset, missing="skip")
    assert result["missing"] == 1 and result["images"] == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_masks(tmp_path / "nowhere", dataset)


def test_bad_predictions_are_named(tmp_path):
    save_label_png(tmp_path / "x.png", PRED[:, :3])
    with pytest.raises(ValueError, match=r"x.png is 3x2 but the ground truth of 'x' is 4x2"):
        evaluate_masks(tmp_path, TinyDataset({"x": GT}))
    save_label_png(tmp_path / "x.png", np.full((2, 4), 7, np.uint8))
    with pytest.raises(ValueError, match=r"x.png holds values \[7\] outside the 3 classes"):
        evaluate_masks(tmp_path, TinyDataset({"x": GT}))
