"""Stage 3: dense-CRF refinement of the localization maps into pseudo-masks.

Model: the fully connected CRF of Krähenbühl & Koltun (NIPS 2011, "Efficient Inference in
Fully Connected CRFs with Gaussian Edge Potentials") through ``pydensecrf``. For pixels i
with positions p_i and colours I_i, and labels x_i in {background, the image's classes}::

    E(x) = sum_i psi_u(x_i) + sum_{i<j} [x_i != x_j] k(f_i, f_j)                 (Potts)
    k(f_i, f_j) = w_g exp(-|p_i - p_j|^2 / (2 sxy_g^2))                          (Gaussian)
                + w_b exp(-|p_i - p_j|^2 / (2 sxy_b^2) - |I_i - I_j|^2 / (2 srgb^2))  (bilateral)

with w_g = ``gaussian_compat``, sxy_g = ``gaussian_sxy``, w_b = ``bilateral_compat``,
sxy_b = ``bilateral_sxy``, srgb = ``bilateral_srgb``. ``iterations`` mean-field steps give the
approximate posterior Q_i(l).

Unary psi_u, from the n maps M_c in [0, 1] of the image's classes (stage 2's ``maps``):

* background score: ``bg = (1 - max_c M_c)^alpha`` ("power", PSA) or ``bg = bg_threshold``
  ("constant");
* ``unary = "scores"`` (PSA, CLIP-ES, ToCo): S = [bg, M_1..M_n], psi_u(l) = -log max(S_l, 1e-5)
  (pydensecrf's ``unary_from_softmax``; S is not renormalised, exactly as PSA does — the first
  mean-field step normalises exp(-psi_u) per pixel, so only ratios matter);
* ``unary = "labels"`` (IRN): y_i = argmax_l S_l, psi_u(y_i) = -log gt_prob and
  psi_u(l != y_i) = -log((1 - gt_prob) / n) (``unary_from_labels``).

Labels x_i = argmax_l Q_i(l), mapped to the class ids, then the ignore rules (255):

* ``confidence``: max_l Q_i(l) < confidence -> 255 (CLIP-ES: 0.95; 0 disables);
* two runs (PSA's low/high alpha, IRN's fg/bg thresholds): run A uses the stronger background
  (``alpha`` / ``bg_threshold``) and yields confident foreground, run B the weaker one
  (``alpha_high`` / ``bg_low_threshold``) and yields confident background::

      x = x_A where x_A != 0;   0 where x_A == 0 and x_B == 0;   255 elsewhere

  This is IRN's rule; PSA's code instead lets B's background win over A's foreground, which
  can only differ where the weaker-background run says background and the stronger one does
  not (practically never). A second background equal to the first means one run.
* optional saliency s in [0, 1] (``saliency_dir/<id>.png``, grey 0-255), the OAA rules the
  official MCIS code uses, added to the CRF: the background score becomes max(bg, 1 - s);
  CRF-background pixels with s >= ``saliency_ignore`` (32/255) -> 255; an image with a
  foreground fraction below ``min_foreground`` (1 %) becomes all 255.

``crf.preset=oaa`` skips the CRF and applies the official MCIS pseudo-GT rules (OAA's
``gen_gt.py``: maps + saliency, :mod:`pipeline.oaa_rules`) instead.

``downscale < 1`` runs the CRF on a resized image (bilinear; position stds multiplied by the
same factor, PSA's ``scale_factor``) and upsamples Q bilinearly before labelling.

Presets (:data:`PRESETS`, all pydensecrf with 10 iterations) reproduce the peers' code:
PSA ``infer_cls.py`` + ``imutils.crf_inference``, IRN ``cam_to_ir_label.py`` +
``crf_inference_label``, CLIP-ES ``eval_cam_with_crf.py`` (it feeds a mean-subtracted BGR
image cast to uint8 to the bilateral term — a quirk we do not copy: we use the RGB image),
ToCo ``utils/crf.py`` (ToCo applies it to segmentation softmax outputs; for maps we choose
PSA's power background with alpha 1, as CLIP-ES).

``crf.source=cams`` refines the plain CAMs stored in the same map files instead of the MCIS
maps (the ablation of co-attention through the CRF and the segmentors).

Reusable pieces: :func:`crf_posterior` (probabilities in, posterior out — stage 5 uses it to
post-process segmentor predictions), :func:`refine_maps` (maps in, label map out),
:func:`refine_images` (chunked multi-process or Dask execution over files).
"""

