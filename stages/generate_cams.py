"""Stage 2: localization maps averaged over related images (MCIS, Sun et al. ECCV 2020).

For every image ``I`` of the split and each class ``c`` of its label, two maps at image size:
the **MCIS map** (co-attention path) and the **plain CAM** ``relu(phi_0(F))_c`` of the same
classifier (single-image path, the ablation), both in [0, 1]. ``k`` related images
``R_1..R_k`` containing ``c`` are drawn with replacement, seeded per image (other than I when
any exists; the official draw may pick I itself; fewer distinct ones when fewer exist, logged).

``maps.protocol: official`` (default) is the official ``Classifier/scripts/test.py``:

  * the image is squashed to ``image_size`` (the classifier's 256) and its copies to the
    flip at 256, 192 (0.75x) and 512 (2x), all from the original image; one view, no TTA;
  * candidates per class, at I's feature resolution (h, w) (32x32 for 256), in this order:
    (I, flip I) I's side; (I, flip I) the copy's side flipped back; the 0.75x and 2x copies'
    sides resized bicubic to (h, w); the related map = I's side ``phi(F_I^{I∩R_j})_c``
    averaged over j (a class with no other image pairs I with itself);
  * the first candidate always counts, every other only when ``sigmoid(mean) > 0.1``; each
    counted map is ReLU'd and divided by ``max + 1e-8``, the sum divided by the number of
    candidates (5); the result is resized bicubic to the image and clipped to [0, 1]
    (the official code also quantises to uint8 PNGs: we keep float16);
  * plain CAMs from the same squashed view (ReLU, bilinear to the image, max-normalised).

``maps.protocol: multiscale`` (ours, for comparison):

  1. *related map*: for each view ``v`` (``scales`` x ``flip``) the raw logits
     ``phi(F_I,v^{I∩R_j})_c`` are averaged over j, resized (bicubic) to the image and flipped
     back, then averaged over the views;
  2. *self-pair maps* (``self_pairs``), on I's base view: (I, flip I) both directions (the
     flipped side flipped back), (I, 0.75x I) and (I, 2x I), I's side each, the copies scaled
     from the base view;
  3. every map is ReLU'd and divided by its maximum *at image size*; the related map always
     counts, every other only when ``sigmoid(mean raw logit) > 0.1``; the sum is divided by
     the number of maps (5 with self-pairs) and clipped to [0, 1]; plain CAMs average the
     views. With no related image and no self-pairs the image is paired with itself.

The backbone runs **once per image per view**: partners use their base-view features
(scale 1, no flip), computed once in a first pass and cached in ``_features/<id>.npy``
(float32) — only the HW x HW co-attention and the 1x1 convs are computed per pair. The
cache is deleted when every map is written.

Output: ``<id>.npy`` per image (:func:`pipeline.maps_io.save_maps`: class ids, MCIS maps and
plain CAMs, float16, at the image's size; images without a label get an empty file and are
left out of pairing, counted). Finished images are skipped on a rerun (resumable).
``config.maps.workers > 1`` splits both passes over that many processes (CPU); on CUDA one
process does everything. ``map_eval.json`` holds the threshold sweep of
:func:`pipeline.map_eval.evaluate_maps`.
"""

import logging
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.coattention import CoAttentionClassifier
from pipeline import runtime
from pipeline.config import PipelineConfig
from pipeline.data import build_dataset
from pipeline.data.pairs import class_index, related_images
from pipeline.data.transforms import normalize
from pipeline.map_eval import evaluate_maps
from pipeline.maps_io import MapFileError, load_maps, map_path, save_maps
from pipeline.storage import StageResult, atomic_path, atomic_write_json
from pipeline.tracking import NULL_TRACKER, Tracker
from stages.train_classifier import (CheckpointError, list_checkpoints, load_classifier,
                                     self_pair_views, squash)

