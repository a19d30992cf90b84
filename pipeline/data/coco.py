"""MS COCO 2014/2017 instances JSON as semantic segmentation (all 80 classes or VOC's 20).

Layout::

    <root>/annotations/instances_<split><year>.json
    <root>/<split><year>/<file_name>                   e.g. train2017/000000391895.jpg

Ids are the image file stems (``000000391895``). Every image listed in the JSON is kept,
also those without annotations (empty label set; ``require_labels`` rejects them for stage 1).

Classes:

* ``classes="all"``: the 80 categories; class index ``c = 1 + position of the category id in
  the sorted category ids`` (so index 1 = "person", 80 = "toothbrush"), name = category name.
* ``classes="voc"``: VOC's 20 classes (:data:`~pipeline.data.voc.VOC_CLASSES` order) through
  a COCO-name -> VOC-name mapping (default :data:`COCO_TO_VOC`, e.g. motorcycle -> motorbike,
  airplane -> aeroplane, couch -> sofa, dining table -> diningtable, potted plant ->
  pottedplant, tv -> tvmonitor). Unmapped COCO categories become background. A key of a
  user mapping that is no category of the JSON, or a value that is no VOC class, is a
  :class:`DatasetError`.

Rasterisation (once per image, cached as palette PNGs under
``<root>/wsss_masks/<split><year>_<classes>/<id>.png``, ``voc-<hash>`` for a custom mapping;
when ``<root>`` is read-only (not writable, or without write permission bits, as the shared
coco-tiny) the cache goes to ``~/.cache/wsss/coco_masks/<hash of root>/`` instead; existing
files are reused (delete the directory after editing the annotations), new ones written
atomically):

* polygons: pixel (row r, col c) is inside when its centre ``(x, y) = (c + 0.5, r + 0.5)``
  lies inside the polygon (``skimage.draw.polygon`` on the vertices shifted by -0.5);
  several polygons of one annotation are united;
* RLE: ``counts`` alternate runs of 0 and 1 (starting with 0) over the pixels in
  column-major order (``mask.reshape((h, w), order="F")``); compressed string counts use
  COCO's encoding (5-bit groups, char = 48 + group, bit 0x20 = more groups follow, bit 0x10
  of the last group = sign, counts from the 4th on are deltas to the count two before);
* paint order: crowd regions first as 255 (ignore), then the non-crowd instances in
  decreasing pixel area (ties: annotation order), so a smaller instance lying on a larger
  one stays visible and an individually annotated object inside a crowd region keeps its
  class. Annotations of unmapped categories are not painted (their pixels stay background).

Image-level labels are the classes of the image's non-crowd annotations (mapped); they do
not depend on ``mask_dir`` (pseudo-masks).
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

from pipeline.data.base import IGNORE_INDEX, DatasetError, SegDataset
from pipeline.data.palette import save_label_png
from pipeline.data.voc import VOC_CLASSES

COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat",
    "bottle": "bottle", "bus": "bus", "car": "car", "cat": "cat", "chair": "chair",
    "cow": "cow", "dining table": "diningtable", "dog": "dog", "horse": "horse",
    "motorcycle": "motorbike", "person": "person", "potted plant": "pottedplant",
    "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}
CACHE_DIR = "wsss_masks"


# --------------------------------------------------------------------------- RLE / polygons
def decode_rle_counts(counts: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (inverse of pycocotools' rleToString)."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError(f"compressed RLE string ends inside a number: {counts!r}")
            group = ord(counts[pos]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """Bool (height, width) mask of an RLE dict with compressed or list ``counts``."""
    size = rle.get("size")
    if size is not None and list(size) != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image size [{height}, {width}]")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = decode_rle_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    runs_arr = np.asarray(runs, dtype=np.int64)
    if (runs_arr < 0).any() or runs_arr.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(runs_arr.sum())} (negative runs: "
                         f"{bool((runs_arr < 0).any())}), expected {height}*{width}={height * width}")
    flat = np.repeat((np.arange(runs_arr.size) % 2).astype(bool), runs_arr)
    return flat.reshape((height, width), order="F")


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """Bool mask of the union of COCO polygons ``[[x1, y1, x2, y2, ...], ...]``."""
    mask = np.zeros((height, width), bool)
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        rr, cc = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(height, width))
        mask[rr, cc] = True
    return mask


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation, height, width)
    raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")


def rasterize(annotations: list[dict], height: int, width: int, class_of: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) class map: crowd -> 255 first, then instances by decreasing area.

    ``class_of`` maps category id -> class index (0 = not painted).
    """
    out = np.zeros((height, width), np.uint8)
    instances = []
    for ann in annotations:
        cls = class_of[ann["category_id"]]
        if cls == 0:
            continue
        region = annotation_mask(ann["segmentation"], height, width)
        if ann.get("iscrowd", 0):
            out[region] = IGNORE_INDEX
        else:
            instances.append((region, cls))
    for region, cls in sorted(instances, key=lambda rc: -int(rc[0].sum())):   # stable sort
        out[region] = cls
    return out


