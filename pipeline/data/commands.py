"""``wsss data synth | prepare voc|coco | info``.

* ``synth``: generate the synthetic dataset of the config at ``data.root`` (skipped when it is
  already there for the same generator config; ``--force`` regenerates); ``--folder DIR``
  also writes it as a ``folder`` dataset (images + labels.csv, ``--masks`` for masks/).
* ``prepare voc``: VOC2012 trainval (tar) + SBD (benchmark.tgz), extracted beside
  ``data.root`` (which must be ``.../VOCdevkit/VOC2012``); SBD's ``cls/*.mat`` masks become
  ``SegmentationClassAug/*.png`` and ``ImageSets/Segmentation/train_aug.txt`` is written
  (SBD train + SBD val + VOC train, minus VOC val: 10,582 ids).
* ``prepare voc-mini``: the 530-image development subset (330 train + 200 val ids, kept in
  ``pipeline/data/voc_mini/``) copied from a VOC2012 directory (``--from``, default the
  ``voc`` preset's ``data.root``; VOC2012 trainval is downloaded there when it is missing)
  into ``data.root`` (the voc-mini preset's); the split files are written last.
* ``prepare coco``: the image zips and the instances annotations zip of ``data.coco_year``,
  extracted into ``data.root``.
  Archives go to ``<extract dir>/downloads`` and are checked against their MD5; an archive
  already there is verified and not fetched again, so an offline machine can be fed by hand.
  Without internet the command prints what to download and where to put it, and exits 1.
* ``info``: per split the image count, classes and label histogram, after ``validate()``.

Dataset and config errors print one line and exit 2.
"""

import argparse
import functools
import sys
from pathlib import Path
from urllib.error import URLError

from pipeline.cli import add_config_arguments, config_from_args
from pipeline.config import ConfigError
from pipeline.errors import InputError

VOC2012 = {"url": "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
           "md5": "6cd6e144f989b92b3379bac3b3de84fd"}          # torchvision.datasets.voc
SBD = {"url": "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
       "md5": "82b4d87ceb2ed10f6038a1cba92111cb"}              # torchvision.datasets.sbd
