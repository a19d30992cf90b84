"""The dataset every reader returns: image, mask (255 = ignore), image-level labels, id.

A :class:`SegDataset` is a list of ids plus where each id's image and mask live. Cheap checks
(files exist) happen when it is built; reading problems (unreadable or truncated image, mask
values outside the classes, image/mask size mismatch) are raised lazily by the loaders with
the file name in the message, and :meth:`SegDataset.validate` runs those checks over every
item up front (``wsss data info`` does).

Image-level labels are a multi-hot float32 vector over the K foreground classes: index
``c - 1`` is set when mask value ``c`` occurs (``0`` = background and ``255`` = ignore never
count). Readers may instead pass a precomputed label matrix (VOC ``cls_labels.npy`` / XML).

Masks are optional: a reader without them (the ``folder`` dataset when it has no ``masks/``)
passes ``mask_path=None`` and a label matrix. Then :attr:`SegDataset.has_masks` is False,
:meth:`~SegDataset.load_mask` raises, items carry an all-255 (ignore) mask so training
transforms still work, and the evaluators report what they can without ground truth.
"""

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pipeline.data.palette import LABEL_MODES, read_label_png
from pipeline.errors import InputError

IGNORE_INDEX = 255


class DatasetError(InputError):
    """Bad dataset input: the message names the file, id or field and what is wrong."""


def read_split_file(path: Path) -> list[str]:
    """Ids listed in a split file, one per line. DeepLab-style lines
    (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``) give the stem of the first path."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    ids = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token:
            ids.append(Path(token).stem if "/" in token or "." in token else token)
    if not ids:
        raise DatasetError(f"split file {path} lists no ids")
    return ids


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot (num_classes - 1,) float32 vector of the foreground classes in ``mask``."""
    present = np.unique(mask)
    present = present[(present > 0) & (present < num_classes)]
    labels = np.zeros(num_classes - 1, dtype=np.float32)
    labels[present.astype(np.int64) - 1] = 1.0
    return labels