# --------------------------------------------------------------------------- classes
def class_table(categories: list[dict], classes: str, mapping: dict[str, str] | None,
                ann_file: Path) -> tuple[list[str], dict[int, int]]:
    """Class names (0 = background) and category id -> class index (0 = background)."""
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    if classes == "all":
        if mapping:
            raise DatasetError("data.coco_mapping is only used with data.coco_classes='voc'")
        order = sorted(by_id)
        return ["background"] + [by_id[i] for i in order], {i: k + 1 for k, i in enumerate(order)}
    if classes != "voc":
        raise DatasetError(f"data.coco_classes: unknown value {classes!r} (all, voc)")
    user_mapping = mapping is not None
    mapping = dict(COCO_TO_VOC if mapping is None else mapping)
    names = set(by_id.values())
    for coco_name, voc_name in mapping.items():
        if user_mapping and coco_name not in names:
            raise DatasetError(f"data.coco_mapping: unknown COCO class name {coco_name!r} "
                               f"(not a category of {ann_file})")
        if voc_name not in VOC_CLASSES[1:]:
            raise DatasetError(f"data.coco_mapping: {coco_name!r} -> unknown VOC class name "
                               f"{voc_name!r} (one of {', '.join(VOC_CLASSES[1:])})")
    voc_index = {n: c for c, n in enumerate(VOC_CLASSES)}
    return list(VOC_CLASSES), {i: voc_index[mapping[n]] if n in mapping else 0 for i, n in by_id.items()}


def _writable(path: Path) -> bool:
    """Writable by us *and* not marked read-only: root passes ``os.access`` on any directory,
    so a directory without write bits (a shared read-only dataset) also counts as read-only."""
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def _cache_dir(root: Path, split: str, year: int, classes: str, mapping: dict | None) -> Path:
    tag = classes
    if classes == "voc" and mapping is not None and dict(mapping) != COCO_TO_VOC:
        tag += "-" + hashlib.sha1(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{split}{year}_{tag}"
    base = root / CACHE_DIR
    if _writable(base if base.is_dir() else root):
        return base / name
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "wsss" / "coco_masks" / key / name


def load_instances(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"COCO annotation file {ann_file} is not valid JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"COCO annotation file {ann_file} has no {key!r} list")
    return data


# --------------------------------------------------------------------------- dataset
def coco_dataset(root: Path, split: str, year: int = 2017, classes: str = "voc",
                 mapping: dict[str, str] | None = None, mask_dir: Path | None = None,
                 transform=None, require_labels: bool = False,
                 cache_dir: Path | None = None) -> SegDataset:
    """The ``<split><year>`` images of a COCO root; see the module docstring.

    ``cache_dir`` overrides where the rasterised ground-truth masks are kept.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist")
    ann_file = root / "annotations" / f"instances_{split}{year}.json"
    image_dir = root / f"{split}{year}"
    data = load_instances(ann_file)
    if not image_dir.is_dir():
        raise DatasetError(f"COCO image directory {image_dir} does not exist")
    names, class_of = class_table(data["categories"], classes, mapping, ann_file)

    images = sorted(data["images"], key=lambda im: int(im["id"]))
    by_image: dict[int, list[dict]] = {int(im["id"]): [] for im in images}
    for ann in data["annotations"]:
        if int(ann["image_id"]) not in by_image:
            raise DatasetError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image "
                               f"id {ann['image_id']}")
        if ann["category_id"] not in class_of:
            raise DatasetError(f"{ann_file}: annotation {ann.get('id')} has unknown category id "
                               f"{ann['category_id']}")
        by_image[int(ann["image_id"])].append(ann)

    ids = [Path(im["file_name"]).stem for im in images]
    files = {Path(im["file_name"]).stem: image_dir / im["file_name"] for im in images}
    labels = np.zeros((len(images), len(names) - 1), np.float32)
    for row, im in enumerate(images):
        for ann in by_image[int(im["id"])]:
            cls = class_of[ann["category_id"]]
            if cls and not ann.get("iscrowd", 0):
                labels[row, cls - 1] = 1.0

    if mask_dir is not None:
        masks = Path(mask_dir)
        if not masks.is_dir():
            raise DatasetError(f"mask directory {masks} does not exist")
    else:
        masks = Path(cache_dir) if cache_dir is not None else _cache_dir(root, split, year, classes, mapping)
        for item, im in zip(ids, images):
            target = masks / f"{item}.png"
            if target.is_file():
                continue
            if not files[item].is_file():     # reported by SegDataset with the path
                continue
            try:
                mask = rasterize(by_image[int(im["id"])], int(im["height"]), int(im["width"]), class_of)
            except (ValueError, KeyError, TypeError) as err:
                raise DatasetError(f"{ann_file}: bad segmentation for image {im['file_name']}: "
                                   f"{err}") from None
            save_label_png(target, mask)

    return SegDataset(root, ids, names, image_path=lambda i: files[i],
                      mask_path=lambda i: masks / f"{i}.png", label_matrix=labels,
                      transform=transform, require_labels=require_labels,
                      name=f"coco {split}{year}")