COCO = {
    2017: [("http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
           ("http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
           ("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            "f4bbac642086de4f52a3fdda2de5fa2c")],
    2014: [("http://images.cocodataset.org/zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88"),
           ("http://images.cocodataset.org/zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3"),
           ("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            "0a379cfc70b0e71301e0f377548639bd")],
}


def _friendly_errors(func):
    """DatasetError (any InputError) / ConfigError -> one line on stderr, exit code 2."""
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (InputError, ConfigError) as err:
            print(f"wsss data: {err}", file=sys.stderr)
            return 2
    return wrapper


# --------------------------------------------------------------------------- synth
@_friendly_errors
def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.data.base import DatasetError
    from pipeline.data.synthetic import generate_synthetic

    config = config_from_args(args)
    if config.data.dataset != "synthetic":
        raise DatasetError(f"data.dataset is {config.data.dataset!r}; `wsss data synth` writes the "
                           f"synthetic dataset (use --config demo or --set data.dataset=synthetic)")
    root = Path(config.data.root)
    meta = generate_synthetic(root, config.data.synthetic, force=args.force)
    splits = ", ".join(f"{n} {s}" for s, n in meta["splits"].items())
    print(f"synthetic dataset at {root.resolve()}: {splits} images, "
          f"{len(meta['class_names']) - 1} classes ({', '.join(meta['class_names'][1:])})")
    if args.folder:
        from pipeline.data.folder import write_folder_dataset
        from pipeline.data.voc import voc_dataset

        target = Path(args.folder)
        (target / "labels.csv").unlink(missing_ok=True)
        for split in meta["splits"]:
            csv_path = write_folder_dataset(voc_dataset(root, split, name="synthetic"), target,
                                            masks=args.masks, split=split, nest=args.nest)
        print(f"folder dataset at {target.resolve()}: images/, {csv_path.name}"
              + (", masks/" if args.masks else " (no masks)"))
    return 0


# --------------------------------------------------------------------------- prepare
def download_and_extract_archive(*args, **kwargs):
    """torchvision's downloader, imported when first called (torchvision imports torch)."""
    from torchvision.datasets.utils import download_and_extract_archive as download

    return download(*args, **kwargs)


def _fetch(archives: list[tuple[str, str]], download_dir: Path, extract_dir: Path) -> list[str]:
    """Download + verify + extract each archive; returns the failure messages."""
    failures = []
    for url, md5 in archives:
        try:
            download_and_extract_archive(url, str(download_dir), extract_root=str(extract_dir), md5=md5)
        except (URLError, OSError, RuntimeError) as err:
            failures.append(f"{url} (md5 {md5}): {err}")
    return failures


def _instructions(kind: str, archives: list[tuple[str, str]], download_dir: Path,
                  extract_dir: Path, failures: list[str]) -> str:
    lines = [f"wsss data prepare {kind}: could not download {len(failures)} archive(s):"]
    lines += [f"  {f}" for f in failures]
    lines.append(f"Download these files by hand and put them, unextracted, in {download_dir}/:")
    lines += [f"  {url}  (md5 {md5})" for url, md5 in archives]
    lines.append(f"then run `wsss data prepare {kind}` again: it verifies the checksums and "
                 f"extracts them into {extract_dir}/.")
    return "\n".join(lines)


def convert_sbd(voc_root: Path, sbd_dataset: Path) -> int:
    """SBD ``cls/*.mat`` -> ``SegmentationClassAug/*.png`` (VOC's own masks where they exist)
    and ``train_aug.txt`` = (SBD train + SBD val + VOC train) - VOC val. Returns its length."""
    import numpy as np
    from scipy.io import loadmat

    from pipeline.data.base import read_split_file
    from pipeline.data.palette import read_label_png, save_label_png
    from pipeline.storage import atomic_write_text

    aug = voc_root / "SegmentationClassAug"
    voc_sets = voc_root / "ImageSets" / "Segmentation"
    sbd_ids = read_split_file(sbd_dataset / "train.txt") + read_split_file(sbd_dataset / "val.txt")
    voc_train, voc_val = read_split_file(voc_sets / "train.txt"), read_split_file(voc_sets / "val.txt")
    for item in sorted(set(sbd_ids) | set(voc_train) | set(voc_val)):
        target = aug / f"{item}.png"
        if target.is_file():
            continue
        voc_mask = voc_root / "SegmentationClass" / f"{item}.png"
        if voc_mask.is_file():
            mask = read_label_png(voc_mask)
        else:
            mat = sbd_dataset / "cls" / f"{item}.mat"
            mask = loadmat(mat)["GTcls"][0]["Segmentation"][0].astype(np.uint8)
        save_label_png(target, mask)
    val = set(voc_val)
    train_aug = sorted(set(sbd_ids + voc_train) - val)
    atomic_write_text(voc_sets / "train_aug.txt", "\n".join(train_aug) + "\n")
    return len(train_aug)


VOC_MINI_IDS = Path(__file__).parent / "voc_mini"


def voc_mini_ids() -> dict[str, list[str]]:
    """The voc-mini id lists kept in the project: ``{"train": [...330], "val": [...200]}``."""
    from pipeline.data.base import read_split_file

    return {split: read_split_file(VOC_MINI_IDS / f"{split}.txt") for split in ("train", "val")}


def build_voc_mini(source: Path, target: Path) -> dict[str, int]:
    """Copy the voc-mini images and masks from the VOC2012 directory ``source`` into ``target``
    (the same layout). Every source file is checked before anything is copied (the error names
    the first missing ones); files already in ``target`` are kept; each copy is atomic and the
    split files come last, so an interrupted run leaves no split that names a missing file."""
    import shutil

    from pipeline.data.base import DatasetError
    from pipeline.storage import atomic_path, atomic_write_text

    ids = voc_mini_ids()
    wanted = [(sub, f"{item}{ext}") for item in sorted({i for v in ids.values() for i in v})
              for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"))]
    missing = [f"{sub}/{name}" for sub, name in wanted if not (source / sub / name).is_file()]
    if missing:
        raise DatasetError(f"{source} is not a VOC2012 directory holding the voc-mini ids: "
                           f"{len(missing)} file(s) missing, e.g. {', '.join(missing[:3])}")
    for sub, name in wanted:
        dest = target / sub / name
        if dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(source / sub / name, tmp)
    for split, items in ids.items():
        atomic_write_text(target / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(items) + "\n")
    return {split: len(items) for split, items in ids.items()}


def _prepare_voc_mini(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data.base import DatasetError

    if args.config is None:
        args.config = "voc-mini"
    config = config_from_args(args)
    if config.data.dataset != "voc":
        raise DatasetError(f"data.dataset is {config.data.dataset!r}; voc-mini is a voc dataset "
                           f"(use --config voc-mini)")
    target = Path(config.data.root)
    source = Path(args.source) if args.source else Path(load_config("voc").data.root)
    if source.resolve() == target.resolve():
        raise DatasetError(f"--from {source} is data.root itself; give the full VOC2012 directory")
    if not (source / "JPEGImages").is_dir():
        if source.parts[-2:] != ("VOCdevkit", "VOC2012"):
            raise DatasetError(f"--from {source} has no JPEGImages/ and does not end in VOCdevkit/VOC2012 "
                               f"(where VOC2012 trainval would be downloaded)")
        archives = [(VOC2012["url"], VOC2012["md5"])]
        download_dir = source.parents[1] / "downloads"
        download_dir.mkdir(parents=True, exist_ok=True)
        failures = _fetch(archives, download_dir, source.parents[1])
        if failures:
            print(_instructions("voc-mini", archives, download_dir, source.parents[1], failures),
                  file=sys.stderr)
            return 1
    counts = build_voc_mini(source, target)
    print(f"voc-mini ready at {target} (train: {counts['train']}, val: {counts['val']} images, from {source})")
    return 0


@_friendly_errors
def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.base import DatasetError

    if args.dataset == "voc-mini":
        return _prepare_voc_mini(args)
    if args.config is None:                   # default: the preset of the dataset
        args.config = args.dataset
    config = config_from_args(args)
    if config.data.dataset != args.dataset:
        raise DatasetError(f"data.dataset is {config.data.dataset!r} but `prepare {args.dataset}` "
                           f"was asked (use --config {args.dataset})")
    root = Path(config.data.root)
    if args.dataset == "voc":
        if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
            raise DatasetError(f"data.root is {root}; for `prepare voc` it must end in VOCdevkit/VOC2012")
        extract_dir = root.parents[1]
        archives = [(VOC2012["url"], VOC2012["md5"]), (SBD["url"], SBD["md5"])]
    else:
        extract_dir = root
        archives = COCO[int(config.data.coco_year)]
    download_dir = extract_dir / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    failures = _fetch(archives, download_dir, extract_dir)
    if failures:
        print(_instructions(args.dataset, archives, download_dir, extract_dir, failures), file=sys.stderr)
        return 1
    if args.dataset == "voc":
        count = convert_sbd(root, extract_dir / "benchmark_RELEASE" / "dataset")
        print(f"VOC2012 + SBD ready at {root} (train_aug: {count} ids)")
    else:
        print(f"COCO {config.data.coco_year} ready at {root}")
    return 0


# --------------------------------------------------------------------------- info
def format_info(ds) -> str:
    matrix = ds.label_matrix()
    counts = matrix.sum(axis=0).astype(int)
    masks = "" if ds.has_masks else " (no masks: image-level labels only)"
    lines = [f"{ds.name}: {len(ds)} images, {ds.num_classes - 1} classes, root {ds.root}{masks}",
             f"  images without labels: {int((matrix.sum(axis=1) == 0).sum())}; "
             f"labels per image: {matrix.sum(axis=1).mean() if len(ds) else 0:.2f}"]
    width = max(len(n) for n in ds.class_names)
    peak = max(int(counts.max(initial=0)), 1)
    for c, name in enumerate(ds.class_names[1:]):
        bar = "#" * int(round(30 * counts[c] / peak))
        lines.append(f"  {c + 1:3d} {name.ljust(width)} {counts[c]:6d} {bar}")
    return "\n".join(lines)


@_friendly_errors
def _cmd_info(args: argparse.Namespace) -> int:
    from pipeline.data import build_dataset

    config = config_from_args(args)
    splits = args.splits.split(",") if args.splits else [config.data.train_split, config.data.val_split]
    for split in dict.fromkeys(splits):
        ds = build_dataset(config.data, split)
        ds.validate()
        print(format_info(ds))
    return 0


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="datasets: generate, download, inspect")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser("synth", help="generate the synthetic dataset of the config")
    add_config_arguments(synth)
    synth.add_argument("--force", action="store_true", help="regenerate even when present")
    synth.add_argument("--folder", default=None, metavar="DIR",
                       help="also write it as a folder dataset (images/ + labels.csv with a split "
                            "column) at DIR, to try data.dataset=folder")
    synth.add_argument("--masks", action="store_true", help="with --folder: write masks/ too")
    synth.add_argument("--nest", type=int, default=0, metavar="N",
                       help="with --folder: spread the images over N sub-directories")
    synth.set_defaults(func=_cmd_synth)

    prepare = data_sub.add_parser("prepare", help="download and lay out VOC2012+SBD, COCO, or the "
                                                  "voc-mini subset")
    prepare.add_argument("dataset", choices=("voc", "coco", "voc-mini"))
    prepare.add_argument("--from", dest="source", default=None, metavar="DIR",
                         help="voc-mini: the full VOC2012 directory to copy from (default: the voc "
                              "preset's data.root; downloaded there when missing)")
    add_config_arguments(prepare)
    prepare.set_defaults(func=_cmd_prepare, config=None)

    info = data_sub.add_parser("info", help="validate the dataset; counts, classes, label histogram")
    add_config_arguments(info)
    info.add_argument("--splits", default=None, help="comma-separated splits (default: train and val splits)")
    info.set_defaults(func=_cmd_info)