class SegDataset(Dataset):
    """Images + palette masks + image-level labels for one split.

    Args:
        root: the dataset root (for messages and ``.root``).
        ids: item ids in split order.
        class_names: index 0 = "background"; mask value c is ``class_names[c]``.
        image_path / mask_path: id -> file path; ``mask_path=None``: no ground-truth masks
            (then ``label_matrix`` is required).
        label_matrix: optional (N, K) precomputed labels (else computed from the masks).
        transform: optional joint transform called as ``transform(image, mask)``.
        require_labels: every item must have at least one foreground label (stage 1).
        name: human-readable name for messages (e.g. ``"voc train_aug"``).
    """

    def __init__(self, root: Path, ids: Sequence[str], class_names: Sequence[str],
                 image_path: Callable[[str], Path], mask_path: Callable[[str], Path] | None,
                 label_matrix: np.ndarray | None = None, transform=None,
                 require_labels: bool = False, name: str = "dataset"):
        self.root = Path(root)
        self.ids = list(ids)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transform = transform
        self.require_labels = require_labels
        self.name = name
        self._image_path = image_path
        self._mask_path = mask_path
        self._index = {item: i for i, item in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise DatasetError(f"{name}: id {dup!r} is listed more than once")
        if label_matrix is not None:
            label_matrix = np.asarray(label_matrix, dtype=np.float32)
            if label_matrix.shape != (len(self.ids), self.num_classes - 1):
                raise DatasetError(f"{name}: label matrix has shape {label_matrix.shape}, expected "
                                   f"({len(self.ids)}, {self.num_classes - 1})")
        if mask_path is None and label_matrix is None:
            raise DatasetError(f"{name}: a dataset without masks needs image-level labels")
        self._labels = label_matrix
        self._check_files()
        if require_labels:
            self.check_labels()

    # ------------------------------------------------------------------ paths
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, item: str) -> Path:
        return Path(self._image_path(item))

    @property
    def has_masks(self) -> bool:
        """True when every item has a ground-truth (or given pseudo-) mask file."""
        return self._mask_path is not None

    def mask_path(self, item: str) -> Path:
        if self._mask_path is None:
            raise DatasetError(f"{self.name}: no masks (id {item!r}): this dataset has "
                               f"image-level labels only")
        return Path(self._mask_path(item))

    def index_of(self, item: str) -> int:
        if item not in self._index:
            raise DatasetError(f"{self.name}: unknown id {item!r}")
        return self._index[item]

    def _check_files(self) -> None:
        """Every listed id has an image and a mask file (cheap: one stat each)."""
        for item in self.ids:
            if not self.image_path(item).is_file():
                raise DatasetError(f"{self.name}: id {item!r} is listed but its image "
                                   f"{self.image_path(item)} does not exist")
            if self.has_masks and not self.mask_path(item).is_file():
                raise DatasetError(f"{self.name}: id {item!r} is listed but its mask "
                                   f"{self.mask_path(item)} does not exist")

    # ------------------------------------------------------------------ loading
    def load_image(self, item: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB; an unreadable or truncated file raises naming the file."""
        path = self.image_path(item)
        try:
            with Image.open(path) as image:
                image.load()
                return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DatasetError(f"{self.name}: image {path} (id {item!r}) is unreadable or "
                               f"truncated: {err}") from None

    def load_mask(self, item: str) -> np.ndarray:
        """uint8 (H, W) class indices, 255 = ignore; values outside the classes raise."""
        path = self.mask_path(item)
        try:
            mask = read_label_png(path)
        except (ValueError, FileNotFoundError) as err:
            raise DatasetError(f"{self.name}: mask of id {item!r}: {err}") from None
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DatasetError(f"{self.name}: mask {path} (id {item!r}) has values "
                               f"{bad.tolist()} outside the {self.num_classes} classes and 255")
        return mask

    def load_pair(self, item: str) -> tuple[np.ndarray, np.ndarray]:
        """Image and mask, checked to have the same size. Without masks the mask is all 255
        (ignore), the image's size."""
        if not self.has_masks:
            image = self.load_image(item)
            return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        image, mask = self.load_image(item), self.load_mask(item)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{self.name}: image {self.image_path(item)} is "
                               f"{image.shape[1]}x{image.shape[0]} but mask {self.mask_path(item)} "
                               f"is {mask.shape[1]}x{mask.shape[0]} (id {item!r})")
        return image, mask

    # ------------------------------------------------------------------ labels
    def label_matrix(self) -> np.ndarray:
        """(N, K) float32 multi-hot labels (read from the masks once, then kept)."""
        if self._labels is None:
            self._labels = np.stack([labels_from_mask(self.load_mask(i), self.num_classes)
                                     for i in self.ids]) if self.ids else \
                np.zeros((0, self.num_classes - 1), np.float32)
        return self._labels

    def labels(self, item: str) -> np.ndarray:
        return self.label_matrix()[self.index_of(item)].copy()

    def check_labels(self) -> None:
        """Raise if some item has an empty label set (stage 1 needs one per image)."""
        empty = np.flatnonzero(self.label_matrix().sum(axis=1) == 0)
        if empty.size:
            shown = ", ".join(repr(self.ids[i]) for i in empty[:5])
            more = f" and {empty.size - 5} more" if empty.size > 5 else ""
            raise DatasetError(f"{self.name}: {empty.size} image(s) have an empty label set "
                               f"(no foreground class), e.g. {shown}{more}; image-level labels "
                               f"are required here")

    def _header(self, path: Path, kind: str, item: str) -> tuple[str, tuple[int, int]]:
        """(mode, (H, W)) of an image file from its header (nothing decoded)."""
        try:
            with Image.open(path) as image:
                return image.mode, (image.height, image.width)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DatasetError(f"{self.name}: {kind} {path} (id {item!r}) is unreadable: {err}") from None

    def check_headers(self) -> None:
        """The cheap part of :meth:`validate`, for a run's start: every image and mask opens
        (header only), masks are palette / grey PNGs and each mask has its image's size.
        Truncated files and mask values are found by :meth:`validate` (a full decode)."""
        for item in self.ids:
            _, image_size = self._header(self.image_path(item), "image", item)
            if not self.has_masks:
                continue
            mode, mask_size = self._header(self.mask_path(item), "mask", item)
            if mode not in LABEL_MODES:
                raise DatasetError(f"{self.name}: mask {self.mask_path(item)} (id {item!r}) has mode "
                                   f"{mode}; expected a palette or grey PNG")
            if image_size != mask_size:
                raise DatasetError(f"{self.name}: image {self.image_path(item)} is "
                                   f"{image_size[1]}x{image_size[0]} but mask {self.mask_path(item)} "
                                   f"is {mask_size[1]}x{mask_size[0]} (id {item!r})")

    def validate(self) -> None:
        """Read every image and mask: decodable, sizes agree, values within the classes
        (images only when there are no masks)."""
        for item in self.ids:
            self.load_pair(item)
        if self.require_labels:
            self.check_labels()

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict:
        item = self.ids[index]
        image, mask = self.load_pair(item)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        mask_t = tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return {"image": image_t, "mask": mask_t,
                "labels": torch.from_numpy(self.label_matrix()[index].copy()), "id": item}

    def __repr__(self) -> str:
        masks = "" if self.has_masks else ", no masks"
        return (f"SegDataset({self.name!r}, {len(self)} images, {self.num_classes - 1} classes{masks}, "
                f"root={self.root})")
