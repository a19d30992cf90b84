"""Your own photos: a folder of images plus a file of image-level labels (``data.dataset=folder``).

::

    <root>/images/**/<name>.{jpg,jpeg,png,webp}   any nesting
    <root>/labels.csv                               or labels.jsonl, or data.labels_file
    <root>/masks/**/<name>.png                      optional, for evaluation only

The labels file names each image by its path under ``images/`` (with or without the
extension) and lists its classes:

* CSV with a header row: ``image,labels[,split]``; labels separated by ``;`` or ``|``
  (``shelf/a.jpg,"cat;dog",train``);
* JSON lines: ``{"image": "shelf/a.jpg", "labels": ["cat", "dog"], "split": "train"}``
  (``labels`` may also be one ``;`` / ``|`` separated string).

Class names are ``data.classes`` when given (index order; a label outside it is an error),
else the sorted names found in the file; index 0 is always ``background`` (a reserved name).
An image's id is its path under ``images/`` without the extension, ``/`` written ``__``
(``shelf/a.jpg`` -> ``shelf__a``), so every stage's ``<id>.png`` output stays flat.

Splits: the ``split`` column when the file has one (every row must fill it), otherwise a
seeded hash of the id puts a ``data.val_fraction`` share of the images in ``val`` and the
rest in ``train`` (stable when images are added). ``all`` is every image.

Masks (palette or index PNGs, value c = class ``c`` of the class list above, 255 = ignore)
are used when ``masks/`` exists: a split whose images all have a mask is scored against them;
a split where none has one has no masks (stages 1-4 never need them; stage 5 then reports
label agreement and pseudo-mask coverage); a split where only some have one is an error.

Pixels are read as stored, as by every stage (the EXIF orientation tag is not applied during
training; ``wsss predict`` applies it to the photos it segments).

Every problem found while reading the file is a :class:`DatasetError` naming the file and
line: a missing or unknown image, an unknown class, an empty label set, a duplicate image or
id, an image under ``images/`` the file does not list. Unreadable images are found by
``wsss data info`` (a full decode) and at run start (headers).
"""

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.data.base import DatasetError, SegDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABEL_FILES = ("labels.csv", "labels.jsonl")
ID_SEPARATOR = "__"
ALL_SPLIT = "all"


@dataclass(frozen=True)
class Row:
    """One labelled image: where it was listed, its file, id, classes and split (or None)."""

    line: int
    image: Path
    id: str
    labels: tuple[str, ...]
    split: str | None


def image_id(relative: PurePosixPath) -> str:
    """``shelf/a.jpg`` -> ``shelf__a``."""
    return ID_SEPARATOR.join(relative.with_suffix("").parts)