NAME = "generate_cams"
FEATURE_DIR = "_features"
EVAL_FILE = "map_eval.json"
BASE_VIEW = (1.0, False)
SELF_VIEWS = ((1.0, True), (0.75, False), (2.0, False))
GATE = 0.1

log = logging.getLogger(__name__)

View = tuple[float, bool]


# --------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """What to compute: per image its classes (0-based) and related partners per class."""

    ids: list[str]
    classes: dict[str, list[int]] = field(default_factory=dict)
    related: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    unlabelled: int = 0
    short_classes: int = 0     # (image, class) with fewer distinct related images than k
    lonely_classes: int = 0    # (image, class) with no other image of that class


def make_plan(dataset, k: int, seed: int) -> Plan:
    """Related images for every (image, class), seeded per image (independent of sharding)."""
    labels = dataset.label_matrix()
    labelled = np.flatnonzero(labels.sum(axis=1) > 0)
    index = class_index(labels)
    plan = Plan(ids=list(dataset.ids), unlabelled=len(dataset) - len(labelled))
    for i in labelled.tolist():
        item = dataset.ids[i]
        rng = np.random.default_rng([seed, 104729, i])
        classes = np.flatnonzero(labels[i]).tolist()
        plan.classes[item] = classes
        plan.related[item] = {}
        for c in classes:
            others = [j for j in index[c] if j != i]
            if k > 0 and not others:
                plan.lonely_classes += 1
                chosen: list[int] = []
            elif len(others) < k:
                plan.short_classes += 1
                chosen = others
            else:
                chosen = related_images(index, i, c, k, rng)
            plan.related[item][c] = [dataset.ids[j] for j in chosen]
    return plan


def config_views(scales: Sequence[float], flip: bool) -> list[View]:
    return [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]