import concurrent.futures as cf
import csv
import dataclasses
import io
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
from PIL import Image, UnidentifiedImageError
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from pipeline.config import PipelineConfig, flatten
from pipeline.crf_params import PRESETS, CRFParams, resolve_params  # noqa: F401 (re-exported)
from pipeline.data.palette import read_label_png, save_label_png
from pipeline.errors import InputError
from pipeline.maps_io import load_maps, map_header, map_path
from pipeline.oaa_rules import oaa_pseudo_mask
from pipeline.processes import die_with_parent
from pipeline.storage import (StageResult, atomic_write_text, atomic_write_json, clean_temp_files,
                              code_version)
from pipeline.tracking import NULL_TRACKER, Tracker

NAME = "refine_crf"
IGNORE = 255
MANIFEST_CSV = "pseudo_masks.csv"
EVALUATION_JSON = "evaluation.json"
PROB_CLIP = 1e-5
log = logging.getLogger(__name__)


class CRFInputError(InputError):
    """Bad stage-3 input; the message names the file(s) and what is wrong."""


class DaskWorkerError(RuntimeError):
    """A Dask worker that cannot run stage 3 as this process would (see :func:`check_workers`)."""


# CRFParams, PRESETS and resolve_params live in pipeline.crf_params (config validation uses them)


# --------------------------------------------------------------------------- images
def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """C-contiguous uint8 (H, W, 3). Grey (H, W) or (H, W, 1) is replicated; (H, W, 4) is
    accepted only when its alpha is fully opaque (the colour of transparent pixels is
    undefined, so they are an error); anything else raises naming ``name``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise CRFInputError(f"{name}: image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        if (image[:, :, 3] != 255).any():
            raise CRFInputError(f"{name}: image has transparent pixels (alpha < 255); flatten it "
                                "onto a background colour first")
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise CRFInputError(f"{name}: expected an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


_CONVERTIBLE_MODES = {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB. Grey, palette, CMYK, YCbCr, LAB and HSV files are
    converted by PIL; alpha channels are dropped when fully opaque and an error otherwise;
    other modes (16-bit / float) are an error. Messages name the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P" and "transparency" in image.info:
                image, mode = image.convert("RGBA"), "RGBA"
            if mode == "RGB":
                array = np.asarray(image)
            elif mode in _ALPHA_MODES:
                rgba = np.asarray(image.convert("RGBA"))
                return as_rgb(rgba, name=f"image {path} (mode {mode})")
            elif mode in _CONVERTIBLE_MODES:
                array = np.asarray(image.convert("RGB"))
            else:
                raise CRFInputError(f"image {path} has unsupported mode {mode!r} (expected RGB, "
                                    "grey, palette, CMYK or an opaque alpha image)")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise CRFInputError(f"image {path} is unreadable or truncated: {err}") from None
    return np.array(array, dtype=np.uint8, order="C")  # a writable copy (pydensecrf needs one)


def load_saliency(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A saliency PNG as float32 (H, W) in [0, 1]; ``size`` = (H, W) it must have."""
    path = Path(path)
    if not path.is_file():
        raise CRFInputError(f"saliency map {path} does not exist")
    try:
        with Image.open(path) as image:
            sal = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise CRFInputError(f"saliency map {path} is unreadable: {err}") from None
    if sal.shape != tuple(size):
        raise CRFInputError(f"saliency map {path} is {sal.shape[1]}x{sal.shape[0]} but the image is "
                            f"{size[1]}x{size[0]} (WxH)")
    return sal


