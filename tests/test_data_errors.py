"""One test per bad-input case of the datasets: a DatasetError naming the file/field."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig, SyntheticConfig
from pipeline.data import DatasetError, build_dataset, voc_dataset
from pipeline.data.coco import coco_dataset
from pipeline.data.palette import save_label_png

SYN = SyntheticConfig(num_classes=3, num_train=4, num_val=3, image_size=32, seed=11)


def test_missing_dataset_root(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root .*nowhere does not exist"):
        voc_dataset(tmp_path / "nowhere", "train")
    cfg = DataConfig(dataset="voc", root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        build_dataset(cfg, "train")


def test_missing_split_file(tree):
    with pytest.raises(DatasetError, match=r"split file .*train_aug\.txt does not exist"):
        voc_dataset(tree, "train_aug")


def test_id_listed_without_image(tree):
    (tree / "JPEGImages" / "val_00001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"'val_00001'.*image .*val_00001\.jpg does not exist"):
        voc_dataset(tree, "val")


def test_id_listed_without_mask(tree):
    (tree / "SegmentationClass" / "val_00002.png").unlink()
    with pytest.raises(DatasetError, match=r"'val_00002'.*mask .*val_00002\.png does not exist"):
        voc_dataset(tree, "val")


def test_unreadable_image(tree):
    (tree / "JPEGImages" / "val_00000.jpg").write_bytes(b"this is not a jpeg")
    ds = voc_dataset(tree, "val")                       # cheap build: files exist
    with pytest.raises(DatasetError, match=r"val_00000\.jpg.*unreadable"):
        ds.load_image("val_00000")
    with pytest.raises(DatasetError, match=r"val_00000\.jpg"):
        ds.validate()


def test_truncated_image(tree):
    path = tree / "JPEGImages" / "val_00001.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = voc_dataset(tree, "val")
    with pytest.raises(DatasetError, match=r"val_00001\.jpg.*truncated"):
        ds[1]


def test_mask_values_outside_classes(tree):
    mask = np.zeros((32, 32), np.uint8)
    mask[3:6, 3:6] = 7                                  # 3 classes + background: 0..3
    mask[0, 0] = 255                                    # ignore is fine
    save_label_png(tree / "SegmentationClass" / "val_00002.png", mask)
    ds = voc_dataset(tree, "val")
    with pytest.raises(DatasetError, match=r"val_00002\.png.*\[7\] outside the 4 classes"):
        ds.validate()


def test_16_bit_mask_values_that_do_not_fit_are_rejected(tree, tmp_path):
    """A 16-bit mask holding 257 must not wrap to class 1; one holding only 0..255 reads."""
    from pipeline.data.palette import read_label_png

    path = tree / "SegmentationClass" / "val_00001.png"
    mask = np.zeros((32, 32), np.uint16)
    mask[2:5, 2:5] = 257
    mask[0, 0] = 255
    Image.fromarray(mask).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")                    # written as a 16-bit grey PNG
    with pytest.raises(ValueError, match=r"val_00001\.png \(I;16\w*\) holds values 257 outside 0\.\.255"):
        read_label_png(path)
    ds = voc_dataset(tree, "val")
    with pytest.raises(DatasetError, match=r"val_00001\.png.*257 outside 0\.\.255"):
        ds.validate()
    mask[2:5, 2:5] = 2
    Image.fromarray(mask).save(tmp_path / "ok.png")
    ok = read_label_png(tmp_path / "ok.png")
    assert ok.dtype == np.uint8 and ok[3, 3] == 2 and ok[0, 0] == 255


def test_image_and_mask_sizes_differ(tree):
    save_label_png(tree / "SegmentationClass" / "val_00000.png", np.zeros((20, 30), np.uint8))
    ds = voc_dataset(tree, "val")
    with pytest.raises(DatasetError, match=r"val_00000\.jpg is 32x32 but mask .*val_00000\.png is 30x20"):
        ds[0]


def test_empty_label_set_where_required(tree):
    save_label_png(tree / "SegmentationClass" / "train_00003.png", np.zeros((32, 32), np.uint8))
    assert voc_dataset(tree, "train").labels("train_00003").sum() == 0   # fine when not required
    with pytest.raises(DatasetError, match=r"empty label set.*'train_00003'"):
        voc_dataset(tree, "train", require_labels=True)


def test_unknown_class_name_in_coco_mapping(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "val2014" / "a.jpg")
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": [],
        "categories": [{"id": 3, "name": "car"}, {"id": 2, "name": "bicycle"}]}))
    cfg = DataConfig(dataset="coco", root=root, coco_year=2014, coco_mapping={"car": "automobile"})
    with pytest.raises(DatasetError, match=r"coco_mapping.*'automobile'"):
        build_dataset(cfg, "val")
    cfg = DataConfig(dataset="coco", root=root, coco_year=2014, coco_mapping={"truck": "car"})
    with pytest.raises(DatasetError, match=r"coco_mapping.*'truck'"):
        build_dataset(cfg, "val")
    assert len(coco_dataset(root, "val", 2014, "voc", mapping={"car": "car"})) == 1