# --------------------------------------------------------------------------- network parts
def network_input(image: np.ndarray, size: int | None, flip: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised (1, 3, h, w), squashed to a ``size`` square if given
    (antialiased bilinear on the uint8 image, as in training) and flipped when asked."""
    x = torch.from_numpy(image).permute(2, 0, 1)
    if size is not None:
        x = squash(x, size, flip)
    elif flip:
        x = torch.flip(x, dims=[2])
    return normalize(x)[None]


def view_input(x: torch.Tensor, view: View) -> torch.Tensor:
    scale, flip = view
    if scale != 1.0:
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                          mode="bilinear", align_corners=False)
    return torch.flip(x, dims=[3]) if flip else x


@torch.no_grad()
def view_features(model: CoAttentionClassifier, x: torch.Tensor, views: Sequence[View],
                  known: Mapping[View, torch.Tensor] | None = None) -> dict[View, torch.Tensor]:
    """Features of a batch at each view (one backbone pass per view; ``known`` reused)."""
    feats = dict(known or {})
    for view in views:
        if view not in feats:
            feats[view] = model.features(view_input(x, view))
    return feats


def _to_image(logits: torch.Tensor, size: tuple[int, int], flip: bool, mode: str) -> torch.Tensor:
    """(n, h, w) -> (n, H, W), resized then flipped back."""
    out = F.interpolate(logits[:, None].float(), size=size, mode=mode, align_corners=False)[:, 0]
    return torch.flip(out, dims=[2]) if flip else out


def _max_norm(maps: torch.Tensor) -> torch.Tensor:
    maps = maps.clamp(min=0)
    return maps / maps.flatten(1).amax(1).clamp(min=1e-5)[:, None, None]


@torch.no_grad()
def plain_cams(model: CoAttentionClassifier, feats: Mapping[View, torch.Tensor], views: Sequence[View],
               classes: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Plain CAMs (n, H, W) in [0, 1] of one image from its view features (batch of 1)."""
    total = 0
    for view in views:
        logits = model.cam(feats[view])[0, list(classes)]
        total = total + _to_image(F.relu(logits), size, view[1], "bilinear")
    return _max_norm(total / len(views))


@torch.no_grad()
def mcis_maps(model: CoAttentionClassifier, feats: Mapping[View, torch.Tensor], views: Sequence[View],
              classes: Sequence[int], related: Mapping[int, Sequence[str]],
              partners: Mapping[str, torch.Tensor], size: tuple[int, int],
              self_pairs: bool) -> torch.Tensor:
    """MCIS maps (n, H, W) in [0, 1] of one image (see the module docstring).

    ``feats``: the image's features per view (batch of 1; must hold ``views`` and, with
    ``self_pairs``, :data:`BASE_VIEW` and :data:`SELF_VIEWS`); ``partners``: id -> base-view
    features (1, C, h, w) of every related image.
    """
    classes = list(classes)
    candidates: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in classes]

    # 1. related map: raw logits averaged over partners, then over views
    with_related = [c for c in classes if related.get(c)]
    device = next(iter(feats.values())).device
    if with_related:
        related_sum = torch.zeros(len(with_related), *size, device=device)
        for view in views:
            logits = related_logits(model, feats[view], with_related, related, partners)
            related_sum += _to_image(logits, size, view[1], "bicubic")
        related_map = dict(zip(with_related, related_sum / len(views)))
        for idx, c in enumerate(classes):
            if c in related_map:
                candidates[idx].append((related_map[c], None))

    # 2. self-pairs on the base view
    if self_pairs:
        f_base = feats[BASE_VIEW]
        for view in SELF_VIEWS:
            out = model.pair(f_base, feats[view], contrastive=False)
            sides = [(out["co_m"][0], False)]
            if view[1]:
                sides.append((out["co_n"][0], True))
            for maps, flipped in sides:
                chosen = maps[classes]
                scores = chosen.mean((1, 2))
                resized = _to_image(chosen, size, flipped, "bicubic")
                for idx in range(len(classes)):
                    candidates[idx].append((resized[idx], scores[idx]))

    # identity pair when nothing else exists
    for idx, c in enumerate(classes):
        if not candidates[idx]:
            f_base = feats[BASE_VIEW]
            out = model.pair(f_base, f_base, contrastive=False)
            candidates[idx].append((_to_image(out["co_m"][0, [c]], size, False, "bicubic")[0], None))

    result = torch.zeros(len(classes), *size, device=device)
    for idx in range(len(classes)):
        total = len(candidates[idx])
        for rank, (logit_map, score) in enumerate(candidates[idx]):
            if rank == 0 or torch.sigmoid(score) > GATE:
                result[idx] += _max_norm(logit_map[None])[0]
        result[idx] /= total
    return result.clamp(0, 1)


def related_logits(model: CoAttentionClassifier, f_i: torch.Tensor, classes: Sequence[int],
                   related: Mapping[int, Sequence[str]], partners: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(n, h, w): for each class c, image I's co-attentive logits ``phi(F_I^{I∩R})_c``
    averaged over its related images R (the official ``co_feature1_list`` after
    ``feature_map_merge``); a class without related images pairs I with itself (the official
    draw includes I). Partners of equal feature size share one batched pass."""
    names = sorted({r for c in classes for r in related.get(c, [])})
    logits: dict[str, torch.Tensor] = {}
    for shape in {tuple(partners[n].shape[-2:]) for n in names}:
        group = [n for n in names if tuple(partners[n].shape[-2:]) == shape]
        f_r = torch.cat([partners[n] for n in group])
        co_i = model.co_attention(f_i.expand(len(group), -1, -1, -1), f_r)[0]
        logits.update(zip(group, model.class_maps(co_i)))
    per_class = []
    for c in classes:
        chosen = related.get(c, [])
        if chosen:
            per_class.append(torch.stack([logits[n][c] for n in chosen]).mean(0))
        else:
            per_class.append(model.pair(f_i, f_i, contrastive=False)["co_m"][0, c])
    return torch.stack(per_class)


def official_aggregate(candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official ``aggregate`` over candidate logit maps, each (n, h, w): the first always
    counts, every other only where ``sigmoid(mean) > 0.1`` (per class); each counted map is
    ReLU'd and divided by ``max + 1e-8``; the sum is divided by the number of candidates."""
    total = torch.zeros_like(candidates[0])
    for rank, logits in enumerate(candidates):
        keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device) if rank == 0 \
            else torch.sigmoid(logits.mean((1, 2))) > GATE
        maps = logits.clamp(min=0)
        maps = maps / (maps.flatten(1).amax(1) + 1e-8)[:, None, None]
        total = total + maps * keep[:, None, None]
    return total / len(candidates)


