"""``wsss predict``: apply a trained segmentor to new photos (not a pipeline stage).

The model (``--model M``) is one of

* a segmentor checkpoint file (stage 4's ``<model>/model.pt``);
* a directory: a model directory holding ``model.pt``, a ``train_segmentor`` stage output
  (``<model>/model.pt`` per segmentor; ``--segmentor`` picks one when there are several) or a
  work directory (its newest complete ``train_segmentor`` output);
* an MLflow run id (32 hex digits: the run's logged ``model``), ``runs:/<id>/<path>`` or
  ``models:/<name>/<version>`` (the model registry, see :mod:`pipeline.model_registry`).

Inputs are image files and directories (searched recursively for
:data:`IMAGE_SUFFIXES`). Each image is read with its EXIF orientation applied
(``PIL.ImageOps.exif_transpose``) and converted to RGB whatever its mode: grey, palette,
CMYK, 16-bit / float (scaled by its maximum when that exceeds 255) and alpha images (composited
onto white). Predictions follow stage 5 exactly (:func:`stages.evaluate.predict_probs`: the
same normalisation, scales, flips, whole / slide mode, optional dense CRF of stage 3,
:func:`stages.refine_crf.crf_posterior`), in batches of consecutive images of equal size.

Outputs under ``--out``: ``<name>.png`` (palette PNG, VOC colours, values = class indices)
where ``<name>`` is the path relative to the input directory (or the file's stem for a file
argument) without its extension, and with ``--overlay`` ``<name>.overlay.jpg`` (the prediction
blended on the photo, a legend of the classes present below it). Files are written atomically;
an image whose outputs exist is skipped, so a rerun only does what is missing. A file that
cannot be read is reported on stderr and skipped; the others are still processed.
"""

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from pipeline import runtime
from pipeline.data.palette import save_label_png, voc_palette
from pipeline.data.transforms import normalize
from pipeline.errors import InputError
from pipeline.storage import atomic_path, is_complete
from stages.evaluate import overlay, predict_probs
from stages.refine_crf import crf_posterior
from stages.train_segmentor import MODEL_FILE, load_trained

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
META_FILE = "wsss_model.json"      # class names etc. beside an MLflow-logged model


class ModelSpecError(InputError):
    """``--model`` names nothing loadable; the message says what was looked for."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    class_names: list[str]
    source: str
    model_name: str = ""


@dataclass
class InferenceSettings:
    """Test-time settings, as ``evaluation.*`` of the config (same defaults)."""

    scales: Sequence[float] = (1.0,)
    flip: bool = False
    mode: str = "whole"
    crop_size: int = 512
    stride: int = 341
    crf_params: object = None          # stages.refine_crf CRFParams, or None
    amp: bool = True


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- the model
def _from_checkpoint(path: Path, device) -> LoadedModel:
    model, state = load_trained(path, device=device)
    names = list(state.get("class_names") or [f"class_{c}" for c in range(state["num_classes"])])
    return LoadedModel(model, names, str(path), state.get("model_name", ""))


def _from_mlflow(uri: str, device, tracking_uri: str | None) -> LoadedModel:
    import tempfile

    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as err:   # mlflow raises its own exception types for unknown models/runs
            raise ModelSpecError(f"--model {uri}: cannot fetch it from MLflow "
                                 f"({mlflow.get_tracking_uri()}): {err}") from None
        model = mlflow.pytorch.load_model(str(local), map_location=device)
        meta_path = next(iter(local.rglob(META_FILE)), None)
        meta = json.loads(meta_path.read_text()) if meta_path else {}
    names = list(meta.get("class_names") or [])
    if not names:
        raise ModelSpecError(f"--model {uri}: no {META_FILE} with the class names beside the model")
    return LoadedModel(model.to(device).eval(), names, uri, meta.get("model_name", ""))


def _newest_segmentor_output(workdir: Path) -> Path | None:
    outputs = [d for d in (workdir / "train_segmentor").glob("*") if d.is_dir() and is_complete(d)]
    return max(outputs, key=lambda d: d.stat().st_mtime) if outputs else None


def checkpoint_in(directory: Path, segmentor: str | None = None) -> Path:
    """The ``model.pt`` a directory stands for (module docstring)."""
    if (directory / MODEL_FILE).is_file():
        return directory / MODEL_FILE
    stage_out = directory
    if not list(directory.glob(f"*/{MODEL_FILE}")):
        stage_out = _newest_segmentor_output(directory)
        if stage_out is None:
            raise ModelSpecError(f"--model {directory}: no {MODEL_FILE}, no <model>/{MODEL_FILE} and no "
                                 f"complete train_segmentor/<key>/ output in it")
    found = {p.parent.name: p for p in sorted(stage_out.glob(f"*/{MODEL_FILE}"))}
    if segmentor is not None:
        if segmentor not in found:
            raise ModelSpecError(f"--segmentor {segmentor}: {stage_out} holds {', '.join(found)}")
        return found[segmentor]
    if len(found) > 1:
        raise ModelSpecError(f"--model {directory}: {stage_out} holds several segmentors "
                             f"({', '.join(found)}); pick one with --segmentor")
    return next(iter(found.values()))


def load_model(spec: str, device, segmentor: str | None = None,
               tracking_uri: str | None = None) -> LoadedModel:
    """The segmentor ``--model`` names, in eval mode on ``device``."""
    if spec.startswith(("models:/", "runs:/")):
        return _from_mlflow(spec, device, tracking_uri)
    path = Path(spec)
    if path.is_file():
        return _from_checkpoint(path, device)
    if path.is_dir():
        return _from_checkpoint(checkpoint_in(path, segmentor), device)
    if RUN_ID.match(spec):
        return _from_mlflow(f"runs:/{spec}/model", device, tracking_uri)
    raise ModelSpecError(f"--model {spec}: not a file, a directory, an MLflow run id or a "
                         f"models:/<name>/<version> URI")


# --------------------------------------------------------------------------- the images
def collect_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """(file, output name) per image: directories recursively (names relative to them),
    files by stem. Missing paths raise; names are unique (later duplicates get ``-2`` ...)."""
    pairs: list[tuple[Path, str]] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    pairs.append((f, f.relative_to(path).with_suffix("").as_posix()))
        elif path.is_file():
            pairs.append((path, path.stem))
        else:
            raise InputError(f"--input {path} does not exist")
    seen: dict[str, int] = {}
    unique = []
    for f, name in pairs:
        seen[name] = seen.get(name, 0) + 1
        unique.append((f, name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return unique


def load_photo(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of any image file, EXIF orientation applied (module docstring)."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise InputError(f"image {path} is unreadable or truncated: {err}") from None
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max(initial=0))
        values = values * (255.0 / peak) if peak > 255 else values
        return np.repeat(np.clip(values, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------- pictures
def legend_overlay(image: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """The prediction blended on the image, with a strip below naming each class present
    (background included) beside its palette colour."""
    blended = Image.fromarray(overlay(image, pred))
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    present = [int(c) for c in np.unique(pred)]
    entries = [(tuple(int(v) for v in palette[c]),
                class_names[c] if c < len(class_names) else str(c)) for c in present]
    width = max(blended.width, 160)
    draw_probe = ImageDraw.Draw(blended)
    sizes = [int(draw_probe.textlength(name)) + 22 for _, name in entries]
    rows, x = 1, 4
    for size in sizes:
        if x + size > width and x > 4:
            rows, x = rows + 1, 4
        x += size
    canvas = Image.new("RGB", (width, blended.height + 16 * rows + 4), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = 4, blended.height + 4
    for (colour, name), size in zip(entries, sizes):
        if x + size > width and x > 4:
            x, y = 4, y + 16
        draw.rectangle([x, y + 1, x + 11, y + 12], fill=colour, outline="black")
        draw.text((x + 15, y), name, fill="black")
        x += size
    return np.asarray(canvas)


def save_jpeg(path: Path, array: np.ndarray) -> None:
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format="JPEG", quality=90)


# --------------------------------------------------------------------------- inference
def predict_batch(model, images: Sequence[np.ndarray], settings: InferenceSettings,
                  device: torch.device) -> list[np.ndarray]:
    """Label maps (H, W) uint8 of equal-size RGB images, as stage 5's ``predict_image``."""
    x = normalize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)).to(device)
    with runtime.autocast(device, settings.amp):
        probs = predict_probs(model, x, settings.scales, settings.flip, settings.mode,
                              settings.crop_size, settings.stride)
    probs = probs.float().cpu().numpy()
    out = []
    for image, p in zip(images, probs):
        if settings.crf_params is not None:
            p = crf_posterior(image, p, settings.crf_params)
        out.append(p.argmax(0).astype(np.uint8))
    return out


