"""Image-level label agreement: what stage 5 can score when a dataset has no masks.

Predicted label sets (the classifier's ``sigmoid(score) > 0.5``, or the classes a segmentor's
prediction covers on at least :data:`PRESENT_FRACTION` of the pixels) are compared with the
given image-level labels over the split::

    precision = TP / (TP + FP),  recall = TP / (TP + FN),  F1 = 2 P R / (P + R)

counted over all (image, class) pairs (micro), plus per-class F1 and the share of images
whose predicted set equals the given one (``exact_match``). None where a denominator is 0.
"""

from typing import Any, Sequence

import numpy as np

PRESENT_FRACTION = 0.01


def labels_from_prediction(pred: np.ndarray, num_classes: int,
                           min_fraction: float = PRESENT_FRACTION) -> np.ndarray:
    """(num_classes - 1,) bool: foreground classes covering >= ``min_fraction`` of ``pred``."""
    hist = np.bincount(np.asarray(pred, dtype=np.int64).reshape(-1), minlength=256)[1:num_classes]
    return hist >= min_fraction * max(pred.size, 1)


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b > 0 else None


def _f1(tp: float, fp: float, fn: float) -> float | None:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def label_agreement(predicted: np.ndarray, given: np.ndarray,
                    class_names: Sequence[str]) -> dict[str, Any]:
    """Scores of (N, K) predicted vs given multi-hot labels; ``class_names`` has background first."""
    p = np.asarray(predicted, dtype=bool)
    g = np.asarray(given) > 0
    if p.shape != g.shape:
        raise ValueError(f"label_agreement: predicted {p.shape} vs given {g.shape}")
    tp, fp, fn = (p & g).sum(0), (p & ~g).sum(0), (~p & g).sum(0)
    return {
        "images": int(p.shape[0]),
        "precision": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall": _ratio(tp.sum(), tp.sum() + fn.sum()),
        "f1": _f1(tp.sum(), fp.sum(), fn.sum()),
        "exact_match": float((p == g).all(1).mean()) if p.shape[0] else None,
        "per_class_f1": {name: _f1(tp[c], fp[c], fn[c]) for c, name in enumerate(class_names[1:])},
    }