@torch.no_grad()
def official_maps(model: CoAttentionClassifier, f_base: torch.Tensor, copies: Sequence[torch.Tensor],
                  classes: Sequence[int], related: Mapping[int, Sequence[str]],
                  partners: Mapping[str, torch.Tensor], size: tuple[int, int], num_related: int) -> torch.Tensor:
    """MCIS maps (n, H, W) in [0, 1] by the official ``test.py`` (protocol ``official``).

    ``f_base``: features (1, C, h, w) of the squashed image; ``copies``: features of its flip,
    0.75x and 2x squashes (:func:`~stages.train_classifier.self_pair_views`; empty without
    self-pairs). Candidates, in the official order, at I's feature size (h, w): (I, flip I)
    I's side; (I, flip I) the copy's side flipped back; the 0.75x and 2x copies' sides resized
    bicubic to (h, w); the related map (:func:`related_logits`, when ``num_related > 0``).
    :func:`official_aggregate` combines them; the result is resized bicubic to the image.
    With neither self-pairs nor related images the image is paired with itself."""
    classes = list(classes)
    h, w = f_base.shape[-2:]
    candidates = []
    if copies:
        f_flip, *scaled = copies
        out = model.pair(f_base, f_flip, contrastive=False)
        candidates += [out["co_m"][0, classes], torch.flip(out["co_n"][0, classes], dims=[2])]
        for f_copy in scaled:
            side = model.pair(f_base, f_copy, contrastive=False)["co_n"][:, classes]
            candidates.append(F.interpolate(side.float(), size=(h, w), mode="bicubic",
                                            align_corners=False)[0])
    if num_related > 0 or not candidates:
        candidates.append(related_logits(model, f_base, classes, related if num_related > 0 else {},
                                         partners))
    maps = official_aggregate([c.float() for c in candidates])
    return _to_image(maps, size, False, "bicubic").clamp(0, 1)


# --------------------------------------------------------------------------- worker side
def feature_path(out_dir: Path, item: str) -> Path:
    return Path(out_dir) / FEATURE_DIR / f"{item}.npy"


def _save_features(path: Path, feats: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats.cpu().numpy().astype(np.float32), allow_pickle=False)


def _load_features(path: Path, device: torch.device) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False)).to(device)
    except (OSError, ValueError) as err:
        raise MapFileError(f"feature cache file {path} is unreadable: {err}; delete it to recompute") from None


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class Job:
    """Everything a worker needs (picklable)."""

    checkpoint: str
    data_cfg: dict
    split: str
    out_dir: str
    image_size: int | None
    views: list[View]
    self_pairs: bool
    batch_size: int
    protocol: str = "official"
    num_related: int = 3
    device: str = "cpu"
    threads: int = 0


def _open(job: Job):
    from pipeline.config import DataConfig
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    dataset = build_dataset(DataConfig.model_validate(job.data_cfg), job.split)
    model, _ = load_classifier(Path(job.checkpoint), map_location=device)
    return dataset, model.to(device).eval(), device


def _stack_inputs(dataset, items: list[str], size: int | None, device):
    """Group items with equal network-input size into batches:
    ``[(ids, images (H, W, 3) uint8, inputs (B, 3, h, w)), ...]``."""
    groups: dict[tuple, list] = {}
    for item in items:
        image = dataset.load_image(item)
        x = network_input(image, size)
        groups.setdefault(tuple(x.shape[-2:]), []).append((item, image, x))
    return [([m[0] for m in members], [m[1] for m in members],
             torch.cat([m[2] for m in members]).to(device)) for members in groups.values()]


