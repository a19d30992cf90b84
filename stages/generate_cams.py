"""Stage 2: localization maps averaged over related images (MCIS, Sun et al. ECCV 2020).

With ``classifier.method=cam`` (the single-image CAM baseline) the stage writes that
classifier's plain CAMs as the maps (no pairs; views as the protocol says). Otherwise,
for every image ``I`` of the split and each class ``c`` of its label, two maps:
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

The backbone runs **once per image per view**: images are processed in the plan's seeded
order, and each image's base-view features (the squashed image, or scale 1 without flip
under multiscale) are computed once, held in memory as float16 in a
:class:`~pipeline.feature_cache.FeatureCache` of ``maps.cache_mb`` and dropped after their
last use (as the image itself or as a partner). Partners are drawn from the
``maps.related_pool`` images of the class nearest in that order (:func:`make_plan`), so the
cache holds a bounded stretch of the dataset; only the HW x HW co-attention and the 1x1 convs
are computed per pair. Nothing but the map files is written to disk.

Output: ``<id>.npy`` per image (:func:`pipeline.maps_io.save_maps`: class ids, the image's
size, MCIS maps and plain CAMs, float16, at feature resolution unless
``maps.full_resolution``; :func:`pipeline.maps_io.load_maps` upsamples them bicubic; images
without a label get an empty file and are left out of pairing, counted). Finished images
are skipped on a rerun (resumable). ``config.maps.workers > 1`` splits the order into that
many contiguous stretches, one process each (CPU); on CUDA one process does everything.
``map_eval.json`` holds the threshold sweep of :func:`pipeline.map_eval.evaluate_maps`.
"""

import logging
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
from pipeline.data.pairs import class_index
from pipeline.data.transforms import normalize
from pipeline.map_eval import evaluate_maps
from pipeline.feature_cache import FeatureCache
from pipeline.maps_io import load_maps, map_path, save_maps, upsample
from pipeline.storage import StageResult, atomic_write_json
from pipeline.tracking import NULL_TRACKER, Tracker
from stages.train_classifier import (CheckpointError, list_checkpoints, load_classifier,
                                     self_pair_views, squash)

NAME = "generate_cams"
EVAL_FILE = "map_eval.json"
BASE_VIEW = (1.0, False)
SELF_VIEWS = ((1.0, True), (0.75, False), (2.0, False))
GATE = 0.1

log = logging.getLogger(__name__)

View = tuple[float, bool]


