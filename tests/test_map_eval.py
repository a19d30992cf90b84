import numpy as np
import pytest

from pipeline.map_eval import evaluate_maps, label_map, map_diagnostics, roc_auc
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


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)           # flat map
    # positives 0.3, 0.9 vs negatives 0.1, 0.3, 0.5: pairs won 1 + 0.5 + 0 + 1 + 1 + 1 = 4.5 of 6
    assert roc_auc([0.3, 0.9, 0.1, 0.3, 0.5], [1, 1, 0, 0, 0]) == pytest.approx(4.5 / 6)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_map_diagnostics_hand_computed(tmp_path):
    # image x: gt [0, 1, 1, 0, 255]; image y: gt [2, 2, 0, 0, 0] (class 2 only); z: no label
    masks = {"x": np.array([[0, 1, 1, 0, 255]], np.uint8), "y": np.array([[2, 2, 0, 0, 0]], np.uint8),
             "z": np.zeros((1, 5), np.uint8)}
    save_maps(tmp_path / "z.npy", [], np.zeros((0, 1, 5)))
    # MCIS: x leaks onto the background pixel 0; y's map is all zero (empty)
    save_maps(tmp_path / "x.npy", [1], np.array([[[0.8, 0.9, 0.6, 0.2, 1.0]]]),
              np.array([[[0.1, 0.9, 0.2, 0.1, 0.0]]]))
    save_maps(tmp_path / "y.npy", [2], np.zeros((1, 1, 5)), np.array([[[0.7, 0.2, 0.0, 0.0, 0.0]]]))
    d = map_diagnostics(tmp_path, FakeDataset(masks), {"maps": 0.5, "cams": 0.5})
    assert d["num_images"] == 3 and d["num_maps"] == 2 and d["images"] == {"a": 1, "b": 1}
    maps, cams = d["maps"], d["cams"]
    # MCIS at 0.5: x -> [1, 1, 1, 0, (ignored)], y -> all 0
    a = maps["per_class"]["a"]
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(1.0)
    assert a["iou"] == pytest.approx(2 / 3)
    assert maps["per_class"]["b"]["precision"] is None and maps["per_class"]["b"]["recall"] == 0
    assert maps["per_class"]["background"]["recall"] == pytest.approx(9 / 10)
    assert maps["foreground_precision"] == pytest.approx(2 / 3) and maps["foreground_recall"] == pytest.approx(2 / 4)
    assert maps["empty_maps"] == 1 and cams["empty_maps"] == 0
    # AUC on labelled pixels: x: positives 0.9, 0.6 vs 0.8, 0.2 -> 3 of 4 pairs; y: flat -> 0.5
    assert a["auc"] == pytest.approx(0.75) and maps["per_class"]["b"]["auc"] == pytest.approx(0.5)
    assert maps["mean_auc"] == pytest.approx(0.625)
    # inside/outside means over the two (image, class) maps (float16 storage)
    assert maps["inside"] == pytest.approx((0.75 + 0.0) / 2, abs=1e-3)
    assert maps["outside"] == pytest.approx((0.5 + 0.0) / 2, abs=1e-3)
    # CAM at 0.5: x -> [0, 1, 0, 0], y -> [2, 0, 0, 0, 0]
    assert cams["per_class"]["a"]["recall"] == pytest.approx(0.5) and cams["per_class"]["a"]["precision"] == 1.0
    assert cams["per_class"]["b"]["iou"] == pytest.approx(0.5)
    assert cams["foreground_precision"] == 1.0 and cams["foreground_recall"] == pytest.approx(2 / 4)
    assert cams["per_class"]["a"]["auc"] == pytest.approx(1.0) and cams["per_class"]["b"]["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kinds"):
        map_diagnostics(tmp_path, FakeDataset(masks), {"crf": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        map_diagnostics(tmp_path, FakeDataset(masks), {"maps": 2.0})


def test_coco_tiny_benchmark_uses_the_official_classifier_recipe(tmp_path):
    """benchmarks/quality_coco_tiny.py starts from the demo preset: the demo's AdamW with a 1x
    new-layer lr must not leak into the documented SGD recipe (it did once)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality_coco_tiny.py"
    spec = importlib.util.spec_from_file_location("quality_coco_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.build_config(tmp_path / "coco", tmp_path / "work", overrides=["classifier.epochs=2"])
    c = cfg.classifier
    assert (c.optimizer, c.lr, c.new_layer_lr_mult, c.weight_decay) == ("sgd", 0.001, 10.0, 0.0005)
    assert c.momentum == 0.9 and c.nesterov and c.batch_size == 5 and c.epochs == 2
    assert c.backbone == "efficientnet_lite0" and c.pretrained and c.freeze_bn
    assert cfg.data.dataset == "coco" and cfg.maps.split == "val" and cfg.maps.self_pairs
