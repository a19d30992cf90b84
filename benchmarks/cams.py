"""Speed of stage 2: MCIS maps vs plain CAMs on the same images in one run.

    .venv/bin/python benchmarks/cams.py [--backbone efficientnet_lite0] [--size 128] [--images 8]

Three ways over the same images (random weights: speed does not depend on training):

* plain CAMs over the views the MCIS rule uses (scale 1, flip, 0.75x, 2x): one backbone
  pass per image per view;
* MCIS maps with k related images + the self-pairs, our way: the same backbone passes, every
  image's base-view features cached and reused as a partner, only the co-attention and the
  1x1 convs per pair (``stages.generate_cams.mcis_maps``);
* the naive way (official code): every pair through the full network, so the backbone runs
  for both images of every pair: 2 x (k + 4) = 14 passes per class per image with k = 3.

Prints P1 = time(MCIS) / time(plain CAM) (target <= 1.5; each side's fastest of ``--repeat``
alternating runs), the naive ratio, images/s and peak memory (CUDA: max allocated; CPU: the
process's peak RSS). ``--protocol official`` times the official stage-2 protocol instead (the
squashed image and its flip / 0.75x / 2x copies; plain CAMs with the same backbone passes).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.coattention import CoAttentionClassifier  # noqa: E402
from stages.generate_cams import (BASE_VIEW, SELF_VIEWS, mcis_maps, official_maps,  # noqa: E402
                                  plain_cams, view_features)

VIEWS = [BASE_VIEW, *SELF_VIEWS]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_plain(model, images, classes, size):
    for x, cls in zip(images, classes):
        feats = view_features(model, x, VIEWS)
        plain_cams(model, feats, VIEWS, cls, size)


@torch.no_grad()
def run_mcis(model, images, classes, related, size):
    cache = {}
    for i, x in enumerate(images):          # base view of every image, computed once
        cache[i] = model.features(x)
    for i, (x, cls) in enumerate(zip(images, classes)):
        feats = view_features(model, x, VIEWS, known={BASE_VIEW: cache[i]})
        mcis_maps(model, feats, [BASE_VIEW], cls, related[i], cache, size, self_pairs=True)


def official_copies(x):
    """The official protocol's self-pair inputs of a squashed image: flip, 0.75x, 2x."""
    side = x.shape[-1]
    return [torch.flip(x, dims=[3])] + [F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                                        for s in (int(side * 0.75), 2 * side)]


@torch.no_grad()
def run_plain_official(model, images, classes, size):
    """Plain CAMs with the same backbone passes as the official protocol (image + 3 copies)."""
    for x, cls in zip(images, classes):
        feats = {BASE_VIEW: model.features(x)}
        for copy in official_copies(x):
            model.features(copy)
        plain_cams(model, feats, [BASE_VIEW], cls, size)


@torch.no_grad()
def run_mcis_official(model, images, classes, related, size):
    cache = {i: model.features(x) for i, x in enumerate(images)}
    for i, (x, cls) in enumerate(zip(images, classes)):
        copies = [model.features(c) for c in official_copies(x)]
        official_maps(model, cache[i], copies, cls, related[i], cache, 3)


@torch.no_grad()
def run_naive(model, images, classes, related, size):
    """Official-code style: full network per pair, both images (14 backbone passes per class)."""
    for i, (x, cls) in enumerate(zip(images, classes)):
        flip = torch.flip(x, dims=[3])
        h, w = x.shape[-2:]
        copies = [flip] + [F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear",
                                         align_corners=False) for s in (0.75, 2.0)]
        for c in cls:
            maps = [model(x, images[j])["co_m"][0, c] for j in related[i][c]]
            for copy in copies:
                out = model(x, copy)
                maps.append(out["co_m"][0, c])
            maps.append(model(flip, x)["co_m"][0, c])   # (flip I, I): the other direction
            # 3 related + 4 self pairs = 7 pair forwards = 14 backbone passes for this class
            for m in maps:
                F.interpolate(m[None, None], size=size, mode="bicubic", align_corners=False)


def timed(fn, device, *args):
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="vgg16 | resnet50 | resnet101 | efficientnet_lite0 | tiny")
    parser.add_argument("--feature-channels", type=int, default=512)
    parser.add_argument("--size", type=int, default=128, help="square input side")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--classes", type=int, default=20, help="K foreground classes")
    parser.add_argument("--labels-per-image", type=int, default=2)
    parser.add_argument("--k", type=int, default=3, help="related images per class")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per side; the fastest counts")
    parser.add_argument("--protocol", choices=["multiscale", "official"], default="multiscale",
                        help="official: the squashed image + flip / 0.75x / 2x copies (maps.protocol)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    model = CoAttentionClassifier(args.classes, backbone=args.backbone,
                                  feature_channels=args.feature_channels).to(device).eval()
    rng = np.random.default_rng(0)
    images = [torch.randn(1, 3, args.size, args.size, device=device) for _ in range(args.images)]
    classes = [sorted(rng.choice(args.classes, args.labels_per_image, replace=False).tolist())
               for _ in images]
    related = [{c: [int(j) for j in rng.choice([j for j in range(len(images)) if j != i], args.k)]
                for c in cls} for i, cls in enumerate(classes)]
    size = (args.size, args.size)

    plain, mcis = ((run_plain_official, run_mcis_official) if args.protocol == "official"
                   else (run_plain, run_mcis))
    plain(model, images[:1], classes[:1], size)           # warm-up (allocators, kernels)
    mcis(model, images[:2], classes[:2], [{c: [1] for c in classes[0]}, {c: [0] for c in classes[1]}], size)
    # alternate the two sides and keep each one's fastest run: on a shared VM a single run
    # of either side swings several-fold with what else runs
    t_plain = t_mcis = float("inf")
    for _ in range(args.repeat):
        t_plain = min(t_plain, timed(plain, device, model, images, classes, size))
        mem_plain = peak_memory_mb(device)
        t_mcis = min(t_mcis, timed(mcis, device, model, images, classes, related, size))
        mem_mcis = peak_memory_mb(device)
    n = len(images)
    print(f"device {device}, backbone {args.backbone}, {n} images {args.size}x{args.size}, "
          f"{args.labels_per_image} classes each, k={args.k} + 4 self-pair maps, views {VIEWS}")
    print(f"plain CAM (4 views):        {t_plain:8.2f} s  {n / t_plain:7.2f} images/s  peak {mem_plain:8.0f} MB")
    print(f"MCIS, cached features:      {t_mcis:8.2f} s  {n / t_mcis:7.2f} images/s  peak {mem_mcis:8.0f} MB")
    print(f"P1 = MCIS / plain CAM = {t_mcis / t_plain:.2f}   (target <= 1.5)")
    if not args.skip_naive:
        t_naive = timed(run_naive, device, model, images, classes, related, size)
        mem_naive = peak_memory_mb(device)
        print(f"MCIS, naive (14 passes/cls): {t_naive:8.2f} s  {n / t_naive:7.2f} images/s  peak {mem_naive:8.0f} MB")
        print(f"naive ratio = naive / plain CAM = {t_naive / t_plain:.2f}; "
              f"speed-up of caching = {t_naive / t_mcis:.1f}x")


if __name__ == "__main__":
    main()
