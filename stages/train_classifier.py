"""Stage 1: train the MCIS co-attention classifier on image pairs (Sun et al., ECCV 2020).

Recipe (the official ``Classifier/scripts/train.py`` + ``train.sh``; all configurable in
``config.classifier``, deviations opt-in): pairs ``(I_m, I_n)`` sharing at least one label
(:class:`pipeline.data.pairs.PairSampler`, seeded per epoch); both images squashed to
``image_size`` squares (256) and colour-jittered (0.3, 0.3, 0.3, 0.1), ImageNet mean/std, no
random flip (``flip=True`` is a deviation); self-pair copies of I_m made from the *original*
image without jitter: flip at ``image_size``, squashes to ``int(0.75 image_size)`` and
``2 image_size``. SGD momentum 0.9 Nesterov, weight decay 5e-4, lr 1e-3 (``optimizer:
adamw`` is a documented deviation for the from-scratch demo) with the per-group multipliers
of :meth:`~models.coattention.CoAttentionClassifier.param_groups`; lr x0.1 at epochs 5 and 10;
15 epochs; 5 pairs per step. Every step (MLSM averaging of :func:`~models.coattention.mcis_losses`):

    L = L_basic(m, n) + L_co-att(m, n) + w_m L_con(m) + w_n L_con(n)
        + sum over copies x in {flip(I_m), 0.75x I_m, 2x I_m}: L_basic(I_m, x) + L_co-att(I_m, x)

with ``w_m = 1`` from ``contrastive_from_epoch`` (0-based, official 2) on and only when some
pair of the batch has a label of m that n lacks (else 0), ``w_n`` likewise (official
per-side rule). A switched-off term is still computed (times 0) so every parameter gets a
gradient, which DDP needs. Self-pairs are switchable (``self_pairs``).

``method=cam`` trains the single-image CAM baseline instead (:class:`CamTrainer`: each image
once per epoch, in the same shuffled order, ``L_basic`` only, the same recipe otherwise).
``freeze_backbone`` (a deviation for CPU budgets) trains only the extra convs and heads;
with it, ``cache_features`` computes the frozen backbone's features of every (deterministic)
view once and trains on them (:mod:`stages.classifier_features`).

Files in ``out_dir``: ``checkpoints/epoch_NNN.pt`` (model weights + metadata after NNN
epochs, 1-based: the official ``pascal_voc_epoch_10.pth``, 0-based, is our ``epoch_011.pt``),
``resume.pt`` (the latest epoch's full state: model, optimizer, scheduler, AMP scaler, RNG
state) and ``history.json`` (epoch metrics). All are written atomically. A killed run
restarts from ``resume.pt``; since every epoch reseeds its pair order and augmentations from
``(seed, epoch)``, the resumed run ends with the same weights as an uninterrupted one.

DDP: under ``torchrun`` ``batch_size`` is the total number of pairs per step over all W
processes (as ``segmentor.batch_size``; it must divide by W). Every epoch's pair list is
padded by repeating its first pairs to a multiple of W (DistributedSampler semantics) and
rank r takes pairs r, r + W, ..., so every rank runs the same number of steps; rank 0 writes
the files and logs, the others wait at a barrier.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from models.coattention import (CoAttentionClassifier, contrastive_switches, mcis_losses,
                                self_pair_losses)
from stages.classifier_features import (CachedImageDataset, CachedPairDataset, check_budget,
                                        compute_features)
from pipeline import runtime
from pipeline.config import PipelineConfig
from pipeline.data import build_dataset
from pipeline.data.pairs import PairSampler
from pipeline.data.transforms import normalize
from pipeline.storage import StageResult, atomic_write_json
from pipeline.tracking import NULL_TRACKER, Tracker

NAME = "train_classifier"
CHECKPOINT_DIR = "checkpoints"
RESUME_FILE = "resume.pt"
HISTORY_FILE = "history.json"
SELF_PAIR_SCALES = (0.75, 2.0)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A classifier checkpoint is missing, unreadable or does not fit the expected model."""


# --------------------------------------------------------------------------- checkpoints
def checkpoint_path(out_dir: Path, epoch: int) -> Path:
    """``<out_dir>/checkpoints/epoch_NNN.pt`` for a 1-based epoch number."""
    return Path(out_dir) / CHECKPOINT_DIR / f"epoch_{epoch:03d}.pt"


def list_checkpoints(out_dir: Path) -> dict[int, Path]:
    found = {}
    for path in sorted((Path(out_dir) / CHECKPOINT_DIR).glob("epoch_*.pt")):
        try:
            found[int(path.stem.split("_")[1])] = path
        except ValueError:
            continue
    return found


