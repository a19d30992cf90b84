"""Image pairs for stage 1 and related images for stage 2 (Sun et al., MCIS, ECCV 2020).

Pairing follows the official MCIS code: the partner of image ``i`` is a random image that
contains a random positive class of ``i``, so the pair shares at least that label. With
``random_fraction = f`` a share ``f`` of partners is instead drawn uniformly at random (the
paper's ablation on unrelated pairs). MCIS draws unseeded; here every epoch's pairs come
from ``numpy.random.default_rng([seed, epoch])``, so a given (labels, fraction, seed, epoch)
always yields the same pairs.

Corner cases the paper does not cover (our choices): if no other image shares any of
``i``'s classes, ``i`` is paired with itself (a self-pair still shares every label); an image
without labels gets a random partner (it is "drawn at random").
"""

from bisect import bisect_left

import numpy as np


def class_index(label_matrix: np.ndarray) -> dict[int, list[int]]:
    """Foreground class ``c`` (0..K-1) -> sorted dataset indices of images labelled ``c``."""
    labels = np.asarray(label_matrix) > 0
    if labels.ndim != 2:
        raise ValueError(f"label matrix must be 2-D (N, K), got shape {labels.shape}")
    return {c: np.flatnonzero(labels[:, c]).tolist() for c in range(labels.shape[1])}


def related_images(index: dict[int, list[int]], i: int, c: int, k: int,
                   rng: np.random.Generator) -> list[int]:
    """``k`` images containing class ``c``, drawn with replacement (as MCIS), other than
    ``i`` when any other exists (else ``i`` itself)."""
    if c not in index:
        raise ValueError(f"class {c} is not in the class index (classes 0..{len(index) - 1})")
    if k <= 0:
        return []
    pool = [j for j in index[c] if j != i] or [i]
    return [int(pool[j]) for j in rng.integers(0, len(pool), size=k)]


class PairSampler:
    """Partners for every image, epoch by epoch.

    Args:
        label_matrix: (N, K) multi-hot image-level labels.
        random_fraction: share of partners drawn uniformly at random (0..1).
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])``.
    """

    def __init__(self, label_matrix: np.ndarray, random_fraction: float = 0.0, seed: int = 0):
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
        self.labels = np.asarray(label_matrix) > 0
        if self.labels.ndim != 2 or self.labels.shape[0] == 0:
            raise ValueError(f"label matrix must be (N>0, K), got shape {self.labels.shape}")
        self.random_fraction = float(random_fraction)
        self.seed = int(seed)
        self.index = class_index(self.labels)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def partner(self, i: int, rng: np.random.Generator, at_random: bool) -> int:
        positives = np.flatnonzero(self.labels[i])
        if at_random or positives.size == 0:
            return self._random_other(i, rng)
        for c in rng.permutation(positives):
            pool = self.index[int(c)]             # sorted, contains i
            if len(pool) > 1:
                k = int(rng.integers(len(pool) - 1))
                return int(pool[k + 1 if k >= bisect_left(pool, i) else k])
        return i

    def _random_other(self, i: int, rng: np.random.Generator) -> int:
        """Uniform over the other images (``i`` itself only when it is alone)."""
        n = len(self)
        if n == 1:
            return i
        j = int(rng.integers(n - 1))
        return j + 1 if j >= i else j

    def pairs(self, epoch: int) -> list[tuple[int, int]]:
        """One pair per image, images in a shuffled order: ``[(i, partner(i)), ...]``.

        Exactly ``round(random_fraction * N)`` of them have a random partner.
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        n = len(self)
        order = rng.permutation(n)
        num_random = int(round(self.random_fraction * n))
        random_set = np.zeros(n, bool)
        random_set[rng.choice(n, size=num_random, replace=False)] = True
        return [(int(i), self.partner(int(i), rng, bool(random_set[i]))) for i in order]
