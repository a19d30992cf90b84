"""Map quality on real photos: stages 1-2 on ../shared/data/coco-tiny (VOC classes).

    .venv/bin/python benchmarks/quality_coco_tiny.py [--root ../shared/data/coco-tiny] [--epochs 6]
        [--workdir DIR] [--set classifier.scale_affinity=true ...]

Trains the MCIS classifier on the coco-tiny train split (50 COCO 2017 photos, labels mapped
to the 20 VOC classes, 40 with a VOC label) with the offline ImageNet-pretrained
EfficientNet-Lite0 backbone (the only pretrained backbone available without internet), then
generates maps for the val split (50 photos; related images drawn from that split) and prints,
for the plain CAMs and the MCIS maps of the same model side by side:

* the background-threshold sweep of map mIoU (``maps.background_thresholds``);
* at each kind's best threshold, per class present in the val ground truth (with its number
  of val images): IoU, precision (of the pixels the maps label c, the share that is c),
  recall (of the GT-c pixels, the share labelled c) and the threshold-free ROC AUC of the
  map (object vs the rest of the image; 50 = a flat or empty map), the same for the
  foreground as a whole, the mean map value on / off the object, and how many (image, class)
  maps are all zero (:func:`pipeline.map_eval.map_diagnostics`);
* whether the co-attention matches objects across images (:func:`pipeline.attention_eval.attention_diagnostics`):
  the share of each position's attention that lands on the partner's object of the shared
  class, from positions on and off the image's own object, vs uniform attention.

CPU-sized recipe (2 cores, <= 20 min; about 6 min on one thread): images 160x160,
256-channel extra convs, backbone BN frozen (batches of 5 pairs are too small for batch
statistics), the official optimiser set explicitly over the demo preset (SGD Nesterov
momentum 0.9, weight decay 5e-4, lr 1e-3 with the 10x/20x new-layer multipliers, colour
jitter 0.3/0.3/0.3/0.1), lr x0.1 after epoch 4, contrastive term from epoch 2; training
self-pairs off by default (the 2x copy quadruples a step's cost), maps with k = 3 related
images + the self-pairs. A rerun with the same ``--workdir`` reuses the finished stages.

What it shows (README, "Map quality, coco-tiny"): 40 labelled photos and ~50 SGD steps leave
the classifier near the label prior, so most maps of both kinds are empty and the rest
barely localise; the co-attention has not learnt to match objects across images, so MCIS
maps are flat and lose to the plain CAM.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import attention_eval  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.map_eval import map_diagnostics  # noqa: E402
from pipeline.tracking import MemoryTracker  # noqa: E402
from stages import generate_cams, train_classifier  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-tiny"


def build_config(root: Path, workdir: Path, epochs: int = 6, image_size: int = 160,
                 feature_channels: int = 256, train_self_pairs: bool = False, overrides=()):
    """The benchmark's pipeline config: the demo preset with every classifier field of the
    official recipe set explicitly (the demo's AdamW / 1x new-layer lr must not leak in)."""
    return load_config("demo", [
        f"workdir={workdir}", "data.dataset=coco", f"data.root={root}", "data.coco_year=2017",
        "data.coco_classes=voc", "data.train_split=train", "data.val_split=val",
        "classifier.backbone=efficientnet_lite0", "classifier.backbone_options={}",
        "classifier.pretrained=true", f"classifier.feature_channels={feature_channels}",
        "classifier.freeze_bn=true", f"classifier.epochs={epochs}", "classifier.batch_size=5",
        "classifier.optimizer=sgd", "classifier.lr=0.001", "classifier.new_layer_lr_mult=10",
        "classifier.weight_decay=0.0005", "classifier.colour_jitter=[0.3, 0.3, 0.3, 0.1]",
        "classifier.lr_steps=[4]", f"classifier.image_size={image_size}",
        "classifier.contrastive_from_epoch=2", f"classifier.self_pairs={str(train_self_pairs).lower()}",
        "classifier.num_workers=0", "classifier.log_every=5",
        "maps.split=val", "maps.num_related=3", "maps.self_pairs=true", "maps.checkpoint_epoch=null",
        f"maps.image_size={image_size}", "maps.workers=1", "maps.batch_size=8",
        *overrides])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--feature-channels", type=int, default=256)
    parser.add_argument("--train-self-pairs", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    if not (args.root / "annotations").is_dir():
        sys.exit(f"coco-tiny not found at {args.root} (expected annotations/ and train2017/ there)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsss-coco-tiny-"))
    config = build_config(args.root, workdir, args.epochs, args.image_size, args.feature_channels,
                          args.train_self_pairs, args.set)

    start = time.time()
    tracker = MemoryTracker()
    stage1 = train_classifier.run(config, {}, workdir / "train_classifier", tracker)
    t_train = time.time() - start
    start = time.time()
    stage2 = generate_cams.run(config, {"train_classifier": stage1}, workdir / "generate_cams", MemoryTracker())
    t_maps = time.time() - start
    scores = json.loads((workdir / "generate_cams" / generate_cams.EVAL_FILE).read_text())

    print(f"\ncoco-tiny ({args.root}), VOC classes, EfficientNet-Lite0 (ImageNet), {args.image_size}px")
    print(f"stage 1: {args.epochs} epochs, {stage1.metrics['num_images']} train images "
          f"({stage1.metrics['skipped_unlabelled']} without a VOC label left out), "
          f"loss {stage1.metrics['first_loss']:.3f} -> {stage1.metrics['final_loss']:.3f}, {t_train:.0f} s")
    print(f"stage 2: val split, {stage2.metrics['num_images']} images "
          f"({stage2.metrics['unlabelled_images']} without label), {t_maps:.0f} s")
    print("\nbg threshold   plain CAM   MCIS maps")
    for t in scores["maps"]["curve"]:
        print(f"  {float(t):5.2f}       {100 * scores['cams']['curve'][t]:6.1f}      "
              f"{100 * scores['maps']['curve'][t]:6.1f}")
    print(f"\nbest: plain CAM {100 * scores['cams']['best_miou']:.1f} mIoU (bg {scores['cams']['best_threshold']}), "
          f"MCIS maps {100 * scores['maps']['best_miou']:.1f} mIoU (bg {scores['maps']['best_threshold']}); "
          f"all-background {100 * scores['background_miou']:.1f}")
    start = time.time()
    dataset = build_dataset(config.data, config.maps.split)
    diag = map_diagnostics(workdir / "generate_cams", dataset,
                           {kind: scores[kind]["best_threshold"] for kind in ("cams", "maps")})
    print_diagnostics(diag)
    print_attention(attention_eval.stage_diagnostics(config, dataset, stage1.path))
    print(f"\ntotal {t_train + t_maps:.0f} s (+ {time.time() - start:.0f} s diagnostics); outputs in {workdir}")


def print_attention(att: dict) -> None:
    print(f"co-attention over {att['pairs']} (val image, class, partner) pairs: share on the partner's "
          f"object {100 * att['on_object']:.1f} % from the object, {100 * att['off_object']:.1f} % from "
          f"elsewhere (uniform {100 * att['uniform']:.1f} %); row entropy {att['entropy']:.2f} of uniform; "
          f"co-attentive class logit on / off the object {att['logit_on']:.2f} / {att['logit_off']:.2f}")


def _pct(value) -> str:
    return "    -" if value is None else f"{100 * value:5.1f}"


def print_diagnostics(diag: dict) -> None:
    """Per-class table at each kind's best threshold, foreground precision / recall,
    threshold-free separation (AUC, mean map value on / off the object) and empty maps."""
    cams, maps = diag["cams"], diag["maps"]
    print(f"\nper class at the best threshold (CAM bg {cams['threshold']:g}, MCIS bg {maps['threshold']:g}); "
          "%; imgs = val images with the class in GT;\nprec/rec = of the pixels labelled c, the share "
          "that is c / of the GT-c pixels, the share labelled c; AUC = object vs rest of the image")
    print(f"{'class':14s} imgs |  CAM: IoU  prec   rec   AUC | MCIS: IoU  prec   rec   AUC")
    for name in cams["per_class"]:
        row = [cams["per_class"][name], maps["per_class"][name]]
        images = diag["images"].get(name, diag["num_images"] if name == "background" else 0)
        print(f"{name:14s} {images:4d} |     " + " |      ".join(
            " ".join(_pct(r[key]) for key in ("iou", "precision", "recall", "auc")) for r in row))
    print(f"{'foreground':14s}      |     {'':5s} " + " |      ".join(
        f"{_pct(k['foreground_precision'])} {_pct(k['foreground_recall'])} {_pct(k['mean_auc'])}"
        for k in (cams, maps)))
    print(f"mean map value on the object / on the rest of the image: CAM {cams['inside']:.2f} / "
          f"{cams['outside']:.2f}, MCIS {maps['inside']:.2f} / {maps['outside']:.2f}")
    print(f"all-zero (image, class) maps: CAM {cams['empty_maps']}, MCIS {maps['empty_maps']} "
          f"of {diag['num_maps']}")


if __name__ == "__main__":
    main()