def model_meta(model: CoAttentionClassifier, class_names: list[str], image_size: int,
               backbone_options: Mapping[str, Any]) -> dict[str, Any]:
    return {"backbone": model.backbone_name, "num_classes": model.num_classes,
            "class_names": list(class_names), "feature_channels": model.feature_channels,
            "extra_convs": sum(isinstance(m, nn.Conv2d) for m in model.extra),
            "backbone_options": dict(backbone_options), "image_size": image_size,
            "scale_affinity": model.scale_affinity, "init": model.init}


def method_meta(meta: Mapping[str, Any]) -> str:
    """The training method of a checkpoint (``mcis`` for those written before it was stored)."""
    return meta.get("method", "mcis")


def build_from_meta(meta: Mapping[str, Any]) -> CoAttentionClassifier:
    return CoAttentionClassifier(meta["num_classes"], backbone=meta["backbone"], pretrained=False,
                                 feature_channels=meta["feature_channels"],
                                 extra_convs=meta["extra_convs"],
                                 backbone_options=meta.get("backbone_options") or {},
                                 scale_affinity=bool(meta.get("scale_affinity", False)),
                                 init=meta.get("init", "official"))


def check_meta(meta: Mapping[str, Any], path: Path, backbone: str | None = None,
               num_classes: int | None = None, feature_channels: int | None = None) -> None:
    """Raise :class:`CheckpointError` naming both sides when the checkpoint's architecture
    or class count is not the expected one."""
    if backbone is not None and meta.get("backbone") != backbone:
        raise CheckpointError(f"checkpoint {path} holds a classifier with backbone "
                              f"{meta.get('backbone')!r}, but backbone {backbone!r} is expected")
    if feature_channels is not None and meta.get("feature_channels") != feature_channels:
        raise CheckpointError(f"checkpoint {path} has {meta.get('feature_channels')} feature channels, "
                              f"but {feature_channels} are expected")
    if num_classes is not None and meta.get("num_classes") != num_classes:
        raise CheckpointError(f"checkpoint {path} was trained for {meta.get('num_classes')} classes, "
                              f"but the dataset has {num_classes} foreground classes")


def load_classifier(path: Path, backbone: str | None = None, num_classes: int | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[CoAttentionClassifier, dict]:
    """Model and metadata from an ``epoch_NNN.pt`` (or ``resume.pt``) file, checked against
    the expected backbone / class count; tensors that do not fit raise naming them."""
    try:
        state = runtime.load_checkpoint(path, map_location=map_location)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise CheckpointError(f"checkpoint {path} is not a wsss classifier checkpoint "
                              f"(needs 'model' and 'meta' entries)")
    meta = state["meta"]
    check_meta(meta, path, backbone=backbone, num_classes=num_classes)
    model = build_from_meta(meta)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state["model"].items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state["model"]]
    if wrong or missing:
        raise CheckpointError(f"checkpoint {path} does not fit a {meta['backbone']} classifier with "
                              f"{meta['num_classes']} classes: missing {missing[:4]}, shape mismatch {wrong[:4]}")
    model.load_state_dict(state["model"])
    return model, dict(meta)


# --------------------------------------------------------------------------- data
class PairDataset(Dataset):
    """``(view_m, view_n, copies_m, labels_m, labels_n)`` for a list of index pairs.

    ``view_transform`` makes the training views of both images (resize, jitter, ...);
    ``copy_views`` lists the self-pair copies of image m as ``(side, flip)``: squashes of the
    *original* image to ``side`` x ``side``, flipped when asked, without colour jitter
    (official). The dataset must return untransformed uint8 images."""

    def __init__(self, dataset, pairs: list[tuple[int, int]], view_transform,
                 copy_views: Sequence[tuple[int, bool]] = ()):
        self.dataset, self.pairs = dataset, pairs
        self.view_transform, self.copy_views = view_transform, list(copy_views)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        i, j = self.pairs[index]
        a, b = self.dataset[i], self.dataset[j]
        copies = [squash(a["image"], side, flip) for side, flip in self.copy_views]
        return (_plain(self.view_transform(a["image"])), _plain(self.view_transform(b["image"])),
                copies, a["labels"], b["labels"])


def _plain(image) -> torch.Tensor:
    return image.as_subclass(torch.Tensor)


