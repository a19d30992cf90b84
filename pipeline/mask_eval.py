"""Quality of a directory of pseudo-masks (or predicted masks) against a dataset's ground truth.

One confusion matrix over the whole split (VOC protocol, :mod:`pipeline.metrics`):
``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, mIoU = mean over the classes present in ground truth
or prediction. Ground-truth 255 pixels never count. Predicted 255 (ignore) pixels are counted
two ways, both reported (peers' papers mix them up):

* ``ignore_dropped``: such pixels are left out (the usual pseudo-mask number: quality of
  what is labelled);
* ``ignore_as_background``: such pixels count as class 0.

``labelled_fraction`` = predicted pixels that are not 255 / all predicted pixels (a mask that
labels 10 % of the image perfectly gets a high "dropped" mIoU; this says how much it covers).
"""

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data.palette import read_label_png
from pipeline.metrics import IGNORE_INDEX, ConfusionMatrix

CONVENTION = ("IoU per class from one confusion matrix over the split; ground-truth 255 "
              "pixels excluded; predicted 255 pixels either dropped (ignore_dropped) or counted "
              "as background (ignore_as_background)")


def evaluate_masks(mask_dir: Path, dataset, ids: Sequence[str] | None = None,
                   missing: str = "error") -> dict[str, Any]:
    """mIoU / per-class IoU of ``<mask_dir>/<id>.png`` vs ``dataset.load_mask(id)``.

    Args:
        mask_dir: directory of palette/grey label PNGs named ``<id>.png``.
        dataset: a ``SegDataset`` (``ids``, ``class_names``, ``num_classes``, ``load_mask``).
        ids: the ids to score (default: all of ``dataset.ids``).
        missing: ``"error"`` (a missing PNG raises naming it) or ``"skip"`` (counted).

    Returns a JSON-ready dict: ``miou`` (255 dropped), ``miou_ignore_as_background``,
    ``labelled_fraction``, ``images``, ``missing``, ``ignore_dropped`` /
    ``ignore_as_background`` (full :meth:`ConfusionMatrix.summary` each) and ``convention``.
    A dataset without masks (``has_masks`` False) gets coverage only: ``miou`` and
    ``miou_ignore_as_background`` None, ``labelled_fraction``, ``foreground_fraction``,
    ``images``, ``missing``, ``masks: False``.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask directory {mask_dir} does not exist")
    ids = list(dataset.ids if ids is None else ids)
    n = dataset.num_classes
    dropped = ConfusionMatrix(n, pred_ignore="drop")
    as_bg = ConfusionMatrix(n, pred_ignore="background")
    labelled = total = foreground = 0
    has_masks = getattr(dataset, "has_masks", True)
    skipped: list[str] = []
    for image_id in ids:
        path = mask_dir / f"{image_id}.png"
        if not path.is_file():
            if missing == "skip":
                skipped.append(image_id)
                continue
            raise FileNotFoundError(f"mask {path} (id {image_id!r}) does not exist")
        pred = read_label_png(path)
        if not has_masks:          # coverage only
            _check_values(pred, n, path)
            labelled += int(np.count_nonzero(pred != IGNORE_INDEX))
            foreground += int(np.count_nonzero((pred != IGNORE_INDEX) & (pred > 0)))
            total += pred.size
            continue
        gt = dataset.load_mask(image_id)
        if pred.shape != gt.shape:
            raise ValueError(f"mask {path} is {pred.shape[1]}x{pred.shape[0]} but the ground truth "
                             f"of {image_id!r} is {gt.shape[1]}x{gt.shape[0]} (WxH)")
        _check_values(pred, n, path)
        dropped.update(pred, gt)
        as_bg.update(pred, gt)
        labelled += int(np.count_nonzero(pred != IGNORE_INDEX))
        total += pred.size
    names = list(dataset.class_names)
    if not has_masks:
        return {"miou": None, "miou_ignore_as_background": None, "masks": False,
                "labelled_fraction": labelled / total if total else float("nan"),
                "foreground_fraction": foreground / total if total else float("nan"),
                "images": len(ids) - len(skipped), "missing": len(skipped),
                "convention": "no ground-truth masks: coverage only (labelled / foreground pixel shares)"}
    return {
        "miou": dropped.miou(),
        "miou_ignore_as_background": as_bg.miou(),
        "labelled_fraction": labelled / total if total else float("nan"),
        "images": len(ids) - len(skipped),
        "missing": len(skipped),
        "ignore_dropped": dropped.summary(names),
        "ignore_as_background": as_bg.summary(names),
        "convention": CONVENTION,
    }


def _check_values(pred: np.ndarray, n: int, path: Path) -> None:
    bad = np.unique(pred[(pred >= n) & (pred != IGNORE_INDEX)])
    if bad.size:
        raise ValueError(f"mask {path} holds values {bad.tolist()} outside the {n} classes and 255")


def headline(result: dict[str, Any]) -> str:
    """One line for logs and the UI, e.g. ``mIoU 61.2% (255 dropped) / 57.9% (255 as
    background), 84.0% of pixels labelled, 1464 images``; without ground truth the coverage."""
    if result.get("miou") is None:
        return (f"no ground-truth masks: {100 * result['labelled_fraction']:.1f}% of pixels labelled, "
                f"{100 * result['foreground_fraction']:.1f}% foreground, {result['images']} images")
    return (f"mIoU {100 * result['miou']:.1f}% (255 dropped) / "
            f"{100 * result['miou_ignore_as_background']:.1f}% (255 as background), "
            f"{100 * result['labelled_fraction']:.1f}% of pixels labelled, {result['images']} images")
