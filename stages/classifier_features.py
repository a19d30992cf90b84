"""Frozen-backbone feature cache of stage 1 (``classifier.cache_features``, a CPU-budget option).

With ``classifier.freeze_backbone`` the backbone is a fixed function, and without colour
jitter or random flip every training view of an image is the same tensor in every epoch:
the squash to ``image_size`` and the self-pair copies (flip at ``image_size``, ``0.75x`` and
``2x`` squashes). So ``B(v) = backbone(v)[-1]`` of each view is computed once, before the
first epoch, and the epochs train ``extra``, the CAM head and the co-attention layers on the
stored ``B(v)``:

    F(v) = extra(B(v))            (instead of extra(backbone(v)[-1]) every step)

This gives the same losses and gradients as running the frozen backbone in every step (up
to float rounding of the batch composition: the test checks 1e-4), at a fraction of the cost
(the backbone is 80-95 % of a step's time on CPU). Features are stored as float32 on the CPU;
their size is checked against ``classifier.feature_cache_mb`` before any compute.
"""

from typing import Sequence

import torch
from torch.utils.data import Dataset

from pipeline.data.transforms import normalize


class FeatureCacheError(ValueError):
    """The cached features would not fit the configured memory, or the config forbids caching."""


def feature_bytes(num_images: int, channels: int, stride: int, sides: Sequence[int]) -> int:
    """float32 bytes of ``num_images`` x one ``channels`` map per view side (``ceil(side/stride)``)."""
    return 4 * num_images * channels * sum((-(-s // stride)) ** 2 for s in sides)


def check_budget(num_images: int, backbone, sides: Sequence[int], budget_mb: int) -> int:
    """Raise :class:`FeatureCacheError` before any compute when the cache exceeds ``budget_mb``."""
    need = feature_bytes(num_images, backbone.channels[-1], backbone.strides[-1], sides)
    if need > budget_mb * 2 ** 20:
        raise FeatureCacheError(
            f"classifier.cache_features: the backbone features of {num_images} images x {len(sides)} "
            f"views need {need / 2 ** 20:.0f} MB, more than classifier.feature_cache_mb={budget_mb}; "
            f"raise it, lower classifier.image_size, or set classifier.cache_features=false")
    return need


@torch.no_grad()
def compute_features(backbone, dataset, views: Sequence[tuple[int, bool]], device,
                     batch_size: int = 8, progress=None) -> list[list[torch.Tensor]]:
    """``out[i][v]`` = ``backbone(view_v(image_i))[-1]`` (C, h, w) float32 on the CPU, for the
    views ``(side, flip)`` (squash to side x side, then flip) of every item of ``dataset``
    (untransformed uint8 images). The backbone must be in eval mode (frozen)."""
    from stages.train_classifier import squash

    if backbone.training:
        raise FeatureCacheError("compute_features needs the frozen backbone in eval mode")
    out: list[list[torch.Tensor]] = []
    for start in range(0, len(dataset), batch_size):
        images = [dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))]
        per_view = []
        for side, flip in views:                   # each image decoded once for all its views
            batch = torch.stack([squash(image, side, flip) for image in images])
            per_view.append(backbone(normalize(batch).to(device))[-1].float().cpu())
        out += [[feats[k].clone() for feats in per_view] for k in range(len(images))]
        if progress is not None:
            progress(len(images))
    return out


class CachedPairDataset(Dataset):
    """:class:`~stages.train_classifier.PairDataset` on cached features: ``(B(view_m),
    B(view_n), [B(copy) ...], labels_m, labels_n)``; ``features[i][0]`` is the main view,
    ``features[i][1:]`` the self-pair copies (``copies=False`` leaves them out)."""

    def __init__(self, features: list[list[torch.Tensor]], labels: torch.Tensor,
                 pairs: list[tuple[int, int]], copies: bool):
        self.features, self.labels, self.pairs, self.copies = features, labels, pairs, copies

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        i, j = self.pairs[index]
        copies = list(self.features[i][1:]) if self.copies else []
        return self.features[i][0], self.features[j][0], copies, self.labels[i], self.labels[j]


class CachedImageDataset(Dataset):
    """:class:`~stages.train_classifier.ImageDataset` on cached features: ``(B(view), labels)``."""

    def __init__(self, features: list[list[torch.Tensor]], labels: torch.Tensor, indices: list[int]):
        self.features, self.labels, self.indices = features, labels, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        i = self.indices[index]
        return self.features[i][0], self.labels[i]
