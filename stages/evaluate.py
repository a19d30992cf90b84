"""Stage 5: one call scores the three products of the pipeline.

1. the localization maps of stage 2 (``pipeline.map_eval.evaluate_maps``),
2. the pseudo-masks of stage 3 (``pipeline.mask_eval.evaluate_masks``),
3. every segmentor of stage 4 on ``evaluation.split`` (default ``data.val_split``).

Segmentor inference (test-time augmentation as in mmsegmentation): for each scale ``s`` in
``evaluation.scales`` the image is resized bilinearly to ``round(s·H) x round(s·W)``; for each
of the (optionally) flipped copies the logits are computed on the whole image
(``mode="whole"``) or by a sliding window (``mode="slide"``: ``crop_size`` windows every
``stride`` pixels, the last window of a row/column aligned to the border, logits of
overlapping windows averaged), un-flipped, resized back to ``H x W`` and turned into
probabilities. The prediction is the argmax of their mean::

    P(x) = 1/|S||F| Σ_{s∈S} Σ_{f∈F} f⁻¹( resize_{H×W}( softmax( g(f(resize_s(x))) ) ) )

With ``evaluation.crf`` the mean probability map is refined by stage 3's dense CRF
(``stages.refine_crf.crf_posterior`` with the parameters of ``config.crf``: unary
``-log max(p, 1e-5)``, the preset's Gaussian and bilateral terms) before the argmax.

Scores follow the VOC protocol: one confusion matrix over the whole split (rows = ground
truth, columns = prediction), ground-truth 255 ignored, IoU per class, mIoU = mean over the
classes that occur. Segmentors never predict 255. Outputs in ``out_dir``: ``metrics.json``
(scores, conventions, confusion matrices), ``per_class_iou.csv`` / ``.md`` (one column per
scored product), and per segmentor ``<model>/confusion_matrix.json`` / ``.png``,
``<model>/predictions/<id>.png`` (palette PNGs), ``<model>/previews/<id>.png`` (image |
prediction overlay | ground-truth overlay, first ``evaluation.previews`` images of the split)
and ``<model>/pipeline_previews/<id>.png``: the whole chain on the first
``evaluation.previews`` images that stages 2 and 3 covered (image | localization map |
pseudo-mask | prediction | ground truth). Predictions already on disk are read back instead of
recomputed and finished pipeline previews are kept, so an interrupted evaluation resumes.

Without ground-truth masks (a ``folder`` dataset without ``masks/``, per split) nothing can be
scored in IoU; the stage then reports what it can and says the masks are absent
(``metrics.json`` ``masks``): the classifier's image-level label agreement on the segmentor
split (:mod:`pipeline.label_eval`, checkpoint of stage 2), the pseudo-masks' coverage
(labelled and foreground pixel shares), and per segmentor the agreement of the classes its
predictions cover with the given labels; predictions and previews (without a ground-truth
panel) are written as usual, ``label_agreement.csv`` / ``.md`` replace the IoU tables.
"""

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from models.segmentors import resize_to
from pipeline import runtime
from pipeline.config import EvaluationConfig, PipelineConfig
from pipeline.data import build_dataset
from pipeline.data.palette import read_label_png, save_label_png, voc_palette
from pipeline.data.transforms import normalize
from pipeline.label_eval import label_agreement, labels_from_prediction
from pipeline.map_eval import evaluate_maps
from pipeline.maps_io import ImageMaps, load_maps, map_path
from pipeline.mask_eval import evaluate_masks
from pipeline.metrics import IGNORE_INDEX, ConfusionMatrix
from pipeline.storage import StageResult, atomic_path, atomic_write_json, atomic_write_text
from pipeline.tracking import NULL_TRACKER, Tracker
from stages.refine_crf import crf_posterior, resolve_params
from stages.train_segmentor import MODEL_FILE, load_trained

NAME = "evaluate"


