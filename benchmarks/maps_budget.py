"""Stage 2's disk and memory at train_aug scale, from a scaled-down run and the plan.

    .venv/bin/python benchmarks/maps_budget.py [--images 10582] [--run-images 48] [--pool 64]

Three parts, printed as a table (target: <= 1 GB written, <= 4 GB of RAM for 10,582 images):

1. **The plan at full scale** (labels only, no images): 10,582 label sets drawn with
   replacement from voc-mini's train labels (co-occurrences kept; a fixed per-class mix when
   voc-mini is absent), :func:`stages.generate_cams.make_plan` with k = 3 and the related
   pool, then the feature cache simulated over the processing order in batches of 8: the peak
   number of features held at once, times one feature's bytes at the voc settings (VGG16 OS 8
   on 256 x 256: 512 x 32 x 32 float16 = 1 MiB). ``--pool 0`` (the whole class) for contrast.
2. **Bytes written per image**: map files at feature resolution for the drawn label counts
   (measured from :func:`pipeline.maps_io.save_maps` on real records), against
   ``maps.full_resolution`` at VOC's typical 500 x 375.
3. **A scaled-down real run** of stage 2 (tiny backbone with 512 feature channels, 256 px
   squash, so features have the voc shape) on ``--run-images`` synthetic images: wall time,
   peak RSS, bytes written, features computed / recomputed, cache peak; per-image figures
   extrapolated to 10,582 images.
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.maps_io import save_maps  # noqa: E402
from pipeline.tracking import MemoryTracker  # noqa: E402
from stages import generate_cams, train_classifier  # noqa: E402

VOC_MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "voc-mini" / "VOCdevkit" / "VOC2012"
FEATURE_BYTES = 512 * 32 * 32 * 2


class LabelsOnly:
    """What make_plan reads: ids and a label matrix."""

    def __init__(self, labels: np.ndarray):
        self._labels = labels
        self.ids = [f"im{i:05d}" for i in range(len(labels))]

    def __len__(self):
        return len(self.ids)

    def label_matrix(self):
        return self._labels


def label_sets(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 20) labels drawn from voc-mini's train label sets (or a fixed mix without it)."""
    rng = np.random.default_rng(seed)
    if (VOC_MINI / "ImageSets").is_dir():
        from pipeline.data import build_dataset
        config = load_config("voc", [f"data.root={VOC_MINI}", "data.train_split=train"])
        source = build_dataset(config.data, "train").label_matrix()
        return source[rng.integers(0, len(source), n)], f"voc-mini train ({len(source)} label sets)"
    prior = np.full(20, 0.06)
    prior[14] = 0.4                                   # person
    return (rng.random((n, 20)) < prior).astype(np.float32), "a fixed class mix (voc-mini absent)"


def simulated_peak(labels: np.ndarray, pool: int, batch: int = 8) -> tuple[int, int]:
    """Peak features held and features computed for the whole split in one process."""
    return generate_cams.simulated_cache_peak(
        generate_cams.make_plan(LabelsOnly(labels), 3, 0, pool), batch)


def map_file_bytes(labels: np.ndarray, tmp: Path, size=(32, 32)) -> float:
    """Mean bytes of a map file over the label counts of ``labels``."""
    sizes = {}
    for n in np.unique(labels.sum(1)).astype(int):
        save_maps(tmp / f"n{n}.npy", np.arange(1, n + 1), np.zeros((n, *size)), size=(375, 500))
        sizes[n] = (tmp / f"n{n}.npy").stat().st_size
    return float(np.mean([sizes[int(n)] for n in labels.sum(1)]))


def real_run(images: int, workdir: Path) -> dict:
    overrides = [f"workdir={workdir}", f"data.root={workdir / 'data'}", f"data.synthetic.num_train={images}",
                 "data.synthetic.num_val=4", "data.synthetic.image_size=256", "data.synthetic.num_classes=20",
                 "classifier.epochs=1", "classifier.feature_channels=512", "classifier.image_size=256",
                 "classifier.backbone_options={width: 16}", "classifier.batch_size=8",
                 "maps.checkpoint_epoch=null", "maps.batch_size=8", "maps.workers=1", "device=cpu"]
    config = load_config("demo", overrides)
    classifier = workdir / "classifier"
    stage1 = train_classifier.run(config, {}, classifier, MemoryTracker())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = generate_cams.run(config, {"train_classifier": stage1}, workdir / "maps", MemoryTracker())
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in (workdir / "maps").rglob("*") if p.is_file())
    return {"seconds": seconds, "written": written, "rss_mb": max(rss0, resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss) / 1024, **{k: result.metrics[k] for k in (
            "features_computed", "features_recomputed", "feature_cache_peak_mb", "num_images")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10582)
    parser.add_argument("--run-images", type=int, default=48)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--skip-run", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    labels, source = label_sets(args.images)
    labels = labels[labels.sum(1) > 0]
    print(f"{len(labels)} labelled images, label sets from {source}; "
          f"{labels.sum(1).mean():.2f} classes per image")
    rows = []
    for pool in dict.fromkeys([args.pool, 0]):
        peak, computed = simulated_peak(labels, pool)
        rows.append((f"feature cache peak, related_pool={pool}", f"{peak} features = "
                     f"{peak * FEATURE_BYTES / 2**30:.2f} GiB", f"computed {computed} (once each)"))
    with tempfile.TemporaryDirectory() as tmp:
        per_image = map_file_bytes(labels, Path(tmp))
        full = map_file_bytes(labels[:200], Path(tmp), size=(375, 500))
    rows.append(("map files, feature resolution", f"{per_image / 1024:.1f} KiB/image",
                 f"{per_image * len(labels) / 2**30:.3f} GiB for {len(labels)}"))
    rows.append(("map files, full_resolution 500x375", f"{full / 1024:.0f} KiB/image",
                 f"{full * len(labels) / 2**30:.1f} GiB for {len(labels)}"))
    if not args.skip_run:
        with tempfile.TemporaryDirectory() as tmp:
            run = real_run(args.run_images, Path(tmp))
        n = run["num_images"]
        rows.append((f"real run, {n} images (CPU, {torch.get_num_threads()} threads)",
                     f"{run['seconds']:.1f} s, {n / run['seconds']:.2f} images/s, peak RSS {run['rss_mb']:.0f} MB",
                     f"wrote {run['written'] / 1024:.0f} KiB ({run['written'] / n / 1024:.1f} KiB/image -> "
                     f"{run['written'] / n * len(labels) / 2**30:.3f} GiB for {len(labels)}); features "
                     f"computed {run['features_computed']}, recomputed {run['features_recomputed']}, "
                     f"cache peak {run['feature_cache_peak_mb']:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:<34}  {b}")


if __name__ == "__main__":
    main()
