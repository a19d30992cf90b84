"""Localization-map quality: mIoU against the ground truth over a background-threshold sweep.

For an image with foreground classes ``c_1..c_n`` and maps ``M_1..M_n`` in [0, 1] (stage 2's
file, :mod:`pipeline.maps_io`), a background threshold ``t`` gives the label map

    label(x) = argmax over [t, M_1(x), ..., M_n(x)]     (index 0 -> background, i -> c_i)

with ties going to the background (``M_i(x) > t`` is needed for a foreground label). One
confusion matrix per threshold is accumulated over the whole split (VOC protocol, ignore
255, :class:`pipeline.metrics.ConfusionMatrix`); the curve is mIoU(t) and the best
threshold its argmax. The MCIS maps and the plain CAMs of the same file are scored side by
side, plus the all-background baseline (every pixel labelled 0) for reference.
:func:`map_diagnostics` says where a kind wins or loses at a chosen threshold (per-class
IoU / precision / recall, ROC AUC, mean map value on and off the object, empty maps).
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


def _load_checked(path: Path, dataset, item: str):
    """(map record, GT mask) of one image; the map file must fit the mask's size and hold
    foreground class ids of the dataset (MapFileError naming the file otherwise)."""
    record = load_maps(path)
    mask = dataset.load_mask(item)
    if record.size != mask.shape:
        raise MapFileError(f"map file {path}: maps are {record.size[1]}x{record.size[0]} but the "
                           f"mask of {item!r} is {mask.shape[1]}x{mask.shape[0]}")
    num_classes = dataset.num_classes
    bad = record.classes[(record.classes < 1) | (record.classes >= num_classes)]
    if bad.size:
        raise MapFileError(f"map file {path}: class ids {bad.tolist()} outside 1..{num_classes - 1}")
    return record, mask


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
    if not getattr(dataset, "has_masks", True):
        return _unscored(map_dir, dataset, thresholds, ids, missing)
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
        record, mask = _load_checked(path, dataset, item)
        for kind in KINDS:
            for matrix, t in zip(matrices[kind], thresholds):
                matrix.update(label_map(record.classes, getattr(record, kind), t), mask)
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


def _unscored(map_dir: Path, dataset, thresholds: list[float], ids, missing: str) -> dict:
    """:func:`evaluate_maps` for a dataset without masks: the same keys, scores None; the map
    files are still checked (readable, classes of the dataset) and counted."""
    count = skipped = 0
    for item in (dataset.ids if ids is None else ids):
        path = map_path(map_dir, item)
        if not path.is_file():
            if missing == "error":
                raise MapFileError(f"map file {path} for image {item!r} does not exist")
            skipped += 1
            continue
        record = load_maps(path)
        bad = record.classes[(record.classes < 1) | (record.classes >= dataset.num_classes)]
        if bad.size:
            raise MapFileError(f"map file {path}: class ids {bad.tolist()} outside 1..{dataset.num_classes - 1}")
        count += 1
    if count == 0:
        raise MapFileError(f"no map files to score in {map_dir}")
    unscored = {"curve": {}, "best_threshold": None, "best_miou": None, "per_class_iou": {}}
    return {"num_images": count, "missing": skipped, "background_miou": None, "thresholds": thresholds,
            "maps": dict(unscored), "cams": dict(unscored), "masks": False,
            "headline": f"{count} maps written; not scored: {dataset.name} has no ground-truth masks"}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` pixels from the others
    (Mann-Whitney U / (n_pos n_neg), ties counted one half); NaN when either side is empty.
    Threshold-free: 1 = every object pixel scores above every other pixel, 0.5 = no better
    than a flat map."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]    # 1-based ranks, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def map_diagnostics(map_dir: Path, dataset, thresholds: dict[str, float],
                    ids: Sequence[str] | None = None) -> dict:
    """Where each kind of map wins or loses, at one background threshold per kind.

    ``thresholds`` maps a kind (``"maps"``, ``"cams"``) to its threshold (e.g. the best of
    :func:`evaluate_maps`' sweep). Per kind, from the confusion matrix ``M`` (rows = GT) of
    :func:`label_map` over the split, for every class c present in the ground truth::

        IoU_c       = M_cc / (sum_j M_cj + sum_i M_ic - M_cc)
        precision_c = M_cc / sum_i M_ic     (of the pixels the maps label c, the share that is c)
        recall_c    = M_cc / sum_j M_cj     (of the GT-c pixels, the share labelled c)

    (``None`` when the denominator is 0), the same two for the foreground as a whole
    (``sum_{c>0} M_cc`` over all pixels labelled / GT foreground), and threshold-free:

    * ``auc_c``: mean over the images with c in their map file and GT of :func:`roc_auc` of
      the class-c map separating GT-c pixels from the image's other labelled pixels;
    * ``inside`` / ``outside``: mean map value on GT-c pixels / on the other labelled pixels,
      over all (image, class) maps (a flat, leaking map has them close);
    * ``empty_maps``: how many (image, class) maps are all zero, of ``num_maps``.

    ``images_c`` counts the scored images whose GT holds class c. Returns a JSON-ready dict
    ``{"num_images", "images": {name: n}, "maps": {...}, "cams": {...}}``.
    """
    unknown = set(thresholds) - set(KINDS)
    if unknown or not thresholds:
        raise ValueError(f"map_diagnostics: thresholds must be given for kinds among {KINDS}, got {sorted(thresholds)}")
    _check_thresholds(thresholds.values())
    map_dir = Path(map_dir)
    k = dataset.num_classes
    names = list(dataset.class_names)
    matrices = {kind: ConfusionMatrix(k) for kind in thresholds}
    aucs = {kind: [[] for _ in range(k)] for kind in thresholds}
    sums = {kind: np.zeros(2) for kind in thresholds}          # sum of inside / outside means
    empty = {kind: 0 for kind in thresholds}
    image_counts = np.zeros(k, np.int64)
    num_maps = pairs = count = 0
    for item in (dataset.ids if ids is None else ids):
        record, mask = _load_checked(map_path(map_dir, item), dataset, item)
        valid = mask != 255
        present = np.unique(mask[valid])
        image_counts[present[(present > 0) & (present < k)]] += 1
        num_maps += len(record.classes)
        for kind, t in thresholds.items():
            maps = getattr(record, kind)
            matrices[kind].update(label_map(record.classes, maps, t), mask)
            empty[kind] += int((maps.max(axis=(1, 2), initial=0) <= 0).sum())
        for idx, c in enumerate(record.classes.tolist()):
            positive = mask[valid] == c
            if not positive.any() or positive.all():
                continue
            pairs += 1
            for kind in thresholds:
                values = getattr(record, kind)[idx][valid]
                aucs[kind][c].append(roc_auc(values, positive))
                sums[kind] += (values[positive].mean(), values[~positive].mean())
        count += 1
    if count == 0:
        raise MapFileError(f"no map files to score in {map_dir}")

    def ratio(a, b):
        return float(a) / float(b) if b > 0 else None

    result: dict = {"num_images": count, "num_maps": num_maps,
                    "images": {names[c]: int(image_counts[c]) for c in range(1, k) if image_counts[c]}}
    for kind, t in thresholds.items():
        m = matrices[kind].matrix.numpy().astype(np.float64)
        tp, gt, pred = np.diag(m), m.sum(1), m.sum(0)
        iou = matrices[kind].iou().tolist()
        per_class = {}
        for c in range(k):
            if gt[c] == 0:
                continue
            per_class[names[c]] = {"iou": iou[c], "precision": ratio(tp[c], pred[c]), "recall": ratio(tp[c], gt[c]),
                                   "auc": float(np.mean(aucs[kind][c])) if aucs[kind][c] else None}
        all_aucs = [a for per in aucs[kind] for a in per]
        result[kind] = {
            "threshold": float(t), "miou": matrices[kind].miou(), "per_class": per_class,
            "foreground_precision": ratio(tp[1:].sum(), pred[1:].sum()),
            "foreground_recall": ratio(tp[1:].sum(), gt[1:].sum()),
            "mean_auc": float(np.mean(all_aucs)) if all_aucs else None,
            "inside": ratio(sums[kind][0], pairs), "outside": ratio(sums[kind][1], pairs),
            "empty_maps": empty[kind]}
    return result