# --------------------------------------------------------------------------- inference
def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis: every ``stride``, the last one flush with the border."""
    if length <= crop:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def slide_logits(model, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits of ``x`` (N,3,H,W) by ``crop x crop`` windows every ``stride`` pixels.

    Windows are clipped to the image (smaller images give one window of the image size);
    where windows overlap, their logits are averaged.
    """
    if stride > crop:
        raise ValueError(f"evaluation.stride ({stride}) must not exceed evaluation.crop_size ({crop})")
    _, _, h, w = x.shape
    total = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    for y0 in _window_starts(h, crop, stride):
        for x0 in _window_starts(w, crop, stride):
            y1, x1 = min(y0 + crop, h), min(x0 + crop, w)
            window = x[:, :, y0:y1, x0:x1]
            logits = resize_to(model(window)["out"].float(), window.shape[-2:])
            if total is None:
                total = torch.zeros(x.shape[0], logits.shape[1], h, w, device=x.device)
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    return total / count


def whole_logits(model, x: torch.Tensor) -> torch.Tensor:
    return resize_to(model(x)["out"].float(), x.shape[-2:])


@torch.no_grad()
def predict_probs(model, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                  mode: str = "whole", crop_size: int = 512, stride: int = 341) -> torch.Tensor:
    """Mean class probabilities (N, C, H, W) over scales and flips (module docstring)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"evaluation.mode must be 'whole' or 'slide', got {mode!r}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"evaluation.scales must be positive, got {list(scales)}")
    h, w = x.shape[-2:]
    total, n = None, 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = xs.flip(-1) if flipped else xs
            logits = whole_logits(model, xi) if mode == "whole" else slide_logits(model, xi, crop_size, stride)
            if flipped:
                logits = logits.flip(-1)
            probs = F.softmax(resize_to(logits, (h, w)), dim=1)
            total = probs if total is None else total + probs
            n += 1
    return total / n


def predict_image(model, image: np.ndarray, cfg: EvaluationConfig, device: torch.device,
                  crf_params=None) -> np.ndarray:
    """Label map (H, W) uint8 of one RGB uint8 image under the evaluation settings;
    ``crf_params`` (stage 3's :class:`~stages.refine_crf.CRFParams`) refines the mean
    probabilities with the dense CRF before the argmax."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))[None].to(device)
    with runtime.autocast(device, True):
        probs = predict_probs(model, x, cfg.scales, cfg.flip, cfg.mode, cfg.crop_size, cfg.stride)
    probs = probs[0].float().cpu().numpy()
    if crf_params is not None:
        probs = crf_posterior(image, probs, crf_params)
    return probs.argmax(0).astype(np.uint8)


# --------------------------------------------------------------------------- pictures
def colourise(mask: np.ndarray) -> np.ndarray:
    """VOC palette colours (H, W, 3) of a label map."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6, void: bool = False) -> np.ndarray:
    """The image with the mask's colours blended in. Background is left as the image, and so
    is 255 unless ``void`` (then it gets the palette's void colour, for pseudo-masks whose
    unlabelled pixels are worth seeing)."""
    colours = colourise(mask).astype(np.float32)
    keep = (mask == 0) if void else ((mask == 0) | (mask == IGNORE_INDEX))
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where(keep[..., None], image, blended).round().clip(0, 255).astype(np.uint8)


def map_overlay(image: np.ndarray, maps: ImageMaps, alpha: float = 0.8) -> np.ndarray:
    """Localization maps drawn on the image: each pixel is tinted with the palette colour of
    its strongest class map ``c* = argmax_c M_c(x)``, in proportion to that map's value
    ``m(x) = max_c M_c(x)`` in [0, 1]::

        out(x) = (1 - alpha * m(x)) * image(x) + alpha * m(x) * colour(c*(x))
    """
    if maps.maps.shape[-2:] != image.shape[:2]:
        raise ValueError(f"localization maps of size {maps.maps.shape[-2:]} do not fit the image "
                         f"{image.shape[:2]}")
    if len(maps.classes) == 0:
        return image.copy()
    strongest = maps.maps.argmax(0)
    weight = alpha * np.clip(maps.maps.max(0), 0.0, 1.0)[..., None]
    colours = colourise(maps.classes[strongest]).astype(np.float32)
    blended = (1 - weight) * image.astype(np.float32) + weight * colours
    return blended.round().clip(0, 255).astype(np.uint8)


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Equal-height RGB panels left to right with 4-px white gaps."""
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return np.concatenate(row, axis=1)


def preview_grid(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """``image | prediction overlay | ground-truth overlay`` (no last panel without ``gt``)."""
    return side_by_side([image, overlay(image, pred)] + ([overlay(image, gt)] if gt is not None else []))


def pipeline_preview(image: np.ndarray, maps: ImageMaps, pseudo_mask: np.ndarray, pred: np.ndarray,
                     gt: np.ndarray | None) -> np.ndarray:
    """``image | localization map | pseudo-mask (void shown) | prediction | ground truth``
    (no last panel without ``gt``)."""
    return side_by_side([image, map_overlay(image, maps), overlay(image, pseudo_mask, void=True),
                         overlay(image, pred)] + ([overlay(image, gt)] if gt is not None else []))


def save_rgb_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format="PNG")


def confusion_image(matrix: np.ndarray, class_names: Sequence[str], cell: int = 24) -> np.ndarray:
    """Row-normalised confusion matrix as a heat map (white 0 -> dark blue 1), class indices
    on both axes (rows = ground truth, columns = prediction)."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    c = len(class_names)
    margin = 28
    canvas = Image.new("RGB", (margin + c * cell, margin + c * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(c):
        draw.text((margin + i * cell + 4, 8), str(i), fill="black")
        draw.text((4, margin + i * cell + 6), str(i), fill="black")
        for j in range(c):
            v = norm[i, j]
            colour = tuple(int(round(255 - v * (255 - t))) for t in (8, 48, 107))
            box = [margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1]
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
    return np.asarray(canvas)


# --------------------------------------------------------------------------- tables
def _per_class(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """Per-class IoU of a score dict (``evaluate_masks`` nests it under ``ignore_dropped``)."""
    if "per_class_iou" in summary:
        return summary["per_class_iou"]
    return summary.get("ignore_dropped", {}).get("per_class_iou", {})


def per_class_metrics(summary: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{prefix + class name: IoU}`` for the classes that have an IoU, for the tracker (so the
    MLflow compare view lines up per-class IoU across runs and segmentors)."""
    return {f"{prefix}{name}": float(v) for name, v in _per_class(summary).items() if v is not None}


def per_class_rows(class_names: Sequence[str], scores: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Header + one row per class + an mIoU row; one column per scored product."""
    header = ["class"] + list(scores)
    rows = [header]
    for name in class_names:
        row = [name]
        for summary in scores.values():
            value = _per_class(summary).get(name)
            row.append("" if value is None else f"{100 * value:.2f}")
        rows.append(row)
    rows.append(["mIoU"] + [f"{100 * s['miou']:.2f}" if s.get("miou") is not None else "" for s in scores.values()])
    return rows


def write_tables(out_dir: Path, rows: list[list[str]], stem: str = "per_class_iou",
                 title: str = "IoU (%) per class") -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    atomic_write_text(out_dir / f"{stem}.csv", buffer.getvalue())
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    atomic_write_text(out_dir / f"{stem}.md", f"{title}\n\n" + "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- one segmentor
def evaluate_segmentor(model_path: Path, dataset, cfg: EvaluationConfig, out_dir: Path,
                       device: torch.device, crf_params=None, model=None) -> dict[str, Any]:
    """Score one trained segmentor on ``dataset`` (its ground-truth masks); writes
    predictions, previews and the confusion matrix into ``out_dir``. ``model``: the segmentor
    already loaded from ``model_path`` (loaded here when not given). A dataset without masks
    gets its predictions and previews and, instead of IoU, the image-level label agreement of
    the predicted classes (``miou`` None)."""
    if model is None:
        model, _ = load_trained(model_path, num_classes=dataset.num_classes, device=device)
    if not dataset.has_masks:
        return _segmentor_without_masks(model, model_path, dataset, cfg, out_dir, device, crf_params)
    cm = ConfusionMatrix(dataset.num_classes)
    all_background = ConfusionMatrix(dataset.num_classes)
    pred_dir, preview_dir = out_dir / "predictions", out_dir / "previews"
    for index, image_id in enumerate(dataset.ids):
        gt = dataset.load_mask(image_id)
        pred_path = pred_dir / f"{image_id}.png"
        image = None
        if pred_path.is_file():
            pred = read_label_png(pred_path)
        else:
            image = dataset.load_image(image_id)
            pred = predict_image(model, image, cfg, device, crf_params)
            save_label_png(pred_path, pred)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred_path} has shape {pred.shape}, ground truth of "
                             f"{image_id} {gt.shape}")
        cm.update(pred, gt)
        all_background.update(np.zeros_like(gt), gt)
        if index < cfg.previews:
            image = dataset.load_image(image_id) if image is None else image
            save_rgb_png(preview_dir / f"{image_id}.png", preview_grid(image, pred, gt))
    summary = cm.summary(dataset.class_names)
    atomic_write_json(out_dir / "confusion_matrix.json", {
        "classes": list(dataset.class_names), "rows": "ground truth", "columns": "prediction",
        "matrix": summary["confusion_matrix"]})
    save_rgb_png(out_dir / "confusion_matrix.png", confusion_image(cm.matrix.numpy(), dataset.class_names))
    summary["images"] = len(dataset.ids)
    summary["all_background_miou"] = all_background.miou()
    summary["checkpoint"] = str(model_path)
    return summary


def _segmentor_without_masks(model, model_path: Path, dataset, cfg: EvaluationConfig, out_dir: Path,
                             device: torch.device, crf_params=None) -> dict[str, Any]:
    """:func:`evaluate_segmentor` for a dataset without masks."""
    pred_dir, preview_dir = out_dir / "predictions", out_dir / "previews"
    predicted = np.zeros((len(dataset.ids), dataset.num_classes - 1), bool)
    for index, image_id in enumerate(dataset.ids):
        pred_path = pred_dir / f"{image_id}.png"
        image = None
        if pred_path.is_file():
            pred = read_label_png(pred_path)
        else:
            image = dataset.load_image(image_id)
            pred = predict_image(model, image, cfg, device, crf_params)
            save_label_png(pred_path, pred)
        predicted[index] = labels_from_prediction(pred, dataset.num_classes)
        if index < cfg.previews:
            image = dataset.load_image(image_id) if image is None else image
            save_rgb_png(preview_dir / f"{image_id}.png", preview_grid(image, pred, None))
    return {"miou": None, "pixel_accuracy": None, "masks": False, "images": len(dataset.ids),
            "checkpoint": str(model_path),
            "label_agreement": label_agreement(predicted, dataset.label_matrix(), dataset.class_names)}


@torch.no_grad()
def classifier_agreement(checkpoint: Path, dataset, device: torch.device) -> dict[str, Any]:
    """Image-level label agreement of stage 1's classifier (the checkpoint stage 2 used) on
    ``dataset``: ``sigmoid(mean_xy CAM(x)) > 0.5`` (its training score) on the image squashed
    to the training size, against the given labels."""
    from stages.generate_cams import network_input
    from stages.train_classifier import load_classifier

    model, meta = load_classifier(Path(checkpoint), num_classes=dataset.num_classes - 1,
                                  map_location=device)
    model.to(device).eval()
    predicted = np.zeros((len(dataset.ids), dataset.num_classes - 1), bool)
    for index, image_id in enumerate(dataset.ids):
        x = network_input(dataset.load_image(image_id), meta.get("image_size")).to(device)
        scores = model.cam(model.features(x)).mean((2, 3))[0]
        predicted[index] = (torch.sigmoid(scores) > 0.5).cpu().numpy()
    return label_agreement(predicted, dataset.label_matrix(), dataset.class_names)


def agreement_rows(class_names: Sequence[str], scores: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Header + per-class F1 rows + micro F1 / exact-match rows of label-agreement scores."""
    def pct(value):
        return "" if value is None else f"{100 * value:.2f}"
    rows = [["class"] + list(scores)]
    rows += [[name] + [pct(s["per_class_f1"].get(name)) for s in scores.values()] for name in class_names[1:]]
    rows.append(["F1 (micro)"] + [pct(s["f1"]) for s in scores.values()])
    rows.append(["exact match"] + [pct(s["exact_match"]) for s in scores.values()])
    return rows


def log_previews(tracker: Tracker, model_dir: Path, step: int) -> None:
    """Every preview grid of a segmentor as a tracked image keyed ``<kind>/<image id>`` at
    ``step`` (its training iterations): MLflow's image grid then lines runs up by image."""
    for kind in ("previews", "pipeline_previews"):
        for path in sorted((Path(model_dir) / kind).glob("*.png")):
            tracker.log_image(path, f"{kind}/{path.stem}", step)


def write_pipeline_previews(model_path: Path, dataset, maps_dir: Path, masks_dir: Path,
                            cfg: EvaluationConfig, out_dir: Path, device: torch.device,
                            crf_params=None, model=None) -> list[str]:
    """``<out_dir>/pipeline_previews/<id>.png`` (:func:`pipeline_preview`) for the first
    ``cfg.previews`` images of ``dataset`` (the split stages 2 and 3 covered) that have both a
    localization map in ``maps_dir`` and a pseudo-mask in ``masks_dir``; the prediction is
    made as in the evaluation. Previews already on disk are kept. ``model``: the segmentor
    already loaded from ``model_path`` (loaded here, only if a preview is due, when not
    given). Returns the image ids."""
    preview_dir = Path(out_dir) / "pipeline_previews"
    inputs: dict[str, tuple[Path, Path]] = {}  # image id -> (map file, pseudo-mask file)
    for image_id in dataset.ids:
        if len(inputs) >= cfg.previews:
            break
        files = (map_path(maps_dir, image_id), Path(masks_dir) / f"{image_id}.png")
        if all(f.is_file() for f in files):
            inputs[image_id] = files
    todo = [i for i in inputs if not (preview_dir / f"{i}.png").is_file()]
    if todo and model is None:
        model, _ = load_trained(model_path, num_classes=dataset.num_classes, device=device)
    for image_id in todo:
        map_file, mask_file = inputs[image_id]
        maps, pseudo_mask = load_maps(map_file), read_label_png(mask_file)
        image = dataset.load_image(image_id)
        gt = dataset.load_mask(image_id) if dataset.has_masks else None
        for path, size in ((map_file, maps.size), (mask_file, pseudo_mask.shape)):
            if tuple(size) != image.shape[:2]:
                raise ValueError(f"{path} has size {tuple(size)}, image {image_id} {image.shape[:2]}")
        pred = predict_image(model, image, cfg, device, crf_params)
        save_rgb_png(preview_dir / f"{image_id}.png", pipeline_preview(image, maps, pseudo_mask, pred, gt))
    return list(inputs)


# --------------------------------------------------------------------------- the stage
def scored_train_split(config: PipelineConfig) -> str:
    """Split the maps and pseudo-masks are scored on (a subset of the split they cover)."""
    return config.evaluation.train_split or config.maps.split or config.data.train_split


def conventions(config: PipelineConfig, split: str) -> dict[str, Any]:
    ev = config.evaluation
    return {
        "segmentor_split": split,
        "maps_split": scored_train_split(config),
        "pseudo_mask_split": scored_train_split(config),
        "maps_background": ("fixed threshold %.2f" % ev.map_threshold if ev.map_threshold is not None
                            else "best of a threshold sweep"),
        "ground_truth_255": "ignored (pixels left out of every confusion matrix)",
        "predicted_255": ("pseudo-masks: pseudo_mask_miou drops them (quality of what is labelled); "
                          "scores.pseudo_masks.miou_ignore_as_background counts them as background and "
                          "labelled_fraction says how much is labelled; segmentors never predict 255"),
        "chance": "each segmentor's all_background_miou = mIoU of labelling every pixel background",
        "segmentor_inference": (f"{'multi-scale ' + str(ev.scales) if len(ev.scales) > 1 else 'single-scale'}"
                                f"{' + flip' if ev.flip else ''}, {ev.mode}"
                                + (f" (crop {ev.crop_size}, stride {ev.stride})" if ev.mode == "slide" else "")),
        "crf": bool(ev.crf),
        "initialisation": ("ImageNet" if config.segmentor.pretrained else "random") + f" {config.segmentor.backbone}",
        "miou": "mean IoU over the classes present in ground truth or prediction, one matrix per split",
    }


def headline(scores: Mapping[str, Any], agreement: Mapping[str, Any], models: Sequence[str],
             split: str, absent: Sequence[str]) -> str:
    """One line: mIoU of maps, pseudo-masks and segmentors; where masks are absent, the label
    F1 and the pseudo-masks' coverage instead, and that the masks are absent."""
    def part(name: str, miou) -> str:
        if miou is not None:
            return f"{name} {100 * miou:.1f} mIoU"
        f1 = agreement.get(name, {}).get("f1")
        return f"{name} label F1 {100 * f1:.1f}" if f1 is not None else f"{name} not scored"
    pseudo = scores["pseudo_masks"]
    pieces = [f"maps {100 * scores['maps']['miou']:.1f} mIoU" if scores["maps"]["miou"] is not None
              else part("classifier", None),
              f"pseudo-masks {100 * pseudo['miou']:.1f} mIoU" if pseudo["miou"] is not None
              else f"pseudo-masks label {100 * pseudo['labelled_fraction']:.1f}% of pixels"]
    line = " | ".join(pieces) + " | " + ", ".join(part(n, scores[n]["miou"]) for n in models) + f" ({split})"
    if not absent:
        return line.replace(" mIoU", "").replace(f" ({split})", f" mIoU ({split})")
    return line + f"; no ground-truth masks ({', '.join(absent)})"


def register_models(config: PipelineConfig, trained: StageResult, models: Sequence[str],
                    metrics: Mapping[str, Any], tracker: Tracker) -> dict[str, str]:
    """A registry version ``wsss-<preset>-<model>`` of each segmentor stage 4 logged as a model
    (``<model>_model_uri``), tagged with this run's headline metrics; returns name -> URI."""
    from pipeline.model_registry import registered_name

    headline = {k: v for k, v in metrics.items() if isinstance(v, (str, float, int)) and not isinstance(v, bool)}
    done = {}
    for name in models:
        uri = trained.metrics.get(f"{name}_model_uri")
        if uri:
            tags = {**headline, "segmentor_miou": metrics.get(f"{name}_miou"), "preset": config.name,
                    "stage4_key": trained.key}
            registered = tracker.register_model(uri, registered_name(config.name, name), tags)
            if registered:
                done[name] = registered
    return done


def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
        tracker: Tracker = NULL_TRACKER) -> StageResult:
    ev = config.evaluation
    missing = [s for s in ("generate_cams", "refine_crf", "train_segmentor") if s not in upstream]
    if missing:
        raise ValueError(f"evaluate needs the outputs of {', '.join(missing)}")
    if ev.mode == "slide" and ev.stride > ev.crop_size:
        raise ValueError(f"evaluation.stride ({ev.stride}) must not exceed evaluation.crop_size ({ev.crop_size})")
    out_dir = Path(out_dir)
    split = ev.split or config.data.val_split
    device = runtime.select_device(config.device)
    seg_dir = Path(upstream["train_segmentor"].path)
    models = sorted(p.parent.name for p in seg_dir.glob(f"*/{MODEL_FILE}"))
    if not models:
        raise FileNotFoundError(f"no trained segmentor ({MODEL_FILE}) under {seg_dir}")
    dataset = build_dataset(config.data, split)
    # class-count mismatches fail before any image is scored
    for name in models:
        state = runtime.load_checkpoint(seg_dir / name / MODEL_FILE)
        if state.get("num_classes") != dataset.num_classes:
            raise ValueError(f"checkpoint {seg_dir / name / MODEL_FILE} has {state.get('num_classes')} "
                             f"classes but the configured dataset has {dataset.num_classes}")

    scores: dict[str, dict[str, Any]] = {}
    map_split = scored_train_split(config)
    map_dataset = build_dataset(config.data, map_split)
    thresholds = [ev.map_threshold] if ev.map_threshold is not None else config.maps.background_thresholds
    maps = evaluate_maps(Path(upstream["generate_cams"].path), map_dataset, thresholds, missing="skip")
    scores["maps"] = {"miou": maps["maps"]["best_miou"], "per_class_iou": maps["maps"]["per_class_iou"],
                      "background_threshold": maps["maps"]["best_threshold"], "split": map_split,
                      "details": maps}
    masks = evaluate_masks(Path(upstream["refine_crf"].path), map_dataset, missing="skip")
    scores["pseudo_masks"] = {**masks, "split": map_split}
    absent = [d.name for d in dict.fromkeys((dataset, map_dataset)) if not d.has_masks]
    agreement: dict[str, dict[str, Any]] = {}
    if absent:
        checkpoint = upstream["generate_cams"].files.get("checkpoint")
        if checkpoint:
            agreement["classifier"] = {**classifier_agreement(Path(checkpoint), dataset, device),
                                       "split": split}
    crf_params = resolve_params(config.crf) if ev.crf else None
    for name in models:
        model_path = seg_dir / name / MODEL_FILE
        model, _ = load_trained(model_path, num_classes=dataset.num_classes, device=device)  # once for both
        scores[name] = evaluate_segmentor(model_path, dataset, ev, out_dir / name, device, crf_params, model)
        scores[name]["split"] = split
        if "label_agreement" in scores[name]:
            agreement[name] = {**scores[name]["label_agreement"], "split": split}
        write_pipeline_previews(model_path, map_dataset, Path(upstream["generate_cams"].path),
                                Path(upstream["refine_crf"].path), ev, out_dir / name, device, crf_params,
                                model)
        del model
        child = tracker.child(name)
        log_previews(child, out_dir / name, step=config.segmentor.iterations)
        if scores[name]["miou"] is not None:
            child.log_metrics({"miou": scores[name]["miou"], "pixel_accuracy": scores[name]["pixel_accuracy"],
                               **per_class_metrics(scores[name], "iou/")})
            child.log_artifact(out_dir / name / "confusion_matrix.png")
        else:
            child.log_metrics({f"label_{k}": v for k, v in agreement[name].items()
                               if k in ("f1", "precision", "recall", "exact_match") and v is not None})

    if dataset.has_masks:
        write_tables(out_dir, per_class_rows(dataset.class_names, scores))
    if agreement:
        write_tables(out_dir, agreement_rows(dataset.class_names, agreement), stem="label_agreement",
                     title="Image-level label F1 (%) per class (no ground-truth masks)")
    atomic_write_json(out_dir / "metrics.json", {
        "conventions": conventions(config, split), "scores": scores,
        "masks": {"absent": absent, "note": (f"no ground-truth masks for {', '.join(absent)}: "
                                             "IoU not computed there; see label_agreement and "
                                             "the pseudo-masks' coverage") if absent else ""},
        "label_agreement": agreement})
    metrics: dict[str, Any] = {"maps_miou": scores["maps"]["miou"],
                               "pseudo_mask_miou": scores["pseudo_masks"]["miou"]}
    metrics["pseudo_mask_miou_ignore_as_background"] = scores["pseudo_masks"]["miou_ignore_as_background"]
    metrics.update({f"{name}_miou": scores[name]["miou"] for name in models})
    metrics.update({f"{name}_label_f1": a["f1"] for name, a in agreement.items()})
    if absent:
        metrics["pseudo_mask_labelled_fraction"] = scores["pseudo_masks"]["labelled_fraction"]
        metrics["masks_absent"] = ", ".join(absent)
    metrics["headline"] = headline(scores, agreement, models, split, absent)
    tracker.log_metrics({**{k: v for k, v in metrics.items() if isinstance(v, float)},
                         **per_class_metrics(scores["maps"], "maps_iou/"),
                         **per_class_metrics(scores["pseudo_masks"], "pseudo_mask_iou/")})
    for name, uri in register_models(config, upstream["train_segmentor"], models, metrics, tracker).items():
        metrics[f"{name}_registered_model"] = uri
    for name in ("metrics.json", "per_class_iou.md", "label_agreement.md"):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    files = {"metrics": "metrics.json"}
    if dataset.has_masks:
        files.update({"table_csv": "per_class_iou.csv", "table_md": "per_class_iou.md"})
        files.update({f"{n}_confusion": f"{n}/confusion_matrix.png" for n in models})
    if agreement:
        files.update({"agreement_csv": "label_agreement.csv", "agreement_md": "label_agreement.md"})
    files.update({f"{n}_previews": f"{n}/previews" for n in models if ev.previews})
    files.update({f"{n}_pipeline_previews": f"{n}/pipeline_previews" for n in models
                  if (out_dir / n / "pipeline_previews").is_dir()})
    return StageResult(stage=NAME, key="", path=str(out_dir), metrics=metrics, files=files)
