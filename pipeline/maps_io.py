"""The one place that reads and writes stage 2's localization-map files.

One ``<id>.npy`` per image holding a single record of a structured dtype (no pickle)::

    classes : int16   (n,)        foreground class ids (1..K, mask values) the maps are for
    maps    : float16 (n, H, W)   MCIS maps in [0, 1] (co-attention path, related images averaged)
    cams    : float16 (n, H, W)   plain single-image CAMs in [0, 1] of the same model

at the image's size. ``np.load(path)`` alone reads it; :func:`load_maps` checks it.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.storage import atomic_path


class MapFileError(InputError):
    """A map file is missing, malformed, or holds non-finite values."""


@dataclass
class ImageMaps:
    classes: np.ndarray   # (n,) int
    maps: np.ndarray      # (n, H, W) float32
    cams: np.ndarray      # (n, H, W) float32

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])


def map_path(directory: Path, image_id: str) -> Path:
    return Path(directory) / f"{image_id}.npy"


def save_maps(path: Path, classes, maps, cams=None) -> None:
    """Write atomically; ``cams`` defaults to ``maps`` (e.g. when only one kind exists)."""
    classes = np.asarray(classes, dtype=np.int16).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    cams = maps if cams is None else np.asarray(cams, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != classes.size or cams.shape != maps.shape:
        raise MapFileError(f"{path}: maps {maps.shape} / cams {cams.shape} do not fit {classes.size} classes")
    n, h, w = maps.shape
    dtype = np.dtype([("classes", np.int16, (n,)), ("maps", np.float16, (n, h, w)),
                      ("cams", np.float16, (n, h, w))])
    record = np.zeros((), dtype=dtype)
    record["classes"], record["maps"], record["cams"] = classes, maps, cams
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, record, allow_pickle=False)


def load_maps(path: Path) -> ImageMaps:
    """Read and validate one map file (raises :class:`MapFileError` naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f"map file {path} does not exist")
    try:
        record = np.load(path, allow_pickle=False)
        classes = np.asarray(record["classes"], dtype=np.int64).reshape(-1)
        maps = np.asarray(record["maps"], dtype=np.float32)
        cams = np.asarray(record["cams"], dtype=np.float32)
    except (ValueError, KeyError, OSError, IndexError) as err:
        raise MapFileError(f"map file {path} is not a wsss map file: {err}") from None
    if maps.ndim == 2:  # a single class with n == 1 squeezed by numpy
        maps, cams = maps[None], cams[None]
    for name, array in (("maps", maps), ("cams", cams)):
        bad = ~np.isfinite(array)
        if bad.any():
            cls = int(classes[np.nonzero(bad.reshape(len(classes), -1).any(1))[0][0]])
            raise MapFileError(f"map file {path}: {name} of class {cls} holds NaN/inf")
    return ImageMaps(classes=classes, maps=maps, cams=cams)
