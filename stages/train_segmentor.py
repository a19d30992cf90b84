"""Stage 4: fully supervised segmentors trained on stage 3's pseudo-masks.

Every model in ``config.segmentor.models`` is trained from the same pseudo-masks (palette
PNGs ``<mask_dir>/<id>.png``, 0 = background, 255 = ignore) into ``out_dir/<model>/`` with
its own tracking run (``tracker.child(model)``), sequentially in this process, or in parallel
processes (``segmentor.parallel``), or each under ``torchrun`` with ``segmentor.nproc`` DDP
processes.

Recipe (mmsegmentation's R-D8 VOC12aug recipe unless said otherwise):

* SGD, momentum 0.9, weight decay on every parameter (``optimizer="adamw"``: AdamW, the
  transformer segmentors' optimizer, see :func:`build_optimizer`); two parameter groups, the
  backbone at ``lr`` and the rest (the heads) at ``lr * head_lr_mult``.
* Learning rate at iteration ``t`` of ``T`` (poly with floor, linear warm-up)::

      poly(t)  = (1 - m) * (1 - t / T) ** power + m,        m = min_lr / lr
      warm(t)  = r + (1 - r) * t / W   for t < W, else 1,   r = warmup_ratio
      lr_g(t)  = base_lr_g * poly(t) * warm(t)

* Data: random rescale in ``scale_range``, crop ``crop_size`` (padding 255), horizontal flip,
  colour jitter, ImageNet mean/std (``pipeline.data.transforms``).
* Loss: per pixel ``ℓ_i = -w_{y_i} log softmax(z_i)_{y_i}`` over pixels with ``y_i ≠ 255``;
  ``loss_average="labelled"`` (the default, pseudo-masks hold many 255s) divides the sum by
  ``Σ_labelled w_{y_i}`` (torch's weighted mean); ``"all"`` divides by the number of pixels
  ``N·H·W`` (mmseg's default, ignored pixels count as 0). An all-ignored batch gives 0.
  Optional class-balanced weights (median-frequency balancing, Eigen & Fergus 2015)::

      f_c = pixels of class c / pixels of the images containing c,   w_c = median(f) / f_c

  clipped to ``[1/class_weight_max, class_weight_max]``; classes absent from every mask get 1.
  Each model adds its own auxiliary terms through ``Segmentor.losses``.
* AMP (float16 autocast + GradScaler) on CUDA when ``amp``; DDP under torchrun (gloo on CPU,
  NCCL + SyncBN on CUDA); ``batch_size`` is the total over the processes.

Determinism and resuming: the sample order and every crop's augmentation are functions of
``(seed, position in the sample stream)`` only, and the global torch RNG (dropout) is
re-seeded from ``(seed, iteration, rank)`` at each iteration, so neither depends on how many
workers load data nor on where a run was interrupted. ``checkpoint.pt`` (written atomically
every ``checkpoint_every`` iterations and at the end) holds the model, optimizer, scheduler,
GradScaler, RNG state and iteration; a rerun continues from it and ends with the same weights
as an uninterrupted run. ``model.pt`` (weights + class names) and ``result.json`` are written
when a model is finished; a finished model is skipped on rerun.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.segmentors import available, build_segmentor, builder_options
from models.segmentors.setr import crop_img_size
from pipeline import runtime
from pipeline.config import PipelineConfig, SegmentorConfig, config_to_dict
from pipeline.data import build_dataset
from pipeline.data.palette import read_label_png
from pipeline.data.transforms import normalize, train_transform
from pipeline.errors import InputError
from pipeline.storage import StageResult, atomic_write_json, atomic_write_text
from pipeline.tracking import NULL_TRACKER, Tracker

NAME = "train_segmentor"
IGNORE_INDEX = 255
CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
RESULT_FILE = "result.json"
LOG_FILE = "log.jsonl"


class PseudoMaskError(InputError):
    """The pseudo-mask directory does not fit the dataset (missing files, bad values)."""


# --------------------------------------------------------------------------- input checks
def check_models(names: Sequence[str]) -> None:
    """Unknown model names fail before anything is trained, listing the registry."""
    known = available()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"segmentor.models: unknown segmentor(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(known)}")


def scan_pseudo_masks(mask_dir: Path, ids: Sequence[str], num_classes: int,
                      split: str = "train", image_path: Callable[[str], Path] | None = None) -> np.ndarray:
    """Check that every image of the split has a mask with values in ``[0, C) ∪ {255}``
    (and, given ``image_path``, the size of its image: only the image header is read).

    Returns ``(pixels[c], image_pixels[c])``: per class the pixels labelled ``c`` and the
    pixels of the images that contain ``c`` (for median-frequency weights), shape (2, C).
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise PseudoMaskError(f"pseudo-mask directory {mask_dir} does not exist")
    missing = [i for i in ids if not (mask_dir / f"{i}.png").is_file()]
    if missing:
        raise PseudoMaskError(
            f"pseudo-mask directory {mask_dir} lacks {len(missing)} of the {len(ids)} images of "
            f"split {split!r}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    counts = np.zeros((2, num_classes), dtype=np.int64)
    for image_id in ids:
        path = mask_dir / f"{image_id}.png"
        mask = read_label_png(path)
        if image_path is not None:
            with Image.open(image_path(image_id)) as image:
                width, height = image.size
            if mask.shape != (height, width):
                raise PseudoMaskError(f"pseudo-mask {path} is {mask.shape[1]}x{mask.shape[0]} but its "
                                      f"image {image_path(image_id)} is {width}x{height}")
        hist = np.bincount(mask.reshape(-1), minlength=256)
        bad = np.nonzero(hist[num_classes:IGNORE_INDEX])[0]
        if bad.size:
            raise PseudoMaskError(f"pseudo-mask {path} holds value {int(bad[0]) + num_classes}, "
                                  f"but the dataset has {num_classes} classes (values 0..{num_classes - 1}, "
                                  f"{IGNORE_INDEX} = ignore)")
        labelled = hist[:num_classes]
        counts[0] += labelled
        counts[1] += np.where(labelled > 0, labelled.sum(), 0)
    return counts


def class_balanced_weights(counts: np.ndarray, max_weight: float = 10.0) -> torch.Tensor:
    """Median-frequency balancing ``w_c = median(f) / f_c`` (see the module docstring)."""
    pixels, image_pixels = np.asarray(counts, dtype=np.float64)
    present = pixels > 0
    weights = np.ones(pixels.shape[0])
    if present.any():
        freq = pixels[present] / image_pixels[present]
        weights[present] = np.median(freq) / freq
    return torch.tensor(np.clip(weights, 1.0 / max_weight, max_weight), dtype=torch.float32)


# --------------------------------------------------------------------------- loss and schedule
def make_pixel_loss(average: str = "labelled",
                    weight: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with ignore 255, averaged over labelled pixels or over all pixels."""
    if average not in ("labelled", "all"):
        raise ValueError(f"loss_average must be 'labelled' or 'all', got {average!r}")

    def pixel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        w = weight.to(logits.device) if weight is not None else None
        total = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX, reduction="sum")
        if average == "all":
            return total / target.numel()
        valid = target != IGNORE_INDEX
        if w is None:
            denom = valid.sum()
        else:
            denom = w[target[valid]].sum()
        return total / denom.clamp(min=1e-12) if valid.any() else total * 0.0
    return pixel_loss


def lr_factor(it: int, cfg: SegmentorConfig) -> float:
    """Multiplier of the base lr at iteration ``it`` (poly with floor, linear warm-up)."""
    m = min(cfg.min_lr / cfg.lr, 1.0)
    poly = (1 - m) * (1 - min(it, cfg.iterations) / cfg.iterations) ** cfg.poly_power + m
    if it < cfg.warmup_iters:
        poly *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
    return poly


#: AdamW's fixed moment coefficients and epsilon (torch's / mmseg's transformer-recipe values)
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def build_optimizer(model: nn.Module, cfg: SegmentorConfig):
    """Backbone / head parameter groups (head at ``lr * head_lr_mult``), the optimizer chosen
    by ``cfg.optimizer`` and the poly+warm-up LambdaLR (the same schedule for both).

    * ``sgd``: SGD with ``momentum``, L2 weight decay ``weight_decay`` (mmseg's R-D8 recipes).
    * ``adamw``: AdamW (Loshchilov & Hutter 2019) with betas ``ADAMW_BETAS``, eps ``ADAMW_EPS``
      and decoupled weight decay ``θ ← θ - lr·weight_decay·θ`` on every parameter, the
      optimizer of transformer recipes such as SegFormer's and mmseg's ViT-UperNet configs
      (lr 6e-5, weight_decay 0.01); ``momentum`` is unused. SETR's own configs use SGD.
    """
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    groups = [g for g in ({"params": backbone, "lr": cfg.lr, "name": "backbone"},
                          {"params": head, "lr": cfg.lr * cfg.head_lr_mult, "name": "head"}) if g["params"]]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                      weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"segmentor.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    return optimizer, scheduler


# --------------------------------------------------------------------------- deterministic data
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(v) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleStream:
    """The infinite training stream: position ``p`` -> (dataset index, augmentation seed).

    Epoch ``e = p // N`` visits a permutation of the ``N`` images drawn from ``(seed, e)``.
    Iteration ``t`` uses positions ``[t·B, (t+1)·B)``; rank ``r`` of ``R`` takes the ``r``-th
    of ``R`` equal slices. Used as a DataLoader ``batch_sampler`` starting at ``start``.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"segmentor.batch_size {batch_size} is not divisible by the "
                             f"{world_size} DDP processes")
        self.size, self.batch, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world_size
        self._perms: dict[int, list[int]] = {}

    def item(self, position: int) -> tuple[int, int]:
        epoch = position // self.size
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=runtime.seeded_generator(
                _mix(self.seed, "epoch", epoch))).tolist()}
        return self._perms[epoch][position % self.size], _mix(self.seed, "aug", position)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch // self.world
        for it in range(self.start, self.stop):
            first = it * self.batch + self.rank * per_rank
            yield [self.item(p) for p in range(first, first + per_rank)]


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset whose transform draws from torch's RNG: item ``(i, seed)`` is sample
    ``i`` transformed under ``torch.manual_seed(seed)`` (the caller's RNG is left untouched)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample = self.dataset[index]
        return {"image": sample["image"].as_subclass(torch.Tensor),
                "mask": sample["mask"].as_subclass(torch.Tensor).long()}


# --------------------------------------------------------------------------- training one model
def _append_log(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, iteration: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be logged again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= iteration]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _check_checkpoint(state: Mapping[str, Any], path: Path, model_name: str, num_classes: int) -> None:
    if state.get("num_classes") != num_classes:
        raise ValueError(f"checkpoint {path} has {state.get('num_classes')} classes but the "
                         f"configured dataset has {num_classes}")
    if state.get("model_name") != model_name:
        raise ValueError(f"checkpoint {path} holds model {state.get('model_name')!r}, not {model_name!r}")


def train_model(config: PipelineConfig, model_name: str, mask_dir: Path, out_dir: Path,
                tracker: Tracker = NULL_TRACKER, class_counts: np.ndarray | None = None,
                on_iteration: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one segmentor into ``out_dir`` (resuming from its checkpoint); returns its result.

    Works alone or as one rank of a torchrun job. ``on_iteration(it)`` is called after each
    finished iteration (tests use it to simulate a kill).
    """
    cfg = config.segmentor
    out_dir = Path(out_dir)
    result_path = out_dir / RESULT_FILE
    if result_path.is_file():
        return json.loads(result_path.read_text())
    device = runtime.select_device(config.device)
    info = runtime.init_distributed(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    dataset = build_dataset(config.data, config.data.train_split, mask_dir=Path(mask_dir),
                            transform=train_transform(cfg.crop_size, tuple(cfg.scale_range), flip=cfg.flip,
                                                      colour_jitter=tuple(cfg.colour_jitter)))
    num_classes = dataset.num_classes
    if class_counts is None and cfg.class_balanced:
        class_counts = scan_pseudo_masks(mask_dir, dataset.ids, num_classes, config.data.train_split)
    weight = class_balanced_weights(class_counts, cfg.class_weight_max) if cfg.class_balanced else None
    pixel_loss = make_pixel_loss(cfg.loss_average, weight)

    runtime.seed_everything(_mix(config.seed, model_name, "init") % 2**31)
    options = dict(cfg.model_options.get(model_name, {}))
    backbone = options.pop("backbone", cfg.backbone)  # per-model override, e.g. SETR: vit_large
    if "img_size" in builder_options(model_name) and "img_size" not in options:
        # SETR stores its position embeddings for the training crop (saved with the options)
        options["img_size"] = crop_img_size(backbone, cfg.crop_size)
    model = build_segmentor(model_name, num_classes, backbone=backbone, pretrained=cfg.pretrained,
                            **options)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = runtime.grad_scaler(device, cfg.amp)
    start = 0
    ckpt_path = out_dir / CHECKPOINT
    log_path = out_dir / LOG_FILE
    if ckpt_path.is_file():
        state = runtime.load_checkpoint(ckpt_path, map_location=device)
        _check_checkpoint(state, ckpt_path, model_name, num_classes)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        start = int(state["iteration"])
    if info.is_main:
        _trim_log(log_path, start)
        if start == 0:
            tracker.log_params({"model": model_name, "num_classes": num_classes,
                                "parameters": sum(p.numel() for p in model.parameters()),
                                "class_weights": None if weight is None else weight.tolist(),
                                "world_size": info.world_size})
    if info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = runtime.wrap_ddp(model, device)

    stream = SampleStream(len(dataset), cfg.batch_size, _mix(config.seed, model_name, "data"),
                          start, cfg.iterations, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset), batch_sampler=stream, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda", generator=torch.Generator(),
        persistent_workers=False)
    window: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    started = time.time()
    ddp_model.train()
    for it, batch in zip(range(start, cfg.iterations), loader):
        torch.manual_seed(_mix(config.seed, model_name, "step", it, info.rank) % 2**63)
        image = normalize(batch["image"].to(device, non_blocking=True))
        target = batch["mask"].to(device, non_blocking=True)
        with runtime.autocast(device, cfg.amp):
            outputs = ddp_model(image)
        terms = model.losses({k: v.float() for k, v in outputs.items()}, target, pixel_loss)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{model_name}: loss is {loss.item()} at iteration {it} (terms "
                f"{ {k: float(v) for k, v in terms.items()} }); lower segmentor.lr or set "
                "segmentor.class_balanced=true")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for k, v in {"loss": loss, **terms}.items():
            window.setdefault(k, []).append(float(v.detach()))
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            values = torch.tensor([np.mean(v) for v in window.values()], dtype=torch.float64)
            values = runtime.all_reduce_mean(values.to(device)).cpu()
            last = dict(zip(window, values.tolist()))
            last["lr"] = optimizer.param_groups[0]["lr"]
            window = {}
            if info.is_main:
                tracker.log_metrics(last, step=done)
                _append_log(log_path, {"iteration": done, **last})
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            if info.is_main:
                runtime.save_checkpoint(ckpt_path, {
                    "model_name": model_name, "num_classes": num_classes, "iteration": done,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": runtime.rng_state(), "backbone": backbone})
            runtime.barrier()
        if on_iteration is not None:
            on_iteration(done)
    result = {"model": model_name, "iterations": cfg.iterations, "resumed_from": start,
              "seconds": time.time() - started, "final": last, "world_size": info.world_size}
    if info.is_main:
        runtime.save_checkpoint(out_dir / MODEL_FILE, {
            "model_name": model_name, "num_classes": num_classes, "class_names": list(dataset.class_names),
            "backbone": backbone, "options": options, "model": model.state_dict(),
            "iteration": cfg.iterations})
        atomic_write_json(result_path, result)
    runtime.barrier()
    return result


def load_trained(path: Path, num_classes: int | None = None, device: str | torch.device = "cpu"):
    """A finished segmentor from its ``model.pt``; ``num_classes`` mismatch is an error."""
    path = Path(path)
    state = runtime.load_checkpoint(path, map_location="cpu")
    if num_classes is not None and state.get("num_classes") != num_classes:
        raise ValueError(f"checkpoint {path} has {state.get('num_classes')} classes but the "
                         f"configured dataset has {num_classes}")
    model = build_segmentor(state["model_name"], state["num_classes"], backbone=state["backbone"],
                            pretrained=False, **state.get("options", {}))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


# --------------------------------------------------------------------------- several models
def _launch(config_path: Path, model_name: str, mask_dir: Path, out_dir: Path, nproc: int,
            threads: int) -> subprocess.Popen:
    """Start one model's training in a child process (under torchrun when ``nproc > 1``)."""
    args = ["-m", "stages.train_segmentor", "--config", str(config_path), "--model", model_name,
            "--masks", str(mask_dir), "--out", str(out_dir)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    log = open(out_dir / "train.log", "ab")
    return subprocess.Popen([sys.executable] + args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _replay_log(out_dir: Path, tracker: Tracker) -> None:
    path = out_dir / LOG_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            step = record.pop("iteration")
            tracker.log_metrics(record, step=step)


def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
        tracker: Tracker = NULL_TRACKER) -> StageResult:
    cfg = config.segmentor
    check_models(cfg.models)
    if "refine_crf" not in upstream:
        raise ValueError("train_segmentor needs the output of refine_crf (the pseudo-masks)")
    mask_dir = Path(upstream["refine_crf"].path)
    base = build_dataset(config.data, config.data.train_split)
    counts = scan_pseudo_masks(mask_dir, base.ids, base.num_classes, config.data.train_split,
                               image_path=base.image_path)
    out_dir = Path(out_dir)
    tracker.log_params({"models": ",".join(cfg.models), "mask_dir": str(mask_dir)})
    results: dict[str, dict[str, Any]] = {}
    if cfg.parallel or cfg.nproc > 1:
        config_path = out_dir / "config.json"
        atomic_write_json(config_path, config_to_dict(config))
        groups = [list(cfg.models)] if cfg.parallel else [[m] for m in cfg.models]
        for group in groups:
            threads = max(1, runtime.cpu_threads(config.threads) // (len(group) * cfg.nproc))
            procs = {}
            for name in group:
                (out_dir / name).mkdir(parents=True, exist_ok=True)
                procs[name] = _launch(config_path, name, mask_dir, out_dir / name, cfg.nproc, threads)
            failed = {name: p.wait() for name, p in procs.items()}
            failed = {k: v for k, v in failed.items() if v != 0}
            if failed:
                tails = {k: (out_dir / k / "train.log").read_text()[-2000:] for k in failed}
                raise RuntimeError("segmentor training failed: " + "; ".join(
                    f"{k} (exit {v}): ...{tails[k]}" for k, v in failed.items()))
            for name in group:
                _replay_log(out_dir / name, tracker.child(name))
                results[name] = json.loads((out_dir / name / RESULT_FILE).read_text())
    else:
        for name in cfg.models:
            results[name] = train_model(config, name, mask_dir, out_dir / name, tracker.child(name),
                                        class_counts=counts)
    metrics: dict[str, Any] = {}
    for name, res in results.items():
        for key, value in res["final"].items():
            metrics[f"{name}_{key}"] = value
        # once per segmentor, after its training: the registry's model (no-op without MLflow)
        uri = tracker.child(name).log_model(out_dir / name / MODEL_FILE, {"preset": config.name})
        if uri:
            metrics[f"{name}_model_uri"] = uri
    metrics["headline"] = ", ".join(f"{n} loss {r['final'].get('loss', float('nan')):.3f}"
                                    for n, r in results.items()) + f" ({cfg.iterations} it)"
    files = {name: f"{name}/{MODEL_FILE}" for name in results}
    return StageResult(stage=NAME, key="", path=str(out_dir), metrics=metrics, files=files)


def main(argv: Sequence[str] | None = None) -> int:
    """Train one model from a saved config (what ``run`` launches, alone or under torchrun)."""
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline config (YAML/JSON or preset)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--masks", required=True, help="directory of palette PNG masks <id>.png")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    check_models([args.model])
    try:
        train_model(config, args.model, Path(args.masks), Path(args.out))
    finally:
        runtime.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