def squash(image: torch.Tensor, side: int, flip: bool = False) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, side, side), antialiased bilinear (PIL's BILINEAR, as the
    official loader), flipped horizontally when asked."""
    out = _plain(v2.functional.resize(image, [side, side], antialias=True))
    return torch.flip(out, dims=[2]) if flip else out


def training_transform(cfg) -> v2.Compose:
    """The main training views: squash to ``image_size``, optional flip (a deviation),
    colour jitter."""
    steps: list = [v2.Resize([cfg.image_size, cfg.image_size], antialias=True)]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if any(cfg.colour_jitter):
        b, c, s, h = cfg.colour_jitter
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    return v2.Compose(steps)


def self_pair_views(image_size: int) -> list[tuple[int, bool]]:
    """Official copies: flip at ``image_size``, then ``int(0.75 s)`` and ``2 s`` squashes."""
    return [(image_size, True)] + [(int(image_size * s), False) for s in SELF_PAIR_SCALES]


def shard_pairs(pairs: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s share of an epoch's pairs, DistributedSampler style: the list is padded
    with its first pairs to a multiple of ``world_size``, then strided, so every rank gets
    ``ceil(N / W)`` pairs (the same number of steps)."""
    if world_size <= 1:
        return list(pairs)
    padded = list(pairs) + list(pairs[:(-len(pairs)) % world_size])
    while len(padded) % world_size:        # fewer pairs than ranks
        padded += list(pairs[:world_size - len(padded) % world_size])
    return padded[rank::world_size]


def labelled_subset(dataset) -> tuple[list[int], int]:
    """Indices of images with at least one foreground label, and how many were left out."""
    labels = dataset.label_matrix()
    keep = np.flatnonzero(labels.sum(axis=1) > 0).tolist()
    return keep, len(dataset) - len(keep)


class _Subset(Dataset):
    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


# --------------------------------------------------------------------------- one step
class PairTrainer(nn.Module):
    """Computes every loss term of a step in one ``forward`` (so DDP sees one call).
    ``cached=True``: the inputs are the frozen backbone's features of the views
    (:mod:`stages.classifier_features`), and only ``extra`` runs on them."""

    def __init__(self, model: CoAttentionClassifier, self_pairs: bool, cached: bool = False):
        super().__init__()
        self.model, self.self_pairs = model, self_pairs
        self.embed = model.extra if cached else model.features

    def forward(self, x_m, x_n, copies, l_m, l_n, w_con_m: float, w_con_n: float) -> dict[str, torch.Tensor]:
        """``copies``: the self-pair copies of x_m (batched), ignored without self-pairs.
        One backbone pass for every input of the training size."""
        model = self.model
        copies = list(copies) if self.self_pairs else []
        same = [c for c in copies if c.shape[-2:] == x_m.shape[-2:]]
        views = [x_m, x_n] + same
        feats = list(self.embed(torch.cat(views)).chunk(len(views)))
        f_m, f_n = feats[0], feats[1]
        same_feats = iter(feats[2:])
        copy_feats = [next(same_feats) if c.shape[-2:] == x_m.shape[-2:] else self.embed(c)
                      for c in copies]
        out = model.pair(f_m, f_n, contrastive=True)
        s_m = model.cam(f_m).mean((2, 3))
        out["s_m"], out["s_n"] = s_m, model.cam(f_n).mean((2, 3))
        terms = mcis_losses(out, l_m, l_n, contrastive=True)
        terms["con_co_att"] = terms.pop("con_m") * w_con_m + terms.pop("con_n") * w_con_n
        for f_copy in copy_feats:
            sp = model.pair(f_m, f_copy, contrastive=False)
            sp["s_m"], sp["s_n"] = s_m, model.cam(f_copy).mean((2, 3))
            for key, value in self_pair_losses(sp, l_m).items():
                terms[f"self_{key}"] = terms.get(f"self_{key}", 0.0) + value
        terms["loss"] = sum(terms.values())
        return terms


class CamTrainer(nn.Module):
    """The single-image CAM baseline (``classifier.method=cam``; the PSA / IRN classifier the
    MCIS paper compares against): ``L_basic = MLSM(GAP(phi_0(F)), l)`` on each image alone,
    the co-attention layers unused (frozen, out of the optimizer)."""

    def __init__(self, model: CoAttentionClassifier, cached: bool = False):
        super().__init__()
        self.model = model
        self.embed = model.extra if cached else model.features

    def forward(self, x, labels) -> dict[str, torch.Tensor]:
        scores = self.model.cam(self.embed(x)).mean((2, 3))
        basic = F.multilabel_soft_margin_loss(scores.float(), labels.float())
        return {"basic": basic, "loss": basic}


