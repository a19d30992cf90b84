"""COCO reader: a JSON fixture with polygon + compressed RLE + list RLE + crowd, exact pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DatasetError, build_dataset
from pipeline.data.coco import COCO_TO_VOC, coco_dataset, decode_rle_counts, rle_to_mask
from pipeline.data.palette import read_label_png, save_label_png
from pipeline.data.voc import VOC_CLASSES
from pipeline.config import DataConfig

H, W = 6, 8
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 4, "name": "motorcycle"},
              {"id": 5, "name": "dining table"}, {"id": 6, "name": "giraffe"},
              {"id": 16, "name": "bird"}]
V = {n: c for c, n in enumerate(VOC_CLASSES)}


def _annotations():
    return [
        # polygon: pixel centres inside x in (1, 5), y in (1, 4) -> rows 1..3, cols 1..4
        {"id": 1, "image_id": 10, "category_id": 1, "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
        # compressed RLE "324OR1" = counts [3, 2, 4, 1, 38] (hand-derived from COCO's
        # encoding: 'O' = 31 -> -1 delta to 2; 'R','1' = 2 | 1<<5 = 34 delta to 4):
        # column-major indices 3, 4, 9 -> (row 3, col 0), (4, 0), (3, 1)
        {"id": 2, "image_id": 10, "category_id": 4, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": "324OR1"}},
        # uncompressed RLE: the last column (flat indices 42..47)
        {"id": 3, "image_id": 10, "category_id": 5, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": [42, 6]}},
        # crowd (bird): col 6 rows 0..2 and col 7 rows 0..2 -> ignore, col 7 then repainted
        {"id": 4, "image_id": 10, "category_id": 16, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [36, 3, 3, 3, 3]}},
        # giraffe (not a VOC class): rows 4..5, cols 4..5
        {"id": 5, "image_id": 10, "category_id": 6, "iscrowd": 0,
         "segmentation": [[4, 4, 6, 4, 6, 6, 4, 6]]},
    ]


def _write_coco(root: Path, split: str = "train", year: int = 2017, annotations=None,
                categories=None) -> Path:
    images_dir = root / f"{split}{year}"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id, name in ((10, "000000000010.jpg"), (20, "000000000020.jpg")):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    data = {"images": images, "annotations": _annotations() if annotations is None else annotations,
            "categories": CATEGORIES if categories is None else categories}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
    return root


def _expected_voc() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[1:4, 1:5] = V["person"]
    m[3, 0] = m[4, 0] = m[3, 1] = V["motorbike"]      # smaller instance painted after person
    m[0:3, 6] = 255                                   # crowd
    m[:, 7] = V["diningtable"]                        # instance painted over the crowd
    return m


def test_rle_string_decoding_known_values():
    assert decode_rle_counts("324OR1") == [3, 2, 4, 1, 38]
    assert decode_rle_counts("X1") == [40]             # 40 = 8 | 1 << 5, two groups
    mask = rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3)
    # column-major: flat [0, 1, 1, 0, 0, 0] -> (1, 0) and (0, 1)
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="sum"):
        rle_to_mask({"counts": [1, 2]}, 2, 3)


def test_coco_voc_mapping_exact_pixels(tmp_path):
    root = _write_coco(tmp_path / "coco")
    ds = coco_dataset(root, "train", 2017, "voc")
    assert ds.ids == ["000000000010", "000000000020"]
    assert ds.class_names == list(VOC_CLASSES)
    np.testing.assert_array_equal(ds.load_mask("000000000010"), _expected_voc())
    np.testing.assert_array_equal(ds.load_mask("000000000020"), np.zeros((H, W), np.uint8))
    labels = ds.labels("000000000010")
    assert set(np.flatnonzero(labels) + 1) == {V["person"], V["motorbike"], V["diningtable"]}
    assert ds.labels("000000000020").sum() == 0        # kept, with an empty label set
    item = ds[0]
    assert item["image"].shape == (3, H, W) and item["mask"].shape == (H, W)
    assert (root / "wsss_masks" / "train2017_voc" / "000000000010.png").is_file()


def test_coco_all_classes_order_and_custom_mapping(tmp_path):
    root = _write_coco(tmp_path / "coco")
    ds = coco_dataset(root, "train", 2017, "all")
    assert ds.class_names == ["background", "person", "motorcycle", "dining table", "giraffe", "bird"]
    mask = ds.load_mask("000000000010")
    assert (mask[4:6, 4:6] == 4).all() and mask[2, 2] == 1 and mask[3, 1] == 2 and (mask[:, 7] == 3).all()

    custom = coco_dataset(root, "train", 2017, "voc", mapping={"giraffe": "horse"})
    mask = custom.load_mask("000000000010")
    expected = np.zeros((H, W), np.uint8)
    expected[4:6, 4:6] = V["horse"]
    # person, motorcycle, dining table and the bird crowd are unmapped here: background
    np.testing.assert_array_equal(mask, expected)
    assert list(np.flatnonzero(custom.labels("000000000010")) + 1) == [V["horse"]]


def test_default_mapping_covers_voc_once():
    assert sorted(COCO_TO_VOC.values()) == sorted(VOC_CLASSES[1:])
    assert COCO_TO_VOC["motorcycle"] == "motorbike" and COCO_TO_VOC["couch"] == "sofa"


def test_coco_unknown_class_name_in_mapping(tmp_path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match="'zebra_horse'"):
        coco_dataset(root, "train", 2017, "voc", mapping={"giraffe": "zebra_horse"})
    with pytest.raises(DatasetError, match="'unicorn'"):
        coco_dataset(root, "train", 2017, "voc", mapping={"unicorn": "horse"})


def test_coco_mask_cache_reused(tmp_path):
    root = _write_coco(tmp_path / "coco")
    coco_dataset(root, "train", 2017, "voc")
    cached = root / "wsss_masks" / "train2017_voc" / "000000000010.png"
    marker = np.full((H, W), V["cat"], np.uint8)      # a mask the annotations cannot give
    save_label_png(cached, marker)
    again = coco_dataset(root, "train", 2017, "voc")
    np.testing.assert_array_equal(again.load_mask("000000000010"), marker)
    assert not list(cached.parent.glob(".*tmp*"))       # no temp leftovers


def test_coco_cache_falls_back_when_root_read_only(tmp_path, monkeypatch):
    """A read-only root (like the shared coco-tiny) is left untouched, even for uid 0."""
    root = _write_coco(tmp_path / "coco")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root.chmod(0o555)
    try:
        ds = coco_dataset(root, "train", 2017, "voc")
    finally:
        root.chmod(0o755)
    assert not (root / "wsss_masks").exists()
    assert ds.mask_path("000000000010").is_relative_to(tmp_path / "home" / ".cache" / "wsss")
    np.testing.assert_array_equal(ds.load_mask("000000000010"), _expected_voc())


def test_coco_through_build_dataset_and_require_labels(tmp_path):
    root = _write_coco(tmp_path / "coco")
    cfg = DataConfig(dataset="coco", root=root, coco_year=2017, coco_classes="voc")
    assert len(build_dataset(cfg, "train")) == 2
    with pytest.raises(DatasetError, match="empty label set.*000000000020"):
        build_dataset(cfg, "train", require_labels=True)
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        build_dataset(cfg, "val")


def _coco_tiny() -> Path | None:
    for candidate in (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny",
                      Path("/work/shared/data/coco-tiny")):
        if (candidate / "annotations" / "instances_val2017.json").is_file():
            return candidate
    return None


@pytest.mark.skipif(_coco_tiny() is None, reason="coco-tiny not found (../shared/data/coco-tiny "
                    "beside the clone, or /work/shared/data/coco-tiny)")
def test_coco_tiny_real_annotations(tmp_path):
    root = _coco_tiny()
    ds = coco_dataset(root, "val", 2017, "voc", cache_dir=tmp_path / "masks")
    assert len(ds) == 50 and ds.num_classes == 21
    ds.validate()                                     # all images decode, sizes agree
    matrix = ds.label_matrix()
    assert matrix[:, V["person"] - 1].sum() > 0
    saw_crowd = False
    for item in ds.ids:
        mask = ds.load_mask(item)
        saw_crowd |= bool((mask == 255).any())
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present == set((np.flatnonzero(ds.labels(item)) + 1).tolist()), item
    assert saw_crowd                                  # coco-tiny val has crowd annotations
    assert len(list((tmp_path / "masks").glob("*.png"))) == 50
    assert read_label_png(ds.mask_path(ds.ids[0])).shape == ds.load_image(ds.ids[0]).shape[:2]
    train = coco_dataset(root, "train", 2017, "all", cache_dir=tmp_path / "train_all")
    assert len(train) == 50 and train.num_classes == 81 and train.class_names[1] == "person"
    # the one train image without annotations is kept, with an empty label set
    assert int((train.label_matrix().sum(axis=1) == 0).sum()) == 1
