"""The one place that reads and writes stage 2's localization-map files.

One ``<id>.npy`` per image holding a single record of a structured dtype (no pickle)::

    classes : int16   (n,)        foreground class ids (1..K, mask values) the maps are for
    size    : int32   (2,)        the image's (H, W)
    maps    : float16 (n, h, w)   MCIS maps in [0, 1] (co-attention path, related images averaged)
    cams    : float16 (n, h, w)   plain single-image CAMs in [0, 1] of the same model

Maps are stored at the resolution the network produced them (feature resolution, e.g. 32 x 32
for a 256 px input; ``maps.full_resolution`` stores them at (H, W)) and upsampled to the
image's size on read: bicubic, clipped to [0, 1], as the official MCIS code upsamples its
32 x 32 maps. Files without ``size`` (written before it existed) are at image size.
``np.load(path)`` alone reads a record; :func:`load_maps` checks and upsamples it.
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
    maps: np.ndarray      # (n, H, W) float32, at image size
    cams: np.ndarray      # (n, H, W) float32, at image size

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])


def map_path(directory: Path, image_id: str) -> Path:
    return Path(directory) / f"{image_id}.npy"


def save_maps(path: Path, classes, maps, cams=None, size: tuple[int, int] | None = None) -> None:
    """Write atomically; ``cams`` defaults to ``maps`` (e.g. when only one kind exists);
    ``size``: the image's (H, W) when the maps are at a lower resolution (default: theirs)."""
    classes = np.asarray(classes, dtype=np.int16).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    cams = maps if cams is None else np.asarray(cams, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != classes.size or cams.shape != maps.shape:
        raise MapFileError(f"{path}: maps {maps.shape} / cams {cams.shape} do not fit {classes.size} classes")
    n, h, w = maps.shape
    size = (h, w) if size is None else tuple(int(v) for v in size)
    if len(size) != 2 or min(size) < 1:
        raise MapFileError(f"{path}: image size {size} is not (H, W)")
    dtype = np.dtype([("classes", np.int16, (n,)), ("size", np.int32, (2,)),
                      ("maps", np.float16, (n, h, w)), ("cams", np.float16, (n, h, w))])
    record = np.zeros((), dtype=dtype)
    record["classes"], record["size"], record["maps"], record["cams"] = classes, size, maps, cams
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, record, allow_pickle=False)


def map_header(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Class ids and the image's (H, W) of a map file without reading the maps."""
    try:
        record = np.load(path, mmap_mode="r", allow_pickle=False)
        classes = np.asarray(record["classes"], dtype=np.int64).reshape(-1)
        if "size" in record.dtype.names:
            size = tuple(int(v) for v in np.asarray(record["size"]))
        else:
            size = tuple(record.dtype["maps"].shape[-2:])
    except (ValueError, KeyError, OSError, IndexError, TypeError) as err:
        raise MapFileError(f"map file {path} is not a wsss map file: {err}") from None
    return classes, size


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) -> (n, H, W): bicubic (align_corners=False), clipped to [0, 1]."""
    if maps.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    if maps.shape[-2:] == tuple(size):
        return maps
    import torch
    import torch.nn.functional as F

    out = F.interpolate(torch.from_numpy(maps)[:, None], size=tuple(size), mode="bicubic",
                        align_corners=False)[:, 0]
    return out.clamp_(0, 1).numpy()


def load_maps(path: Path) -> ImageMaps:
    """Read, validate and upsample one map file (raises :class:`MapFileError` naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f"map file {path} does not exist")
    try:
        record = np.load(path, allow_pickle=False)
        classes = np.asarray(record["classes"], dtype=np.int64).reshape(-1)
        maps = np.asarray(record["maps"], dtype=np.float32)
        cams = np.asarray(record["cams"], dtype=np.float32)
        size = tuple(int(v) for v in record["size"]) if "size" in record.dtype.names else None
    except (ValueError, KeyError, OSError, IndexError) as err:
        raise MapFileError(f"map file {path} is not a wsss map file: {err}") from None
    if maps.ndim == 2:  # a single class with n == 1 squeezed by numpy
        maps, cams = maps[None], cams[None]
    for name, array in (("maps", maps), ("cams", cams)):
        bad = ~np.isfinite(array)
        if bad.any():
            cls = int(classes[np.nonzero(bad.reshape(len(classes), -1).any(1))[0][0]])
            raise MapFileError(f"map file {path}: {name} of class {cls} holds NaN/inf")
    if size is not None:
        maps, cams = upsample(maps, size), upsample(cams, size)
    return ImageMaps(classes=classes, maps=maps, cams=cams)