def list_images(images_dir: Path) -> dict[str, Path]:
    """Relative posix path (with suffix) -> file, for every image file under ``images_dir``."""
    found = {}
    for path in sorted(images_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            found[path.relative_to(images_dir).as_posix()] = path
    return found


def _split_labels(text: str) -> list[str]:
    return [part.strip() for part in text.replace("|", ";").split(";") if part.strip()]


def _read_csv(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        if "image" not in fields or "labels" not in fields:
            raise DatasetError(f"{path}:1: the header must name the columns 'image' and 'labels' "
                               f"(and optionally 'split'), got {fields}")
        reader.fieldnames = fields
        rows = []
        for record in reader:
            line = reader.line_num
            if None in record:
                raise DatasetError(f"{path}:{line}: more fields than the header's {len(fields)} "
                                   f"(quote a labels field that holds commas)")
            image = (record.get("image") or "").strip()
            if not image and not any((v or "").strip() for v in record.values()):
                continue                                   # blank line
            split = (record.get("split") or "").strip() if "split" in fields else None
            rows.append((line, image, _split_labels(record.get("labels") or ""), split))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{line}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or "image" not in record or "labels" not in record:
            raise DatasetError(f"{path}:{line}: expected an object with 'image' and 'labels'")
        labels = record["labels"]
        if isinstance(labels, str):
            labels = _split_labels(labels)
        elif isinstance(labels, list) and all(isinstance(x, str) for x in labels):
            labels = [x.strip() for x in labels if x.strip()]
        else:
            raise DatasetError(f"{path}:{line}: 'labels' must be a list of class names or a "
                               f"';'-separated string, got {labels!r}")
        split = record.get("split")
        rows.append((line, str(record["image"]).strip(), labels,
                     None if split is None else str(split).strip()))
    return rows


def labels_file_path(root: Path, labels_file: Path | None) -> Path:
    """``labels_file`` (relative paths are under ``root``), else ``labels.csv`` / ``labels.jsonl``."""
    if labels_file is not None:
        path = Path(labels_file)
        path = path if path.is_absolute() or path.exists() else root / path
        if not path.is_file():
            raise DatasetError(f"data.labels_file {path} does not exist")
        return path
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"folder dataset {root}: no labels file ({' or '.join(LABEL_FILES)}; or set "
                       f"data.labels_file)")


def read_rows(root: Path, labels_file: Path | None = None) -> tuple[Path, list[Row]]:
    """The labels file's rows resolved against ``<root>/images`` (see the module docstring)."""
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"folder dataset {root}: directory {images_dir} does not exist")
    path = labels_file_path(root, labels_file)
    raw = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else _read_csv(path)
    files = list_images(images_dir)
    by_stem: dict[str, list[str]] = {}
    for rel in files:
        by_stem.setdefault(PurePosixPath(rel).with_suffix("").as_posix(), []).append(rel)
    ids: dict[str, tuple[int, str]] = {}
    listed: dict[str, int] = {}
    rows = []
    for line, name, labels, split in raw:
        where = f"{path}:{line}"
        if not name:
            raise DatasetError(f"{where}: empty image name")
        rel = PurePosixPath(name.replace("\\", "/")).as_posix().lstrip("/")
        if rel.startswith("images/") and rel not in files:
            rel = rel[len("images/"):]
        if rel not in files:
            candidates = by_stem.get(rel, [])
            if len(candidates) > 1:
                raise DatasetError(f"{where}: image {name!r} is ambiguous ({', '.join(candidates)}); "
                                   f"give the extension")
            if not candidates:
                raise DatasetError(f"{where}: image {name!r} does not exist under {images_dir}")
            rel = candidates[0]
        if rel in listed:
            raise DatasetError(f"{where}: image {rel!r} is listed twice (first at line {listed[rel]})")
        listed[rel] = line
        item = image_id(PurePosixPath(rel))
        if item in ids:
            raise DatasetError(f"{where}: image {rel!r} has the id {item!r} of line {ids[item][0]} "
                               f"({ids[item][1]!r}); rename one of them")
        ids[item] = (line, rel)
        if not labels:
            raise DatasetError(f"{where}: image {rel!r} has no labels (every image needs at "
                               f"least one class)")
        if "background" in labels:
            raise DatasetError(f"{where}: 'background' is reserved (class 0); list only the "
                               f"classes the image shows")
        if split is not None and not split:
            raise DatasetError(f"{where}: image {rel!r} has an empty split (the file has a 'split' "
                               f"column, so every row needs one)")
        rows.append(Row(line, files[rel], item, tuple(dict.fromkeys(labels)), split))
    unlisted = [rel for rel in files if rel not in listed]
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        raise DatasetError(f"{path}: {len(unlisted)} image(s) under {images_dir} have no labels "
                           f"(no row): {', '.join(unlisted[:3])}{more}")
    if not rows:
        raise DatasetError(f"{path}: no images listed")
    return path, rows


def class_list(rows: list[Row], classes: list[str] | None, path: Path) -> list[str]:
    """``["background", ...]``: the configured classes, or the sorted names of the file."""
    if classes is None:
        return ["background"] + sorted({label for row in rows for label in row.labels})
    if len(set(classes)) != len(classes) or "background" in classes:
        raise DatasetError(f"data.classes {classes} must be distinct and not name 'background'")
    known = set(classes)
    for row in rows:
        unknown = [label for label in row.labels if label not in known]
        if unknown:
            raise DatasetError(f"{path}:{row.line}: unknown class(es) {', '.join(map(repr, unknown))} "
                               f"(data.classes: {', '.join(classes)})")
    return ["background"] + list(classes)