class ImageDataset(Dataset):
    """``(view, labels)`` of the images at ``indices`` (the CAM baseline's items)."""

    def __init__(self, dataset, indices: list[int], view_transform):
        self.dataset, self.indices, self.view_transform = dataset, indices, view_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.dataset[self.indices[index]]
        return _plain(self.view_transform(item["image"])), item["labels"]


def build_optimizer(model: CoAttentionClassifier, cfg) -> torch.optim.Optimizer:
    """SGD (official: momentum, Nesterov) or AdamW over the model's lr groups
    (:meth:`~models.coattention.CoAttentionClassifier.param_groups`)."""
    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.new_layer_lr_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def _freeze_backbone(model: CoAttentionClassifier) -> None:
    """``classifier.freeze_backbone``: the pretrained backbone stays as loaded (weights out of
    the optimizer, BatchNorm statistics fixed); the extra convs and heads train."""
    model.backbone.eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)


def _freeze_bn(model: CoAttentionClassifier) -> None:
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, 7919, epoch]).integers(2**31 - 1))


def _pair_terms(trainer, batch, device, contrastive_on: bool, cached: bool = False) -> dict[str, torch.Tensor]:
    img_m, img_n, copies, l_m, l_n = batch
    prep = (lambda t: t.to(device)) if cached else (lambda t: normalize(t).to(device))
    x_m, x_n = prep(img_m), prep(img_n)
    copies = [prep(c) for c in copies]
    l_m, l_n = l_m.to(device), l_n.to(device)
    on_m, on_n = contrastive_switches(l_m, l_n) if contrastive_on else (False, False)
    return trainer(x_m, x_n, copies, l_m, l_n, float(on_m), float(on_n))


def _cam_terms(trainer, batch, device, cached: bool = False) -> dict[str, torch.Tensor]:
    images, labels = batch
    return trainer((images if cached else normalize(images)).to(device), labels.to(device))


def _cached_features(model, train_set, cfg, copy_views, device, main: bool):
    """``classifier.cache_features``: the frozen backbone's features of every view, computed
    once (:mod:`stages.classifier_features`; the budget is checked first)."""
    views = [(cfg.image_size, False)] + list(copy_views)
    check_budget(len(train_set), model.backbone, [side for side, _ in views], cfg.feature_cache_mb)
    t0 = time.time()
    features = compute_features(model.backbone, train_set, views, device)
    if main:
        log.info("train_classifier: cached the frozen backbone's features of %d images x %d views "
                 "(%.1f s)", len(train_set), len(views), time.time() - t0)
    return features


