"""Localization-map quality: mIoU against the ground truth over a background-threshold sweep.

For an image with foreground classes ``c_1..c_n`` and maps ``M_1..M_n`` in [0, 1] (stage 2's
file, :mod:`pipeline.maps_io`), a background threshold ``t`` gives the label map

    label(x) = argmax over [t, M_1(x), ..., M_n(x)]     (index 0 -> background, i -> c_i)

with ties going to the background (``M_i(x) > t`` is needed for a foreground label). One
confusion matrix per threshold is accumulated over the whole split (VOC protocol, ignore
255, :class:`pipeline.metrics.ConfusionMatrix`); the curve is mIoU(t) and the best
threshold its argmax. The MCIS maps and the plain CAMs of the same file are scored side by
side, plus the all-background baseline (every pixel labelled 0) for reference.
"""

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.maps_io import MapFileError, load_maps, map_path
from pipeline.metrics import ConfusionMatrix

KINDS = ("maps", "cams")


def label_map(classes: np.ndarray, maps: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 (H, W) labels: argmax over [threshold, maps], background on ties."""
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], np.uint8)
    best = maps.argmax(axis=0)
    peak = np.take_along_axis(maps, best[None], axis=0)[0]
    labels = np.asarray(classes, dtype=np.int64)[best]
    return np.where(peak > threshold, labels, 0).astype(np.uint8)


def _check_thresholds(thresholds: Iterable[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values:
        raise ValueError("evaluate_maps: at least one background threshold is needed")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"evaluate_maps: background thresholds must lie in [0, 1], got {bad}")
    return values


def evaluate_maps(map_dir: Path, dataset, thresholds: Sequence[float],
                  ids: Sequence[str] | None = None, missing: str = "error") -> dict:
    """Score the map files in ``map_dir`` against ``dataset``'s masks.

    Args:
        map_dir: directory of ``<id>.npy`` map files.
        dataset: a :class:`pipeline.data.SegDataset` (its ``load_mask`` and ``class_names``).
        thresholds: background thresholds to sweep (each in [0, 1]).
        ids: the images to score (default: every id of the dataset).
        missing: ``"error"`` (a missing map file raises, naming it) or ``"skip"`` (counted).

    Returns a JSON-ready dict::

        {"maps": {"curve": {"0.15": miou, ...}, "best_threshold": t, "best_miou": v,
                  "per_class_iou": {...}},  "cams": {...},
         "background_miou": v, "num_images": n, "missing": m, "headline": "..."}
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    thresholds = _check_thresholds(thresholds)
    map_dir = Path(map_dir)
    num_classes = dataset.num_classes
    matrices = {kind: [ConfusionMatrix(num_classes) for _ in thresholds] for kind in KINDS}
    background = ConfusionMatrix(num_classes)
    count = skipped = 0
    for item in (dataset.ids if ids is None else ids):
        path = map_path(map_dir, item)
        if not path.is_file():
            if missing == "error":
                raise MapFileError(f"map file {path} for image {item!r} does not exist")
            skipped += 1
            continue
        record = load_maps(path)
        mask = dataset.load_mask(item)
        if record.size != mask.shape:
            raise MapFileError(f"map file {path}: maps are {record.size[1]}x{record.size[0]} but the "
                               f"mask of {item!r} is {mask.shape[1]}x{mask.shape[0]}")
        bad = record.classes[(record.classes < 1) | (record.classes >= num_classes)]
        if bad.size:
            raise MapFileError(f"map file {path}: class ids {bad.tolist()} outside 1..{num_classes - 1}")
        for kind in KINDS:
            maps = record.maps if kind == "maps" else record.cams
            for matrix, t in zip(matrices[kind], thresholds):
                matrix.update(label_map(record.classes, maps, t), mask)
        background.update(np.zeros_like(mask), mask)
        count += 1
    if count == 0:
        raise MapFileError(f"no map files to score in {map_dir}")

    names = list(dataset.class_names)
    result: dict = {"num_images": count, "missing": skipped,
                    "background_miou": background.miou(), "thresholds": thresholds}
    for kind in KINDS:
        curve = [m.miou() for m in matrices[kind]]
        best = int(np.nanargmax(curve))
        result[kind] = {"curve": {f"{t:g}": v for t, v in zip(thresholds, curve)},
                        "best_threshold": thresholds[best], "best_miou": curve[best],
                        "per_class_iou": matrices[kind][best].summary(names)["per_class_iou"]}
    result["headline"] = (
        f"MCIS maps {100 * result['maps']['best_miou']:.1f} mIoU (bg {result['maps']['best_threshold']:g}) "
        f"vs plain CAM {100 * result['cams']['best_miou']:.1f} (bg {result['cams']['best_threshold']:g}); "
        f"all-background {100 * result['background_miou']:.1f}; {count} images")
    return result