def _resize(array: np.ndarray, size: tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    """Bilinear resize of (C, H, W) float32 or (H, W, 3) uint8 to ``size`` = (H, W) via PIL."""
    h, w = size
    if array.dtype == np.uint8:
        return np.array(Image.fromarray(array).resize((w, h), resample))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32), mode="F")
                                .resize((w, h), resample)) for c in array])


# --------------------------------------------------------------------------- CRF core
def dense_crf(image: np.ndarray, unary: np.ndarray, params: CRFParams,
              position_scale: float = 1.0) -> np.ndarray:
    """Mean-field posterior Q (C, H, W) float32 for a unary energy (C, H*W) or (C, H, W) on an
    RGB uint8 image (H, W, 3); position stds are multiplied by ``position_scale``."""
    h, w = image.shape[:2]
    unary = np.ascontiguousarray(np.asarray(unary, dtype=np.float32).reshape(unary.shape[0], -1))
    n = unary.shape[0]
    if unary.shape[1] != h * w:
        raise CRFInputError(f"unary has {unary.shape[1]} pixels, image {w}x{h} has {h * w}")
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if not image.flags.writeable:  # pydensecrf's memoryview refuses read-only buffers
        image = image.copy()
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy * position_scale, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy * position_scale, srgb=params.bilateral_srgb,
                             rgbim=image,
                             compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(n, h, w)


def _posterior(image: np.ndarray, scores: np.ndarray, params: CRFParams) -> np.ndarray:
    """Posterior of the scores (C, H, W) under ``params.unary``, at ``params.downscale``."""
    h, w = image.shape[:2]
    scale = params.downscale
    if scale < 1:
        small = (max(1, round(h * scale)), max(1, round(w * scale)))
        image, scores = _resize(image, small), _resize(scores, small)
    if params.unary == "labels":
        unary = unary_from_labels(np.argmax(scores, axis=0), scores.shape[0], params.gt_prob,
                                  zero_unsure=False)
    else:
        unary = unary_from_softmax(scores, clip=PROB_CLIP)
    q = dense_crf(image, unary, params, position_scale=scale)
    return _resize(q, (h, w)) if scale < 1 else q


