"""Synthetic segmentation dataset written in the VOC layout (the embedded default).

Each of the K object classes is a (shape, texture) pair: class ``c`` has shape
``SHAPES[c % 10]`` and texture ``TEXTURES[(c + c // 10) % 5]``, so the first five classes
differ in both and all 20 possible classes are distinct. Colours are drawn per instance (two
random RGB colours paint the texture), so no class is separable by colour alone.

An image of side S is drawn as:

1. background: two random colours blended by smooth noise ``n(x) in [0, 1]`` (bicubic
   upsampling of a coarse uniform grid): ``I = (1 - n) c0 + n c1``; then 0-2 *distractor*
   blobs (irregular shapes, not a class shape) carrying one of the class textures, so a
   texture alone does not make a class;
2. 1-3 objects (``min_objects..max_objects``), each with a random class, centre, radius
   ``r ~ U(0.12 S, 0.30 S)``, rotation, aspect ``a ~ U(0.8, 1.25)`` and texture period
   ``p ~ U(4, 8)`` px. In the object's rotated frame ``(u, v)`` (pixels), the shape is an
   implicit inequality on ``(u / (r a), v a / r)`` and the texture a binary pattern
   ``t(u, v)`` mixing its two colours; a linear shading ``1 - 0.25 v / r`` adds variation.
   Later objects are painted over earlier ones (occlusion); the mask takes their class;
3. Gaussian pixel noise (sigma 6), JPEG (quality 90) for the image, palette PNG for the mask.

``class_colours=True`` adds a colour cue, as real categories have typical colours (grass is
green): class ``c`` (0-based, of K) gets the hue ``h_c = c / K``; an instance paints its
texture with a saturated colour ``HSV(h_c + U(-0.03, 0.03), U(0.6, 1), U(0.5, 0.95))`` and a
pale one ``HSV(h_c + U(-0.03, 0.03), U(0.15, 0.4), U(0.8, 1))``, and the background blends
two greyish colours ``HSV(U(0, 1), U(0, 0.25), U(0.3, 0.9))``. Distractor blobs keep fully
random colours, so a class hue seen on the wrong shape still occurs. Shape and texture stay
class-specific; the cue only makes the task learnable by a small network trained from
scratch in a few hundred steps (the CPU demo).

Every image is drawn from ``numpy.random.default_rng([seed, split, index])``, so the same
config gives byte-identical files. ``dataset.json`` (class names + generator config) is
written last: a tree without it, or generated from another config, is regenerated.
"""

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.transform import resize

from pipeline.data.palette import save_label_png
from pipeline.storage import atomic_path, atomic_write_json

SHAPES = ("disk", "triangle", "square", "star", "cross", "ring", "crescent", "bar", "hexagon", "lshape")
TEXTURES = ("striped", "checkered", "dotted", "plain", "ringed")
SPLITS = {"train": 0, "val": 1}
META_FILE = "dataset.json"
FORMAT_VERSION = 1


def class_parts(c: int) -> tuple[str, str]:
    """(shape, texture) of foreground class ``c`` (0-based)."""
    return SHAPES[c % len(SHAPES)], TEXTURES[(c + c // len(SHAPES)) % len(TEXTURES)]


def synthetic_class_names(num_classes: int) -> list[str]:
    """``["background", "striped_disk", "checkered_triangle", ...]``."""
    return ["background"] + [f"{t}_{s}" for s, t in (class_parts(c) for c in range(num_classes))]


# --------------------------------------------------------------------------- shapes
def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Inside a regular n-gon of circumradius ``radius`` (one vertex on +u)."""
    theta = np.arctan2(v, u)
    r = np.hypot(u, v)
    sector = np.pi / n
    phi = np.mod(theta, 2 * sector) - sector
    return r * np.cos(phi) <= radius * np.cos(sector)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Implicit shapes in normalised coordinates (the shape spans about [-1, 1]^2)."""
    r = np.hypot(u, v)
    if shape == "disk":
        return r <= 1.0
    if shape == "triangle":
        return _regular_polygon(u, v, 3, 1.1)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "star":
        theta = np.arctan2(v, u)
        return r <= 0.6 + 0.4 * np.cos(5 * theta)
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.55, v) > 0.8)
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.38)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6, 0.95)
    if shape == "lshape":
        return ((u >= -0.8) & (u <= -0.2) & (np.abs(v) <= 0.9)) | \
            ((u >= -0.8) & (u <= 0.8) & (v >= 0.3) & (v <= 0.9))
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(texture: str, pu: np.ndarray, pv: np.ndarray, period: float) -> np.ndarray:
    """Binary pattern in [0, 1] over pixel coordinates of the object's rotated frame."""
    if texture == "striped":
        return (np.sin(2 * np.pi * pu / period) > 0).astype(np.float32)
    if texture == "checkered":
        return (np.mod(np.floor(pu / period) + np.floor(pv / period), 2)).astype(np.float32)
    if texture == "dotted":
        fu = np.mod(pu / period, 1.0) - 0.5
        fv = np.mod(pv / period, 1.0) - 0.5
        return (np.hypot(fu, fv) < 0.3).astype(np.float32)
    if texture == "plain":
        return np.zeros_like(pu, dtype=np.float32)
    if texture == "ringed":
        return (np.sin(2 * np.pi * np.hypot(pu, pv) / period) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


# --------------------------------------------------------------------------- drawing
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells + 1, cells + 1))
    return np.clip(resize(coarse, (size, size), order=3, mode="reflect", anti_aliasing=False), 0, 1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(25, 230, size=3)


def _contrasting(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A second colour at least ~80 away (L2) from ``colour``, so textures stay visible."""
    while True:
        other = _colour(rng)
        if np.linalg.norm(other - colour) > 80:
            return other


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (components in [0, 1], hue wrapping) as RGB in 0..255."""
    return 255.0 * np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _class_colours(rng: np.random.Generator, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """The saturated and the pale colour of an instance of the class with hue ``hue``."""
    strong = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.95))
    pale = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.15, 0.4), rng.uniform(0.8, 1.0))
    return strong, pale


