"""Datasets (VOC, COCO, synthetic, folder), pair sampling and joint transforms.

Entry point: :func:`build_dataset` turns a :class:`~pipeline.config.DataConfig` and a split
name into a :class:`SegDataset` (image, mask with 255 = ignore, image-level labels, id).

The names below load their modules (and torch) on first use, so ``import
pipeline.data.commands`` stays cheap: the ``wsss`` command parses and validates its arguments
before torch is imported.
"""

from pathlib import Path

_LAZY = {"IGNORE_INDEX": "base", "DatasetError": "base", "SegDataset": "base",
         "labels_from_mask": "base", "read_split_file": "base", "generate_synthetic": "synthetic",
         "is_generated": "synthetic", "synthetic_class_names": "synthetic", "VOC_CLASSES": "voc",
         "voc_dataset": "voc"}


def __getattr__(name: str):
    """PEP 562: ``pipeline.data.SegDataset`` etc. from their modules, imported when asked."""
    module = _LAZY.get(name)
    if module == "base":
        from pipeline.data import base as source
    elif module == "synthetic":
        from pipeline.data import synthetic as source
    elif module == "voc":
        from pipeline.data import voc as source
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(source, name)


__all__ = ["build_dataset", "SegDataset", "DatasetError", "IGNORE_INDEX", "VOC_CLASSES",
           "generate_synthetic", "is_generated", "synthetic_class_names", "labels_from_mask",
           "read_split_file", "voc_dataset"]


def build_dataset(data_cfg, split: str, mask_dir: Path | None = None, transform=None,
                  require_labels: bool = False) -> "SegDataset":
    """The ``split`` of the dataset ``data_cfg`` describes.

    * ``synthetic``: generates the VOC-layout tree at ``data_cfg.root`` first when it is
      missing, unfinished or from another generator config; then reads it as VOC.
    * ``voc``: VOCdevkit/VOC2012 layout (``train_aug`` uses SBD's SegmentationClassAug).
    * ``coco``: instances JSON of ``data_cfg.coco_year``; masks rasterised once and cached.
    * ``folder``: ``images/`` + a labels CSV / JSON-lines file, masks optional
      (:mod:`pipeline.data.folder`).

    ``mask_dir`` replaces the ground-truth masks by ``<mask_dir>/<id>.png``;
    ``require_labels`` makes an image without any foreground label an error (stage 1).
    """
    from pipeline.data.base import DatasetError
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.data.voc import voc_dataset

    root = Path(data_cfg.root)
    if data_cfg.dataset == "synthetic":
        generate_synthetic(root, data_cfg.synthetic)
        return voc_dataset(root, split, mask_dir=mask_dir, transform=transform,
                           require_labels=require_labels, name="synthetic")
    if data_cfg.dataset == "voc":
        return voc_dataset(root, split, mask_dir=mask_dir, transform=transform,
                           label_source=data_cfg.label_source, labels_file=data_cfg.labels_file,
                           require_labels=require_labels, name="voc")
    if data_cfg.dataset == "coco":
        from pipeline.data.coco import coco_dataset
        return coco_dataset(root, split, year=data_cfg.coco_year, classes=data_cfg.coco_classes,
                            mapping=data_cfg.coco_mapping, mask_dir=mask_dir, transform=transform,
                            require_labels=require_labels)
    if data_cfg.dataset == "folder":
        from pipeline.data.folder import folder_dataset
        return folder_dataset(root, split, labels_file=data_cfg.labels_file, classes=data_cfg.classes,
                              val_fraction=data_cfg.val_fraction, split_seed=data_cfg.split_seed,
                              mask_dir=mask_dir, transform=transform, require_labels=require_labels)
    raise DatasetError(f"data.dataset: unknown dataset {data_cfg.dataset!r} (synthetic, voc, coco, folder)")
