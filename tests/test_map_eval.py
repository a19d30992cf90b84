import numpy as np
import pytest

from pipeline.map_eval import evaluate_maps, label_map
from pipeline.maps_io import MapFileError, save_maps


class FakeDataset:
    """Just what evaluate_maps reads: ids, class_names, num_classes, load_mask."""

    def __init__(self, masks):
        self.masks = masks
        self.ids = list(masks)
        self.class_names = ["background", "a", "b"]
        self.num_classes = 3

    def load_mask(self, item):
        return self.masks[item]


def test_label_map_argmax_with_background_threshold():
    maps = np.array([[[0.9, 0.2], [0.5, 0.0]],
                     [[0.1, 0.6], [0.5, 0.3]]], np.float32)
    classes = np.array([2, 1])
    assert label_map(classes, maps, 0.4).tolist() == [[2, 1], [2, 0]]  # tie 0.5/0.5 -> first class
    assert label_map(classes, maps, 0.5).tolist() == [[2, 1], [0, 0]]  # peak == t -> background
    assert label_map(classes, np.zeros((0, 2, 2)), 0.1).tolist() == [[0, 0], [0, 0]]


def test_curve_best_threshold_and_side_by_side(tmp_path):
    # one 1x4 image: gt = [0, 1, 1, 255]
    mask = np.array([[0, 1, 1, 255]], np.uint8)
    maps = np.array([[[0.3125, 0.8125, 0.625, 0.875]]], np.float32)    # MCIS: right at t in [0.3, 0.6)
    cams = np.array([[[0.6875, 0.8125, 0.1875, 0.875]]], np.float32)    # CAM: always misses something
    save_maps(tmp_path / "x.npy", [1], maps, cams)
    result = evaluate_maps(tmp_path, FakeDataset({"x": mask}), [0.1, 0.4, 0.7])
    curve = result["maps"]["curve"]
    # t=0.1: pred [1,1,1] -> bg IoU 0/1, cls1 IoU 2/3 -> mean 1/3 (class 2 absent in both)
    assert curve["0.1"] == pytest.approx((0 + 2 / 3) / 2)
    assert curve["0.4"] == pytest.approx(1.0)
    # t=0.7: pred [0,1,0] -> bg IoU 1/2, cls1 IoU 1/2
    assert curve["0.7"] == pytest.approx(0.5)
    assert result["maps"]["best_threshold"] == 0.4 and result["maps"]["best_miou"] == pytest.approx(1.0)
    # CAM t=0.7: pred [0,1,0] -> 0.5; t=0.4: [1,1,0] -> bg 0/2, cls1 1/3 -> 1/6
    assert result["cams"]["curve"]["0.4"] == pytest.approx(1 / 6)
    assert result["cams"]["best_threshold"] == 0.7
    # all-background: bg IoU 1/3, cls1 0 -> 1/6
    assert result["background_miou"] == pytest.approx(1 / 6)
    assert "MCIS maps 100.0" in result["headline"] and result["num_images"] == 1


def test_missing_and_bad_inputs(tmp_path):
    mask = np.zeros((2, 2), np.uint8)
    dataset = FakeDataset({"x": mask, "y": mask})
    save_maps(tmp_path / "x.npy", [1], np.ones((1, 2, 2)))
    with pytest.raises(MapFileError, match="y.npy"):
        evaluate_maps(tmp_path, dataset, [0.5])
    assert evaluate_maps(tmp_path, dataset, [0.5], missing="skip")["missing"] == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_maps(tmp_path, dataset, [1.5])
    save_maps(tmp_path / "y.npy", [1], np.ones((1, 3, 2)))
    with pytest.raises(MapFileError, match="y.npy.*2x3"):
        evaluate_maps(tmp_path, dataset, [0.5])
    save_maps(tmp_path / "y.npy", [7], np.ones((1, 2, 2)))
    with pytest.raises(MapFileError, match="class ids \\[7\\]"):
        evaluate_maps(tmp_path, dataset, [0.5])