def crf_posterior(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Dense-CRF posterior (C, H, W) float32 of class probabilities ``probs`` (C, H, W) (e.g. a
    segmentor's softmax) on ``image`` (H, W[, 3]); unary -log max(p, 1e-5) (or hard labels
    when ``params.unary == "labels"``), pairwise terms, iterations and downscale from
    ``params``. Rows of the result sum to 1."""
    image = as_rgb(image)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise CRFInputError(f"probabilities of shape {probs.shape} do not fit the "
                            f"{image.shape[1]}x{image.shape[0]} image (expected (C, H, W))")
    if not np.isfinite(probs).all():
        raise CRFInputError("probabilities hold NaN/inf")
    if probs.shape[0] < 2:
        return np.ones_like(probs)
    return _posterior(image, probs, params)


def background_score(maps: np.ndarray, params: CRFParams, second: bool = False,
                     saliency: np.ndarray | None = None) -> np.ndarray:
    """(H, W) background score of run A (``second=False``) or B: (1 - max_c M_c)^alpha or a
    constant, raised to at least 1 - saliency when a saliency map is given."""
    value = params.second_background if second else (
        params.alpha if params.background == "power" else params.bg_threshold)
    h, w = maps.shape[1:]
    if params.background == "power":
        top = maps.max(axis=0) if len(maps) else np.zeros((h, w), np.float32)
        bg = np.power(np.clip(1.0 - top, 0.0, 1.0), value, dtype=np.float32)
    else:
        bg = np.full((h, w), value, dtype=np.float32)
    if saliency is not None:
        bg = np.maximum(bg, 1.0 - saliency)
    return bg


def refine_maps(image: np.ndarray, classes: Sequence[int], maps: np.ndarray, params: CRFParams,
                saliency: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W) pseudo-mask of one image: 0 background, the ids in ``classes`` (mask values
    of the n maps (n, H, W) in [0, 1]), 255 ignore; rules in the module docstring."""
    image = as_rgb(image)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    h, w = image.shape[:2]
    if maps.ndim != 3 or maps.shape[0] != classes.size:
        raise CRFInputError(f"{classes.size} classes but maps of shape {maps.shape}")
    if maps.shape[1:] != (h, w):
        raise CRFInputError(f"maps are {maps.shape[2]}x{maps.shape[1]} but the image is {w}x{h} (WxH)")
    if classes.size and (classes.min() < 1 or classes.max() >= IGNORE):
        raise CRFInputError(f"class ids must lie in 1..254, got {classes.tolist()}")
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    if params.method == "oaa":
        if saliency is None:
            raise CRFInputError("crf.preset=oaa needs a saliency map for every image")
        return oaa_pseudo_mask(classes, maps, saliency, params.fg_threshold, params.conflict,
                               params.att_threshold, params.saliency_ignore, params.min_foreground)

    def run(second: bool) -> np.ndarray:
        scores = np.concatenate([background_score(maps, params, second, saliency)[None], maps])
        q = _posterior(image, scores, params)
        label = keys[np.argmax(q, axis=0)]
        if params.confidence and not second:
            label[q.max(axis=0) < params.confidence] = IGNORE
        return label

    if classes.size == 0:
        label = np.zeros((h, w), np.uint8)
    else:
        label = run(second=False)
        if params.second_background is not None:
            label_b = run(second=True)
            label = np.where(label != 0, label, np.where(label_b == 0, 0, IGNORE)).astype(np.uint8)
    if saliency is not None:
        label[(label == 0) & (saliency >= params.saliency_ignore)] = IGNORE
        if np.mean((label != 0) & (label != IGNORE)) < params.min_foreground:
            label[:] = IGNORE
    return label


# --------------------------------------------------------------------------- one image / chunks
@dataclass(frozen=True)
class WorkItem:
    """One image to refine: its files and where the pseudo-mask goes."""

    id: str
    image: str
    maps: str
    output: str
    saliency: str | None = None


def mask_stats(label: np.ndarray) -> dict[str, float]:
    """Foreground (not 0, not 255) and ignore (255) fractions of a pseudo-mask."""
    return {"foreground_fraction": float(np.mean((label != 0) & (label != IGNORE))),
            "ignore_fraction": float(np.mean(label == IGNORE))}


def refine_file(item: WorkItem, params: CRFParams) -> dict[str, Any]:
    """Refine one image from its files; writes the PNG atomically and returns its stats."""
    maps = load_maps(Path(item.maps))
    image = load_rgb(Path(item.image))
    if maps.size != image.shape[:2]:
        raise CRFInputError(f"map file {item.maps} is {maps.size[1]}x{maps.size[0]} but image "
                            f"{item.image} is {image.shape[1]}x{image.shape[0]} (WxH)")
    saliency = load_saliency(Path(item.saliency), image.shape[:2]) if item.saliency else None
    try:
        label = refine_maps(image, maps.classes, getattr(maps, params.source), params, saliency)
    except CRFInputError as err:
        raise CRFInputError(f"map file {item.maps}: {err}") from None
    save_label_png(Path(item.output), label)
    return {"id": item.id, **mask_stats(label)}


def refine_chunk(items: Sequence[WorkItem], params: CRFParams) -> list[dict[str, Any]]:
    """Refine a chunk of images (the unit of work of a process or a Dask task)."""
    return [refine_file(item, params) for item in items]


def _start_method() -> str:
    """``fork`` where the platform has it, else ``spawn``: it spares each worker re-importing
    torch through ``pipeline.data`` (seconds per worker). See :func:`_worker_init` for the one
    torch call the workers make."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_init(parent_pid: int) -> None:
    """Pool initializer: end with the parent (:func:`pipeline.processes.die_with_parent`) and
    run torch on one thread. Workers upsample maps stored at feature resolution with torch
    (:func:`pipeline.maps_io.upsample`); in a child forked from a parent whose OpenMP pool has
    run (stages 1-2 in the same process), a multi-threaded torch op waits forever on the
    parent's threads, which do not exist in the child (seen on voc-mini: 330 maps of 14x14
    upsampled to 500x375). One thread per worker is also what a pool of per-core workers wants."""
    die_with_parent(parent_pid)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _chunks(items: Sequence[WorkItem], size: int) -> list[list[WorkItem]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------- Dask workers
def code_fingerprint() -> str:
    """Hash of this module's source and every project module it imports (the code part of the
    stage key): equal on two machines when they run the same stage-3 code (library versions,
    pydensecrf's included, are not covered)."""
    return code_version([__name__])


def worker_report(paths: Sequence[str]) -> dict[str, Any]:
    """Run *on* a Dask worker (``client.run``): which ``stages.refine_crf`` it imports, its
    :func:`code_fingerprint`, and which of ``paths`` it cannot see (directories must also be
    writable). Chunks are shipped by reference (module + function name), so a worker runs
    its own installed copy of the project and reads and writes the paths named here."""
    missing = [p for p in paths if not os.path.exists(p)
               or (os.path.isdir(p) and not os.access(p, os.W_OK | os.X_OK))]
    return {"module": __file__, "code": code_fingerprint(), "missing": missing}


def check_worker_reports(reports: Mapping[str, Any]) -> None:
    """Raise :class:`DaskWorkerError` naming the first worker whose report (or exception)
    shows it cannot run the chunks like this process."""
    if not reports:
        raise DaskWorkerError("the Dask cluster has no workers")
    here = code_fingerprint()
    for worker, report in sorted(reports.items()):
        if isinstance(report, BaseException):  # client.run wraps a worker's error in Exception
            detail = str(report) if type(report) is Exception else f"{type(report).__name__}: {report}"
            raise DaskWorkerError(
                f"Dask worker {worker} cannot run stage 3 ({detail}): "
                "install this project (`pip install -e .` of the same checkout) in the workers' "
                "environment") from None
        if report["code"] != here:
            raise DaskWorkerError(
                f"Dask worker {worker} runs other code for stage 3 ({report['module']}, fingerprint "
                f"{report['code'][:12]} vs {here[:12]} here): install the same version of the "
                "project on the workers")
        if report["missing"]:
            raise DaskWorkerError(
                f"Dask worker {worker} cannot see {', '.join(report['missing'])} (or cannot write "
                "there): the workers read the images and maps and write the pseudo-masks at the "
                "paths this process uses, so they need a shared file system mounted at the same path")


def check_workers(client: Any, item: WorkItem) -> None:
    """Before any chunk is submitted: every current worker of ``client`` imports the same
    stage-3 code as this process and sees ``item``'s input files and output directory."""
    paths = [item.image, item.maps, str(Path(item.output).parent)] + ([item.saliency] if item.saliency else [])
    try:
        reports = client.run(worker_report, paths, on_error="return")
    except Exception as err:  # e.g. a worker could not unpickle the function at all
        raise DaskWorkerError(f"the Dask workers cannot run stage 3 ({type(err).__name__}: {err}): "
                              "install this project (`pip install -e .` of the same checkout) in the "
                              "workers' environment") from None
    check_worker_reports(reports)


def refine_images(items: Sequence[WorkItem], params: CRFParams, workers: int = 1,
                  chunk_size: int = 16, client: Any = None,
                  progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Refine many images in chunks: serially (``workers == 1``), in a process pool
    (``workers > 1``; fork where available, else spawn; the workers die with this process,
    see :mod:`pipeline.processes`) or on a Dask ``client`` (``dask.distributed.Client``).
    Every image is independent and pydensecrf is deterministic, so the files are identical
    whichever way runs them. On Dask, :func:`check_workers` first makes sure each worker runs
    the same code and sees the files. Returns the per-image stats in ``items`` order; the first failing
    image raises (files already written stay, each written atomically)."""
    chunks = _chunks(list(items), chunk_size)
    results: dict[int, list[dict[str, Any]]] = {}
    done = 0

    def collect(index: int, stats: list[dict[str, Any]]) -> None:
        nonlocal done
        results[index] = stats
        done += len(stats)
        if progress:
            progress(done, len(items))

    if client is not None and chunks:
        from dask.distributed import as_completed
        check_workers(client, chunks[0][0])
        futures = client.map(refine_chunk, chunks, params=params, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for future, stats in as_completed(futures, with_results=True):
                collect(index[future.key], stats)
        finally:
            client.cancel(futures)
    elif workers > 1 and len(chunks) > 1:
        context = multiprocessing.get_context(_start_method())
        # workers end with this process, even when it is killed (kill -9 included)
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context,
                                    initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(refine_chunk, chunk, params): i for i, chunk in enumerate(chunks)}
            try:
                for future in cf.as_completed(futures):
                    collect(futures[future], future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    else:
        for i, chunk in enumerate(chunks):
            collect(i, refine_chunk(chunk, params))
    return [stats for i in range(len(chunks)) for stats in results[i]]


# --------------------------------------------------------------------------- pre-flight checks
def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header; a mode :func:`load_rgb` refuses outright raises here."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, (image.height, image.width)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise CRFInputError(f"image {path} is unreadable: {err}") from None
    if mode not in _CONVERTIBLE_MODES | _ALPHA_MODES | {"RGB"}:
        raise CRFInputError(f"image {path} has unsupported mode {mode!r} (expected RGB, grey, "
                            "palette, CMYK or an opaque alpha image)")
    return size


def check_inputs(items: Sequence[WorkItem], num_classes: int) -> None:
    """Cheap checks of every item before any CRF work: map file is a wsss map file with class
    ids in 1..num_classes-1 and the image's size, image mode usable, saliency map present.
    Non-finite values and transparent pixels are found when a file is read (the error names
    the file, and the class for maps)."""
    for item in items:
        classes, size = map_header(Path(item.maps))
        image_size = _image_size(Path(item.image))
        if size != image_size:
            raise CRFInputError(f"map file {item.maps} is {size[1]}x{size[0]} but image "
                                f"{item.image} is {image_size[1]}x{image_size[0]} (WxH)")
        bad = classes[(classes < 1) | (classes >= num_classes)]
        if bad.size:
            raise CRFInputError(f"map file {item.maps} holds class ids {bad.tolist()} outside "
                                f"1..{num_classes - 1}")
        if item.saliency and not Path(item.saliency).is_file():
            raise CRFInputError(f"saliency map {item.saliency} (image {item.id!r}) does not exist")


# --------------------------------------------------------------------------- the stage
def _write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "status", "foreground_fraction", "ignore_fraction"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _dask_client(address: str):
    from dask.distributed import Client
    return Client(address)


def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
        tracker: Tracker = NULL_TRACKER, client: Any = None) -> StageResult:
    """Refine stage 2's maps of every image of the maps split into ``<out_dir>/<id>.png``.

    Resumable: PNGs already in ``out_dir`` are kept and skipped. Writes ``pseudo_masks.csv``
    (per image: status, foreground and ignore fractions) and ``evaluation.json`` (mIoU vs the
    ground truth, 255 dropped and as background). ``client`` (or ``config.crf.dask_address``)
    runs the chunks on Dask instead of local processes."""
    from pipeline.data import build_dataset
    from pipeline.mask_eval import evaluate_masks, headline

    if "generate_cams" not in upstream:
        raise ValueError("refine_crf needs the result of generate_cams")
    maps_dir = Path(upstream["generate_cams"].path)
    if not maps_dir.is_dir():
        raise CRFInputError(f"map directory {maps_dir} (generate_cams output) does not exist")
    crf = config.crf
    params = resolve_params(crf)
    split = config.maps.split or config.data.train_split
    dataset = build_dataset(config.data, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out_dir)

    items, missing = [], []
    for image_id in dataset.ids:
        path = map_path(maps_dir, image_id)
        if not path.is_file():
            missing.append(image_id)
            continue
        saliency = str(Path(crf.saliency_dir) / f"{image_id}.png") if crf.saliency_dir else None
        items.append(WorkItem(image_id, str(dataset.image_path(image_id)), str(path),
                              str(out_dir / f"{image_id}.png"), saliency))
    if missing and not crf.skip_missing:
        shown = ", ".join(str(map_path(maps_dir, i)) for i in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CRFInputError(f"{len(missing)} image(s) of split {split!r} have no map file: {shown}"
                            f"{more} (set crf.skip_missing=true to skip them)")
    todo = [item for item in items if not Path(item.output).is_file()]
    check_inputs(todo, dataset.num_classes)
    tracker.log_params({f"crf.resolved.{k}": v for k, v in flatten(dataclasses.asdict(params)).items()})
    log.info("refine_crf: %d images (%d already done, %d without maps), preset %s",
             len(items), len(items) - len(todo), len(missing), crf.preset)

    reported = [0]

    def progress(done: int, total: int) -> None:  # about every 5 %, and at the end
        if done - reported[0] >= max(1, total // 20) or done == total:
            reported[0] = done
            log.info("refine_crf: %d/%d images refined", done, total)
            tracker.log_metrics({"images_refined": done}, step=done)

    own_client = _dask_client(crf.dask_address) if client is None and crf.dask_address else None
    try:
        new_stats = refine_images(todo, params, workers=crf.workers, chunk_size=crf.chunk_size,
                                  client=client or own_client, progress=progress)
    finally:
        if own_client is not None:
            own_client.close()
    new = {s["id"]: s for s in new_stats}

    rows = []
    for item in items:
        if item.id in new:
            rows.append({"id": item.id, "status": "refined", **{k: v for k, v in new[item.id].items() if k != "id"}})
        else:
            rows.append({"id": item.id, "status": "resumed", **mask_stats(read_label_png(Path(item.output)))})
    rows += [{"id": i, "status": "missing_map", "foreground_fraction": "", "ignore_fraction": ""}
             for i in missing]
    _write_manifest(out_dir / MANIFEST_CSV, rows)

    evaluation = evaluate_masks(out_dir, dataset, ids=[item.id for item in items])
    evaluation["split"] = split
    evaluation["skipped_missing_maps"] = len(missing)
    atomic_write_json(out_dir / EVALUATION_JSON, evaluation)
    done_rows = [r for r in rows if r["status"] != "missing_map"]
    metrics = {
        "miou": evaluation["miou"],
        "miou_ignore_as_background": evaluation["miou_ignore_as_background"],
        "labelled_fraction": evaluation["labelled_fraction"],
        "foreground_fraction": float(np.mean([r["foreground_fraction"] for r in done_rows])) if done_rows else 0.0,
        "ignore_fraction": float(np.mean([r["ignore_fraction"] for r in done_rows])) if done_rows else 0.0,
        "images": len(items),
        "refined": len(new),
        "resumed": len(items) - len(new),
        "skipped_missing": len(missing),
    }
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)})
    metrics["headline"] = headline(evaluation) + (f"; {len(missing)} image(s) skipped (no map)" if missing else "")
    return StageResult(stage=NAME, key=out_dir.name, path=str(out_dir), metrics=metrics,
                       files={"manifest": MANIFEST_CSV, "evaluation": EVALUATION_JSON})