def partner_pass(job: Job, items: list[str]) -> int:
    """Pass A: base-view features of ``items`` into the cache (existing files kept)."""
    dataset, model, device = _open(job)
    todo = [i for i in items if not feature_path(Path(job.out_dir), i).is_file()]
    for chunk in _batches(todo, job.batch_size):
        for names, _, x in _stack_inputs(dataset, chunk, job.image_size, device):
            with torch.no_grad():
                feats = model.features(x)
            for name, f in zip(names, feats):
                _save_features(feature_path(Path(job.out_dir), name), f[None])
    return len(todo)


def map_pass(job: Job, items: list[str], classes: Mapping[str, list[int]],
             related: Mapping[str, Mapping[int, list[str]]]) -> int:
    """Pass B: the map file of each of ``items`` (already finished ones skipped)."""
    dataset, model, device = _open(job)
    out_dir = Path(job.out_dir)
    done = 0
    todo = [i for i in items if not map_path(out_dir, i).is_file()]
    official = job.protocol == "official"
    if official:
        need = [BASE_VIEW]
        copy_views = self_pair_views(job.image_size) if job.self_pairs else []
    else:
        need = list(job.views) + ([BASE_VIEW, *SELF_VIEWS] if job.self_pairs else [BASE_VIEW])
        need, copy_views = list(dict.fromkeys(need)), []
    for chunk in _batches(todo, job.batch_size):
        for names, images, x in _stack_inputs(dataset, chunk, job.image_size, device):
            known = {}
            cached = [feature_path(out_dir, n) for n in names]
            if all(p.is_file() for p in cached):
                known[BASE_VIEW] = torch.cat([_load_features(p, device) for p in cached])
            feats = view_features(model, x, need, known)
            with torch.no_grad():
                copy_feats = [model.features(torch.cat([network_input(im, side, flip) for im in images])
                                             .to(device)) for side, flip in copy_views]
            for b, name in enumerate(names):
                size = images[b].shape[:2]
                cls = classes.get(name, [])
                if not cls:
                    save_maps(map_path(out_dir, name), np.zeros(0), np.zeros((0, *size)))
                    done += 1
                    continue
                own = {v: f[b:b + 1] for v, f in feats.items()}
                partner_feats = {r: _load_features(feature_path(out_dir, r), device)
                                 for c in cls for r in related[name].get(c, [])}
                if official:
                    cams = plain_cams(model, own, [BASE_VIEW], cls, size)
                    maps = official_maps(model, own[BASE_VIEW], [f[b:b + 1] for f in copy_feats], cls,
                                         related[name], partner_feats, size, job.num_related)
                else:
                    cams = plain_cams(model, own, job.views, cls, size)
                    maps = mcis_maps(model, own, job.views, cls, related[name], partner_feats, size,
                                     job.self_pairs)
                save_maps(map_path(out_dir, name), np.asarray(cls) + 1, maps.cpu().numpy(),
                          cams.cpu().numpy())
                done += 1
    return done


def _run_sharded(fn, job: Job, shards: list[tuple]) -> list[int]:
    if len(shards) == 1:
        return [fn(job, *shards[0])]
    with ProcessPoolExecutor(max_workers=len(shards), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, job, *shard) for shard in shards]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- the stage
def select_checkpoint(classifier_dir: Path, epoch: int | None) -> Path:
    found = list_checkpoints(classifier_dir)
    if not found:
        raise CheckpointError(f"no classifier checkpoint (checkpoints/epoch_NNN.pt) in {classifier_dir}")
    if epoch is None:
        return found[max(found)]
    if epoch not in found:
        raise CheckpointError(f"maps.checkpoint_epoch={epoch}, but {classifier_dir} has checkpoints of "
                              f"epochs {sorted(found)} only (set maps.checkpoint_epoch to one of them "
                              f"or null for the last)")
    return found[epoch]


