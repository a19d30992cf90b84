"""``wsss plan``: a dry run before hours of compute.

1. **Data**: every file of every split the run reads exists with a readable header (the
   run-start check of :func:`stages.check_run_inputs`), counts and the label histogram.
2. **A short sample of each stage on this device** (``samples`` steps after one warm-up, on
   random inputs of the configured sizes: speed does not depend on the weights or pixels;
   stage 3 on real images): seconds per step, peak GPU memory (``max_memory_allocated``) and
   the process's peak host memory (``ru_maxrss``, cumulative over the stages sampled so far).
3. **Projection** per stage: time = steps of the full run x seconds per step; disk from the
   sizes of what the stage writes (checkpoints from the parameter count, map files from
   :func:`pipeline.maps_io.save_maps`, pseudo-mask PNGs as sampled); stage 2's feature
   cache from its plan (:func:`stages.generate_cams.make_plan` over the real labels).

:func:`check_fits` refuses (``PlanError``, one line, exit 2) when the projected disk exceeds
the free space of the work directory, or a stage's GPU peak exceeds the device's memory.
"""

import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import runtime
from pipeline.config import PipelineConfig
from pipeline.errors import InputError

MB = 2**20


class PlanError(InputError):
    """The run will not fit (disk or GPU memory); the message says by how much."""


@dataclass
class Estimate:
    """Projection for one stage."""

    stage: str
    seconds_per_step: float
    steps: int
    gpu_peak_mb: float
    host_peak_mb: float
    disk_mb: float
    note: str = ""
    flops_per_step: float = 0.0      # counted by torch's FlopCounterMode (model stages only)

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps


def _timed(step: Callable[[], None], device: torch.device, samples: int,
           count_flops: bool = False) -> tuple[float, float, float]:
    """(seconds per call after one warm-up, peak GPU MB, FLOPs per call or 0) of ``step``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    runtime_sync(device)
    flops = _count_flops(step) if count_flops else 0.0
    start = time.perf_counter()
    for _ in range(samples):
        step()
    runtime_sync(device)
    per_step = (time.perf_counter() - start) / samples
    gpu = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else 0.0
    return per_step, gpu, flops


def _count_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def runtime_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _load_seconds(get_item: Callable[[int], object], count: int, samples: int) -> float:
    """Seconds to load ``count`` items (one step's batch), from ``samples`` timed items."""
    start = time.perf_counter()
    for i in range(samples):
        get_item(i)
    return (time.perf_counter() - start) / samples * count


def _with_loading(compute: float, loading: float, workers: int) -> float:
    """A step's time: loading in the training process adds to the compute; with loader
    processes it overlaps (the slower of the two, loading shared by the workers)."""
    return compute + loading if workers == 0 else max(compute, loading / workers)


# --------------------------------------------------------------------------- stage samplers
def sample_classifier(config: PipelineConfig, dataset, num_images: int, num_classes: int,
                      device: torch.device, samples: int, count_flops: bool = False) -> Estimate:
    from stages.train_classifier import (CoAttentionClassifier, PairDataset, PairTrainer,
                                         build_optimizer, self_pair_views, training_transform)
    cfg = config.classifier
    model = CoAttentionClassifier(num_classes, backbone=cfg.backbone, pretrained=False,
                                  feature_channels=cfg.feature_channels,
                                  backbone_options=cfg.backbone_options).to(device)
    trainer = PairTrainer(model, cfg.self_pairs)
    optimizer = build_optimizer(model, cfg)
    world = max(1, runtime.dist_info().world_size)
    b, s = max(1, cfg.batch_size // world), cfg.image_size
    x_m, x_n = torch.randn(b, 3, s, s, device=device), torch.randn(b, 3, s, s, device=device)
    copies = [torch.randn(b, 3, side, side, device=device) for side, _ in self_pair_views(s)]
    labels = torch.zeros(b, num_classes, device=device)
    labels[:, 0] = 1

    def step():
        with runtime.autocast(device, cfg.amp):
            terms = trainer(x_m, x_n, copies, labels, labels, 1.0, 1.0)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    per_step, gpu, flops = _timed(step, device, samples, count_flops)
    pairs = PairDataset(dataset, [(i % len(dataset), (i + 1) % len(dataset)) for i in range(samples)],
                        training_transform(cfg), self_pair_views(s) if cfg.self_pairs else [])
    per_step = _with_loading(per_step, _load_seconds(pairs.__getitem__, b, samples), cfg.num_workers)
    steps = math.ceil(num_images / cfg.batch_size) * cfg.epochs
    weights = _param_bytes(model)
    disk = (cfg.epochs + 2) * weights      # one checkpoint per epoch + resume.pt (model + momentum)
    return Estimate("train_classifier", per_step, steps, gpu, host_peak_mb(), disk / MB,
                    f"{steps} steps of {cfg.batch_size} pairs", flops)


def sample_maps(config: PipelineConfig, dataset, device: torch.device, samples: int,
                count_flops: bool = False) -> Estimate:
    from pipeline.maps_io import save_maps
    from stages import generate_cams as g
    from stages.train_classifier import CoAttentionClassifier, self_pair_views

    cfg, ccfg = config.maps, config.classifier
    labels = dataset.label_matrix()
    model = CoAttentionClassifier(labels.shape[1], backbone=ccfg.backbone, pretrained=False,
                                  feature_channels=ccfg.feature_channels,
                                  backbone_options=ccfg.backbone_options).to(device).eval()
    side = cfg.image_size or ccfg.image_size
    x = torch.randn(1, 3, side, side, device=device)
    n_cls = max(1, int(round(float(labels.sum(1).mean()))))
    classes = list(range(n_cls))

    @torch.no_grad()
    def step():
        f = model.features(x)
        copies = [model.features(torch.randn(1, 3, s, s, device=device)) for s, _ in self_pair_views(side)]
        partners = {"p": f}
        g.official_maps(model, f, copies if cfg.self_pairs else [], classes,
                        {c: ["p"] * cfg.num_related for c in classes}, partners, cfg.num_related)

    per_step, gpu, flops = _timed(step, device, samples, count_flops)
    feature_bytes = model.features(x).numel() * 2
    plan = g.make_plan(dataset, cfg.num_related, config.seed, cfg.related_pool)
    peak, _ = g.simulated_cache_peak(plan, cfg.batch_size)
    cache_mb = peak * feature_bytes / MB
    h = (side + 7) // 8
    with tempfile.TemporaryDirectory() as tmp:
        save_maps(Path(tmp) / "m.npy", np.arange(1, n_cls + 1), np.zeros((n_cls, h, h)), size=(375, 500))
        per_file = (Path(tmp) / "m.npy").stat().st_size
    return Estimate("generate_cams", per_step, len(dataset), gpu, host_peak_mb() + (
        0 if device.type == "cuda" else cache_mb), per_file * len(dataset) / MB,
        f"feature cache peak {cache_mb:.0f} MB of maps.cache_mb={cfg.cache_mb}", flops)


def sample_crf(config: PipelineConfig, dataset, samples: int) -> Estimate:
    from pipeline.crf_params import resolve_params
    from pipeline.data.palette import save_label_png
    from stages.refine_crf import refine_maps

    params = resolve_params(config.crf)
    ids = dataset.ids[:max(1, samples)]
    images = [dataset.load_image(i) for i in ids]
    rng = np.random.default_rng(0)
    index = iter(range(10**9))

    def step():
        image = images[next(index) % len(images)]
        maps = rng.random((2, *image.shape[:2])).astype(np.float32)
        saliency = rng.random(image.shape[:2]).astype(np.float32) if params.method == "oaa" else None
        return refine_maps(image, [1, 2], maps, params, saliency)

    per_step, _, _ = _timed(step, torch.device("cpu"), samples)
    with tempfile.TemporaryDirectory() as tmp:
        save_label_png(Path(tmp) / "m.png", step())
        png = (Path(tmp) / "m.png").stat().st_size
    steps = math.ceil(len(dataset) / config.crf.workers)
    return Estimate("refine_crf", per_step, steps, 0.0, host_peak_mb(), png * len(dataset) / MB,
                    f"{config.crf.workers} worker(s)")


def sample_segmentors(config: PipelineConfig, num_classes: int, device: torch.device,
                      samples: int, count_flops: bool = False) -> list[Estimate]:
    from models.segmentors import build_segmentor, builder_options
    from pipeline.data import build_dataset
    from pipeline.data.transforms import train_transform
    from stages.train_segmentor import build_optimizer, crop_img_size, make_pixel_loss

    cfg = config.segmentor
    out = []
    crops = build_dataset(config.data, config.data.train_split,   # ground truth stands in for the
                          transform=train_transform(cfg.crop_size, tuple(cfg.scale_range),  # pseudo-masks
                                                    flip=cfg.flip, colour_jitter=tuple(cfg.colour_jitter)))
    crops.label_matrix()                 # read once up front, as the training stage does
    loading = _load_seconds(lambda i: crops[i % len(crops)], max(1, cfg.batch_size // cfg.nproc), samples)
    b = max(1, cfg.batch_size // cfg.nproc)
    c = cfg.crop_size
    x = torch.randn(b, 3, c, c, device=device)
    target = torch.randint(0, num_classes, (b, c, c), device=device)
    loss_fn = make_pixel_loss(cfg.loss_average)
    for name in cfg.models:
        options = dict(cfg.model_options.get(name, {}))
        backbone = options.pop("backbone", cfg.backbone)
        if "img_size" in builder_options(name) and "img_size" not in options:
            options["img_size"] = crop_img_size(backbone, c)
        model = build_segmentor(name, num_classes, backbone=backbone, pretrained=False, **options).to(device)
        model.train()
        optimizer, _ = build_optimizer(model, cfg)

        def step():
            with runtime.autocast(device, cfg.amp):
                outputs = model(x)
            loss = sum(model.losses({k: v.float() for k, v in outputs.items()}, target, loss_fn).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        per_step, gpu, flops = _timed(step, device, samples, count_flops)
        per_step = _with_loading(per_step, loading, cfg.num_workers)
        disk = 3 * _param_bytes(model)       # rolling checkpoint (model + momentum) + final model
        out.append(Estimate(f"train_segmentor:{name}", per_step, cfg.iterations, gpu, host_peak_mb(),
                            disk / MB, f"{cfg.iterations} it x {cfg.batch_size} crops {c}px", flops))
        del model, optimizer
    return out


# --------------------------------------------------------------------------- the plan
@dataclass
class DataSummary:
    splits: dict[str, int]
    num_classes: int
    label_counts: dict[str, int]


def summarise_data(config: PipelineConfig) -> tuple[DataSummary, object]:
    """Run-start checks of every split, then counts and the train split's label histogram."""
    from pipeline.data import build_dataset
    from stages import check_run_inputs

    check_run_inputs(config)
    splits = {config.data.train_split, config.maps.split or config.data.train_split, config.data.val_split}
    datasets = {s: build_dataset(config.data, s) for s in sorted(splits)}
    train = datasets[config.maps.split or config.data.train_split]
    counts = train.label_matrix().sum(0).astype(int)
    return DataSummary({s: len(d) for s, d in datasets.items()}, train.num_classes,
                       dict(zip(train.class_names[1:], counts.tolist()))), train


def make_estimates(config: PipelineConfig, samples: int = 2, stages: Sequence[str] | None = None,
                   device: torch.device | None = None,
                   count_flops: bool = False) -> tuple[DataSummary, list[Estimate]]:
    """The data summary and one :class:`Estimate` per stage (``stages``: a subset;
    ``count_flops``: also count each model step's FLOPs, for benchmarks/gpu.py)."""
    from pipeline.data import build_dataset

    device = device or runtime.select_device(config.device)
    summary, train = summarise_data(config)
    wanted = set(stages or ("train_classifier", "generate_cams", "refine_crf", "train_segmentor", "evaluate"))
    k = train.num_classes - 1
    labelled = int((train.label_matrix().sum(1) > 0).sum())
    estimates = []
    if "train_classifier" in wanted:
        estimates.append(sample_classifier(config, train, labelled, k, device, samples, count_flops))
    if "generate_cams" in wanted:
        estimates.append(sample_maps(config, train, device, samples, count_flops))
    if "refine_crf" in wanted:
        estimates.append(sample_crf(config, train, samples))
    if "train_segmentor" in wanted or "evaluate" in wanted:
        segs = sample_segmentors(config, train.num_classes, device, samples, count_flops)
        if "train_segmentor" in wanted:
            estimates += segs
        if "evaluate" in wanted:
            val = build_dataset(config.data, config.evaluation.split or config.data.val_split)
            views = len(config.evaluation.scales) * (2 if config.evaluation.flip else 1)
            # one inference view costs about a third of a training step (forward only)
            per_image = sum(e.seconds_per_step / max(1, config.segmentor.batch_size // config.segmentor.nproc)
                            for e in segs) / 3 * views
            estimates.append(Estimate("evaluate", per_image, len(val), max((e.gpu_peak_mb for e in segs),
                                      default=0.0) / 3, host_peak_mb(), 0.5 * len(segs),
                                      f"{len(val)} val images x {views} views x {len(segs)} models"))
    return summary, estimates


def check_fits(config: PipelineConfig, estimates: Sequence[Estimate],
               device: torch.device | None = None) -> None:
    """Raise :class:`PlanError` when the work directory's disk or the GPU will not hold the run."""
    device = device or runtime.select_device(config.device)
    workdir = Path(config.workdir)
    probe = next((p for p in [workdir, *workdir.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free / MB
    need = sum(e.disk_mb for e in estimates)
    if need > free:
        raise PlanError(f"not enough disk: the run writes about {need / 1024:.1f} GB under {workdir}, "
                        f"but {probe} has {free / 1024:.1f} GB free")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / MB
        worst = max(estimates, key=lambda e: e.gpu_peak_mb, default=None)
        if worst is not None and worst.gpu_peak_mb > total:
            raise PlanError(f"{worst.stage} needs about {worst.gpu_peak_mb / 1024:.1f} GB of GPU memory, "
                            f"the device has {total / 1024:.1f} GB: lower its batch size")


def format_plan(summary: DataSummary, estimates: Sequence[Estimate]) -> str:
    from pipeline.cli_run import format_table

    lines = ["data: " + ", ".join(f"{s} {n} images" for s, n in summary.splits.items())
             + f"; {summary.num_classes - 1} classes",
             "labels: " + ", ".join(f"{c} {n}" for c, n in summary.label_counts.items())]
    rows = [["stage", "s/step", "steps", "projected", "GPU peak", "host peak", "disk", "note"]]
    for e in estimates:
        rows.append([e.stage, f"{e.seconds_per_step:.3g}", str(e.steps), _duration(e.seconds),
                     f"{e.gpu_peak_mb:.0f} MB", f"{e.host_peak_mb:.0f} MB", f"{e.disk_mb:.0f} MB", e.note])
    rows.append(["total", "", "", _duration(sum(e.seconds for e in estimates)),
                 f"{max((e.gpu_peak_mb for e in estimates), default=0):.0f} MB",
                 f"{max((e.host_peak_mb for e in estimates), default=0):.0f} MB",
                 f"{sum(e.disk_mb for e in estimates):.0f} MB", ""])
    return "\n".join(lines) + "\n" + format_table(rows)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
