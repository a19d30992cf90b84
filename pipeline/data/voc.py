"""PASCAL VOC 2012 in the VOCdevkit layout (also what the synthetic generator writes).

::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png        palette PNGs, 0 = background, 255 = ignore
    <root>/SegmentationClassAug/<id>.png     SBD-augmented masks (optional, grey PNGs)
    <root>/ImageSets/Segmentation/<split>.txt
    <root>/Annotations/<id>.xml              (label_source = "xml")
    <root>/cls_labels.npy                    (label_source = "cls_labels")

Splits whose name ends in ``_aug`` (``train_aug``: 10,582 images) read their masks from
``SegmentationClassAug``; other splits from ``SegmentationClass``, falling back to
``SegmentationClassAug`` for ids that have no mask there. Image-level labels come from the
masks (default), from ``cls_labels.npy`` (a pickled dict id -> 20-dim vector, as in PSA/IRN;
keys may be ``"2007_000032"`` or the IRN integer ``2007000032``), or from the XML object names.
"""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.data.base import DatasetError, SegDataset, read_split_file

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")

SPLIT_DIR = Path("ImageSets/Segmentation")


def split_file(root: Path, split: str) -> Path:
    return Path(root) / SPLIT_DIR / f"{split}.txt"


def _mask_dir_for(root: Path, split: str) -> tuple[Path, Path | None]:
    """Primary mask directory for the split and an optional fallback."""
    plain, aug = root / "SegmentationClass", root / "SegmentationClassAug"
    if split.endswith("_aug"):
        return aug, None
    if not plain.is_dir():
        return aug, None
    return plain, aug if aug.is_dir() else None


def _cls_labels_matrix(path: Path, ids: list[str], num_fg: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"label_source=cls_labels but {path} does not exist")
    try:
        table = np.load(path, allow_pickle=True).item()
    except (OSError, ValueError, AttributeError) as err:
        raise DatasetError(f"{path} is not a pickled dict of label vectors: {err}") from None
    rows = []
    for item in ids:
        key = item if item in table else (int(item.replace("_", "")) if item.replace("_", "").isdigit() else None)
        if key not in table:
            raise DatasetError(f"{path} has no labels for id {item!r}")
        row = np.asarray(table[key], dtype=np.float32).reshape(-1)
        if row.shape != (num_fg,):
            raise DatasetError(f"{path}: labels of id {item!r} have {row.size} entries, expected {num_fg}")
        rows.append(row)
    return np.stack(rows)


def _xml_labels_matrix(root: Path, ids: list[str], class_names: list[str]) -> np.ndarray:
    index = {name: c for c, name in enumerate(class_names)}
    matrix = np.zeros((len(ids), len(class_names) - 1), np.float32)
    for row, item in enumerate(ids):
        path = root / "Annotations" / f"{item}.xml"
        if not path.is_file():
            raise DatasetError(f"label_source=xml but annotation {path} does not exist (id {item!r})")
        try:
            tree = ET.parse(path)
        except ET.ParseError as err:
            raise DatasetError(f"annotation {path} is not valid XML: {err}") from None
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in index or index[name] == 0:
                raise DatasetError(f"annotation {path}: unknown class name {name!r}")
            matrix[row, index[name] - 1] = 1.0
    return matrix


def read_class_names(root: Path) -> list[str]:
    """VOC's 21 names, or those of ``dataset.json`` when the tree carries one (synthetic)."""
    meta = Path(root) / "dataset.json"
    if meta.is_file():
        names = json.loads(meta.read_text()).get("class_names")
        if names:
            return list(names)
    return list(VOC_CLASSES)


def voc_dataset(root: Path, split: str, mask_dir: Path | None = None, transform=None,
                label_source: str = "masks", labels_file: Path | None = None,
                require_labels: bool = False, class_names: list[str] | None = None,
                name: str = "voc") -> SegDataset:
    """A VOC-layout split. ``mask_dir`` replaces the ground truth by ``<mask_dir>/<id>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist")
    ids = read_split_file(split_file(root, split))
    names = list(class_names) if class_names else read_class_names(root)
    images = root / "JPEGImages"

    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            raise DatasetError(f"mask directory {mask_dir} does not exist")
        mask_path = lambda i: mask_dir / f"{i}.png"  # noqa: E731
    else:
        primary, fallback = _mask_dir_for(root, split)

        def mask_path(i: str) -> Path:
            path = primary / f"{i}.png"
            if fallback is not None and not path.is_file():
                return fallback / f"{i}.png"
            return path

    matrix = None
    if label_source == "cls_labels":
        matrix = _cls_labels_matrix(Path(labels_file) if labels_file else root / "cls_labels.npy",
                                    ids, len(names) - 1)
    elif label_source == "xml":
        matrix = _xml_labels_matrix(root, ids, names)
    elif label_source != "masks":
        raise DatasetError(f"data.label_source: unknown value {label_source!r} (masks, cls_labels, xml)")
    return SegDataset(root, ids, names, image_path=lambda i: images / f"{i}.jpg",
                      mask_path=mask_path, label_matrix=matrix, transform=transform,
                      require_labels=require_labels, name=f"{name} {split}")