def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
        tracker: Tracker = NULL_TRACKER) -> StageResult:
    """Write one map file per image of the split, then score them; see the module docstring."""
    cfg = config.maps
    out_dir = Path(out_dir)
    if "train_classifier" not in upstream:
        raise ValueError("generate_cams needs the output of train_classifier (upstream['train_classifier'])")
    split = cfg.split or config.data.train_split
    checkpoint = select_checkpoint(Path(upstream["train_classifier"].path), cfg.checkpoint_epoch)
    dataset = build_dataset(config.data, split)
    # validates architecture and class count before any work starts
    load_classifier(checkpoint, backbone=config.classifier.backbone,
                    num_classes=dataset.num_classes - 1)

    plan = make_plan(dataset, cfg.num_related, config.seed)
    if plan.unlabelled:
        log.warning("generate_cams: %d image(s) without a foreground label are left out of pairing "
                    "(they get an empty map file)", plan.unlabelled)
    if plan.short_classes or plan.lonely_classes:
        log.warning("generate_cams: %d (image, class) pairs have fewer than k=%d other images of the "
                    "class (all of them are used), %d have none", plan.short_classes + plan.lonely_classes,
                    cfg.num_related, plan.lonely_classes)

    device = runtime.select_device(config.device)
    runtime.seed_everything(config.seed)
    workers = 1 if device.type == "cuda" else cfg.workers
    image_size = cfg.image_size
    if image_size is None and cfg.protocol == "official":
        image_size = config.classifier.image_size
    job = Job(checkpoint=str(checkpoint), data_cfg=config.data.model_dump(mode="json"), split=split,
              out_dir=str(out_dir), image_size=image_size,
              views=config_views(cfg.scales, cfg.flip), self_pairs=cfg.self_pairs,
              batch_size=cfg.batch_size, protocol=cfg.protocol, num_related=cfg.num_related,
              device=str(device),
              threads=max(1, runtime.cpu_threads(config.threads) // workers) if workers > 1 else 0)

    todo = [i for i in plan.ids if not map_path(out_dir, i).is_file()]
    partners = sorted({r for i in todo for rel in plan.related.get(i, {}).values() for r in rel})
    if partners:
        _run_sharded(partner_pass, job, [(partners[w::workers],) for w in range(workers)
                                         if partners[w::workers]])
    if todo:
        shards = []
        for w in range(workers):
            part = todo[w::workers]
            if part:
                shards.append((part, {i: plan.classes.get(i, []) for i in part},
                               {i: plan.related.get(i, {}) for i in part}))
        _run_sharded(map_pass, job, shards)
    for item in plan.ids:       # every map readable before the stage counts as done
        load_maps(map_path(out_dir, item))
    shutil.rmtree(out_dir / FEATURE_DIR, ignore_errors=True)

    scores = evaluate_maps(out_dir, dataset, cfg.background_thresholds)
    atomic_write_json(out_dir / EVAL_FILE, scores)
    metrics = {"headline": scores["headline"], "maps_miou": scores["maps"]["best_miou"],
               "cams_miou": scores["cams"]["best_miou"],
               "maps_best_threshold": scores["maps"]["best_threshold"],
               "cams_best_threshold": scores["cams"]["best_threshold"],
               "background_miou": scores["background_miou"], "num_images": len(plan.ids),
               "unlabelled_images": plan.unlabelled, "short_related_classes": plan.short_classes,
               "no_related_classes": plan.lonely_classes, "resumed_skipped": len(plan.ids) - len(todo)}
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.info("generate_cams: %s", scores["headline"])
    return StageResult(stage=NAME, key=out_dir.name, path=str(out_dir), metrics=metrics,
                       files={"maps": ".", "evaluation": EVAL_FILE, "checkpoint": str(checkpoint)},
                       run_id=tracker.run_id)