def hash_split(item: str, val_fraction: float, seed: int) -> str:
    """``val`` for a seeded-hash share ``val_fraction`` of the ids, else ``train``."""
    digest = hashlib.sha256(f"{seed}:{item}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def folder_dataset(root: Path, split: str, labels_file: Path | None = None,
                   classes: list[str] | None = None, val_fraction: float = 0.2,
                   split_seed: int = 0, mask_dir: Path | None = None,
                   transform=None, require_labels: bool = False) -> SegDataset:
    """One split of a folder dataset; ``mask_dir`` replaces the masks by ``<mask_dir>/<id>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist")
    path, rows = read_rows(root, labels_file)
    names = class_list(rows, classes, path)
    with_column = [r for r in rows if r.split is not None]
    if split == ALL_SPLIT:
        chosen = rows
    elif with_column:
        chosen = [r for r in rows if r.split == split]
        if not chosen:
            found = sorted({r.split for r in rows})
            raise DatasetError(f"{path}: no row has split {split!r} (splits in the file: "
                               f"{', '.join(found)}, plus {ALL_SPLIT!r})")
    else:
        if split not in ("train", "val"):
            raise DatasetError(f"folder dataset {root}: split {split!r} unknown; without a 'split' "
                               f"column the splits are 'train', 'val' (data.val_fraction) and "
                               f"{ALL_SPLIT!r}")
        chosen = [r for r in rows if hash_split(r.id, val_fraction, split_seed) == split]
        if not chosen:
            raise DatasetError(f"folder dataset {root}: split {split!r} is empty (data.val_fraction="
                               f"{val_fraction} of {len(rows)} images)")
    index = {name: c for c, name in enumerate(names)}
    matrix = np.zeros((len(chosen), len(names) - 1), np.float32)
    for i, row in enumerate(chosen):
        matrix[i, [index[label] - 1 for label in row.labels]] = 1.0
    images = {r.id: r.image for r in chosen}
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            raise DatasetError(f"mask directory {mask_dir} does not exist")
        mask_path = lambda i: mask_dir / f"{i}.png"  # noqa: E731
    else:
        mask_path = _ground_truth(root, chosen, split)
    return SegDataset(root, [r.id for r in chosen], names, image_path=images.__getitem__,
                      mask_path=mask_path, label_matrix=matrix, transform=transform,
                      require_labels=require_labels, name=f"folder {split}")


def _ground_truth(root: Path, rows: list[Row], split: str):
    """id -> ``masks/<relative path>.png`` when every image of the split has one; None when none
    has (or there is no ``masks/``); an error when only some have."""
    masks_dir, images_dir = root / "masks", root / "images"
    if not masks_dir.is_dir():
        return None
    paths = {r.id: masks_dir / r.image.relative_to(images_dir).with_suffix(".png") for r in rows}
    have = [i for i, p in paths.items() if p.is_file()]
    if not have:
        return None
    if len(have) < len(paths):
        lacking = [str(p) for i, p in paths.items() if not p.is_file()]
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise DatasetError(f"folder dataset {root}: {len(have)} of the {len(paths)} images of split "
                           f"{split!r} have a mask under {masks_dir}, missing {', '.join(lacking[:3])}"
                           f"{more} (give every image of a split a mask, or none)")
    return paths.__getitem__


def write_folder_dataset(source: SegDataset, out_root: Path, masks: bool = False,
                         split: str | None = None, nest: int = 0) -> Path:
    """Write ``source`` (e.g. a synthetic split) as a folder dataset under ``out_root``:
    ``images/`` (as ``<id>.jpg``, spread over ``nest`` sub-directories when > 0), a
    ``labels.csv`` with a ``split`` column when ``split`` is given, and with ``masks`` its
    ground truth under ``masks/``. Appends to an existing ``labels.csv``. Returns the CSV."""
    import shutil

    from pipeline.data.palette import save_label_png
    from pipeline.storage import atomic_write_text

    out_root = Path(out_root)
    csv_path = out_root / "labels.csv"
    lines = csv_path.read_text().splitlines() if csv_path.is_file() else \
        ["image,labels" + (",split" if split else "")]
    for index, item in enumerate(source.ids):
        rel = PurePosixPath(f"group{index % nest}" if nest else "", f"{item}.jpg")
        target = out_root / "images" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.image_path(item), target)
        if masks:
            save_label_png((out_root / "masks" / rel).with_suffix(".png"), source.load_mask(item))
        names = [source.class_names[c + 1] for c in np.flatnonzero(source.labels(item))]
        lines.append(f"{rel.as_posix()},{';'.join(names)}" + (f",{split}" if split else ""))
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    return csv_path
