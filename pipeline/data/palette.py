"""Label PNGs in the PASCAL VOC palette format (0 = background, 255 = ignore)."""

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.storage import atomic_path

LABEL_MODES = ("P", "L", "I", "I;16")   # PIL modes a label PNG may have


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (bit-interleaved class index), flattened RGB."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def save_label_png(path: Path, mask: np.ndarray) -> None:
    """Write a uint8 label map as a palette PNG, atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"{path}: label values must be in [0, 255]")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG as a uint8 (H, W) array of indices (palette PNGs keep their indices).

    16-bit / 32-bit grey PNGs are accepted when every value fits 0..255; a value that does
    not (e.g. 257, which a cast would turn into class 1) raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in LABEL_MODES:
                raise ValueError(f"label file {path} has mode {image.mode}; expected a palette or grey PNG")
            if image.mode in ("P", "L"):
                return np.asarray(image, dtype=np.uint8).copy()
            values = np.asarray(image)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"label file {path} is unreadable or truncated: {err}") from None
    bad = np.unique(values[(values < 0) | (values > 255)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist()) + (" ..." if bad.size > 5 else "")
        raise ValueError(f"label file {path} ({image.mode}) holds values {shown} outside 0..255; "
                         "label maps must be 8-bit class indices (255 = ignore)")
    return values.astype(np.uint8)
