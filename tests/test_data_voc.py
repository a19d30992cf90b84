"""VOC reader on a VOC-layout tree written by the synthetic generator (+ an SBD-aug variant)."""


import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pipeline.config import DataConfig, SyntheticConfig
from pipeline.data import DatasetError, build_dataset, labels_from_mask, voc_dataset
from pipeline.data.palette import read_label_png, save_label_png

SYN = SyntheticConfig(num_classes=3, num_train=6, num_val=4, image_size=32, seed=3)


def test_voc_reader_on_generated_tree(generated):
    ds = voc_dataset(generated, "train")
    assert ds.ids == [f"train_{i:05d}" for i in range(6)]
    assert ds.class_names[0] == "background" and ds.num_classes == 4
    assert ds.root == generated
    ds.validate()
    for i, item in enumerate(ds.ids):
        mask = ds.load_mask(item)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32)
        np.testing.assert_array_equal(ds.labels(item), labels_from_mask(mask, 4))
        assert ds.labels(item).sum() >= 1                 # 1-3 objects per image
    sample = ds[2]
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].dtype == torch.uint8
    assert sample["image"].shape == (3, 32, 32)
    assert isinstance(sample["mask"], tv_tensors.Mask) and sample["mask"].dtype == torch.int64
    assert sample["labels"].dtype == torch.float32 and sample["labels"].shape == (3,)
    assert sample["id"] == "train_00002"
    np.testing.assert_array_equal(sample["mask"].numpy(), ds.load_mask("train_00002"))
    assert ds.label_matrix().shape == (6, 3)


def test_build_dataset_synthetic_generates_once(tmp_path):
    cfg = DataConfig(dataset="synthetic", root=tmp_path / "syn", synthetic=SYN)
    ds = build_dataset(cfg, "val")
    assert len(ds) == 4 and ds.name == "synthetic val"
    meta = tmp_path / "syn" / "dataset.json"
    stamp = meta.stat().st_mtime_ns
    build_dataset(cfg, "train")
    assert meta.stat().st_mtime_ns == stamp             # not regenerated


def _to_sbd_aug(root, modify: str):
    """Move train masks into SegmentationClassAug as grey PNGs, write a DeepLab-style
    train_aug.txt; ``modify``'s aug mask differs from its SegmentationClass one."""
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    for item in ids:
        mask = read_label_png(root / "SegmentationClass" / f"{item}.png")
        if item == modify:
            mask = np.zeros_like(mask)
            mask[:4, :4] = 1
        Image.fromarray(mask, mode="L").save(aug / f"{item}.png")
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(lines) + "\n")
    return ids


def test_sbd_aug_variant(tree):
    ids = _to_sbd_aug(tree, modify="train_00001")
    aug = voc_dataset(tree, "train_aug")
    assert aug.ids == ids
    assert aug.mask_path("train_00001").parent.name == "SegmentationClassAug"
    expected = np.zeros((32, 32), np.uint8)
    expected[:4, :4] = 1
    np.testing.assert_array_equal(aug.load_mask("train_00001"), expected)
    np.testing.assert_array_equal(aug.labels("train_00001"), [1, 0, 0])
    plain = voc_dataset(tree, "train")                  # VOC's own masks win for "train"
    assert plain.mask_path("train_00001").parent.name == "SegmentationClass"
    assert not np.array_equal(plain.load_mask("train_00001"), expected)
    # an id without a SegmentationClass mask falls back to SegmentationClassAug
    (tree / "SegmentationClass" / "train_00001.png").unlink()
    np.testing.assert_array_equal(voc_dataset(tree, "train").load_mask("train_00001"), expected)


def test_labels_from_cls_labels_npy(tree):
    ids = (tree / "ImageSets/Segmentation/val.txt").read_text().split()
    table = {item: np.eye(3, dtype=np.float32)[k % 3] for k, item in enumerate(ids)}
    np.save(tree / "cls_labels.npy", table)
    ds = voc_dataset(tree, "val", label_source="cls_labels")
    np.testing.assert_array_equal(ds.label_matrix(), np.stack([table[i] for i in ids]))
    other = tree / "elsewhere.npy"
    np.save(other, {item: np.ones(3, np.float32) for item in ids})
    assert voc_dataset(tree, "val", label_source="cls_labels", labels_file=other).label_matrix().sum() == 12
    with pytest.raises(DatasetError, match="missing.npy"):
        voc_dataset(tree, "val", label_source="cls_labels", labels_file=tree / "missing.npy")


def test_cls_labels_irn_integer_keys(tmp_path):
    """IRN stores keys as integers (2007_000032 -> 2007000032)."""
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    ids = ["2007_000032", "2007_000039"]
    for item in ids:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{item}.jpg")
        save_label_png(root / "SegmentationClass" / f"{item}.png", np.zeros((8, 8), np.uint8))
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    vec = np.zeros(20, np.float32)
    vec[[0, 14]] = 1                                     # aeroplane, person
    np.save(root / "cls_labels.npy", {2007000032: vec, 2007000039: vec[::-1].copy()})
    ds = voc_dataset(root, "val", label_source="cls_labels")
    assert ds.class_names[1] == "aeroplane" and ds.num_classes == 21
    np.testing.assert_array_equal(ds.labels("2007_000032"), vec)
    np.testing.assert_array_equal(ds.labels("2007_000039"), vec[::-1])


def test_labels_from_xml(tree):
    ds = voc_dataset(tree, "val")
    names = ds.class_names
    (tree / "Annotations").mkdir()
    for k, item in enumerate(ds.ids):
        objects = "".join(f"<object><name>{names[c]}</name></object>" for c in (1 + k % 3, 3))
        (tree / "Annotations" / f"{item}.xml").write_text(f"<annotation>{objects}</annotation>")
    xml = voc_dataset(tree, "val", label_source="xml")
    expected = np.zeros((4, 3), np.float32)
    for k in range(4):
        expected[k, k % 3] = expected[k, 2] = 1
    np.testing.assert_array_equal(xml.label_matrix(), expected)
    (tree / "Annotations" / f"{ds.ids[0]}.xml").write_text(
        "<annotation><object><name>dragon</name></object></annotation>")
    with pytest.raises(DatasetError, match="'dragon'"):
        voc_dataset(tree, "val", label_source="xml")


def test_mask_dir_replaces_ground_truth(tree, tmp_path):
    pseudo = tmp_path / "pseudo"
    ids = (tree / "ImageSets/Segmentation/val.txt").read_text().split()
    for item in ids:
        save_label_png(pseudo / f"{item}.png", np.full((32, 32), 2, np.uint8))
    ds = voc_dataset(tree, "val", mask_dir=pseudo)
    assert ds.mask_path(ids[0]) == pseudo / f"{ids[0]}.png"
    assert (ds[0]["mask"] == 2).all()
    with pytest.raises(DatasetError, match="nowhere"):
        voc_dataset(tree, "val", mask_dir=tmp_path / "nowhere")
