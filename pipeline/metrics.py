"""Segmentation metrics on one confusion matrix accumulated over a whole split (VOC convention).

For ``C`` classes the confusion matrix ``M`` (rows = ground truth, columns = prediction)
counts pixels whose ground truth is not the ignore value (255)::

    IoU_c  = M_cc / (sum_j M_cj + sum_i M_ic - M_cc)
    mIoU   = mean of IoU_c over the classes with a non-zero denominator
    pixAcc = trace(M) / sum(M)

Predictions outside ``[0, C)`` (e.g. 255 in a pseudo-mask) are handled by ``pred_ignore``:
``"drop"`` leaves such pixels out, ``"background"`` counts them as class 0, ``"wrong"``
counts them as misclassified (only the ground-truth row grows: they lower recall and IoU of
the true class without adding a false positive anywhere).

Matrices are plain tensors, so workers merge by addition (``a.merge(b)`` or
``torch.distributed.all_reduce``).
"""

from typing import Literal, Sequence

import numpy as np
import torch

IGNORE_INDEX = 255
PredIgnore = Literal["drop", "background", "wrong"]


class ConfusionMatrix:
    """Accumulates a C x C confusion matrix (int64) over many images."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 pred_ignore: PredIgnore = "drop"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pred_ignore not in ("drop", "background", "wrong"):
            raise ValueError(f"pred_ignore must be drop, background or wrong, got {pred_ignore!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pred_ignore = pred_ignore
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        # ground-truth pixels whose prediction fell outside the classes ("wrong" mode)
        self.missed = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one prediction / ground-truth pair (any shape, same for both)."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to(torch.int64).cpu()
        target = target.reshape(-1).to(torch.int64).cpu()
        valid = target != self.ignore_index
        bad_gt = valid & ((target < 0) | (target >= self.num_classes))
        if bad_gt.any():
            raise ValueError(f"target holds value {int(target[bad_gt][0])} outside [0, {self.num_classes}) ∪ {{{self.ignore_index}}}")
        pred, target = pred[valid], target[valid]
        outside = (pred < 0) | (pred >= self.num_classes)
        if outside.any():
            if self.pred_ignore == "background":
                pred = torch.where(outside, torch.zeros_like(pred), pred)
            else:
                if self.pred_ignore == "wrong":
                    self.missed += torch.bincount(target[outside], minlength=self.num_classes)
                pred, target = pred[~outside], target[~outside]
        index = target * self.num_classes + pred
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge matrices of {self.num_classes} and {other.num_classes} classes")
        self.matrix += other.matrix
        self.missed += other.missed
        return self

    def all_reduce(self) -> None:
        """Sum the matrix over all DDP ranks (no-op when torch.distributed is not running)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)
            torch.distributed.all_reduce(self.missed)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN for a class absent from both GT and prediction."""
        m = self.matrix.to(torch.float64)
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp + self.missed.to(torch.float64)
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        iou = self.iou()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum() + self.missed.sum()
        return float(self.matrix.diag().sum()) / float(total) if total > 0 else float("nan")

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-ready: mIoU, pixel accuracy, per-class IoU and the raw matrix."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        iou = self.iou().tolist()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "per_class_iou": {n: (None if np.isnan(v) else v) for n, v in zip(names, iou)},
            "confusion_matrix": self.matrix.tolist(),
            "pred_ignore": self.pred_ignore,
        }


def miou(preds, targets, num_classes: int, pred_ignore: PredIgnore = "drop") -> float:
    """mIoU of paired predictions/targets with one matrix over all of them."""
    cm = ConfusionMatrix(num_classes, pred_ignore=pred_ignore)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return cm.miou()