class Progress:
    """``predict 12/40 [#####.....] 3.1 img/s`` on one line of a terminal, else a line about
    every 10 %."""

    def __init__(self, total: int, stream=None, width: int = 30):
        stream = sys.stderr if stream is None else stream     # the current stderr, not import time's
        self.total, self.stream, self.width = total, stream, width
        self.start, self.last, self.first = time.time(), 0, None
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int) -> None:
        """Report ``done`` of ``total``; the first call sets the base of the rate (images
        already there are not counted as work)."""
        if self.first is None:
            self.first, self.start, self.last = done, time.time(), done
            if not self.tty:
                return
        if not self.total:
            return
        step = max(1, self.total // 10)
        if not self.tty and done != self.total and done // step == self.last // step:
            return
        self.last = done
        rate = (done - self.first) / max(time.time() - self.start, 1e-9)
        bar = "#" * (self.width * done // self.total)
        line = f"predict {done}/{self.total} [{bar.ljust(self.width, '.')}] {rate:.1f} img/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def predict_files(loaded: LoadedModel, files: Sequence[tuple[Path, str]], out_dir: Path,
                  settings: InferenceSettings, device: torch.device, batch_size: int = 4,
                  overlays: bool = False, say: Callable[[str], None] | None = None,
                  progress: Progress | None = None) -> Report:
    """Predict every (file, name) into ``out_dir`` (module docstring); returns what happened."""
    out_dir = Path(out_dir)
    say = say or (lambda text: print(text, file=sys.stderr))
    report = Report()

    def outputs(name: str) -> list[Path]:
        paths = [out_dir / f"{name}.png"]
        return paths + [out_dir / f"{name}.overlay.jpg"] if overlays else paths

    todo = []
    for path, name in files:
        if all(p.is_file() for p in outputs(name)):
            report.skipped_existing.append(name)
        else:
            todo.append((path, name))
    done = len(report.skipped_existing)
    progress = progress or Progress(len(files))
    progress.update(done)
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        preds = predict_batch(loaded.model, [image for _, image in batch], settings, device)
        for (name, image), pred in zip(batch, preds):
            save_label_png(out_dir / f"{name}.png", pred)
            if overlays:
                save_jpeg(out_dir / f"{name}.overlay.jpg", legend_overlay(image, pred, loaded.class_names))
            report.written.append(name)
        done += len(batch)
        progress.update(done)
        batch.clear()

    for path, name in todo:
        try:
            image = load_photo(path)
        except InputError as err:
            report.failed.append((str(path), str(err)))
            say(f"wsss predict: skipped {path}: {err}")
            done += 1
            progress.update(done)
            continue
        if batch and (batch[0][1].shape != image.shape or len(batch) >= batch_size):
            flush()
        batch.append((name, image))
    flush()
    return report