# --------------------------------------------------------------------------- the stage
def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
        tracker: Tracker = NULL_TRACKER) -> StageResult:
    """Train (or resume training) the classifier; see the module docstring."""
    cfg = config.classifier
    out_dir = Path(out_dir)
    device = runtime.select_device(config.device)
    info = runtime.init_distributed(device)
    main = info.is_main

    if cfg.batch_size % info.world_size:
        raise ValueError(f"classifier.batch_size {cfg.batch_size} (pairs per step over all "
                         f"processes) is not divisible by the {info.world_size} DDP processes")
    dataset = build_dataset(config.data, config.data.train_split)
    keep, skipped = labelled_subset(dataset)
    if not keep:
        raise ValueError(f"split {config.data.train_split!r} of {dataset.root} has no image with a "
                         f"foreground label: nothing to train the classifier on")
    if skipped and main:
        log.warning("train_classifier: %d of %d images have no foreground label and are left out "
                    "of pairing", skipped, len(dataset))
    labels = dataset.label_matrix()[keep]
    sampler = PairSampler(labels, random_fraction=cfg.random_partner_fraction, seed=config.seed)
    train_set = _Subset(dataset, keep)

    runtime.seed_everything(config.seed)
    model = CoAttentionClassifier(labels.shape[1], backbone=cfg.backbone, pretrained=cfg.pretrained,
                                  feature_channels=cfg.feature_channels,
                                  backbone_options=cfg.backbone_options,
                                  scale_affinity=cfg.scale_affinity, init=cfg.init)
    meta = {**model_meta(model, dataset.class_names, cfg.image_size, cfg.backbone_options), "method": cfg.method}
    if cfg.freeze_bn:
        _freeze_bn(model)
    if cfg.freeze_backbone:
        _freeze_backbone(model)
    if cfg.method == "cam":
        for layer in (model.w_p, model.class_conv, model.w_b):
            layer.requires_grad_(False)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps),
                                                     gamma=cfg.lr_gamma)
    scaler = runtime.grad_scaler(device, cfg.amp)
    history: list[dict[str, float]] = []
    start_epoch = 0

    resume = out_dir / RESUME_FILE
    if resume.is_file():
        state = runtime.load_checkpoint(resume, map_location=device)
        check_meta(state.get("meta", {}), resume, backbone=cfg.backbone, num_classes=labels.shape[1],
                   feature_channels=cfg.feature_channels)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
        if main:
            log.info("train_classifier: resuming from %s after epoch %d", resume, start_epoch)

    cam = cfg.method == "cam"
    cached = cfg.cache_features
    copy_views = self_pair_views(cfg.image_size) if cfg.self_pairs and not cam else []
    features = None
    if cached:
        features = _cached_features(model, train_set, cfg, copy_views, device, main)
        label_rows = torch.from_numpy(np.ascontiguousarray(labels))
    trainer = runtime.wrap_ddp(CamTrainer(model, cached) if cam else
                               PairTrainer(model, cfg.self_pairs, cached), device)
    if main:
        tracker.log_params({"num_images": len(keep), "skipped_unlabelled": skipped,
                            "num_classes": labels.shape[1], "world_size": info.world_size})
    per_rank = cfg.batch_size // info.world_size
    view_transform = training_transform(cfg)
    step = start_epoch * -(-len(shard_pairs(sampler.pairs(0), 0, info.world_size)) // per_rank)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)
        pairs = shard_pairs(sampler.pairs(epoch), info.rank, info.world_size)
        if cached:
            items = (CachedImageDataset(features, label_rows, [i for i, _ in pairs]) if cam
                     else CachedPairDataset(features, label_rows, pairs, bool(copy_views)))
        else:
            items = (ImageDataset(train_set, [i for i, _ in pairs], view_transform) if cam
                     else PairDataset(train_set, pairs, view_transform, copy_views))
        loader = DataLoader(items, batch_size=per_rank, shuffle=False,
                            num_workers=0 if cached else cfg.num_workers, generator=runtime.seeded_generator(epoch_seed),
                            persistent_workers=False)
        contrastive_on = epoch >= cfg.contrastive_from_epoch
        trainer.train()
        if cfg.freeze_bn:
            _freeze_bn(model)
        if cfg.freeze_backbone:
            _freeze_backbone(model)
        sums: dict[str, float] = {}
        count = 0
        for batch in loader:
            with runtime.autocast(device, cfg.amp):
                terms = (_cam_terms(trainer, batch, device, cached) if cam
                         else _pair_terms(trainer, batch, device, contrastive_on, cached))
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"train_classifier: loss became {terms['loss'].item()} at "
                                         f"epoch {epoch + 1} step {step}; lower classifier.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            count += 1
            values = {k: float(runtime.all_reduce_mean(v.detach().float())) for k, v in terms.items()}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if main and step % cfg.log_every == 0:
                tracker.log_metrics({f"step/{k}": v for k, v in values.items()}, step=step)
        scheduler.step()
        epoch_metrics = {f"epoch/{k}": v / max(count, 1) for k, v in sums.items()}
        epoch_metrics["epoch/lr"] = optimizer.param_groups[0]["lr"]
        epoch_metrics["epoch/seconds"] = time.time() - t0
        history.append({"epoch": epoch + 1, **epoch_metrics})
        if main:
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            runtime.save_checkpoint(checkpoint_path(out_dir, epoch + 1),
                                    {"model": weights, "meta": meta, "epoch": epoch + 1})
            runtime.save_checkpoint(resume, {
                "model": weights, "meta": meta, "epoch": epoch + 1,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": runtime.rng_state(), "history": history})
            atomic_write_json(out_dir / HISTORY_FILE, history)
            tracker.log_metrics(epoch_metrics, step=epoch + 1)
            log.info("train_classifier: epoch %d/%d loss %.4f (%.1f s)", epoch + 1, cfg.epochs,
                     epoch_metrics.get("epoch/loss", float("nan")), epoch_metrics["epoch/seconds"])
        runtime.barrier()

    if not history:
        history = json.loads((out_dir / HISTORY_FILE).read_text()) if (out_dir / HISTORY_FILE).is_file() else []
    last = history[-1] if history else {}
    metrics = {"epochs": cfg.epochs, "num_images": len(keep), "skipped_unlabelled": skipped,
               "final_loss": last.get("epoch/loss", float("nan")),
               "first_loss": history[0].get("epoch/loss", float("nan")) if history else float("nan")}
    return StageResult(stage=NAME, key=out_dir.name, path=str(out_dir), metrics=metrics,
                       files={"checkpoint": str(checkpoint_path(out_dir, cfg.epochs).relative_to(out_dir)),
                              "history": HISTORY_FILE},
                       run_id=tracker.run_id)
