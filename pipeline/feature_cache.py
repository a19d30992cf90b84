"""A bounded in-memory cache of per-image backbone features for stage 2.

Stage 2 pairs every image with ``k`` related images per class; each image's base-view
features are needed while it is processed and while any image that chose it as a partner
is. The plan (:func:`stages.generate_cams.make_plan`) fixes the processing order and every
partner in advance, so the cache knows each entry's future uses:

* an entry is dropped as soon as its last use has passed (:meth:`FeatureCache.release`);
* when a new entry does not fit in ``capacity_bytes``, the entries needed furthest in the
  future go first (Belady's rule; entries the current step needs are kept); an entry dropped
  this way and needed again is recomputed and counted (``recomputed``).

With partners drawn near each image in the processing order (``maps.related_pool``), the
live set stays bounded whatever the dataset size, so every feature is computed once.
"""

from bisect import bisect_right
from typing import Iterable, Mapping, Sequence

import torch


class FeatureCache:
    """``key -> tensor`` bounded by ``capacity_bytes``; ``uses[key]``: the positions (steps of
    the processing order) at which ``key`` is needed."""

    def __init__(self, uses: Mapping[str, Sequence[int]], capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self._uses = {key: sorted(positions) for key, positions in uses.items()}
        self._store: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self.bytes = self.peak_bytes = 0
        self.computed = self.recomputed = self.overflows = 0

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: str) -> torch.Tensor:
        return self._store[key]

    def next_use(self, key: str, position: int) -> float:
        """The first position after ``position`` at which ``key`` is needed (inf if none)."""
        uses = self._uses.get(key, ())
        i = bisect_right(uses, position)
        return uses[i] if i < len(uses) else float("inf")

    def put(self, key: str, value: torch.Tensor, position: int, keep: Iterable[str] = ()) -> None:
        """Store ``value`` (computed at ``position``), evicting by furthest next use; entries
        in ``keep`` are never evicted (if only they remain, the cache overflows, counted)."""
        size = value.numel() * value.element_size()
        if key in self._store:
            self._drop(key)
        keep = set(keep)
        while self._store and self.bytes + size > self.capacity:
            candidates = [k for k in self._store if k not in keep]
            if not candidates:
                self.overflows += 1
                break
            self._drop(max(candidates, key=lambda k: self.next_use(k, position)))
        self.recomputed += key in self._seen
        self.computed += 1
        self._seen.add(key)
        self._store[key] = value
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release(self, position: int) -> None:
        """Drop every entry with no use after ``position``."""
        for key in [k for k in self._store if self.next_use(k, position) == float("inf")]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        value = self._store.pop(key)
        self.bytes -= value.numel() * value.element_size()

    def stats(self) -> dict[str, int]:
        return {"computed": self.computed, "recomputed": self.recomputed,
                "peak_bytes": self.peak_bytes, "overflows": self.overflows}