# --------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """What to compute: the processing order, per image its classes (0-based) and related
    partners per class."""

    ids: list[str]             # processing order: labelled images (seeded shuffle), then the rest
    classes: dict[str, list[int]] = field(default_factory=dict)
    related: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    unlabelled: int = 0
    short_classes: int = 0     # (image, class) with fewer distinct related images than k
    lonely_classes: int = 0    # (image, class) with no other image of that class


def make_plan(dataset, k: int, seed: int, pool: int = 0) -> Plan:
    """Processing order and related images for every (image, class), seeded.

    The labelled images are shuffled (``default_rng([seed, 7])``); the ``k`` partners of
    (I, c) are drawn with replacement (``default_rng([seed, 104729, i])``) from the ``pool``
    other images of class c nearest to I in that order (all of them when ``pool`` is 0 or the
    class is smaller). In a random order each other image of the class is equally likely to be
    near I, so a partner is still uniform over the class, as in the official draw, while every
    image's features are needed only within a bounded stretch of the order
    (:class:`pipeline.feature_cache.FeatureCache`)."""
    labels = dataset.label_matrix()
    labelled = np.flatnonzero(labels.sum(axis=1) > 0)
    order = labelled[np.random.default_rng([seed, 7]).permutation(len(labelled))].tolist()
    rank = {i: r for r, i in enumerate(order)}
    members = {c: sorted(idx, key=rank.__getitem__) for c, idx in class_index(labels).items()}
    where = {c: {i: r for r, i in enumerate(m)} for c, m in members.items()}
    rest = [i for i in range(len(dataset)) if i not in rank]
    plan = Plan(ids=[dataset.ids[i] for i in order + rest], unlabelled=len(rest))
    for i in order:
        item = dataset.ids[i]
        rng = np.random.default_rng([seed, 104729, i])
        classes = np.flatnonzero(labels[i]).tolist()
        plan.classes[item] = classes
        plan.related[item] = {}
        for c in classes:
            pool_c = _nearest_others(members[c], where[c][i], pool)
            if k > 0 and not pool_c:
                plan.lonely_classes += 1
                chosen: list[int] = []
            elif len(pool_c) < k:
                plan.short_classes += 1
                chosen = pool_c
            else:
                chosen = [pool_c[j] for j in rng.integers(0, len(pool_c), size=k)] if k > 0 else []
            plan.related[item][c] = [dataset.ids[j] for j in chosen]
    return plan


def _nearest_others(members: list[int], r: int, pool: int) -> list[int]:
    """The ``pool`` entries of ``members`` nearest to position ``r``, without ``members[r]``
    (all others when ``pool`` is 0 or there are fewer)."""
    if pool <= 0 or len(members) - 1 <= pool:
        return members[:r] + members[r + 1:]
    lo = max(0, min(r - pool // 2, len(members) - 1 - pool))
    window = members[lo:lo + pool + 1]
    return window[:r - lo] + window[r - lo + 1:]


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
            keep = 1.0 if rank == 0 else (torch.sigmoid(score) > GATE).to(logit_map.dtype)
            result[idx] += _max_norm(logit_map[None])[0] * keep       # no host sync
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
                  partners: Mapping[str, torch.Tensor], num_related: int) -> torch.Tensor:
    """MCIS maps (n, h, w) in [0, 1] at I's feature resolution by the official ``test.py``
    (protocol ``official``; the official code then resizes them bicubic to the image, which
    :func:`pipeline.maps_io.load_maps` does on read).

    ``f_base``: features (1, C, h, w) of the squashed image; ``copies``: features of its flip,
    0.75x and 2x squashes (:func:`~stages.train_classifier.self_pair_views`; empty without
    self-pairs). Candidates, in the official order, at I's feature size (h, w): (I, flip I)
    I's side; (I, flip I) the copy's side flipped back; the 0.75x and 2x copies' sides resized
    bicubic to (h, w); the related map (:func:`related_logits`, when ``num_related > 0``).
    :func:`official_aggregate` combines them. With neither self-pairs nor related images the
    image is paired with itself."""
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
    return official_aggregate([c.float() for c in candidates]).clamp(0, 1)


# --------------------------------------------------------------------------- worker side
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
    method: str = "mcis"
    cache_bytes: int = 4 << 30
    full_resolution: bool = False
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


@torch.no_grad()
def _cache_features(model, cache: FeatureCache, names: list[str], x: torch.Tensor, position: int,
                    keep) -> None:
    """Base-view features of a batch into the cache, float16 (every later use, as the image
    itself or as a partner, reads the same rounded values: results do not depend on order)."""
    for name, f in zip(names, model.features(x)):
        cache.put(name, f[None].half(), position, keep)


def feature_uses(todo: Sequence[str], classes: Mapping[str, list[int]],
                 related: Mapping[str, Mapping[int, list[str]]]):
    """``(partners_of, uses)``: each image's distinct partners, and for every image whose
    features are needed the positions in ``todo`` that need them (itself, or as a partner)."""
    partners_of = {n: list(dict.fromkeys(r for c in classes.get(n, []) for r in related[n].get(c, [])))
                   for n in todo}
    uses: dict[str, list[int]] = {}
    for position, name in enumerate(todo):
        for key in ([name] if classes.get(name) else []) + partners_of[name]:
            uses.setdefault(key, []).append(position)
    return partners_of, uses


def simulated_cache_peak(plan: Plan, batch_size: int) -> tuple[int, int]:
    """(peak number of features held, features computed) when the whole plan runs in one
    process in batches of ``batch_size``, with an unbounded cache: what :func:`map_pass`
    would hold, from the labels alone (``wsss plan``, ``benchmarks/maps_budget.py``)."""
    partners_of, uses = feature_uses(plan.ids, plan.classes, plan.related)
    cache = FeatureCache(uses, capacity_bytes=1 << 62)
    token = torch.empty(1, dtype=torch.uint8)     # one byte per entry: counts, not features
    for start in range(0, len(plan.ids), batch_size):
        chunk = plan.ids[start:start + batch_size]
        for key in dict.fromkeys([n for n in chunk if plan.classes.get(n)]
                                 + [r for n in chunk for r in partners_of[n]]):
            if key not in cache:
                cache.put(key, token, start)
        cache.release(start + len(chunk) - 1)
    return cache.peak_bytes, cache.computed


def map_pass(job: Job, items: list[str], classes: Mapping[str, list[int]],
             related: Mapping[str, Mapping[int, list[str]]]) -> dict[str, int]:
    """The map file of each of ``items`` (in this order; finished ones skipped). Base-view
    features of the images and their partners are computed once into a bounded
    :class:`~pipeline.feature_cache.FeatureCache` and dropped after their last use."""
    dataset, model, device = _open(job)
    out_dir = Path(job.out_dir)
    todo = [i for i in items if not map_path(out_dir, i).is_file()]
    partners_of, uses = feature_uses(todo, classes, related)
    cache = FeatureCache(uses, job.cache_bytes)
    official, cam_only = job.protocol == "official", job.method == "cam"
    if cam_only:
        need, copy_views = (list(dict.fromkeys([BASE_VIEW] + list(job.views))) if not official
                            else [BASE_VIEW]), []
    elif official:
        need = [BASE_VIEW]
        copy_views = self_pair_views(job.image_size) if job.self_pairs else []
    else:
        need = list(job.views) + ([BASE_VIEW, *SELF_VIEWS] if job.self_pairs else [BASE_VIEW])
        need, copy_views = list(dict.fromkeys(need)), []
    for start in range(0, len(todo), job.batch_size):
        chunk = todo[start:start + job.batch_size]
        keep = set(chunk) | {r for n in chunk for r in partners_of[n]}
        for names, images, x in _stack_inputs(dataset, chunk, job.image_size, device):
            absent = [b for b, n in enumerate(names) if n not in cache]
            if absent:
                _cache_features(model, cache, [names[b] for b in absent], x[absent], start, keep)
            missing = [r for n in names for r in partners_of[n] if r not in cache]
            for group in _batches(list(dict.fromkeys(missing)), job.batch_size):
                for p_names, _, p_x in _stack_inputs(dataset, group, job.image_size, device):
                    _cache_features(model, cache, p_names, p_x, start, keep)
            known = {BASE_VIEW: torch.cat([cache.get(n).float() for n in names])}
            feats = view_features(model, x, need, known)
            with torch.no_grad():
                copy_feats = [model.features(torch.cat([network_input(im, side, flip) for im in images])
                                             .to(device)) for side, flip in copy_views]
            for b, name in enumerate(names):
                image_size = images[b].shape[:2]
                cls = classes.get(name, [])
                if not cls:
                    save_maps(map_path(out_dir, name), np.zeros(0), np.zeros((0, 1, 1)), size=image_size)
                    continue
                own = {v: f[b:b + 1] for v, f in feats.items()}
                partner_feats = {r: cache.get(r).float() for r in partners_of[name]}
                size = tuple(own[BASE_VIEW].shape[-2:])        # stored at feature resolution
                if cam_only:        # the CAM baseline: its plain CAMs are its maps
                    cams = plain_cams(model, own, [BASE_VIEW] if official else job.views, cls, size)
                    maps = cams
                elif official:
                    cams = plain_cams(model, own, [BASE_VIEW], cls, size)
                    maps = official_maps(model, own[BASE_VIEW], [f[b:b + 1] for f in copy_feats], cls,
                                         related[name], partner_feats, job.num_related)
                else:
                    cams = plain_cams(model, own, job.views, cls, size)
                    maps = mcis_maps(model, own, job.views, cls, related[name], partner_feats, size,
                                     job.self_pairs)
                maps, cams = maps.cpu().numpy(), cams.cpu().numpy()
                if job.full_resolution:
                    maps, cams = upsample(maps, image_size), upsample(cams, image_size)
                save_maps(map_path(out_dir, name), np.asarray(cls) + 1, maps, cams, size=image_size)
        cache.release(start + len(chunk) - 1)
    return {"maps": len(todo), **cache.stats()}


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

    method = config.classifier.method
    plan = make_plan(dataset, cfg.num_related if method == "mcis" else 0, config.seed, cfg.related_pool)
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
              batch_size=cfg.batch_size, protocol=cfg.protocol, num_related=cfg.num_related, method=method,
              cache_bytes=cfg.cache_mb << 20, full_resolution=cfg.full_resolution, device=str(device),
              threads=max(1, runtime.cpu_threads(config.threads) // workers) if workers > 1 else 0)

    todo = [i for i in plan.ids if not map_path(out_dir, i).is_file()]
    shards = []
    for w in range(workers):          # contiguous stretches of the order: partners stay local
        part = todo[w * len(todo) // workers:(w + 1) * len(todo) // workers]
        if part:
            shards.append((part, {i: plan.classes.get(i, []) for i in part},
                           {i: plan.related.get(i, {}) for i in part}))
    passes = _run_sharded(map_pass, job, shards) if shards else []
    cache_stats = {key: sum(p[key] for p in passes) for key in ("computed", "recomputed", "overflows")}
    cache_stats["peak_mb"] = max((p["peak_bytes"] for p in passes), default=0) / 2**20
    if cache_stats["recomputed"]:
        log.warning("generate_cams: the feature cache (maps.cache_mb=%d) was too small: %d features "
                    "were computed twice", cfg.cache_mb, cache_stats["recomputed"])
    for item in plan.ids:       # every map readable before the stage counts as done
        load_maps(map_path(out_dir, item))

    scores = evaluate_maps(out_dir, dataset, cfg.background_thresholds)
    atomic_write_json(out_dir / EVAL_FILE, scores)
    metrics = {"headline": scores["headline"], "maps_miou": scores["maps"]["best_miou"],
               "cams_miou": scores["cams"]["best_miou"],
               "maps_best_threshold": scores["maps"]["best_threshold"],
               "cams_best_threshold": scores["cams"]["best_threshold"],
               "background_miou": scores["background_miou"], "num_images": len(plan.ids),
               "unlabelled_images": plan.unlabelled, "short_related_classes": plan.short_classes,
               "no_related_classes": plan.lonely_classes, "resumed_skipped": len(plan.ids) - len(todo),
               "features_computed": cache_stats["computed"], "features_recomputed": cache_stats["recomputed"],
               "feature_cache_peak_mb": cache_stats["peak_mb"]}
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.info("generate_cams: %s", scores["headline"])
    return StageResult(stage=NAME, key=out_dir.name, path=str(out_dir), metrics=metrics,
                       files={"maps": ".", "evaluation": EVAL_FILE, "checkpoint": str(checkpoint)},
                       run_id=tracker.run_id)