def _greyish(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.3, 0.9))


def _paint(image: np.ndarray, region: np.ndarray, texture: str, pu, pv, period,
           rng: np.random.Generator, shading: np.ndarray | None = None,
           hue: float | None = None) -> None:
    if hue is None:
        c_a = _colour(rng)
        c_b = _contrasting(rng, c_a)
    else:
        c_a, c_b = _class_colours(rng, hue)
    t = texture_pattern(texture, pu, pv, period)[..., None]
    colour = (1 - t) * c_a + t * c_b
    if shading is not None:
        colour = colour * shading[..., None]
    image[region] = colour[region]


def draw_sample(rng: np.random.Generator, size: int, num_classes: int, min_objects: int,
                max_objects: int, class_colours: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (S, S, 3), mask uint8 (S, S)) pair; see the module docstring."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
    background = _greyish if class_colours else _colour
    image = (1 - noise) * background(rng) + noise * background(rng)
    mask = np.zeros((size, size), np.uint8)

    for _ in range(int(rng.integers(0, 3))):          # distractor blobs (not a class)
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(0.08, 0.18) * size
        wobble = _smooth_noise(rng, size, 4) - 0.5
        region = np.hypot(xx - cx, yy - cy) / radius + wobble < 1.0
        _paint(image, region, TEXTURES[int(rng.integers(len(TEXTURES)))], xx - cx, yy - cy,
               rng.uniform(4, 8), rng)

    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        c = int(rng.integers(num_classes))
        shape, texture = class_parts(c)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        radius = rng.uniform(0.12, 0.30) * size
        aspect = rng.uniform(0.8, 1.25)
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = xx - cx, yy - cy
        pu = np.cos(angle) * dx + np.sin(angle) * dy
        pv = -np.sin(angle) * dx + np.cos(angle) * dy
        region = shape_mask(shape, pu / (radius * aspect), pv * aspect / radius)
        shading = 1.0 - 0.25 * np.clip(pv / radius, -1, 1)
        _paint(image, region, texture, pu, pv, rng.uniform(4, 8), rng, shading,
               hue=c / num_classes if class_colours else None)
        mask[region] = c + 1

    image = image + rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------- writing
def _config_dict(cfg) -> dict:
    return cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(cfg)


def is_generated(root: Path, cfg) -> bool:
    """True when ``root`` holds a finished dataset generated from exactly ``cfg``."""
    meta = Path(root) / META_FILE
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return data.get("config") == _config_dict(cfg) and data.get("format_version") == FORMAT_VERSION


def generate_synthetic(root: Path, cfg, force: bool = False) -> dict:
    """Write the dataset described by ``cfg`` (a SyntheticConfig) under ``root``.

    Returns the metadata written to ``dataset.json``. Skips the work when the tree is already
    finished for this config (unless ``force``).
    """
    root = Path(root)
    meta_path = root / META_FILE
    if not force and is_generated(root, cfg):
        return json.loads(meta_path.read_text())
    conf = _config_dict(cfg)
    meta_path.unlink(missing_ok=True)                 # unfinished until written again
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    counts = {"train": conf["num_train"], "val": conf["num_val"]}
    for split, count in counts.items():
        ids = []
        for index in range(count):
            item = f"{split}_{index:05d}"
            rng = np.random.default_rng([conf["seed"], SPLITS[split], index])
            image, mask = draw_sample(rng, conf["image_size"], conf["num_classes"],
                                      conf["min_objects"], conf["max_objects"],
                                      conf.get("class_colours", False))
            with atomic_path(root / "JPEGImages" / f"{item}.jpg") as tmp:
                Image.fromarray(image).save(tmp, format="JPEG", quality=90)
            save_label_png(root / "SegmentationClass" / f"{item}.png", mask)
            ids.append(item)
        with atomic_path(root / "ImageSets" / "Segmentation" / f"{split}.txt") as tmp:
            Path(tmp).write_text("\n".join(ids) + "\n")

    meta = {"name": "synthetic", "format_version": FORMAT_VERSION,
            "class_names": synthetic_class_names(conf["num_classes"]),
            "splits": counts, "config": conf}
    atomic_write_json(meta_path, meta)
    return meta
